"""Evaluation protocol, condense() driver and the condense/evaluate CLI, on digits."""
from __future__ import annotations

import argparse
import dataclasses
import warnings

import pytest
import torch

from raydd.condense import condense, image_grid
from raydd.condense_cli import add_condense_parser, add_evaluate_parser
from raydd.evaluation import EvalConfig, evaluate_synthetic, full_data
from raydd.methods import MTT, SyntheticSet, load_synthetic, make_config


pytestmark = pytest.mark.usefixtures("single_thread")


TINY = dict(model={"arch": "convnet", "width": 16, "depth": 2}, num_models=2, epochs=15, batch_size=64,
            device="cpu")


def real_init_set(train, ipc: int = 10, soft: bool = False) -> SyntheticSet:
    subset = train.per_class(ipc, seed=0)
    labels = subset.labels
    if soft:
        labels = torch.nn.functional.one_hot(labels, 10).float() * 0.9 + 0.01
    return SyntheticSet(subset.images.clone(), labels, {**train.info.to_dict(), "zca": False}, "random")


def test_evaluate_synthetic_reports_final_accuracies(digits):
    train, test = digits
    result = evaluate_synthetic(real_init_set(train), test, EvalConfig(**TINY))
    assert len(result.accuracies) == 2 and result.final_test_acc == result.accuracies
    assert all(0.0 <= a <= 1.0 for a in result.accuracies)
    assert result.mean > 0.3  # 10 real images per class: well above chance (0.1)
    assert result.std >= 0 and result.lr == 0.01 and result.model["width"] == 16
    again = evaluate_synthetic(real_init_set(train), test, EvalConfig(**TINY))
    assert again.accuracies == result.accuracies  # seeded networks, batches and augmentation


def test_soft_labels_syn_lr_and_zca(digits):
    train, test = digits
    syn = dataclasses.replace(real_init_set(train, ipc=3, soft=True), syn_lr=0.02)
    result = evaluate_synthetic(syn, test, EvalConfig(**{**TINY, "num_models": 1, "epochs": 3}))
    assert result.lr == 0.02 and len(result.accuracies) == 1
    from raydd.data.zca import ZCAWhitening

    zca = ZCAWhitening().fit(train.images)
    white = dataclasses.replace(syn, images=zca.transform(syn.images), zca=zca.state_dict())
    assert evaluate_synthetic(white, test, EvalConfig(**{**TINY, "num_models": 1, "epochs": 3})).extra["zca"]
    bad = dataclasses.replace(syn, labels=syn.labels * 2)
    with pytest.raises(ValueError, match="probability rows"):
        evaluate_synthetic(bad, test, EvalConfig(**TINY))


def test_all_op_augmentation_is_an_option_not_the_protocol(digits):
    train, test = digits
    config = EvalConfig(**{**TINY, "num_models": 1, "epochs": 3})
    assert config.dsa_single_per_call  # the standard protocol: one DSA op per batch (reference aug_mode 'S')
    single = evaluate_synthetic(real_init_set(train), test, config)
    every = evaluate_synthetic(real_init_set(train), test, dataclasses.replace(config, dsa_single_per_call=False))
    assert every.accuracies != single.accuracies and every.config["dsa_single_per_call"] is False
    args = _parser().parse_args(["evaluate", "x.safetensors", "--dsa-mode", "all"])
    from raydd.condense_cli import eval_config_from_args
    assert eval_config_from_args(args, "digits").dsa_single_per_call is False
    with pytest.raises(ValueError, match="EvalConfig.dsa_single_per_call='yes' is invalid"):
        EvalConfig(dsa_single_per_call="yes")


def test_full_data_and_cross_architecture_spec(digits):
    train, test = digits
    result = full_data(train.per_class(30), test, EvalConfig(**{**TINY, "num_models": 1, "epochs": 3}))
    assert result.extra["method"] == "full_data" and len(result.accuracies) == 1
    spec = EvalConfig(model="resnet18-bn").model_spec(train.info)
    assert (spec.arch, spec.norm, spec.channels, spec.resolution, spec.num_classes) == \
           ("resnet18", "batch", 1, (8, 8), 10)
    # instance norm over the 1x1 maps of ResNet-18's last stage on 8x8 digits: every image, one output
    with pytest.raises(ValueError, match=r"model resnet18-in on 8x8 images instance-normalises 1x1 feature maps "
                                         r".* use norm=batch \(resnet18-bn\)"):
        EvalConfig(model="resnet18").model_spec(train.info)


@pytest.mark.parametrize("kwargs, message", [
    ({"model": "vgg"}, "unknown evaluation model 'vgg'"),
    ({"model": {"arch": "convnet", "colour": 1}}, r"unknown evaluation model option\(s\) \['colour'\]"),
    ({"num_models": 0}, "num_models=0 is invalid"),
    ({"lr": -0.1}, "lr=-0.1 is out of range"),
    ({"lr_decay_at": 2.0}, "lr_decay_at=2.0 is out of range"),
    ({"extra_pass": "yes"}, "extra_pass='yes' is invalid"),
    ({"decay_resets_momentum": 1}, "decay_resets_momentum=1 is invalid"),
])
def test_bad_eval_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**kwargs)


def test_standard_schedule_is_the_references_evaluate_synset(digits, monkeypatch):
    """DC/MTT's evaluate_synset, written out: E + 1 passes (range(Epoch + 1)) over the set, and after pass
    Epoch//2 + 1 the lr x0.1 with a fresh SGD optimiser (momentum restarts). raydd's protocol trains the same
    network bit for bit (no DSA here: the batch orders come from the same seeded generator)."""
    import raydd.evaluation.standard as standard

    train, test = digits
    syn = real_init_set(train, ipc=3)
    config = EvalConfig(model={"arch": "convnet", "width": 8, "depth": 1}, num_models=1, epochs=4, batch_size=8,
                        dsa=False, device="cpu", seed=5)
    finals = []
    keep = standard.evaluate_together

    def recording(stack, *a, **k):
        finals.extend([p.detach().clone() for p in net.parameters()] for net in stack.write_back())
        return keep(stack, *a, **k)

    monkeypatch.setattr(standard, "evaluate_together", recording)
    epochs_seen = []
    result = standard.train_and_test(syn.images, syn.labels, test, train.info, config, lr=0.01,
                                     on_epoch=lambda i, epoch: epochs_seen.append(epoch))
    assert epochs_seen == [0, 1, 2, 3, 4] and config.passes == 5 and config.decay_after == 3

    net, generator = standard.fresh_network(config.model_spec(train.info), 5, torch.device("cpu"))
    lr, epochs = 0.01, config.epochs
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    for ep in range(epochs + 1):
        net.train()
        order = torch.randperm(len(syn.labels), generator=generator)
        for start in range(0, len(order), 8):
            idx = order[start:start + 8]
            loss = torch.nn.functional.cross_entropy(net(syn.images[idx]), syn.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ep == epochs // 2 + 1:
            lr *= 0.1
            opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)
    (final,) = finals
    assert all(torch.equal(a, b) for a, b in zip(final, net.parameters()))
    # raydd's earlier schedule (E passes, the decay at pass E/2 keeping momentum) trains another network
    finals.clear()
    standard.train_and_test(syn.images, syn.labels, test, train.info,
                            dataclasses.replace(config, extra_pass=False, decay_resets_momentum=False), lr=0.01)
    assert not all(torch.equal(a, b) for a, b in zip(finals[0], net.parameters()))
    assert result.accuracies[0] == pytest.approx(float((net.eval()(test.images).argmax(1) == test.labels).float().mean()))


def test_mismatched_test_set_is_refused(digits):
    train, test = digits
    syn = real_init_set(train, ipc=1)
    wrong = dataclasses.replace(test, images=torch.zeros(len(test), 1, 4, 4))
    with pytest.raises(ValueError, match="does not match the test set"):
        evaluate_synthetic(syn, wrong, EvalConfig(**TINY))


# --------------------------------------------------------------------------- condense + CLI
def test_condense_logs_evaluates_checkpoints_and_resumes(digits, digits_experts, tmp_path):
    train, test = digits
    cfg = make_config("mtt", "digits", 1, syn_steps=3, expert_epochs=2, max_start_epoch=4, lr_img=100.0)
    store = digits_experts
    eval_cfg = EvalConfig(**{**TINY, "num_models": 1, "epochs": 2})
    ckpt = tmp_path / "run.ckpt"
    result = condense(MTT(cfg, train, store, device="cpu"), 4, eval_every=2, eval_config=eval_cfg, test=test,
                      logdir=str(tmp_path / "tb"), progress=False, checkpoint_path=str(ckpt))
    assert [h["iteration"] for h in result.history] == [1, 2, 3, 4]
    assert [it for it, _ in result.evals] == [2, 4] and result.last_eval == result.evals[-1]
    assert result.seconds_per_iteration > 0 and ckpt.exists()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert {"train/loss", "train/syn_lr", "eval/acc_mean"} <= set(events.Tags()["scalars"])
    assert "synthetic/images" in events.Tags()["images"]

    resumed = condense(MTT(cfg, train, store, device="cpu"), 6, progress=False, checkpoint_path=str(ckpt))
    assert resumed.resumed_from == 4 and [h["iteration"] for h in resumed.history] == [5, 6]
    grid = image_grid(resumed.synthetic)
    assert grid.dim() == 3 and 0 <= float(grid.min()) and float(grid.max()) <= 1


def test_condense_warns_once_when_the_learned_step_size_is_not_positive(digits, digits_experts):
    train, _ = digits
    cfg = make_config("mtt", "digits", 1, syn_steps=3, expert_epochs=2, max_start_epoch=4, lr_lr=0.0)
    method = MTT(cfg, train, digits_experts, device="cpu")
    with torch.no_grad():
        method.syn_lr.fill_(-0.01)  # what a too-large lr_lr does over many iterations (a NaN loss raises instead)
    with pytest.warns(RuntimeWarning, match=r"learned step size α became -0.01 at iteration 1") as caught:
        condense(method, 3, progress=False)
    assert len([w for w in caught if "learned step size" in str(w.message)]) == 1
    healthy = MTT(cfg, train, digits_experts, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        condense(healthy, 2, progress=False)


def test_step_size_watch_used_by_every_stepping_loop_warns_once():
    from raydd.condense import StepSizeWatch

    watch = StepSizeWatch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert not watch.check({"loss": 1.0}, 1) and not watch.check({"syn_lr": 0.01}, 2)  # no α, healthy α
    with pytest.warns(RuntimeWarning, match="became nan at iteration 3"):
        assert watch.check({"syn_lr": float("nan")}, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert not watch.check({"syn_lr": -1.0}, 4)  # once per run


def _parser():
    parser = argparse.ArgumentParser(prog="raydd")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_condense_parser(sub)
    add_evaluate_parser(sub)
    return parser


def test_cli_condense_then_evaluate(digits_experts, tmp_path, capsys):
    out = tmp_path / "digits.safetensors"
    args = _parser().parse_args([
        "condense", "--method", "mtt", "--dataset", "digits", "--ipc", "1", "--store", str(digits_experts.root),
        "--iterations", "2", "--set", "syn_steps=2", "--set", "max_start_epoch=4", "--set", "expert_epochs=2",
        "--out", str(out), "--quiet", "--device", "cpu"])
    assert args.func(args) == 0
    syn = load_synthetic(out)
    assert syn.iteration == 2 and len(syn) == 10
    args = _parser().parse_args(["evaluate", str(out), "--num-models", "2", "--epochs", "2", "--width", "16",
                                 "--depth", "2", "--device", "cpu"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "final test accuracy, 2 networks" in text and "per network:" in text


def test_cli_cross_architecture_table_and_robustness_scores(digits, tmp_path, capsys):
    train, _ = digits
    path = real_init_set(train, ipc=2).save(tmp_path / "set.safetensors")
    common = ["--num-models", "1", "--epochs", "2", "--width", "8", "--device", "cpu", "--quiet"]
    args = _parser().parse_args(["evaluate", str(path), "--models", "convnet", "alexnet-bn", "resnet10-bn"] + common)
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| ") and "network" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| convnet2-w8-in", "| alexnet-bn-w8", "| resnet10-bn-w8"]
    assert "cross-architecture, 1 networks x 2 epochs each, standard protocol" in lines[0]
    for models, message in ((["convnet", "resnet18"], "model resnet18-in-w8 on 8x8 images instance-normalises"),
                            (["vgg11"], "model vgg11 does not fit 8x8 images")):
        args = _parser().parse_args(["evaluate", str(path), "--models", *models] + common)
        with pytest.raises(ValueError, match=message):  # every network checked before any training
            args.func(args)
    args = _parser().parse_args(["evaluate", str(path), "--metrics", "ior", "lrs", "--metric-runs", "1",
                                 "--full-acc", "0.9", "--json"] + common)
    assert args.func(args) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    scores = out["robustness"]["summary"]
    assert set(scores) == {"ior", "ior_std", "lrs", "lrs_std"} and 0 <= scores["lrs"] <= 1


def test_cli_refuses_bad_input_before_work(digits_experts, tmp_path):
    base = ["condense", "--method", "mtt", "--dataset", "digits", "--store", str(digits_experts.root), "--quiet"]
    for extra, message in ((["--ipc", "0"], "ipc=0 is invalid"),
                           (["--ipc", "1", "--set", "nope=1"], "unknown MTTConfig knob 'nope'"),
                           (["--ipc", "1", "--method", "xyz"], "unknown method 'xyz'")):
        args = _parser().parse_args(base + extra)
        with pytest.raises(ValueError, match=message):
            args.func(args)
