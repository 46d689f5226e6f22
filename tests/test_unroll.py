"""unroll='checkpoint' (raydd/methods/unroll.py): the gradient of the full unroll, holding only segment starts;
unroll='tesla': TESLA's Eq. 5-6 gradient, equal to the full one for one step and first-order beyond."""
from __future__ import annotations

import math

import pytest
import torch

from raydd.methods import get_method, make_config
from raydd.methods.matching import normalised_distance
from raydd.methods.unroll import checkpointed_unroll, first_order_unroll, segment_length

pytestmark = pytest.mark.usefixtures("single_thread")


def toy_step(params, leaves, generator, pending, *, create_graph):
    """A student step with every ingredient of the real one: a minibatch queue refilled from the generator,
    a random augmentation draw, an inner gradient taken with create_graph, a learnable step size."""
    data, alpha = leaves
    if not pending:
        pending.extend(torch.randperm(len(data), generator=generator).split(3))
    idx = pending.pop(0)
    x = data[idx] * (1 + 0.1 * torch.rand(len(idx), 1, generator=generator, dtype=data.dtype))
    loss = torch.tanh(x @ params).pow(2).sum() + 0.01 * params.pow(4).sum()
    (grad,) = torch.autograd.grad(loss, params, create_graph=create_graph)
    params = params - alpha * grad
    return params if create_graph else params.detach().requires_grad_(True)


def full_unroll(theta, leaves, steps, generator):
    params, pending = theta.detach().clone().requires_grad_(True), []
    for _ in range(steps):
        params = toy_step(params, leaves, generator, pending, create_graph=True)
    return params


@pytest.mark.parametrize("segment", [0, 1, 3, 7, 50])
def test_checkpointed_gradient_equals_the_full_one(segment):
    torch.manual_seed(0)
    data = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    theta, target = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    results = []
    for unroll in (full_unroll, lambda t, lv, n, g: checkpointed_unroll(toy_step, t, lv, n, g, segment)):
        generator = torch.Generator().manual_seed(3)
        end = unroll(theta, [data, alpha], 11, generator)
        loss = (end - target).pow(2).sum()
        results.append((loss.detach(), *torch.autograd.grad(loss, [data, alpha]), generator.get_state()))
    (loss_f, gd_f, ga_f, state_f), (loss_c, gd_c, ga_c, state_c) = results
    assert torch.allclose(loss_f, loss_c, rtol=1e-12) and torch.allclose(gd_f, gd_c, rtol=1e-10, atol=1e-14)
    assert torch.allclose(ga_f, ga_c, rtol=1e-10) and torch.equal(state_f, state_c)  # same draws, same order
    assert segment_length(11, segment) == min(segment or 1, 11)


def toy_problem():
    torch.manual_seed(0)
    data = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    return data, alpha, torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)


def toy_gradients(unroll, steps):
    data, alpha, theta, target = toy_problem()
    generator = torch.Generator().manual_seed(3)
    end = unroll(theta, [data, alpha], steps, generator)
    loss = (end - target).pow(2).sum()
    return (loss.detach(), *torch.autograd.grad(loss, [data, alpha]), generator.get_state())


def eq6_unroll(theta, leaves, steps, generator):
    """TESLA's Eq. 5-6 written out: θ̂_N = θ̂_0 + Σ_n u_n with each update u_n = −α g_n differentiated at a
    fixed θ̂_n (computed without a graph), so dL/dS = Σ_n (∂u_n/∂S)ᵀ ∂L/∂θ̂_N."""
    params, pending, total = theta.detach().clone(), [], theta.detach().clone()
    for _ in range(steps):
        begin = params.detach().requires_grad_(True)
        update = toy_step(begin, leaves, generator, pending, create_graph=True) - begin
        total = total + update
        params = (begin + update).detach()
    return total


@pytest.mark.parametrize("steps", [1, 11])
def test_tesla_gradient_is_eq6_and_the_full_one_for_one_step(steps):
    loss_t, gd_t, ga_t, state_t = toy_gradients(lambda t, lv, n, g: first_order_unroll(toy_step, t, lv, n, g), steps)
    loss_e, gd_e, ga_e, state_e = toy_gradients(eq6_unroll, steps)
    loss_f, gd_f, ga_f, state_f = toy_gradients(full_unroll, steps)
    assert torch.allclose(loss_t, loss_f, rtol=1e-12) and torch.equal(state_t, state_f)  # same forward, same draws
    assert torch.allclose(gd_t, gd_e, rtol=1e-10, atol=1e-14) and torch.allclose(ga_t, ga_e, rtol=1e-10)
    if steps == 1:  # one step: no later step depends on S, Eq. 6 is exact
        assert torch.allclose(gd_t, gd_f, rtol=1e-10, atol=1e-14) and torch.allclose(ga_t, ga_f, rtol=1e-10)
    else:  # the critique of Eq. 6: later steps' Hessian terms are dropped, the gradient is not the full one
        assert (gd_t - gd_f).norm() > 1e-3 * gd_f.norm() and not torch.allclose(ga_t, ga_f, rtol=1e-3)


def small(name, unroll, **knobs):
    window = {"current_max_start_epoch": 2} if name == "datm" else {}
    return make_config(name, "digits", 2, **{"syn_steps": 7, "expert_epochs": 2, "max_start_epoch": 3,
                                             "unroll": unroll, **window, **knobs})


def method_gradients(name, digits, store, unroll, **knobs):
    """One matching problem of ``name`` (same expert, start epoch, minibatches, augmentations): its loss
    and its gradient in every leaf."""
    train, _ = digits
    config = small(name, unroll, **knobs)
    method = get_method(name)(config, train, store, device="cpu", seed=0)
    start, theta_start, theta_target = method.sample_segment()
    end = method.unroll(theta_start, torch.Generator().manual_seed(5), create_graph=True)[0]
    loss = normalised_distance(end, theta_start, theta_target)
    return method, loss.detach(), torch.autograd.grad(loss, method.leaves())


@pytest.mark.parametrize("name", ["mtt", "datm"])
def test_methods_get_the_full_gradient_in_checkpoint_mode(name, digits, digits_experts):
    _, loss_full, grads_full = method_gradients(name, digits, digits_experts, "full")
    _, loss_ckpt, grads_ckpt = method_gradients(name, digits, digits_experts, "checkpoint", unroll_segment=2)
    assert torch.allclose(loss_full, loss_ckpt, rtol=1e-5)
    assert len(grads_full) == len(grads_ckpt) == (2 if name == "mtt" else 3)  # S, α (DATM: and its labels)
    for full, ckpt in zip(grads_full, grads_ckpt):
        assert torch.allclose(full, ckpt, rtol=1e-4, atol=1e-7 * full.abs().max()), (full - ckpt).abs().max()
    # a whole step: the same update of S and α
    runs = []
    for unroll in ("full", "checkpoint"):
        train, _ = digits
        method = get_method(name)(small(name, unroll), train, digits_experts, device="cpu", seed=0)
        metrics = method.step()
        runs.append((method.images.detach().clone(), method.syn_lr.detach().item(), metrics["loss"]))
    assert torch.allclose(runs[0][0], runs[1][0], rtol=1e-4, atol=1e-5)
    assert runs[0][1] == pytest.approx(runs[1][1], rel=1e-6) and runs[0][2] == pytest.approx(runs[1][2], rel=1e-5)


@pytest.mark.parametrize("strategy", ["fusion", "update"])
def test_datm_clr_gets_the_full_gradient_in_checkpoint_mode(strategy, digits, digits_experts):
    """DATM-CLR's momentum student (θ̂, v) and its contrastive term at every step: the checkpointed unroll
    gives the full objective (L_tm and mean L_con) and its gradient in S, α, the labels and the head."""
    train, _ = digits
    results = []
    for unroll in ("full", "checkpoint"):
        config = make_config("datm_clr", "digits", 2, syn_steps=5, expert_epochs=2, max_start_epoch=3,
                             current_max_start_epoch=2, unroll=unroll, unroll_segment=2, strategy=strategy)
        method = get_method("datm_clr")(config, train, digits_experts, device="cpu", seed=0)
        start, theta_start, theta_target = method.sample_segment()
        end, con = method.unroll(theta_start, torch.Generator().manual_seed(5), create_graph=True)
        loss = normalised_distance(end, theta_start, theta_target) + (0.1 * con if strategy == "fusion" else 0)
        leaves = method.leaves()
        assert len(leaves) > 3  # S, α, labels and the learned head
        results.append((loss.detach(), con.detach(), torch.autograd.grad(loss, leaves)))
    (loss_f, con_f, grads_f), (loss_c, con_c, grads_c) = results
    assert torch.allclose(loss_f, loss_c, rtol=1e-5) and torch.allclose(con_f, con_c, rtol=1e-5)
    for full, ckpt in zip(grads_f, grads_c):
        assert torch.allclose(full, ckpt, rtol=1e-4, atol=1e-6 * full.abs().max()), (full - ckpt).abs().max()


@pytest.mark.parametrize("name", ["mtt", "datm"])
def test_methods_in_tesla_mode(name, digits, digits_experts):
    """One student step: TESLA's gradient is the full one in every leaf (DATM: its soft labels too); seven
    steps: the same loss (the forward pass is the full one), a first-order gradient that still updates S."""
    _, loss_full, grads_full = method_gradients(name, digits, digits_experts, "full", syn_steps=1)
    _, loss_tesla, grads_tesla = method_gradients(name, digits, digits_experts, "tesla", syn_steps=1)
    assert torch.allclose(loss_full, loss_tesla, rtol=1e-6) and len(grads_tesla) == len(grads_full)
    for full, tesla in zip(grads_full, grads_tesla):
        assert torch.allclose(full, tesla, rtol=1e-4, atol=1e-6 * full.abs().max()), (full - tesla).abs().max()
    _, loss_full, grads_full = method_gradients(name, digits, digits_experts, "full")
    _, loss_tesla, grads_tesla = method_gradients(name, digits, digits_experts, "tesla")
    assert torch.allclose(loss_full, loss_tesla, rtol=1e-5)
    assert all(bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0 for g in grads_tesla)
    train, _ = digits
    method = get_method(name)(small(name, "tesla"), train, digits_experts, device="cpu", seed=0)
    before = method.images.detach().clone()
    assert math.isfinite(method.step()["loss"]) and not torch.equal(before, method.images.detach())


def test_bad_unroll_settings_are_one_line_errors():
    with pytest.raises(ValueError, match=r"MTTConfig.unroll='reverse' is invalid: accepted full, checkpoint, tesla"):
        make_config("mtt", "digits", 1, unroll="reverse")
    with pytest.raises(ValueError, match=r"MTTConfig.unroll_segment=-1 is out of range"):
        make_config("mtt", "digits", 1, unroll="checkpoint", unroll_segment=-1)
    with pytest.raises(ValueError, match=r"DATMCLRConfig.unroll='tesla' is not available: .*accepted: full, checkpoint"):
        make_config("datm_clr", "digits", 1, unroll="tesla")
