"""A sweep's results: the leaderboard (best trial per method and IPC), the trial table, the best
synthetic sets and TensorBoard's HPARAMS view, written into the experiment directory."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .spec import SweepSpec
from .trial import METRIC, SYNTHETIC_FILE, TIME_ATTR, TrialSettings


def _trial_id_from_path(path: str | None) -> str:
    """The Tune trial id ('c38f5_00011') at the end of a trial directory named by ``_trial_dirname``."""
    return "_".join(Path(path or "").name.rsplit("_", 2)[-2:])



@dataclass
class LeaderboardRow:
    method: str
    ipc: int
    acc_mean: float  # final test accuracy (mean over the evaluation networks) of the best trial
    acc_std: float
    source: str  # "final_eval" or "eval" (which evaluation the accuracy comes from)
    eval_models: int
    iterations: int  # iterations the best trial ran
    target_iterations: int
    trials: int  # trials of this (method, IPC), stopped early or not
    stopped_early: int
    errored: int
    seed: int
    knobs: dict
    trial_id: str
    trial_path: str
    synthetic_path: str | None  # the copy in <experiment>/best/


@dataclass
class SweepResult:
    name: str
    experiment_path: str
    rows: list[LeaderboardRow]
    trials: list[dict]
    leaderboard_csv: str
    leaderboard_md: str
    trials_csv: str
    hparams_dir: str | None
    num_errors: int
    wall_time_s: float
    unfinished: int = 0  # trials neither terminated nor errored (an interrupted sweep): resume=True finishes them
    result_grid: Any = field(default=None, repr=False)

    @property
    def complete(self) -> bool:
        return self.unfinished == 0

    def markdown(self) -> str:
        return leaderboard_markdown(self.rows, self.name, unfinished=self.unfinished)


def _trial_record(result, spec: SweepSpec) -> dict:
    settings = TrialSettings.from_config(result.config or {})
    metrics = result.metrics or {}
    knobs = settings.knobs
    source = "final_eval" if "final_acc" in metrics else "eval"
    acc = metrics.get("final_acc", metrics.get(METRIC))
    std = metrics.get("final_acc_std", metrics.get(f"{METRIC}_std"))
    return {
        "method": settings.method, "ipc": settings.ipc, "seed": settings.seed,
        "knobs": knobs, "iterations": int(metrics.get(TIME_ATTR, 0) or 0),
        "target_iterations": settings.iterations, "acc_mean": acc, "acc_std": std, "source": source,
        "eval_models": int(metrics.get("final_models" if source == "final_eval" else "eval_models", 0) or 0),
        "eval_acc": metrics.get(METRIC), "syn_lr": metrics.get("syn_lr"),
        "trial_id": metrics.get("trial_id") or _trial_id_from_path(result.path), "path": result.path,
        "error": result.error is not None,
        "node_id": metrics.get("node_id"), "checkpoint": result.checkpoint,
    }


def build_leaderboard(records: list[dict]) -> list[tuple[LeaderboardRow, dict]]:
    """Best trial per (method, IPC): among trials that ran all their iterations (if any did), highest accuracy."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["ipc"]), []).append(r)
    rows = []
    for (method, ipc), group in sorted(groups.items()):
        scored = [r for r in group if r["acc_mean"] is not None and math.isfinite(r["acc_mean"])]
        if not scored:
            continue
        complete = [r for r in scored if r["iterations"] >= r["target_iterations"]]
        best = max(complete or scored, key=lambda r: (r["acc_mean"], -(r["acc_std"] or 0.0)))
        rows.append((LeaderboardRow(
            method=method, ipc=ipc, acc_mean=float(best["acc_mean"]), acc_std=float(best["acc_std"] or 0.0),
            source=best["source"], eval_models=best["eval_models"], iterations=best["iterations"],
            target_iterations=best["target_iterations"], trials=len(group),
            stopped_early=sum(1 for r in group if not r["error"] and r["iterations"] < r["target_iterations"]),
            errored=sum(1 for r in group if r["error"]), seed=best["seed"], knobs=best["knobs"],
            trial_id=best["trial_id"], trial_path=best["path"], synthetic_path=None), best))
    return rows


def leaderboard_markdown(rows: list[LeaderboardRow], name: str = "", *, unfinished: int = 0) -> str:
    lines = [f"### Leaderboard {name}".rstrip(), ""]
    if unfinished:
        lines += [f"**Incomplete: {unfinished} trial(s) did not finish (interrupted sweep); resume it with "
                  f"`raydd sweep <spec> --resume`.**", ""]
    lines += [
             "| method | IPC | accuracy (%) | evaluation | iterations | trials (early-stopped, errored) | knobs |",
             "|---|---:|---:|---|---:|---|---|"]
    for r in rows:
        knobs = ", ".join(f"{k}={_short(v)}" for k, v in sorted(r.knobs.items())) or "defaults"
        lines.append(f"| {r.method} | {r.ipc} | {100 * r.acc_mean:.2f} ± {100 * r.acc_std:.2f} | "
                     f"{r.source}, {r.eval_models} nets | {r.iterations}/{r.target_iterations} | "
                     f"{r.trials} ({r.stopped_early}, {r.errored}) | {knobs} |")
    lines += ["", "Accuracy: mean ± std of the final test accuracy of freshly trained networks on the best trial's "
              "synthetic set (never the best epoch)."]
    return "\n".join(lines) + "\n"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    keys = list(rows[0])
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
                         for k, v in row.items()})
    return buf.getvalue()


def _write_text(fs, path: str, text: str) -> None:
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def _copy_synthetic(record: dict, fs, dest: str) -> bool:
    """Copy the trial's synthetic set (trial dir, else its latest checkpoint) to ``dest``."""
    import pyarrow.fs as pafs

    candidates = []
    if record["path"]:
        candidates.append((fs, f"{record['path']}/{SYNTHETIC_FILE}"))
    ckpt = record.get("checkpoint")
    if ckpt is not None:
        candidates.append((ckpt.filesystem, f"{ckpt.path}/{SYNTHETIC_FILE}"))
    for src_fs, src in candidates:
        if src_fs.get_file_info(src).type == pafs.FileType.File:
            pafs.copy_files(src, dest, source_filesystem=src_fs, destination_filesystem=fs)
            return True
    return False


def _hparams_value(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True)


def write_hparams(records: list[dict], fs, experiment_path: str) -> str:
    """TensorBoard HPARAMS view: one run per trial (method, IPC, seed, knobs) against its accuracy.

    One experiment summary at the top (the union of every trial's hyperparameters, so the
    table has a column per knob of any method) and one session per trial.
    """
    import pyarrow.fs as pafs
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    dest = f"{experiment_path}/tensorboard_hparams"
    runs = []
    for r in records:
        if r["acc_mean"] is None:
            continue
        hp = {"method": r["method"], "ipc": r["ipc"], "seed": r["seed"],
              **{k: _hparams_value(v) for k, v in sorted(r["knobs"].items())}}
        metrics = {"hparams/acc_mean": float(r["acc_mean"]), "hparams/acc_std": float(r["acc_std"] or 0.0),
                   "hparams/iterations": float(r["iterations"])}
        runs.append((f"{r['method']}_ipc{r['ipc']}_{r['trial_id']}", hp, metrics))
    textual = {k for _, hp, _ in runs for k, v in hp.items() if isinstance(v, (str, bool))}
    for _, hp, _ in runs:  # one type per column: a column with any text value is all text
        for k in textual & set(hp):
            hp[k] = str(hp[k])
    union: dict[str, Any] = {}
    for _, hp, _ in runs:
        for k, v in hp.items():
            union.setdefault(k, v)
    discrete = {k: sorted({hp[k] for _, hp, _ in runs if k in hp}) for k in textual}
    with tempfile.TemporaryDirectory(prefix="raydd-hparams-") as tmp:
        if runs:
            experiment, _, _ = hparams_summary(union, runs[0][2], hparam_domain_discrete=discrete)
            with SummaryWriter(log_dir=tmp) as root:
                root.file_writer.add_summary(experiment)
            for run_name, hp, metrics in runs:
                _, start, end = hparams_summary(hp, metrics)
                with SummaryWriter(log_dir=os.path.join(tmp, run_name)) as writer:
                    writer.file_writer.add_summary(start)
                    writer.file_writer.add_summary(end)
                    for key, value in metrics.items():
                        writer.add_scalar(key, value)
        fs.create_dir(dest, recursive=True)
        pafs.copy_files(tmp, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return dest


def summarize(result_grid, spec: SweepSpec, *, wall_time_s: float = 0.0) -> SweepResult:
    """Leaderboard, trial table, best synthetic sets and the hparams view, written into the experiment dir."""
    fs = result_grid.filesystem
    exp = result_grid.experiment_path
    records = [_trial_record(res, spec) for res in result_grid]
    statuses = _trial_statuses(result_grid)
    for r in records:
        r["status"] = statuses.get(r["trial_id"], "ERROR" if r["error"] else "UNKNOWN")
    unfinished = len(result_grid) - result_grid.num_terminated - result_grid.num_errors
    board = build_leaderboard(records)
    fs.create_dir(f"{exp}/best", recursive=True)
    rows = []
    for row, best in board:
        dest = f"{exp}/best/{row.method}_ipc{row.ipc}.safetensors"
        if _copy_synthetic(best, fs, dest):
            row.synthetic_path = dest
        rows.append(row)
    trials = [{k: v for k, v in r.items() if k != "checkpoint"} for r in records]
    paths = {name: f"{exp}/{name}" for name in ("leaderboard.csv", "leaderboard.md", "trials.csv")}
    _write_text(fs, paths["leaderboard.csv"], _csv([asdict(r) for r in rows]))
    _write_text(fs, paths["leaderboard.md"], leaderboard_markdown(rows, spec.name, unfinished=unfinished))
    _write_text(fs, paths["trials.csv"], _csv(trials))
    hparams = write_hparams(records, fs, exp) if records else None
    return SweepResult(spec.name, exp, rows, trials, paths["leaderboard.csv"], paths["leaderboard.md"],
                       paths["trials.csv"], hparams, sum(1 for r in records if r["error"]), wall_time_s,
                       unfinished, result_grid)


def _trial_statuses(result_grid) -> dict[str, str]:
    """{trial id: Tune status} (TERMINATED, ERROR, PENDING, RUNNING, PAUSED); {} if Ray hides them."""
    analysis = getattr(result_grid, "_experiment_analysis", None)
    return {t.trial_id: t.status for t in getattr(analysis, "trials", None) or []}
