"""EDC synthesis and the EDC evaluation protocol on real (tiny) data: BatchNorm observers farmed
on scikit-learn digits into a temporary store (two ConvNet-BN, one ResNet-18-BN)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from raydd.evaluation.edc import EDCEvalConfig, evaluate_edc, smoothing_lr_factor
from raydd.models.ema import ModelEMA
from raydd.farm import FarmSpec, farm
from raydd.methods import load_checkpoint, load_synthetic, make_config, save_checkpoint
from raydd.methods.edc import EDC
from raydd.methods.synthetic import SyntheticSet
from raydd.store import TrajectoryStore

CONVNET = "convnet2-w16-bn"


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "edc_observers"
    base = dict(store=str(root), dataset="digits", recipe="observer", backend="local")
    farm(FarmSpec(**base, recipe_options={"epochs": 3, "batch_size": 64, "lr": 0.05, "dsa": False},
                  model={"arch": "convnet", "width": 16, "depth": 2}, trajectories=2), progress=False)
    # a small, briefly trained ResNet-18-BN (subset, no DSA) keeps the fixture fast
    farm(FarmSpec(**base, train_per_class=20, recipe_options={"epochs": 1, "batch_size": 64, "dsa": False},
                  model={"arch": "resnet18", "width": 4}, trajectories=1), progress=False)
    # instance-norm networks under another kind: observers without BatchNorm
    farm(FarmSpec(store=str(root), dataset="digits", recipe="expert", backend="local", trajectories=1,
                  recipe_options={"epochs": 1, "batch_size": 256}, model={"width": 8, "depth": 1}), progress=False)
    return TrajectoryStore(root)


def no_hooks(method: EDC) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks
               for net in method.observer_models() for m in net.modules())


def test_uses_every_observer_and_config_ids(digits, store):
    train, _ = digits
    method = EDC(make_config("edc", "digits", 1), train, store, device="cpu", seed=0)
    assert sorted(o.model_name for o in method.observers) == [CONVNET, CONVNET, "resnet18-bn-w4"]
    chosen = method.observers[2].trajectory_id
    only = EDC(make_config("edc", "digits", 1, observers=chosen), train, store, device="cpu", seed=0)
    assert [o.trajectory_id for o in only.observers] == [chosen]
    cfg = make_config("edc", "digits", 1, alpha=0.25, tau=2.0)  # shared sweep symbols
    assert (cfg.alpha, cfg.tau) == (0.25, 2.0)


def test_loss_goes_down_on_fixed_observers(digits, store):
    train, _ = digits
    cfg = make_config("edc", "digits", 2, model=CONVNET, iterations=12)
    method = EDC(cfg, train, store, device="cpu", seed=0)
    before = method.matching_loss(seed=5)  # same observers and augmentations every time
    metrics = [method.step() for _ in range(12)]
    after = method.matching_loss(seed=5)
    assert after["loss"] < 0.9 * before["loss"], (before, after)
    assert {"loss", "loss_global", "loss_class", "loss_ce", "loss_flat", "lr", "time_s"} <= set(metrics[-1])
    assert metrics[0]["loss_flat"] == pytest.approx(0.0, abs=1e-6)  # S_EMA == S at the start
    assert metrics[-1]["loss_flat"] > 0

    stats_only = EDC(cfg.with_overrides(ce_weight=0.0, stat_weight=1.0), train, store, device="cpu", seed=0)
    before = stats_only.matching_loss(seed=5)
    for _ in range(12):
        stats_only.step()
    after = stats_only.matching_loss(seed=5)
    assert after["loss_stat"] < 0.95 * before["loss_stat"], (before, after)


def test_class_statistics_come_back_from_the_checkpoint(digits, store, tmp_path):
    """Exact resume is the contract's (tests/test_method_contract.py); here: the per-class statistics of the
    observers used before the checkpoint are restored, not recomputed."""
    train, _ = digits
    cfg = make_config("edc", "digits", 2, batch_syn=10, iterations=6)  # 3 observers, 2 chunks
    first = EDC(cfg, train, store, device="cpu", seed=3)
    for _ in range(2):
        first.step()
    save_checkpoint(first, tmp_path / "edc.ckpt")
    resumed = load_checkpoint(EDC(cfg, train, store, device="cpu", seed=3), tmp_path / "edc.ckpt")
    assert resumed.iteration == 2 and set(resumed.class_stats) == set(first.class_stats)
    for _ in range(2):
        resumed.step()
    assert resumed.class_stat_computations == 1  # two observers' statistics came from the checkpoint
    with pytest.raises(ValueError, match="config differs"):
        EDC(cfg.with_overrides(alpha=0.4), train, store, device="cpu", seed=3).load_state_dict(first.state_dict())


def test_hooks_are_removed_after_use(digits, store, monkeypatch):
    train, _ = digits
    method = EDC(make_config("edc", "digits", 1, observer_turns="all"), train, store, device="cpu", seed=0)
    method.step()
    method.matching_loss()
    assert no_hooks(method)
    bn = method.observers[0].bn[-1]

    def broken(x):
        raise RuntimeError("boom")

    monkeypatch.setattr(bn, "forward", broken)
    with pytest.raises(RuntimeError, match="boom"):
        method.step()
    assert no_hooks(method)


def test_class_statistics_computed_once_and_correct(digits, store, monkeypatch):
    train, _ = digits
    calls = []
    original = EDC._compute_class_stats

    def counting(self, obs):
        calls.append(obs.trajectory_id)
        return original(self, obs)

    monkeypatch.setattr(EDC, "_compute_class_stats", counting)
    method = EDC(make_config("edc", "digits", 1), train, store, device="cpu", seed=0)
    for _ in range(2 * len(method.observers)):
        method.step()
    method.matching_loss()
    method.synthetic_set()
    assert sorted(calls) == sorted(o.trajectory_id for o in method.observers)

    obs = method.observers[0]  # check one layer/class against a direct computation
    feats = []
    handle = obs.bn[1].register_forward_hook(lambda m, a, o: feats.append(a[0]))
    with torch.no_grad():
        obs.net(train.images[train.labels == 3])
    handle.remove()
    mean, var = method.class_stats[obs.trajectory_id][1]
    f = feats[0].double()
    assert torch.allclose(mean[3].double(), f.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(var[3].double(), f.var((0, 2, 3), unbiased=False), atol=1e-4)


def test_the_released_codes_statistics_form(digits, store, tmp_path):
    """class_term='code', stat_momentum m (recover/utils.py BNFeatureHook; benchmarks/reference_equivalence.py
    --methods edc --edc-as-code compares it with the hook itself): class statistics are means of per-image
    statistics; the batch statistics are a running average from 0 carrying the current gradient; the class
    term compares the batch with its images' mean class statistics; the running state is checkpointed."""
    train, _ = digits
    cfg = make_config("edc", "digits", 2, observers=None, model=CONVNET, class_term="code", stat_momentum=0.8,
                      augment=False)
    method = EDC(cfg, train, store, device="cpu", seed=0)
    obs = method.observers[0]
    feats = []
    handle = obs.bn[1].register_forward_hook(lambda m, a, o: feats.append(a[0]))
    with torch.no_grad():
        obs.net(train.images[train.labels == 3])
    handle.remove()
    mean, var = method._stats(obs)[1]
    f = feats[0].double()
    assert torch.allclose(mean[3].double(), f.mean((2, 3)).mean(0), atol=1e-4)
    assert torch.allclose(var[3].double(), f.var((2, 3), unbiased=False).mean(0), atol=1e-4)
    method.matching_loss()
    assert method.stat_running == {}  # a fixed evaluation advances nothing
    x, y = method.images.detach(), method.labels
    with torch.no_grad():
        loss, parts = method._chunk_loss(obs, x, x, y, update_running=True)
    feats = []
    handle = obs.bn[0].register_forward_hook(lambda m, a, o: feats.append(a[0]))
    with torch.no_grad():
        obs.net(x)
    handle.remove()
    f = feats[0]
    batch_mean, batch_var = f.mean((0, 2, 3)), f.var((0, 2, 3), unbiased=False)
    run_mean, run_var = method.stat_running[obs.trajectory_id][0]
    assert torch.allclose(run_mean, 0.2 * batch_mean, atol=1e-6) and torch.allclose(run_var, 0.2 * batch_var, atol=1e-6)
    tmean, tvar = method._stats(obs)[0]
    bn = obs.bn[0]
    first = 10 * (0.5 * (torch.norm(run_mean - bn.running_mean) + torch.norm(run_var - bn.running_var))
                  + 0.5 * (torch.norm(tmean[y].mean(0) - run_mean) + torch.norm(tvar[y].mean(0) - run_var)))
    assert parts["loss_stat"] > float(first) > 0  # the first layer's share (x10) of the statistics term
    method.step()
    save_checkpoint(method, tmp_path / "edc.safetensors")
    again = load_checkpoint(EDC(cfg, train, store, device="cpu", seed=0), tmp_path / "edc.safetensors")
    for (a, b), (c, d) in zip(again.stat_running[obs.trajectory_id], method.stat_running[obs.trajectory_id]):
        assert torch.equal(a, c) and torch.equal(b, d)
    with pytest.raises(ValueError, match="class_term='gmm' is invalid: accepted paper, code"):
        make_config("edc", "digits", 2, class_term="gmm")


def test_synthetic_set_soft_labels(digits, store, tmp_path):
    train, _ = digits
    method = EDC(make_config("edc", "digits", 2), train, store, device="cpu", seed=1)
    method.step()
    syn = method.synthetic_set()
    logits = torch.stack([net(syn.images) for net in method.observer_models()]).mean(0)  # eq. 4
    assert syn.soft and torch.allclose(syn.labels, logits.softmax(1), atol=1e-5)
    assert torch.allclose(syn.meta["logits"], logits, atol=1e-5)
    back = load_synthetic(syn.save(tmp_path / "edc.safetensors"))
    assert torch.equal(back.meta["logits"], syn.meta["logits"]) and torch.equal(back.images, syn.images)


def test_smoothing_schedule_formula_and_plain_cosine():
    n = 20
    for zeta in (1.0, 2.0, 3.0):
        for i in range(n):
            assert smoothing_lr_factor(i, n, zeta) == pytest.approx((1 + math.cos(i * math.pi / (zeta * n))) / 2)
    assert smoothing_lr_factor(n // 2, n, 2.0) > smoothing_lr_factor(n // 2, n, 1.0)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n)
    for i in range(n + 1):
        assert smoothing_lr_factor(i, n, 1.0) == pytest.approx(cosine.get_last_lr()[0], abs=1e-9)
        opt.step()
        cosine.step()
    cfg = EDCEvalConfig(schedule="multistep", epochs=1000)
    assert [cfg.lr_factor(e) for e in (799, 800, 900, 950, 999)] == [1.0, 0.5, 0.25, 0.125, 0.125]


def test_model_ema_matches_the_analytic_ema():
    net = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema = ModelEMA(net, decay=0.9)
    values = [2.0, -1.0, 4.0, 0.5]
    for v in values:
        with torch.no_grad():
            net.weight.fill_(v)
        ema.update(net)
    d, t = 0.9, len(values)
    analytic = d ** t * 1.0 + sum((1 - d) * d ** (t - k) * v for k, v in enumerate(values, start=1))
    tested = ema.model(net)
    assert float(tested.weight.detach()) == pytest.approx(analytic, rel=1e-6)
    assert float(tested.weight.detach()) != float(net.weight.detach())
    assert float(net.weight.detach()) == 0.5  # the raw model is untouched


def test_evaluate_edc_end_to_end(digits, store):
    train, test = digits
    method = EDC(make_config("edc", "digits", 2, model=CONVNET), train, store, device="cpu", seed=0)
    for _ in range(2):
        method.step()
    syn = method.synthetic_set()
    small = dict(model={"arch": "convnet", "width": 8, "depth": 1}, epochs=4, batch_size=10, device="cpu")
    result = evaluate_edc(syn, test, EDCEvalConfig(num_models=2, **small))
    assert len(result.accuracies) == 2 and 0 <= result.mean <= 1 and result.extra["tested"] == "ema"
    assert len(result.extra["raw_accuracies"]) == 2 and result.extra["label_source"] == "logits"
    relabel = evaluate_edc(syn, test, EDCEvalConfig(num_models=1, loss="mse_gt", schedule="ssrs", **small),
                           teachers=method.observer_models())
    assert relabel.extra["label_source"] == "teachers"
    code = EDCEvalConfig(num_models=1, loss="mse_gt", teachers=True, cutmix_alpha=1.0, randaugment=True, **small)
    as_code = evaluate_edc(syn, test, code, teachers=method.observer_models())
    assert as_code.mean != relabel.mean and as_code.config["cutmix_alpha"] == 1.0
    assert evaluate_edc(syn, test, code, teachers=method.observer_models()).accuracies == as_code.accuracies
    hard = SyntheticSet(images=syn.images, labels=syn.hard_labels, dataset=syn.dataset, method="random")
    other = evaluate_edc(hard, test, EDCEvalConfig(num_models=1, schedule="multistep", augment="dsa", **small))
    assert 0 <= other.mean <= 1
    with pytest.raises(ValueError, match="mse_gt"):
        evaluate_edc(hard, test, EDCEvalConfig(loss="mse_gt", **small))


def test_errors(digits, store, tmp_path):
    train, _ = digits
    with pytest.raises(ValueError, match="raydd farm --recipe observer --norm batch"):
        EDC(make_config("edc", "digits", 1), train, TrajectoryStore(tmp_path / "empty"), device="cpu")
    with pytest.raises(ValueError, match="BatchNorm"):
        EDC(make_config("edc", "digits", 1, observer_kind="expert"), train, store, device="cpu")
    with pytest.raises(ValueError, match="not in store"):
        EDC(make_config("edc", "digits", 1, observers="nope"), train, store, device="cpu")
    for alpha in (1.5, -0.1):
        with pytest.raises(ValueError, match=r"alpha=.*expected \[0, 1\]"):
            make_config("edc", "digits", 1, alpha=alpha)
    with pytest.raises(ValueError, match="unknown EDCConfig knob 'bogus'"):
        make_config("edc", "digits", 1, bogus=1)
    with pytest.raises(ValueError, match="tau"):
        make_config("edc", "digits", 1, tau=0)
    with pytest.raises(ValueError, match="schedule"):
        EDCEvalConfig(schedule="step")
    with pytest.raises(ValueError, match="zeta"):
        EDCEvalConfig(zeta=0)
    with pytest.raises(ValueError, match="zeta"):
        smoothing_lr_factor(0, 10, -1.0)


def test_code_knobs_weight_decay_groups_cutmix_and_randaugment(digits, monkeypatch):
    """The released code's evaluation details: decay on kernels and matrices only (its get_parameters),
    CutMix of every batch before the teachers relabel it, RandAugment on 8-bit pixels, all seeded."""
    import raydd.evaluation.edc as edc
    from raydd.models import ModelSpec, build_model

    net = build_model(ModelSpec(arch="convnet", channels=1, num_classes=10, resolution=(8, 8), width=4, depth=1,
                                norm="batch"))
    decay, rest = edc.decay_groups(net, "weights")
    assert all(p.dim() > 1 for p in decay["params"]) and all(p.dim() == 1 for p in rest["params"])
    assert rest["weight_decay"] == 0.0 and len(decay["params"]) + len(rest["params"]) == len(list(net.parameters()))
    (everything,) = edc.decay_groups(net, "all")
    assert len(everything["params"]) == len(list(net.parameters())) and "weight_decay" not in everything

    train, _ = digits
    x = train.images[:6]
    info = train.info
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = edc.rand_augment(x, g1, info, 2, 9), edc.rand_augment(x, g2, info, 2, 9)
    assert torch.equal(a, b) and a.shape == x.shape and not torch.allclose(a, x, atol=0.05)
    state = torch.random.get_rng_state()
    edc.rand_augment(x, torch.Generator().manual_seed(4), info, 2, 0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left as it was

    seen = []
    paste = edc.paste_cutmix
    monkeypatch.setattr(edc, "paste_cutmix", lambda batch, d: seen.append((batch, d, paste(batch, d))) or seen[-1][2])
    syn = SyntheticSet(images=train.images[:20], labels=train.labels[:20],
                       dataset={**info.to_dict(), "zca": False}, method="random")
    small = dict(model={"arch": "convnet", "width": 4, "depth": 1}, epochs=1, batch_size=10, device="cpu")
    teacher = build_model(ModelSpec(arch="convnet", channels=1, num_classes=10, resolution=tuple(info.resolution),
                                    width=4, depth=1))
    evaluate_edc(syn, train, EDCEvalConfig(num_models=1, teachers=True, cutmix_alpha=1.0, augment="none", **small),
                 teachers=[teacher])
    assert len(seen) == 2
    for batch, d, mixed in seen:
        box = (slice(None), slice(None), slice(d.y0, d.y1), slice(d.x0, d.x1))
        assert torch.equal(mixed[box], batch[d.perm][box])
        outside = torch.ones_like(batch, dtype=torch.bool)
        outside[box] = False
        assert torch.equal(mixed[outside], batch[outside])


def test_code_knob_errors():
    with pytest.raises(ValueError, match=r"cutmix_alpha=1.0 needs teachers=true"):
        EDCEvalConfig(cutmix_alpha=1.0)
    with pytest.raises(ValueError, match=r"weight_decay_on='bias' is invalid: accepted weights, all"):
        EDCEvalConfig(weight_decay_on="bias")
    with pytest.raises(ValueError, match=r"randaugment_magnitude=31 is invalid"):
        EDCEvalConfig(randaugment_magnitude=31)
    assert EDCEvalConfig.defaults("cifar10").randaugment and not EDCEvalConfig.defaults("digits").randaugment
