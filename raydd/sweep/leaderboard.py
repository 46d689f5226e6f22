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

from ..evaluation.robustness import METRICS as ROBUSTNESS_SCORES
from ..files import write_whole
from .spec import SweepSpec
from .trial import METRIC, SYNTHETIC_FILE, TIME_ATTR, TRIAL_STATE_FILE, TrialSettings

FINISHED_FILE = "sweep_done.json"
SCORE_KEYS = tuple(k for m in ROBUSTNESS_SCORES for k in (m, f"{m}_std"))  # what trials report (spec ``metrics``)


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
    error: str | None = None  # every trial of the group errored: the first one's error line
    scores: dict = field(default_factory=dict)  # DD-Ranking's scores of the best trial's set (spec ``metrics``)


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
    unfinished: int = 0  # trials that neither reached their iterations, nor errored, nor were stopped by ASHA
    result_grid: Any = field(default=None, repr=False)
    interrupted: bool = False  # Ctrl-C stopped the sweep (resume=True continues it)

    @property
    def complete(self) -> bool:
        return self.unfinished == 0

    def markdown(self) -> str:
        return leaderboard_markdown(self.rows, self.name, unfinished=self.unfinished,
                                    errored=[t for t in self.trials if t.get("error")])


def _trial_record(result, spec: SweepSpec, config: dict | None = None) -> dict:
    """A trial's row from its Tune result; ``config``: the trial's config, where the result lacks it (a trial
    that never reported in this run). A checkpoint newer than the result (Tune's state lagged behind a
    driver that was killed) supplies the last report."""
    settings = TrialSettings.from_config(result.config or config or {})
    metrics = dict(result.metrics or {})
    saved = last_checkpointed_report(result)
    if saved and saved.get(TIME_ATTR, 0) > metrics.get(TIME_ATTR, 0) and "trial_error" not in metrics:
        metrics.update(saved)
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
        "error": result.error is not None or "trial_error" in metrics,
        "error_line": metrics.get("trial_error") or (first_error_line(result.error) if result.error else None),
        "node_id": metrics.get("node_id"), "checkpoint": result.checkpoint,
        "scores": {k: metrics[k] for k in SCORE_KEYS if metrics.get(k) is not None},
    }


def last_checkpointed_report(result) -> dict | None:
    """The last report of a trial as its newest checkpoint saved it (``trial.json``), or None."""
    import pyarrow.fs as pafs

    fs = getattr(result, "filesystem", None)
    if fs is None or not result.path:
        return None
    newest, newest_it = None, -1
    for entry in fs.get_file_info(pafs.FileSelector(result.path, allow_not_found=True)):
        if entry.type != pafs.FileType.Directory or not entry.base_name.startswith("checkpoint_"):
            continue
        try:
            with fs.open_input_stream(f"{entry.path}/{TRIAL_STATE_FILE}") as f:
                last = json.loads(f.read().decode())["last"]
        except (OSError, KeyError, ValueError):
            continue
        if int(last.get(TIME_ATTR, -1)) > newest_it:
            newest, newest_it = last, int(last.get(TIME_ATTR, -1))
    return newest


def first_error_line(error: BaseException | str | None) -> str | None:
    """The line that says what went wrong (``ValueError: ...``), not Ray's wrapping or the traceback."""
    if error is None:
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):  # Ray puts the original exception's last line last
        if ":" in line and line.split(":", 1)[0].replace(".", "").isidentifier() and \
                line.split(":", 1)[0].endswith(("Error", "Exception", "Interrupt")):
            return line
    return lines[-1] if lines else type(error).__name__


def build_leaderboard(records: list[dict]) -> list[tuple[LeaderboardRow, dict]]:
    """Best trial per (method, IPC): among trials that ran all their iterations (if any did), highest accuracy."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["ipc"]), []).append(r)
    rows = []
    for (method, ipc), group in sorted(groups.items()):
        scored = [r for r in group if not r["error"] and r["acc_mean"] is not None and math.isfinite(r["acc_mean"])]
        if not scored:
            failed = [r for r in group if r["error"]]
            if failed:  # nothing to rank: the group is an errored row
                first = failed[0]
                rows.append((LeaderboardRow(
                    method=method, ipc=ipc, acc_mean=float("nan"), acc_std=float("nan"), source="-", eval_models=0,
                    iterations=first["iterations"], target_iterations=first["target_iterations"], trials=len(group),
                    stopped_early=0, errored=len(failed), seed=first["seed"], knobs=first["knobs"],
                    trial_id=first["trial_id"], trial_path=first["path"], synthetic_path=None,
                    error=first.get("error_line") or "error"), first))
            continue
        complete = [r for r in scored if r["iterations"] >= r["target_iterations"]]
        best = max(complete or scored, key=lambda r: (r["acc_mean"], -(r["acc_std"] or 0.0)))
        rows.append((LeaderboardRow(
            method=method, ipc=ipc, acc_mean=float(best["acc_mean"]), acc_std=float(best["acc_std"] or 0.0),
            source=best["source"], eval_models=best["eval_models"], iterations=best["iterations"],
            target_iterations=best["target_iterations"], trials=len(group),
            stopped_early=sum(1 for r in group if not r["error"] and r["iterations"] < r["target_iterations"]),
            errored=sum(1 for r in group if r["error"]), seed=best["seed"], knobs=best["knobs"],
            trial_id=best["trial_id"], trial_path=best["path"], synthetic_path=None,
            scores=dict(best.get("scores") or {})), best))
    return rows


def leaderboard_markdown(rows: list[LeaderboardRow], name: str = "", *, unfinished: int = 0,
                         errored: list[dict] | None = None) -> str:
    lines = [f"### Leaderboard {name}".rstrip(), ""]
    if unfinished:
        lines += [f"**Incomplete: {unfinished} trial(s) did not finish (interrupted sweep); resume it with "
                  f"`raydd sweep <spec> --resume`.**", ""]
    scored = [m for m in ROBUSTNESS_SCORES if any(m in r.scores for r in rows)]  # the spec's metrics
    lines += [
             "| method | IPC | accuracy (%) | evaluation | iterations | trials (early-stopped, errored) | knobs |"
             + "".join(f" {m.upper()} |" for m in scored),
             "|---|---:|---:|---|---:|---|---|" + "---:|" * len(scored)]
    for r in rows:
        knobs = ", ".join(f"{k}={_short(v)}" for k, v in sorted(r.knobs.items())) or "defaults"
        accuracy = f"errored: {r.error}" if r.error else f"{100 * r.acc_mean:.2f} ± {100 * r.acc_std:.2f}"
        evaluation = "-" if r.error else f"{r.source}, {r.eval_models} nets"
        scores = "".join(f" {r.scores[m]:.4f} ± {r.scores.get(m + '_std', 0.0):.4f} |" if m in r.scores else " - |"
                         for m in scored)
        lines.append(f"| {r.method} | {r.ipc} | {accuracy} | {evaluation} | {r.iterations}/{r.target_iterations} | "
                     f"{r.trials} ({r.stopped_early}, {r.errored}) | {knobs} |{scores}")
    lines += ["", "Accuracy: mean ± std of the final test accuracy (%) of freshly trained networks on the best "
              "trial's synthetic set (never the best epoch)."]
    if scored:
        lines += ["", "HLR, IOR, LRS, ARS: DD-Ranking's scores of that set (mean ± std over seeded runs, accuracies "
                  "as fractions; raydd.evaluation.robustness)."]
    if errored:
        lines += ["", f"Errored trials ({len(errored)}):", ""]
        lines += [f"- {r['method']} IPC {r['ipc']} (trial {r['trial_id']}): {r.get('error_line') or 'error'}"
                  for r in errored]
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


def write_text(fs, path: str, text: str) -> None:
    """Write ``text`` whole (``raydd.files.write_whole``)."""
    write_whole(fs, path, text.encode())


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


def _asha_stopped(fs, experiment: str) -> set[str]:
    """The trials ASHA stopped, from the decisions it saved with the experiment (empty without ASHA)."""
    import pyarrow.fs as pafs

    from .scheduler import DECISIONS_FILE

    path = f"{experiment}/{DECISIONS_FILE}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return set()
    with fs.open_input_stream(path) as f:
        return set(json.loads(f.read().decode()).get("stopped", []))


def summarize(result_grid, spec: SweepSpec, *, wall_time_s: float = 0.0, interrupted: bool = False) -> SweepResult:
    """Leaderboard, trial table, best synthetic sets and the hparams view, written into the experiment dir."""
    fs = result_grid.filesystem
    exp = result_grid.experiment_path
    configs = _trial_configs(result_grid)
    records = [_trial_record(res, spec, configs.get(_trial_id_from_path(res.path))) for res in result_grid]
    statuses = _trial_statuses(result_grid)
    for r in records:
        r["status"] = statuses.get(r["trial_id"], "ERROR" if r["error"] else "UNKNOWN")
    # finished: errored, reached its iterations, or stopped by ASHA (its saved decisions) — not merely TERMINATED,
    # which is also what Tune calls the trials it stops when the sweep is interrupted
    stopped = _asha_stopped(fs, exp)
    unfinished = sum(1 for r in records if not (r["error"] or r["iterations"] >= r["target_iterations"]
                                                  or r["trial_id"] in stopped))
    board = build_leaderboard(records)
    fs.create_dir(f"{exp}/best", recursive=True)
    rows = []
    for row, best in board:
        dest = f"{exp}/best/{row.method}_ipc{row.ipc}.safetensors"
        if row.error is None and _copy_synthetic(best, fs, dest):
            row.synthetic_path = dest
        rows.append(row)
    trials = [{k: v for k, v in r.items() if k != "checkpoint"} for r in records]
    paths = {name: f"{exp}/{name}" for name in ("leaderboard.csv", "leaderboard.md", "trials.csv")}
    write_text(fs, paths["leaderboard.csv"], _csv([asdict(r) for r in rows]))
    errored = [r for r in records if r["error"]]
    write_text(fs, paths["leaderboard.md"], leaderboard_markdown(rows, spec.name, unfinished=unfinished,
                                                                  errored=errored))
    write_text(fs, paths["trials.csv"], _csv(trials))
    hparams = write_hparams(records, fs, exp) if records else None
    result = SweepResult(spec.name, exp, rows, trials, paths["leaderboard.csv"], paths["leaderboard.md"],
                         paths["trials.csv"], hparams, sum(1 for r in records if r["error"]), wall_time_s,
                         unfinished, result_grid, interrupted)
    if result.complete and not interrupted and result_grid.num_errors == 0:  # what a resume reads: nothing left to run (a crashed
        # trial, Tune status ERROR, is retried by a resume; a trial that reported its error is final)
        saved = {k: v for k, v in asdict(result).items() if k != "result_grid"}
        write_text(fs, f"{exp}/{FINISHED_FILE}", json.dumps(saved, indent=1, default=str))
    return result


def load_finished(fs, experiment_path: str) -> SweepResult | None:
    """The result a finished sweep saved (``FINISHED_FILE``), or None while it has not finished."""
    import pyarrow.fs as pafs

    path = f"{experiment_path}/{FINISHED_FILE}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        saved = json.loads(f.read().decode())
    saved["rows"] = [LeaderboardRow(**row) for row in saved["rows"]]
    return SweepResult(**saved)


def _trial_configs(result_grid) -> dict[str, dict]:
    analysis = getattr(result_grid, "_experiment_analysis", None)
    return {t.trial_id: t.config for t in getattr(analysis, "trials", None) or []}


def _trial_statuses(result_grid) -> dict[str, str]:
    """{trial id: Tune status} (TERMINATED, ERROR, PENDING, RUNNING, PAUSED); {} if Ray hides them."""
    analysis = getattr(result_grid, "_experiment_analysis", None)
    return {t.trial_id: t.status for t in getattr(analysis, "trials", None) or []}
