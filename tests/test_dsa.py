import math

import pytest
import torch

from raydd.data.augment import DSA, DSA_OPS, DSAConfig, dsa_for_dataset
from raydd.data.augment.dsa import DSADraw, make_dsa


def _images(n=4, c=3, h=16, w=16, seed=0, dtype=torch.float32):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- config


def test_config_defaults_match_reference():
    c = DSAConfig()
    assert c.ops == ("color", "crop", "cutout", "flip", "scale", "rotate")
    assert (c.scale, c.rotate_degrees, c.crop_pad_fraction, c.cutout_fraction) == (1.2, 15.0, 0.125, 0.5)
    assert (c.brightness, c.saturation, c.contrast) == (1.0, 2.0, 0.5)
    assert c.single_per_call is True


def test_unknown_op_lists_accepted_ones():
    with pytest.raises(ValueError) as info:
        DSAConfig(strategy="color_blur")
    msg = str(info.value)
    assert "blur" in msg and all(op in msg for op in DSA_OPS)
    assert "\n" not in msg


@pytest.mark.parametrize("strategy", ["", "   ", "color__crop", "flip_flip", 3])
def test_bad_strategy(strategy):
    with pytest.raises(ValueError, match="strategy"):
        DSAConfig(strategy=strategy)


@pytest.mark.parametrize(
    "field,value",
    [
        ("scale", 0.0),
        ("scale", 0.9),
        ("rotate_degrees", 0.0),
        ("rotate_degrees", -5.0),
        ("rotate_degrees", 200.0),
        ("crop_pad_fraction", 0.0),
        ("crop_pad_fraction", 1.0),
        ("cutout_fraction", -0.5),
        ("cutout_fraction", 1.5),
        ("brightness", 0.0),
        ("saturation", -1.0),
        ("contrast", float("nan")),
        ("contrast", "0.5"),
        ("brightness", True),
        ("single_per_call", 1),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DSAConfig(**{field: value})


def test_without_flip():
    assert DSAConfig().without_flip().strategy == "color_crop_cutout_scale_rotate"
    assert DSAConfig(strategy="flip").without_flip().strategy == "none"
    c = DSAConfig(strategy="crop_scale", scale=1.5)
    assert c.without_flip() == c


def test_none_strategy_is_identity():
    x = _images()
    assert DSAConfig(strategy="none").ops == ()
    assert torch.equal(DSA(DSAConfig(strategy="none"))(x, seed=1), x)


def test_dsa_for_dataset_flip_policy():
    assert "flip" not in dsa_for_dataset("mnist").ops
    assert "flip" not in dsa_for_dataset("MNIST").ops
    assert "flip" not in dsa_for_dataset("digits").ops
    for name in ("fashion_mnist", "FashionMNIST", "cifar10", "svhn"):
        assert "flip" in dsa_for_dataset(name).ops, name
    custom = DSAConfig(strategy="flip_rotate", rotate_degrees=30.0)
    d = dsa_for_dataset("mnist", custom)
    assert d.config.strategy == "rotate" and d.config.rotate_degrees == 30.0
    with pytest.raises(ValueError, match="dataset_name"):
        dsa_for_dataset("")


# ----------------------------------------------------------------------------- behaviour


def test_rejects_bad_inputs():
    d = DSA(DSAConfig())
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        d(torch.rand(3, 16, 16), seed=0)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        d(torch.zeros(2, 3, 8, 8, dtype=torch.int64), seed=0)
    with pytest.raises(ValueError, match="both seed and generator"):
        d(_images(), seed=0, generator=torch.Generator())
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="seed"):
            d(_images(), seed=bad)
    with pytest.raises(ValueError, match="generator"):
        d(_images(), generator=3)


@pytest.mark.parametrize("strategy", list(DSA_OPS) + ["color_crop_cutout_flip_scale_rotate"])
@pytest.mark.parametrize("single", [True, False])
def test_same_seed_same_output_and_shape(strategy, single):
    d = DSA(DSAConfig(strategy=strategy, single_per_call=single))
    x = _images()
    y1, y2 = d(x, seed=7), d(x, seed=7)
    assert y1.shape == x.shape and y1.dtype == x.dtype
    assert torch.equal(y1, y2)


def test_different_seeds_differ():
    d = DSA(DSAConfig())
    x = _images()
    outs = [d(x, seed=s) for s in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(outs[i], outs[j]), (i, j)


@pytest.mark.parametrize("strategy", list(DSA_OPS) + ["color_crop_cutout_flip_scale_rotate"])
@pytest.mark.parametrize("single", [True, False])
def test_siamese_transform_independent_of_batch(strategy, single):
    """Same seed => same transform for real and synthetic batches of different sizes."""
    d = DSA(DSAConfig(strategy=strategy, single_per_call=single))
    x, other = _images(n=3, seed=1), _images(n=5, seed=2)
    for seed in range(5):
        small = d(x, seed=seed)
        big = d(torch.cat([x, other]), seed=seed)
        torch.testing.assert_close(big[:3], small, rtol=0, atol=1e-6)


@pytest.mark.parametrize("strategy", ["crop", "cutout", "scale", "rotate", "color"])
def test_siamese_shares_params_generator_does_not(strategy):
    d = DSA(DSAConfig(strategy=strategy))
    x = _images(n=1).expand(8, -1, -1, -1).contiguous()
    y = d(x, seed=3)
    assert torch.allclose(y, y[:1].expand_as(y))
    z = d(x, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(z, z[:1].expand_as(z))


def test_generator_mode_is_reproducible():
    d = DSA(DSAConfig())
    x = _images()
    a = d(x, generator=torch.Generator().manual_seed(11))
    b = d(x, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, b)


def test_global_rng_untouched():
    d = DSA(DSAConfig(single_per_call=False))
    x = _images()
    state = torch.get_rng_state()
    d(x, seed=5)
    d(x, generator=torch.Generator().manual_seed(1))
    d(x)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("strategy", DSA_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_flow(strategy, dtype):
    d = DSA(DSAConfig(strategy=strategy))
    x = _images(dtype=dtype).requires_grad_()
    for seed in range(3):
        x.grad = None
        y = d(x, seed=seed)
        (y * torch.linspace(0, 1, y.numel(), dtype=dtype).view_as(y)).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("strategy", DSA_OPS)
def test_gradcheck(strategy):
    d = DSA(DSAConfig(strategy=strategy))
    x = _images(n=2, c=2, h=6, w=6, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: d(t, seed=4), (x,), eps=1e-6, atol=1e-5)


def test_dtype_does_not_change_transform():
    d = DSA(DSAConfig(single_per_call=False))
    x = _images(dtype=torch.float64)
    torch.testing.assert_close(d(x.float(), seed=9).double(), d(x, seed=9), rtol=0, atol=1e-4)


def test_flip_op_is_flip_or_identity():
    d = DSA(DSAConfig(strategy="flip"))
    x = _images(n=6)
    seen = set()
    for seed in range(10):
        y = d(x, seed=seed)
        flipped = torch.equal(y, x.flip(3))
        assert flipped or torch.equal(y, x)
        seen.add(flipped)
    assert seen == {True, False}
    z = d(x, generator=torch.Generator().manual_seed(0))
    for i in range(6):
        assert torch.equal(z[i], x[i]) or torch.equal(z[i], x[i].flip(2))


def test_crop_is_integer_translation_with_zero_fill():
    d = DSA(DSAConfig(strategy="crop"))
    x = _images(n=2, h=16, w=16) + 1.0  # strictly positive so zero fill is visible
    for seed in range(8):
        y = d(x, seed=seed)
        found = False
        for dh in range(-2, 3):  # int(16 * 0.125 + 0.5) == 2
            for dw in range(-2, 3):
                ref = torch.zeros_like(x)
                src = x[:, :, max(dh, 0):16 + min(dh, 0), max(dw, 0):16 + min(dw, 0)]
                ref[:, :, max(-dh, 0):16 + min(-dh, 0), max(-dw, 0):16 + min(-dw, 0)] = src
                found = found or torch.equal(y, ref)
        assert found, seed


def test_cutout_zeroes_a_square_region():
    d = DSA(DSAConfig(strategy="cutout", cutout_fraction=0.5))
    x = _images(n=2) + 1.0
    for seed in range(6):
        y = d(x, seed=seed)
        zero = y == 0
        assert torch.equal(zero[:, :1].expand_as(zero), zero)  # same mask over channels
        assert torch.equal(y[~zero], x[~zero])
        rows, cols = zero[0, 0].any(1), zero[0, 0].any(0)
        assert 0 < rows.sum() <= 8 and 0 < cols.sum() <= 8
        assert zero[0, 0].sum() == rows.sum() * cols.sum()  # a rectangle


def test_rotate_and_scale_keep_the_centre():
    x = torch.zeros(1, 1, 17, 17)
    x[..., 8, 8] = 1.0
    for strategy in ("rotate", "scale"):
        y = DSA(DSAConfig(strategy=strategy))(x, seed=2)
        assert y.argmax().item() == 8 * 17 + 8
    small = DSA(DSAConfig(strategy="rotate", rotate_degrees=1e-4))
    torch.testing.assert_close(small(_images(), seed=0), _images(), atol=1e-3, rtol=0)


def test_color_only_affects_values_not_geometry():
    d = DSA(DSAConfig(strategy="color"))
    x = torch.ones(2, 3, 8, 8)
    y = d(x, seed=1)  # constant image stays constant (no spatial change)
    assert torch.allclose(y, y[:, :, :1, :1].expand_as(y))
    assert not torch.allclose(y, x)
    assert math.isfinite(y.sum().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    d = DSA(DSAConfig(single_per_call=False))
    x = _images()
    torch.testing.assert_close(d(x.cuda(), seed=3).cpu(), d(x, seed=3), rtol=0, atol=1e-5)


def test_align_corners_is_the_same_map_on_square_images_and_the_mtt_family_defaults_to_the_references():
    """MTT's and DATM's code sample scale/rotate with align_corners=True, DSA's code with torch's default
    False: on square images one map (rounding apart), so the knob changes rounding only; the MTT family
    follows its reference code (benchmarks/reference_equivalence.py measured the rounding's effect)."""
    from raydd.methods import make_config

    x = torch.randn(3, 2, 9, 9, generator=torch.Generator().manual_seed(0))
    draws = {"scale": (torch.tensor([0.9, 0.1, 0.5], dtype=torch.float64),) * 2,
             "rotate": (torch.tensor([0.95, 0.2, 0.6], dtype=torch.float64),)}
    on, off = DSA(DSAConfig(align_corners=True)), DSA(DSAConfig())
    for op, values in draws.items():
        a, b = on.apply(x, DSADraw((op,), {op: values})), off.apply(x, DSADraw((op,), {op: values}))
        assert torch.allclose(a, b, atol=1e-5) and not torch.equal(a, x)
    assert make_config("mtt", "digits", 1).dsa_align_corners is True
    assert make_config("datm", "digits", 1).dsa_align_corners is True
    assert make_dsa(flip_ok=True, align_corners=True).config.align_corners is True
    with pytest.raises(ValueError, match="DSAConfig.align_corners='yes' is invalid"):
        DSAConfig(align_corners="yes")


@pytest.mark.parametrize("strategy", ["crop", "color_crop_cutout", "crop_scale"])
@pytest.mark.parametrize("single", [True, False])
def test_one_channel_output_is_in_row_major_strides(strategy, single):
    """The crop's gather leaves a one-channel batch in strides the convolution reads as channels-last (another
    kernel, whose CPU input gradient was 8e-4 off in float32 where the row-major one's is 2e-7 off): every
    call, and the table path, hands on row-major strides."""
    d = make_dsa(strategy, flip_ok=True, single_per_call=single)
    x = _images(n=6, c=1, h=12, w=12)
    row_major = torch.empty(x.shape).stride()
    for seed in range(6):
        assert d(x, seed=seed).stride() == row_major
    g = torch.Generator().manual_seed(0)
    draws = [d.draw(g, 3, x.shape[-2:]) for _ in range(2)]
    table = d.table(draws, [3, 3])
    out = d.apply_table(x, table)
    assert out.stride() == row_major
    assert torch.equal(out, torch.cat([d.apply(x[:3], draws[0]), d.apply(x[3:], draws[1])]))
