"""Ray Tune sweeps of condensation methods, by concern:

- ``spec``: ``SweepSpec`` (YAML, validated without Ray; knob names resolved once into trial plans);
- ``rungs``: ASHA's rung arithmetic and the one check of its arguments (no Ray);
- ``space``: the Tune search space of a spec;
- ``trial``: ``TrialSettings`` (a trial's plain plan) and ``condensation_trainable`` (the one
  condensation loop, reporting to Tune);
- ``scheduler``: ASHA per (method, IPC) group (``GroupedASHA``);
- ``leaderboard``: best trial per (method, IPC), trial table, best synthetic sets, HPARAMS view;
- ``runner``: ``run_sweep`` (checks before Ray, the Tune run, the results) and ``farm_for_sweep``;
- ``cli``: ``raydd sweep``.

Only ``spec`` and ``rungs`` are imported here; the modules that need Ray import it at their top.
"""
from .rungs import ASHA_VARIANTS, RUNGS, asha_rungs, check_asha, default_grace_period
from .spec import SHARED_KNOBS, Knob, SweepSpec, default_trial_iterations, resolve_knob

__all__ = ["ASHA_VARIANTS", "Knob", "RUNGS", "SHARED_KNOBS", "SweepSpec", "asha_rungs", "check_asha",
           "default_grace_period", "default_trial_iterations", "resolve_knob"]
