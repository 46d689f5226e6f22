"""The shared method interface: registry, configs, validation, SyntheticSet and checkpoint files."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from raydd.methods import (
    METHODS,
    MTT,
    MTTConfig,
    SyntheticSet,
    get_method,
    load_synthetic,
    make_config,
)
from raydd.methods.base import StepMeter, check_ipc
from raydd.methods.serial import load_tree, pack, save_tree, unpack


pytestmark = pytest.mark.usefixtures("single_thread")


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------- registry and configs
def test_registry_and_unknown_method():
    assert get_method("mtt") is MTT and METHODS["mtt"] is MTT
    with pytest.raises(ValueError, match="unknown method 'nope': accepted .*mtt") as err:
        get_method("nope")
    one_line(err)


def test_published_defaults_and_fallbacks():
    c1 = MTTConfig.defaults("cifar10", 1)
    assert (c1.syn_steps, c1.expert_epochs, c1.max_start_epoch, c1.lr_img, c1.lr_lr, c1.syn_lr_init, c1.zca) == \
        (50, 2, 2, 100.0, 1e-7, 0.01, True)
    c10 = make_config("mtt", "cifar10", 10)
    assert (c10.syn_steps, c10.max_start_epoch, c10.lr_img, c10.lr_lr, c10.syn_lr_init, c10.zca) == \
        (30, 20, 100.0, 1e-5, 0.001, True)
    c50 = make_config("mtt", "cifar10", 50)
    assert (c50.syn_steps, c50.max_start_epoch, c50.lr_img, c50.zca) == (30, 40, 1000.0, False)
    fm = make_config("mtt", "fashion_mnist", 10)
    assert fm.zca is False and fm.syn_lr_init is None and fm.syn_steps == 30  # documented fallback
    assert make_config("mtt", "digits", 10).syn_steps == 10  # digits' epochs are ~6 expert steps
    assert MTTConfig.default_iterations == 5000


def test_overrides_aliases_and_unknown_knob():
    cfg = make_config("mtt", "digits", 3, syn_steps=7, lr_img=10, alpha=0.02)
    assert cfg.syn_steps == 7 and cfg.lr_img == 10.0 and isinstance(cfg.lr_img, float) and cfg.syn_lr_init == 0.02
    with pytest.raises(ValueError, match="unknown MTTConfig knob 'bogus': accepted .*syn_steps.*lr_img") as err:
        make_config("mtt", "digits", 3, bogus=1)
    one_line(err)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.syn_steps = 3  # type: ignore[misc]
    assert MTTConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("overrides, message", [
    ({"syn_steps": 0}, "syn_steps=0 is out of range"),
    ({"syn_steps": "ten"}, "syn_steps='ten' is invalid: expected int"),
    ({"syn_steps": True}, "syn_steps=True is invalid"),
    ({"lr_img": -1.0}, "lr_img=-1.0 is out of range"),
    ({"img_momentum": 1.0}, "img_momentum=1.0 is out of range"),
    ({"pix_init": "gan"}, "pix_init='gan' is invalid: accepted real, noise"),
    ({"dsa_strategy": "color_warp"}, "unknown op"),
    ({"zca": "yes"}, "zca='yes' is invalid: expected bool or None"),
])
def test_bad_knob_values_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError, match=message) as err:
        make_config("mtt", "digits", 2, **overrides)
    one_line(err)


@pytest.mark.parametrize("ipc", [0, -3])
def test_nonpositive_ipc_is_refused(ipc):
    with pytest.raises(ValueError, match=f"ipc={ipc} is invalid: expected an integer >= 1") as err:
        make_config("mtt", "digits", ipc)
    one_line(err)


def test_unknown_dataset_is_refused():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet9'"):
        make_config("mtt", "imagenet9", 1)


class _UntouchableStore:
    root = "untouchable"

    def list(self, **_):
        raise AssertionError("the store was read before the config was validated")


def test_ipc_larger_than_smallest_class_fails_before_any_work(digits):
    train, _ = digits
    counts = torch.bincount(train.labels)
    smallest = int(counts.min())
    with pytest.raises(ValueError, match=f"ipc={smallest + 1} is larger than the smallest class .* "
                                         f"use ipc <= {smallest}") as err:
        MTT(make_config("mtt", "digits", smallest + 1), train, _UntouchableStore(), device="cpu")
    one_line(err)
    check_ipc(smallest, train)


def test_config_for_another_dataset_is_refused(digits):
    train, _ = digits
    with pytest.raises(ValueError, match="config is for dataset 'mnist' but the training data is 'digits'"):
        MTT(make_config("mtt", "mnist", 1), train, _UntouchableStore(), device="cpu")


# --------------------------------------------------------------------------- files
def _synthetic(soft: bool = False, zca: bool = False) -> SyntheticSet:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(6, 1, 8, 8, generator=gen)
    labels = torch.softmax(torch.randn(6, 3, generator=gen), 1) if soft else torch.tensor([0, 0, 1, 1, 2, 2])
    info = {"name": "digits", "channels": 1, "resolution": [8, 8], "num_classes": 3, "mean": [0.3], "std": [0.4],
            "class_names": ["0", "1", "2"], "flip_ok": False, "zca": zca}
    zca_state = None
    if zca:
        from raydd.data.zca import ZCAWhitening

        zca_state = ZCAWhitening().fit(torch.randn(50, 1, 8, 8, generator=gen)).state_dict()
    return SyntheticSet(images, labels, info, "mtt", config={"syn_steps": 3}, syn_lr=0.0123, iteration=42,
                        zca=zca_state, meta={"store": "/x"})


@pytest.mark.parametrize("soft, zca", [(False, False), (True, True)])
def test_synthetic_set_round_trip(tmp_path, soft, zca):
    syn = _synthetic(soft, zca)
    path = syn.save(tmp_path / "sub" / "set.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["set.safetensors"]  # no temp file left
    back = load_synthetic(path)
    assert torch.equal(back.images, syn.images) and torch.equal(back.labels, syn.labels)
    assert back.labels.dtype == syn.labels.dtype
    assert (back.syn_lr, back.iteration, back.method, back.config, back.dataset, back.meta) == \
        (syn.syn_lr, syn.iteration, syn.method, syn.config, syn.dataset, syn.meta)
    if zca:
        assert all(torch.equal(back.zca[k], syn.zca[k]) for k in syn.zca)
        assert torch.allclose(back.zca_whitening().inverse(back.images), syn.zca_whitening().inverse(syn.images))
    else:
        assert back.zca is None
    assert back.info.num_classes == 3 and back.hard_labels.shape == (6,)


def test_synthetic_file_is_plain_safetensors(tmp_path):
    from safetensors import safe_open

    path = _synthetic().save(tmp_path / "set.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        assert {"images", "labels"} <= set(fh.keys())
        header = json.loads(fh.metadata()["raydd"])
    assert header["kind"] == "synthetic_set" and header["tree"]["method"] == "mtt"
    save_tree(tmp_path / "other.safetensors", {"a": torch.zeros(1)}, kind="something_else")
    with pytest.raises(ValueError, match="not a 'synthetic_set'"):
        load_synthetic(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_synthetic(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        load_synthetic(tmp_path / "missing.safetensors")


def test_synthetic_set_validates_shapes():
    with pytest.raises(ValueError, match="6 synthetic images but 5 labels"):
        dataclasses.replace(_synthetic(), labels=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="hard synthetic labels must be int64"):
        dataclasses.replace(_synthetic(), labels=torch.zeros(6, dtype=torch.int32))


def test_pack_round_trips_optimizer_and_rng_state(tmp_path):
    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.5)
    p.grad = torch.ones(4)
    opt.step()
    state = {"opt": opt.state_dict(), "gen": torch.Generator().manual_seed(3).get_state(), "tuple": (1, 2.5, None)}
    tree, tensors = pack(state)
    json.dumps(tree)
    back = unpack(tree, tensors)
    assert list(back["opt"]["state"]) == [0]  # int keys survive
    assert torch.equal(back["opt"]["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])
    assert back["tuple"] == [1, 2.5, None]
    save_tree(tmp_path / "s.safetensors", state, kind="test")
    loaded = load_tree(tmp_path / "s.safetensors", kind="test")
    assert torch.equal(loaded["gen"], state["gen"])
    opt.load_state_dict(loaded["opt"])
    with pytest.raises(TypeError, match="cannot serialise object"):
        pack({"x": object()})


def test_step_meter_reports_time_and_cpu_memory():
    meter = StepMeter(torch.device("cpu"))
    plain = meter.finish({"loss": 1.0})
    assert set(plain) == {"loss", "rss_peak_mb", "time_s"}  # no GPU: no peak_mem_mb unless a graph size is given
    assert plain["time_s"] >= 0 and plain["rss_peak_mb"] > 0
    unrolled = StepMeter(torch.device("cpu")).finish({}, graph_mb=12.5)
    assert unrolled["peak_mem_mb"] == 12.5 and "rss_peak_mb" in unrolled
