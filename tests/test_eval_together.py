"""The evaluation networks trained together (one vmapped computation) are the networks trained one by one."""
from __future__ import annotations

import pytest
import torch

from raydd.data.augment import make_dsa
from raydd.evaluation.standard import EvalConfig, fresh_network, networks_together, train_and_test
from raydd.training import NetworkStack, evaluate_model, evaluate_together, train_epoch, train_epoch_together

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")


def _run(subset, test, **fields):
    config = EvalConfig(model={"arch": "convnet", "width": 16}, num_models=3, epochs=12, device="cpu", **fields)
    return train_and_test(subset.images, subset.labels, test, subset.info, config, lr=0.01)


def test_together_gives_each_network_its_one_by_one_accuracy(digits):
    train, test = digits
    subset = train.per_class(4, seed=0)
    one = _run(subset, test, together=False)
    together = _run(subset, test, together=True)
    assert not one.extra["networks_together"] and together.extra["networks_together"]
    assert len(set(one.accuracies)) > 1  # three different networks, not one network three times
    tolerance = 1.0 / len(test.labels) + 1e-12  # a rounding difference may flip one test image, no more
    assert together.accuracies == pytest.approx(one.accuracies, abs=tolerance)
    assert together.train_accuracies == pytest.approx(one.train_accuracies, abs=1.0 / len(subset.labels) + 1e-12)


def test_together_with_soft_labels(digits):
    train, test = digits
    subset = train.per_class(3, seed=1)
    soft = torch.softmax(torch.randn(len(subset.labels), 10, generator=torch.Generator().manual_seed(0)), 1)
    config = EvalConfig(model={"arch": "convnet", "width": 16}, num_models=2, epochs=6, device="cpu")
    results = [train_and_test(subset.images, soft, test, subset.info, EvalConfig(**{**config.to_dict(), "together": t}),
                              lr=0.01) for t in (False, True)]
    assert results[1].accuracies == pytest.approx(results[0].accuracies, abs=1.0 / len(test.labels) + 1e-12)


@pytest.mark.parametrize("model", ["convnet-bn", "resnet10-bn", "convnet"])
def test_one_epoch_together_equals_one_by_one_to_float_tolerance(digits, model):
    """Parameters and BatchNorm running statistics after two epochs with augmentation, in float64: each
    network's slice is the network trained alone to 1e-10, so the two are the same computation. (In float32
    the grouped convolutions round differently; a BN ResNet on 8x8 images, whose last BatchNorms normalise
    1x1 maps, amplifies that to ~1e-4 within a few steps — rounding, not a different algorithm.)"""
    train, test = digits
    subset = train.per_class(8, seed=0)
    images = subset.images.double()
    spec = EvalConfig(model=model).model_spec(subset.info)
    dsa = make_dsa("color_crop_cutout_flip_scale_rotate", flip_ok=False)
    augment = lambda x, g: dsa(x, generator=g)  # noqa: E731
    alone = [(net.double(), gen) for net, gen in (fresh_network(spec, seed, CPU) for seed in (3, 4))]
    joint = [(net.double(), gen) for net, gen in (fresh_network(spec, seed, CPU) for seed in (3, 4))]
    for net, gen in alone:
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        for _ in range(2):
            train_epoch(net, opt, images, subset.labels, batch_size=32, generator=gen, device=CPU,
                        augment=augment)
    stack = NetworkStack([net for net, _ in joint])
    opt = torch.optim.SGD(stack.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        stats = train_epoch_together(stack, opt, images, subset.labels, batch_size=32,
                                     generators=[g for _, g in joint], device=CPU, augment=augment)
    stack.write_back()
    for (a, _), (b, _) in zip(alone, joint):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.allclose(x.float(), y.float(), rtol=0, atol=1e-10), name
    assert not torch.allclose(next(alone[0][0].parameters()), next(alone[1][0].parameters()))  # two networks
    test_images = test.images.double()
    tests = evaluate_together(stack, test_images, test.labels, device=CPU)
    for (net, _), joint_stats in zip(joint, tests):
        own = evaluate_model(net, test_images, test.labels, device=CPU)
        assert joint_stats.acc == own.acc
        assert joint_stats.loss == pytest.approx(own.loss, rel=1e-10)
    assert len(stats) == 2


def test_together_auto_is_cuda_at_ipc1_only_and_bad_values_are_one_line(digits):
    train, test = digits
    subset = train.per_class(2, seed=0)
    auto = _run(subset, test)
    assert auto.extra["networks_together"] is False  # CPU: one by one unless asked
    cuda = torch.device("cuda")  # the rule only (no GPU needed): together on CUDA at IPC 1, else one by one
    assert networks_together(EvalConfig(), cuda, 10, 10) and not networks_together(EvalConfig(), cuda, 20, 10)
    assert not networks_together(EvalConfig(), CPU, 10, 10) and networks_together(EvalConfig(together=True), CPU, 500, 10)
    with pytest.raises(ValueError, match="EvalConfig.together='yes' is invalid"):
        EvalConfig(together="yes")
    with pytest.raises(ValueError, match="2 generators for 3 networks"):
        spec = EvalConfig().model_spec(subset.info)
        nets = [fresh_network(spec, s, CPU)[0] for s in range(3)]
        stack = NetworkStack(nets)
        train_epoch_together(stack, torch.optim.SGD(stack.parameters(), lr=0.1), subset.images, subset.labels,
                             batch_size=8, generators=[torch.Generator(), torch.Generator()], device=CPU)


def test_cli_flag_sets_together_and_other_protocols_refuse_it():
    from raydd.cli import build_parser
    from raydd.condense_cli import eval_config_from_args

    parse = build_parser().parse_args
    assert eval_config_from_args(parse(["evaluate", "x.safetensors", "--networks-together", "yes"]),
                                 "digits").together is True
    assert eval_config_from_args(parse(["evaluate", "x.safetensors", "--networks-together", "no"]),
                                 "digits").together is False
    assert eval_config_from_args(parse(["evaluate", "x.safetensors"]), "digits").together is None
    with pytest.raises(ValueError, match="unknown edc evaluation setting.*together"):
        eval_config_from_args(parse(["evaluate", "x.safetensors", "--protocol", "edc", "--networks-together",
                                     "no"]), "digits")
