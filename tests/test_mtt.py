"""MTT on real (tiny) data: 2 experts farmed on scikit-learn digits (the shared digits_experts store)."""
from __future__ import annotations

import pytest
import torch

from raydd.methods import MTT, get_method, make_config
from raydd.store import TrajectoryStore


pytestmark = pytest.mark.usefixtures("single_thread")


def small_config(**overrides):
    knobs = dict(syn_steps=8, expert_epochs=2, max_start_epoch=4, lr_img=100.0, lr_lr=1e-5)
    knobs.update(overrides)
    return make_config("mtt", "digits", 2, **knobs)


def test_matching_loss_goes_down_on_fixed_problems(digits, digits_experts):
    train, _ = digits
    method = MTT(small_config(), train, digits_experts, device="cpu", seed=0)
    problems = [(e.trajectory_id, t) for e in method.experts for t in (0, 2)]

    def fixed_loss():  # same experts, start epochs, minibatches and augmentations every time
        return sum(method.matching_loss(tid, t, seed=7) for tid, t in problems) / len(problems)

    before = fixed_loss()
    metrics = [method.step() for _ in range(15)]
    after = fixed_loss()
    assert method.iteration == 15
    assert after < 0.8 * before, (before, after)
    for m in metrics:
        assert {"loss", "syn_lr", "grad_norm_img", "peak_mem_mb", "time_s"} <= set(m)
        assert m["peak_mem_mb"] > 0


def test_unrolled_graph_memory_is_linear_in_steps(digits, digits_experts):
    train, _ = digits
    mem = {}
    for steps in (4, 8):
        method = MTT(small_config(syn_steps=steps, dsa=False), train, digits_experts, device="cpu", seed=0)
        mem[steps] = method.step()["graph_mem_mb"]
    ratio = mem[8] / mem[4]
    assert 1.7 < ratio < 2.2, mem


def test_zca_experts_and_space_mismatch(digits, digits_experts, farm_digits_experts, tmp_path):
    train, _ = digits
    with pytest.raises(ValueError, match="trained without ZCA.*--set zca=false") as err:
        MTT(small_config(zca=True), train, digits_experts, device="cpu")
    assert "\n" not in str(err.value)

    zca_store = farm_digits_experts(tmp_path / "zca", zca=True, trajectories=1, epochs=3)
    method = MTT(small_config(zca=None, max_start_epoch=1, syn_steps=3), train, zca_store, device="cpu")
    assert method.uses_zca
    method.step()
    syn = method.synthetic_set()
    assert syn.zca is not None and syn.dataset["zca"] is True
    pixels = syn.pixels()
    assert pixels.shape == syn.images.shape and torch.isfinite(pixels).all()
    with pytest.raises(ValueError, match="trained with ZCA.*--set zca=true"):
        MTT(small_config(zca=False, max_start_epoch=1), train, zca_store, device="cpu")


def test_store_checks_name_filters_and_farm_command(digits, digits_experts, tmp_path):
    train, _ = digits
    with pytest.raises(ValueError, match=r"raydd farm --recipe expert --dataset digits") as err:
        MTT(small_config(), train, TrajectoryStore(tmp_path / "empty"), device="cpu")
    assert "dataset=digits" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="model=convnet3-w128-in"):
        MTT(small_config(model="convnet3-w128-in"), train, digits_experts, device="cpu")
    with pytest.raises(ValueError, match=r"stores epochs t and t\+10 for some t < 50 \(longest stores up to epoch 6\)"):
        MTT(small_config(max_start_epoch=50, expert_epochs=10), train, digits_experts, device="cpu")
    with pytest.raises(ValueError, match="pass a TrajectoryStore"):
        get_method("mtt")(small_config(), train, None, device="cpu")


def test_synthetic_set_of_mtt(digits, digits_experts, tmp_path):
    train, _ = digits
    method = MTT(small_config(syn_steps=2), train, digits_experts, device="cpu", seed=1)
    method.step()
    syn = method.synthetic_set()
    assert syn.images.shape == (20, 1, 8, 8) and syn.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert syn.syn_lr == pytest.approx(float(method.syn_lr.detach()))
    assert syn.method == "mtt" and syn.iteration == 1 and syn.config["syn_steps"] == 2
    # experts' lr is the initial step size of the digits fallback (syn_lr_init=None)
    fresh = MTT(small_config(), train, digits_experts, device="cpu")
    assert float(fresh.syn_lr.detach()) == pytest.approx(0.01)
