"""DM (distribution matching): objective goes down, exact resume, config validation."""
from __future__ import annotations

import pytest
import torch

import raydd.methods.dm  # noqa: F401  (registers "dm")
from raydd.methods.base import get_method, make_config
from raydd.methods.dm import DM, DMConfig

pytestmark = pytest.mark.usefixtures("single_thread")


# Small and quick: ConvNet-2 width 32 on 8x8 digits, 64 real images per class.
SMALL = dict(width=32, depth=2, batch_real=64)


def _dm(train, **overrides) -> DM:
    cfg = make_config("dm", "digits", 2, **{**SMALL, **overrides})
    return get_method("dm")(cfg, train, seed=3, device="cpu")


def test_defaults_follow_the_paper():
    cfg = make_config("dm", "cifar10", 10)
    assert (cfg.lr_img, cfg.momentum, cfg.batch_real, cfg.init, cfg.dsa) == (1.0, 0.5, 256, "real", True)
    assert DMConfig.default_iterations == 20000
    from raydd.data.datasets import DatasetInfo

    info = DatasetInfo("cifar10", 3, (32, 32), 10, (0.5,) * 3, (0.25,) * 3)
    assert cfg.model_spec(info).name == "convnet3-w128-in"


def test_loss_goes_down_on_fixed_embedders(digits):
    train, _ = digits
    method = _dm(train)
    seeds = range(100, 104)  # fixed embedders, real batches and augmentations, never used for training
    before = [method.matching_loss(s) for s in seeds]
    for _ in range(6):
        metrics = method.step()
        assert set(metrics) >= {"loss", "loss_per_class", "grad_norm_img", "time_s"}
    after = [method.matching_loss(s) for s in seeds]
    assert all(a < b for a, b in zip(after, before)), (before, after)
    assert sum(after) < 0.8 * sum(before), (before, after)
    assert method.matching_loss(100) == after[0]  # measuring does not consume the method's RNG


def test_embedder_is_frozen_and_reseeded(digits):
    train, _ = digits
    method = _dm(train)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = method._embedder(g1), method._embedder(g2)
    assert all(not p.requires_grad for p in a.parameters())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = method._embedder(g1)  # the next draw is a different network
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_noise_init_and_batchnorm_embedder(digits):
    train, _ = digits
    method = _dm(train, init="noise", norm="batch", width=16, dsa=False)
    loss = method.step()["loss"]
    assert loss > 0 and torch.isfinite(method.images).all()


def test_bad_input(digits):
    train, _ = digits
    with pytest.raises(ValueError, match="ipc=500 is larger than the smallest class"):
        get_method("dm")(make_config("dm", "digits", 500), train, device="cpu")
    with pytest.raises(ValueError, match="unknown DMConfig knob 'lr_net'"):
        make_config("dm", "digits", 1, lr_net=0.01)
    with pytest.raises(ValueError, match="init='zeros' is invalid"):
        make_config("dm", "digits", 1, init="zeros")
    with pytest.raises(ValueError, match="lr_img=0.0 is out of range"):
        make_config("dm", "digits", 1, lr_img=0)
    with pytest.raises(ValueError, match="norm='layer' is invalid"):
        make_config("dm", "digits", 1, norm="layer")
