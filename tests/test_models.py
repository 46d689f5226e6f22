"""Models: specs rebuild exact modules; flat parameters round-trip; the functional forward matches."""
from __future__ import annotations

import pytest
import torch

from raydd.models import FlatModel, ModelSpec, ParamLayout, build_model, flatten_buffers, flatten_params, \
    load_flat_params

SPECS = [
    ModelSpec(channels=3, resolution=32),
    ModelSpec(channels=1, resolution=28, norm="batch", width=16),
    ModelSpec(channels=1, resolution=8, width=16),
    ModelSpec(channels=3, resolution=64, width=8, norm="none", pooling="max"),
    ModelSpec(arch="resnet10", channels=3, resolution=16, width=8, norm="batch"),
    ModelSpec(arch="resnet18", channels=1, resolution=28, width=8, norm="instance"),
    ModelSpec(arch="vgg11", channels=1, resolution=28, width=8),
    ModelSpec(arch="alexnet", channels=3, resolution=16, width=16, norm="batch"),
]


def test_reference_parameter_counts():
    # ConvNet-3 width 128 of the DC/MTT reference code: 320,010 parameters on CIFAR, 317,706 on (Fashion-)MNIST.
    assert ParamLayout.of_parameters(build_model(ModelSpec(channels=3, resolution=32))).numel == 320_010
    assert ParamLayout.of_parameters(build_model(ModelSpec(channels=1, resolution=28))).numel == 317_706
    assert ParamLayout.of_parameters(build_model(ModelSpec(arch="resnet18", norm="batch"))).numel == 11_173_962


def test_vgg11_and_alexnet_are_the_reference_small_image_networks():
    # DC's networks.py VGG11 (instance norm) and AlexNet (no norm) on CIFAR-10: 9,231,114 and 1,872,202
    # parameters; 28x28 one-channel inputs are padded in the first convolution to the maps of 32x32 ones
    vgg, alex = ModelSpec(arch="vgg11"), ModelSpec(arch="alexnet")
    assert (vgg.norm, vgg.width, vgg.name, alex.norm, alex.width, alex.name) == \
           ("instance", 64, "vgg11-in", "none", 128, "alexnet-nn")
    assert ParamLayout.of_parameters(build_model(vgg)).numel == 9_231_114
    assert ParamLayout.of_parameters(build_model(alex)).numel == 1_872_202
    mnist_alex = build_model(ModelSpec(arch="alexnet", channels=1, resolution=28))
    assert mnist_alex.feature_dim == 192 * 4 * 4 and mnist_alex(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert build_model(ModelSpec(arch="vgg11", channels=1, resolution=28)).feature_dim == 512
    assert ModelSpec.from_dict({"arch": "vgg11", "norm": "batch"}).name == "vgg11-bn"
    from raydd.models.spec import fields_from_name

    assert fields_from_name("alexnet-bn") == {"arch": "alexnet", "width": 128, "norm": "batch"}
    with pytest.raises(ValueError, match="model vgg11 does not fit 8x8 images: its max-pools leave no pixel"):
        ModelSpec(arch="vgg11", channels=1, resolution=8)


def test_default_depth_follows_resolution():
    assert ModelSpec(resolution=32).depth == 3 and ModelSpec(resolution=28).depth == 3
    assert ModelSpec(resolution=64).depth == 4 and ModelSpec(resolution=128).depth == 5
    assert ModelSpec(resolution=8).depth == 2


def test_instance_norm_over_one_pixel_maps_is_refused():
    """GroupNorm(C, C) over a 1x1 map outputs its bias whatever the input: such a network is refused."""
    for fields, fix in [({"arch": "resnet18"}, "resnet18-bn"), ({"depth": 4}, "convnet4-w128-bn")]:
        with pytest.raises(ValueError, match=rf"on 8x8 images instance-normalises 1x1 feature maps .*{fix}"):
            ModelSpec(channels=1, resolution=8, **fields)
    assert ModelSpec(arch="resnet18", resolution=8, norm="batch").last_norm_map() == (1, 1)
    assert ModelSpec(resolution=8, depth=3).last_norm_map() == (2, 2)  # allowed: 2x2 maps still vary
    net = build_model(ModelSpec(arch="resnet18", channels=1, resolution=8, norm="batch", width=8)).eval()
    assert not torch.allclose(net(torch.randn(2, 1, 8, 8))[0], net(torch.randn(2, 1, 8, 8))[1])


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_spec_round_trip_rebuilds_the_same_module(spec):
    again = ModelSpec.from_dict(spec.to_dict())
    assert again == spec
    torch.manual_seed(0)
    a = build_model(spec)
    torch.manual_seed(0)
    b = build_model(again)
    assert torch.equal(flatten_params(a), flatten_params(b))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_flat_round_trip_and_functional_forward(spec):
    torch.manual_seed(1)
    net = build_model(spec).eval()
    layout = ParamLayout.of_parameters(net)
    flat = flatten_params(net)
    assert flat.shape == (layout.numel,)
    x = torch.randn(3, spec.channels, *spec.resolution)
    flat = flat.clone().requires_grad_(True)
    out = FlatModel(net)(flat, x)
    torch.testing.assert_close(out, net(x))
    torch.testing.assert_close(FlatModel(net).embed(flat, x), net.embed(x))
    out.square().sum().backward()
    assert flat.grad is not None and flat.grad.abs().sum() > 0
    # unflatten -> flatten is the identity, and loading a flat vector changes the module
    assert torch.equal(layout.flatten(layout.unflatten(flat.detach())), flat.detach())
    other = torch.randn_like(flat)
    load_flat_params(net, other, flatten_buffers(net) if flatten_buffers(net).numel() else None)
    assert torch.equal(flatten_params(net), other)


def test_layout_serialises_as_plain_lists():
    net = build_model(ModelSpec(channels=1, resolution=8, width=4))
    layout = ParamLayout.of_parameters(net)
    assert ParamLayout.from_list(layout.to_list()) == layout
    assert layout.to_list()[0] == ["features.0.weight", [4, 1, 3, 3]]


def test_batchnorm_buffers_are_flattened():
    net = build_model(ModelSpec(channels=1, resolution=8, width=4, norm="batch"))
    assert ParamLayout.of_buffers(net).numel == 2 * 2 * 4  # running mean + var of two BN layers


@pytest.mark.parametrize("change, message", [
    ({"arch": "vgg16"}, "unknown model arch 'vgg16': accepted convnet, resnet10, resnet18, vgg11, alexnet"),
    ({"norm": "layer"}, "unknown model norm 'layer'"),
    ({"width": 0}, "model width=0 is invalid"),
    ({"resolution": (0, 8)}, "model resolution=(0, 8) is invalid"),
])
def test_bad_specs_fail_clearly(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelSpec(**change)


def test_wrong_flat_size_is_refused():
    layout = ParamLayout.of_parameters(build_model(ModelSpec(channels=1, resolution=8, width=4)))
    with pytest.raises(ValueError, match=f"expected \\({layout.numel},\\)"):
        layout.unflatten(torch.zeros(layout.numel + 1))
