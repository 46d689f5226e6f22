"""The method contract, for every registered method (a new method is picked up by itself).

Each method runs at its published digits defaults, planned by raydd's planner (``raydd.plan``) for a short
run and shrunk by its own ``MethodConfig.scaled``; its store holds what its ``needs()`` declare, farmed tiny
when a test first asks for that method (a method that reads nothing farms nothing). Checked for every method: exact resume from a checkpoint and
from ``state_dict``, the synthetic set's save/load round trip, one-line errors (IPC <= 0, IPC too
large, unknown knob, nothing in the store — naming the farm command), and the loss going down on
a fixed problem (the same draws as the first iteration, with the trained synthetic set).
"""
from __future__ import annotations

import pytest
import torch

from raydd.farm import FarmSpec, farm
from raydd.methods import METHODS, get_method, load_checkpoint, load_synthetic, make_config, save_checkpoint
from raydd.plan import Shrink, plan_config
from raydd.store import TrajectoryStore

pytestmark = pytest.mark.usefixtures("single_thread")

FRACTION = 0.02  # SSD's labelled split on digits: 3 labelled images per class
# Tiny farms, per farm recipe (depth 2: a depth-3 ConvNet instance-normalises 2x2 maps on 8x8 digits).
RECIPE_OPTIONS = {
    "expert": {"epochs": 4, "batch_size": 64},
    "pad_expert": {"epochs": 4, "batch_size": 64},
    "pretrain": {"epochs": 3, "batch_size": 64, "lr": 0.05},
    "observer": {"epochs": 2, "batch_size": 64, "lr": 0.05, "dsa": False},
    "ssd_teacher": {"epochs": 3, "batch_size": 16, "mu": 4, "steps_per_epoch": 8, "ema_decay": 0.9, "eval_every": 3,
                    "labelled_fraction": FRACTION},
    "ssd_student": {"epochs": 4, "batch_size": 64, "labelled_fraction": FRACTION},
}
COUNTS = {"pretrain": 2, "expert": 2, "pad_expert": 2, "observer": 1, "ssd_student": 2}  # trajectories farmed per recipe
TINY = Shrink(width=16, syn_steps=4, recipes={r: (COUNTS.get(r), o["epochs"]) for r, o in RECIPE_OPTIONS.items()})
ITERATIONS = 6
IPC = 2
# Knobs that put more of a method's state to work when set (minibatch permutations and subsets, a second
# update every k iterations): resume is also checked with them, for every method that has them.
STATEFUL = {"batch_syn": 7, "batch_syn_max": 5, "calib_interval": 2, "threshold": 0.97, "sampling_net": True}
NAMES = sorted(METHODS)


def contract_config(name: str, ipc: int = IPC, **knobs):
    return plan_config(name, "digits", ipc, iterations=ITERATIONS, knobs=knobs, shrink=TINY)[0]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """``stores(name)``: the store holding what method ``name`` reads, its recipes farmed tiny on first use (one
    root for all: each recipe once); None for a method that reads nothing."""
    root = str(tmp_path_factory.mktemp("contract") / "store")
    farmed: set[tuple] = set()

    def store_for(name: str) -> TrajectoryStore | None:
        needs = contract_config(name).needs()
        for need in needs:
            if (need.recipe, need.recipe_config) in farmed:  # a recipe under another config is farmed again
                continue
            farmed.add((need.recipe, need.recipe_config))
            model = {"width": 16, "depth": 2, **({"norm": need.norm} if need.norm else {})}
            farm(FarmSpec(store=root, dataset="digits", recipe=need.recipe, backend="local",
                          trajectories=max(need.count, COUNTS.get(need.recipe, 1)),
                          recipe_options={**RECIPE_OPTIONS[need.recipe], **dict(need.recipe_config)}, model=model),
                 progress=False)
        return TrajectoryStore(root) if needs else None

    return store_for


def build(name, train, store, seed=0, **knobs):
    return get_method(name)(contract_config(name, **knobs), train, store, device="cpu", seed=seed)


def same_set(a, b) -> bool:
    return torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.syn_lr == b.syn_lr


def same_state(a, b) -> bool:
    """Two ``state_dict()`` trees are equal: every tensor (optimiser moments, heads, EMA copies, RNG
    states...) bit for bit, every other value exactly (but wall-clock measurements, ``*time_s``)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and \
            all(str(k).endswith("time_s") or same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_state, a, b))
    return a == b


@pytest.mark.parametrize("stateful", [False, True], ids=["defaults", "stateful"])
@pytest.mark.parametrize("name", NAMES)
def test_resume_is_exact(name, stateful, digits, stores, tmp_path):
    train, _ = digits
    knobs = {k: v for k, v in STATEFUL.items() if stateful and k in get_method(name).config_cls.knobs()}
    if stateful and not knobs:
        pytest.skip(f"{name} has none of the knobs {sorted(STATEFUL)}")

    def new(**changes):
        return build(name, train, stores(name), seed=3, **{**knobs, **changes})

    with new() as straight:
        for _ in range(4):
            straight.step()
        expected, final_state = straight.synthetic_set(), straight.state_dict()
    with new() as first:
        for _ in range(2):
            first.step()
        save_checkpoint(first, tmp_path / "method.ckpt")
        state = first.state_dict()
    with load_checkpoint(new(), tmp_path / "method.ckpt") as resumed:
        assert resumed.iteration == 2
        for _ in range(2):
            resumed.step()
        assert resumed.iteration == 4 and same_set(resumed.synthetic_set(), expected)
        assert same_state(resumed.state_dict(), final_state)
    with new() as in_memory:
        in_memory.load_state_dict(state)
        for _ in range(2):
            in_memory.step()
        assert same_set(in_memory.synthetic_set(), expected) and same_state(in_memory.state_dict(), final_state)
    with new(ipc=1) as other, pytest.raises(ValueError) as err:
        other.load_state_dict(state)  # a checkpoint of another configuration is refused, in one line
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", NAMES)
def test_synthetic_set_round_trip(name, digits, stores, tmp_path):
    train, _ = digits
    with build(name, train, stores(name)) as method:
        method.step()
        syn = method.synthetic_set()
    back = load_synthetic(syn.save(tmp_path / "set.safetensors"))
    assert same_set(back, syn) and (back.method, back.iteration, back.dataset) == (name, 1, syn.dataset)
    assert len(back) == len(syn) and len(back) >= IPC * train.info.num_classes
    assert back.config == syn.config and set(back.meta) == set(syn.meta)


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_one_line_before_work(name, digits, stores, tmp_path):
    train, _ = digits
    cases = [(lambda: make_config(name, "digits", 0), "ipc=0 is invalid"),
             (lambda: build(name, train, stores(name), ipc=5000), "ipc=5000 is"),
             (lambda: contract_config(name, bogus=1), f"unknown {get_method(name).config_cls.__name__} knob 'bogus'")]
    needs = contract_config(name).needs()
    if needs:
        empty = TrajectoryStore(tmp_path / "empty")
        cases.append((lambda: build(name, train, empty), f"raydd farm --recipe {needs[0].recipe} "))
        cases.append((lambda: build(name, train, None), "pass a TrajectoryStore"))
    for make, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            make()
        assert "\n" not in str(err.value), str(err.value)


def _first_problem(method, initial: dict) -> float:
    """The loss of ``method``'s synthetic set on the problem of the run's first iteration: the same
    draws (iteration counter and random generators back at their initial values)."""
    state = method.state_dict()
    state.update({k: initial[k] for k in ("iteration", "rng", "generator")})
    method.load_state_dict(state)
    return method.step()["loss"]


@pytest.mark.parametrize("name", NAMES)
def test_loss_goes_down_on_a_fixed_problem(name, digits, stores):
    train, _ = digits
    with build(name, train, stores(name)) as method:
        initial = method.state_dict()
        before = method.step()["loss"]
        for _ in range(ITERATIONS - 1):
            method.step()
        if type(method.config).default_iterations == 1:  # one-shot selection: nothing moves after step 1
            assert method.step()["loss"] == before
            return
        after = _first_problem(method, initial)
    assert after < before, (before, after)
