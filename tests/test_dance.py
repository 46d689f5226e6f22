"""DANCE on real (tiny) data: 2 pre-trained experts farmed on scikit-learn digits into a temporary store."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

import raydd.methods.dance  # noqa: F401  (registers "dance")
from raydd.methods import get_method, make_config
from raydd.methods.dance import DANCE, DANCEConfig, decode_tiles, encode_tiles
from raydd.store import TrajectoryStore

pytestmark = pytest.mark.usefixtures("single_thread")


def config(ipc: int = 2, **overrides) -> DANCEConfig:
    return make_config("dance", "digits", ipc, **{"num_experts": 2, **overrides})


def test_losses_go_down_on_fixed_encoders(digits, pretrain_experts):
    train, _ = digits
    default = DANCE(config(), train, pretrain_experts, device="cpu")
    assert default.factor == 2 and default.lr_img == pytest.approx(0.02)  # paper: l = 2, lr 0.01 x IPC
    method = DANCE(config(lr_img=0.1), train, pretrain_experts, device="cpu", seed=0)

    def fixed():  # same experts, λ, real batches, subsets and augmentations every time
        match = sum(method.matching_loss(e, lam, seed=5) for e in range(2) for lam in (0.2, 0.8))
        return match, method.calibration_loss(0, seed=5)

    match_before, calib_before = fixed()
    metrics = [method.step() for _ in range(8)]
    match_after, calib_after = fixed()
    assert method.iteration == 8
    assert match_after < 0.9 * match_before, (match_before, match_after)
    assert calib_after < calib_before, (calib_before, calib_after)
    for m in metrics:
        assert {"loss", "pltda_loss", "calib_loss", "lam", "grad_norm_img", "time_s", "rss_peak_mb"} <= set(m)
        assert 0 <= m["lam"] <= 1 and math.isfinite(m["calib_loss"])


def test_mid_encoder_lambda_range_and_calibration_interval(digits, pretrain_experts):
    train, _ = digits
    cfg = config(lam=0.3, calib_interval=3)  # shared symbol λ -> lam_max
    assert cfg.lam_max == 0.3
    method = DANCE(cfg, train, pretrain_experts, device="cpu", seed=1)
    expert = method.experts[0]
    assert expert.final_epoch == 3 and not torch.equal(expert.initial, expert.final)
    assert torch.equal(method.mid_encoder(expert, 1.0), expert.initial)  # Eq. 3: λ=1 is φ_0
    assert torch.equal(method.mid_encoder(expert, 0.0), expert.final)
    assert torch.allclose(method.mid_encoder(expert, 0.25), 0.25 * expert.initial + 0.75 * expert.final)
    metrics = [method.step() for _ in range(3)]
    assert all(0 <= m["lam"] <= 0.3 for m in metrics)
    calibrated = [math.isfinite(m["calib_loss"]) for m in metrics]
    assert calibrated == [False, False, True]  # Algorithm 1: i % I_c == 0, i counted from 1
    off = DANCE(config(calib_interval=0), train, pretrain_experts, device="cpu", seed=1)
    assert math.isnan(off.step()["calib_loss"])


def test_factoring_decodes_ipc_times_l_squared_images(digits, pretrain_experts):
    train, _ = digits
    method = DANCE(config(ipc=3), train, pretrain_experts, device="cpu", seed=2)
    assert method.images.shape == (30, 1, 8, 8)  # the encoded state: IPC stored images per class
    syn = method.synthetic_set()
    assert syn.images.shape == (120, 1, 8, 8)  # decoded: IPC·l² = 12 per class at full resolution
    assert syn.labels.tolist() == [c for c in range(10) for _ in range(12)]
    assert syn.method == "dance" and syn.meta["factor"] == 2 and syn.meta["encoded_shape"] == [30, 1, 8, 8]
    # IDC init: every decoded image is an up-sampled, down-sampled real image of its own class
    x, y = method.decoded()
    for i in (0, 5, 61, 119):
        reals = train.images[train.labels == int(y[i])]
        expected = F.interpolate(F.interpolate(reals, size=(4, 4), mode="nearest"), size=(8, 8), mode="bilinear")
        assert (expected - x[i]).abs().flatten(1).amax(1).min() < 1e-5

    plain = DANCE(config(ipc=3, factor=1), train, pretrain_experts, device="cpu", seed=2)
    assert plain.synthetic_set().images.shape == (30, 1, 8, 8)


def test_tile_codec_geometry():
    fill = torch.tensor([0.5])
    constant = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 8, 8)  # 4 images -> 1 stored image of 2x2 tiles
    packed = encode_tiles(constant, 2, fill)
    assert packed.shape == (1, 1, 8, 8)
    assert packed[0, 0, :4, :4].eq(0).all() and packed[0, 0, :4, 4:].eq(1).all() and packed[0, 0, 4:, :4].eq(2).all()
    decoded = decode_tiles(packed, 2, fill)
    assert decoded.shape == (4, 1, 8, 8) and torch.equal(decoded, constant.contiguous())  # tile-major order
    odd = decode_tiles(torch.randn(2, 3, 7, 9, requires_grad=True), 3, torch.zeros(3))  # padded to 9x9
    assert odd.shape == (18, 3, 7, 9)
    assert torch.equal(decode_tiles(constant, 1, fill), constant)


def test_errors_are_one_line_value_errors(digits, pretrain_experts, tmp_path):
    train, _ = digits
    cases = [
        (lambda: DANCE(config(ipc=35), train, pretrain_experts, device="cpu"),
         r"ipc=35 with factor=2 needs 140 real images per class.*smallest class of digits has 139"),
        (lambda: DANCE(config(ipc=200, factor=1), train, pretrain_experts, device="cpu"), r"ipc=200 is larger"),
        (lambda: DANCE(config(), train, TrajectoryStore(tmp_path / "empty"), device="cpu"),
         r"no trajectories .* kind=pretrain.*raydd farm --recipe pretrain --dataset digits"),
        (lambda: DANCE(config(num_experts=5), train, pretrain_experts, device="cpu"), r"num_experts=5 but only 2"),
        (lambda: DANCE(config(model="convnet3-w128-in"), train, pretrain_experts, device="cpu"),
         r"model=convnet3-w128-in"),
        (lambda: get_method("dance")(config(), train, None, device="cpu"), "pass a TrajectoryStore"),
        (lambda: config(bogus=1), r"unknown DANCEConfig knob 'bogus'.*lam \(= lam_max\)"),
        (lambda: config(lam=1.5), r"lam_max=1.5 is out of range"),
        (lambda: config(factor=0), r"factor=0 is out of range"),
        (lambda: config(pix_init="zeros"), r"pix_init='zeros' is invalid"),
        (lambda: DANCE(config(factor=9), train, pretrain_experts, device="cpu"), r"factor=9 is larger than"),
    ]
    for build, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as err:
            build()
        assert "\n" not in str(err.value)


def test_step_per_class_is_the_codes_loop(digits, pretrain_experts):
    """step_per_class=True (DANCE.py's loop): an optimiser step after each class's Eq. 4 term and each class's
    Eq. 5 term; the default (Algorithm 1): one step per loss. The stored images start as pixels in [0, 1]."""
    train, _ = digits
    k = train.info.num_classes
    counts = {}
    for per_class in (False, True):
        method = DANCE(config(step_per_class=per_class, lr_img=5.0), train, pretrain_experts, device="cpu", seed=0)
        assert not method.embed_together
        pixels = method.images.detach()
        assert float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0 and float(pixels.std()) > 0.1
        calls = []
        step = method.optimizer.step
        method.optimizer.step = lambda *a, **kw: (calls.append(1), step(*a, **kw))[1]
        metrics = method.step()
        counts[per_class] = len(calls)
        assert math.isfinite(metrics["grad_norm_img"]) and metrics["grad_norm_img"] > 0
    assert counts == {False: 2, True: 2 * k}
