"""The Tune search space of a sweep: the spec's plans (``SweepSpec.arms``) with their knobs as Tune domains."""
from __future__ import annotations

import random
from typing import Any

from ray import tune

from .spec import Knob, SweepSpec, resolve_knob


def domain(knob: Knob | Any):
    """A Tune domain for a Knob (grid knobs are expanded into arms before this), or the constant itself."""
    if not isinstance(knob, Knob):
        return knob
    if knob.kind == "const":
        return knob.values[0]
    if knob.kind == "grid":
        return tune.grid_search(list(knob.values))
    if knob.kind == "choice":
        return tune.choice(list(knob.values))
    return getattr(tune, knob.kind)(*knob.values)


def param_space(spec: SweepSpec, *, store: str | None = None, data_root: str | None = None,
                pinned: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Tune's param space: one ``arm`` per method x grid point (its knobs sampled inside), x IPC x seed.

    Under ASHA the arms start in a seeded shuffled order (the same for every run of the spec):
    asynchronous ASHA promotes a trial that is in the top 1/rf of what a rung has recorded so
    far, so a grid started corner-first (e.g. all good settings first) lets the early trials run
    to the end before anything better or worse has been seen.
    """
    arms = []
    for arm in spec.arms(pinned):
        arm = dict(arm)
        arm["method_knobs"] = {k: domain(v) for k, v in arm["method_knobs"].items()}
        arm["eval_knobs"] = {k: domain(v) for k, v in arm["eval_knobs"].items()}
        arms.append(arm)
    if spec.scheduler.get("type") == "asha":
        random.Random(0).shuffle(arms)
    return {
        "arm": tune.grid_search(arms), "ipc": tune.grid_search(list(spec.ipcs)),
        "seed": tune.grid_search(list(spec.seeds)) if len(spec.seeds) > 1 else spec.seeds[0],
        "dataset": spec.dataset, "store": store, "data_root": data_root,
        "resolution": spec.resolution, "device": spec.device,
    }


def knob_space(method: str, *, lam: Any = None, tau: Any = None, alpha: Any = None, zeta: Any = None,
               eval_protocol: str = "standard", **fields: Any) -> dict[str, Any]:
    """{knob: value or Tune domain} for a hand-written trial config of ``method``: shared symbols mapped
    onto its config fields.

    >>> knob_space("ptlm", lam=tune.grid_search([1, 5, 10]), tau=tune.loguniform(0.05, 1))
    {'inject_scale': ..., 'sharpen_tau': ...}

    ``zeta`` (and ``eval.<name>`` fields) land on the evaluation config as ``eval.zeta`` when the
    method does not map it and ``eval_protocol`` has it (edc). A shared knob the method does not
    use is a ValueError; None means: not swept. Pass the result as a trial's ``knobs``.
    """
    out: dict[str, Any] = {}
    given = {"lam": lam, "tau": tau, "alpha": alpha, "zeta": zeta}
    for name, value in [*given.items(), *fields.items()]:
        if value is None:
            continue
        where, target = resolve_knob(method, name, {"protocol": eval_protocol})
        key = target if where == "method" else f"eval.{target}"
        if key in out:
            raise ValueError(f"knob_space({method!r}) sets {target!r} twice")
        out[key] = value
    return out
