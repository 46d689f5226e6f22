"""embed_classes_together (DM, DANCE, PTLM): every class in one real and one synthetic forward gives the
per-class path's gradients and updates (instance norm / no norm); refused with batch norm; per class on CPU
by default."""
from __future__ import annotations

import pytest
import torch

import raydd.methods.dance  # noqa: F401  (registers "dance")
import raydd.methods.dm  # noqa: F401  (registers "dm")
import raydd.methods.ptlm  # noqa: F401  (registers "ptlm")
from raydd.methods import get_method, make_config
from raydd.methods.base import embed_classes_together

pytestmark = pytest.mark.usefixtures("single_thread")

DM_SMALL = dict(width=32, depth=2, batch_real=64)
ATOL = 1e-5


def _pair(name, train, store=None, **knobs):
    """The same method twice (same seed): class by class, and every class together."""
    made = []
    for together in (False, True):
        cfg = make_config(name, "digits", 2, **{**knobs, "embed_classes_together": together})
        made.append(get_method(name)(cfg, train, store, device="cpu", seed=4))
    assert (made[0].embed_together, made[1].embed_together) == (False, True)
    return made


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.allclose(a, b, rtol=1e-5, atol=ATOL), float((a - b).abs().max())


@pytest.mark.parametrize("norm", ["instance", "none"])
def test_dm_together_equals_per_class(digits, norm):
    train, _ = digits
    per_class, together = _pair("dm", train, **DM_SMALL, norm=norm)
    _close(per_class.images, together.images)
    m0, m1 = per_class.step(), together.step()
    _close(per_class.images.grad, together.images.grad)  # ∇_S Σ_c L_c (eq. 4), same draws
    _close(per_class.images, together.images)  # the updated synthetic set
    assert m0["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    assert per_class.matching_loss(7) == pytest.approx(together.matching_loss(7), rel=1e-5)
    # the same generator state afterwards: the together path drew exactly what the per-class path drew
    assert torch.equal(per_class.generator.get_state(), together.generator.get_state())


def _grads(method, flat, loss) -> torch.Tensor:
    method.optimizer.zero_grad(set_to_none=True)
    loss(flat)
    grad = method.images.grad.clone()
    method.optimizer.zero_grad(set_to_none=True)
    return grad


@pytest.mark.parametrize("name", ["dance", "ptlm"])
def test_pretrained_dm_together_equals_per_class(digits, pretrain_experts, name):
    train, _ = digits
    per_class, together = _pair(name, train, pretrain_experts, num_experts=2)
    expert = per_class.experts[0]
    flat = 0.5 * expert.initial + 0.5 * expert.final
    targets = list(range(10))
    for method in (per_class, together):
        method.grads = [
            _grads(method, flat, lambda f: method._feature_matching(f, torch.Generator().manual_seed(3),
                                                                      backward=True)),
            _grads(method, expert.final, lambda f: method._classification(f, targets, torch.Generator().manual_seed(3),
                                                                           backward=True)),
        ]
    for g0, g1 in zip(per_class.grads, together.grads):
        _close(g0, g1)
    m0, m1 = per_class.step(), together.step()  # matching update, then calibration / pseudo-label update
    _close(per_class.images, together.images)
    for key in ("loss", "grad_norm_img"):
        assert m0[key] == pytest.approx(m1[key], rel=1e-4), key
    if name == "ptlm":
        assert m0["keep_fraction"] == m1["keep_fraction"] and m0["plm_classes"] == m1["plm_classes"]
        assert per_class.pseudo_label_loss(0, seed=2) == pytest.approx(together.pseudo_label_loss(0, seed=2), rel=1e-5)
    assert torch.equal(per_class.generator.get_state(), together.generator.get_state())


def test_default_is_per_class_on_cpu_and_together_on_cuda_where_exact(digits):
    train, _ = digits
    cfg = make_config("dm", "digits", 2, **DM_SMALL)
    assert cfg.embed_classes_together is None
    assert get_method("dm")(cfg, train, device="cpu", seed=0).embed_together is False
    cuda = torch.device("cuda")
    assert embed_classes_together("X.embed_classes_together", None, "instance", cuda) is True
    assert embed_classes_together("X.embed_classes_together", None, "none", cuda) is True
    assert embed_classes_together("X.embed_classes_together", None, "batch", cuda) is False  # not exact
    assert embed_classes_together("X.embed_classes_together", None, "instance", torch.device("cpu")) is False
    assert embed_classes_together("X.embed_classes_together", False, "instance", cuda) is False


def test_together_refused_with_batch_norm(digits, tmp_path):
    with pytest.raises(ValueError) as err:
        make_config("dm", "digits", 2, **DM_SMALL, norm="batch", embed_classes_together=True)
    message = str(err.value)
    assert "\n" not in message and "DMConfig.embed_classes_together=True" in message
    assert "batch" in message and "instance or none" in message
    make_config("dm", "digits", 2, norm="batch", embed_classes_together=False)  # today's BN branch: accepted
    with pytest.raises(ValueError, match="embed_classes_together"):
        make_config("dm", "digits", 2, embed_classes_together="yes")  # typed: a bool or null

    # DANCE / PTLM learn their norm from the store's experts: refused when the method is built
    from raydd.farm import FarmSpec, farm
    from raydd.store import TrajectoryStore

    farm(FarmSpec(store=str(tmp_path), dataset="digits", recipe="pretrain", backend="local", trajectories=1,
                  recipe_options={"epochs": 1, "batch_size": 64}, model={"width": 8, "depth": 2, "norm": "batch"}),
         progress=False)
    train, _ = digits
    store = TrajectoryStore(tmp_path)
    for name in ("dance", "ptlm"):
        cfg = make_config(name, "digits", 2, num_experts=1, embed_classes_together=True)
        with pytest.raises(ValueError) as err:
            get_method(name)(cfg, train, store, device="cpu")
        assert "\n" not in str(err.value) and f"{type(cfg).__name__}.embed_classes_together=True" in str(err.value)
        off = get_method(name)(make_config(name, "digits", 2, num_experts=1), train, store, device="cpu")
        assert off.embed_together is False
