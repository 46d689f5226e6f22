"""``raydd reproduce --campaign DIR --time 8m``: the published settings at the paper's scale, one GPU sitting at a
time.

GPU time comes in short sittings. A campaign takes the published settings that have no paper-scale row yet, in a
fixed priority order (``CAMPAIGN_ORDER``), runs each to its end — farm, condense, evaluate with Random beside it,
ledger row — or, when the sitting's time runs out, to a checkpoint, and keeps everything a later sitting needs in
``DIR``: ``campaign.json`` (each entry's status and sittings), ``ledger.jsonl`` (its finished rows) and
``runs/<entry>/`` (the method's checkpoint and synthetic set: kilobytes to a few MB). The trajectory store is not
kept: a later sitting farms the same trajectories again from the same seeds (their ids are hashes of their
settings), equal up to the GPU's non-determinism, and the row says how often and from where it was resumed.
``--smoke`` runs the same campaign at the test-sized scale on digits (on a CPU, in a minute).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .run import append_ledger, default_ledger, parse_budget, read_ledger, reproduce, run_directory
from .settings import get_setting, published_settings

# The priority order of the paper-scale rows (issue 25): the cheap distribution-matching row first, then MTT's
# CIFAR-10 IPC 1, DATM-CLR under each reading of its student momentum, the Fashion-MNIST rows, DATM and EDC;
# every other IPC-10 setting after them (``campaign_entries``).
CAMPAIGN_ORDER: tuple[tuple[str, dict[str, Any]], ...] = (
    ("dm_fashion_mnist_ipc10", {}),
    ("mtt_cifar10_ipc1", {}),
    ("datm_clr_cifar10_ipc1", {}),  # the default: a plain-SGD student, as the code it builds on (DATM's)
    ("datm_clr_cifar10_ipc1", {"inner_momentum": 0.5}),  # the paper's words read literally: a momentum student
    ("dance_fashion_mnist_ipc10", {}),
    ("ptlm_fashion_mnist_ipc10", {}),
    ("ssd_fashion_mnist_ipc10", {}),
    ("datm_cifar10_ipc1", {}),
    ("edc_cifar10_ipc10", {}),
)

STATE_FILE, LEDGER_FILE = "campaign.json", "ledger.jsonl"


@dataclass(frozen=True)
class CampaignEntry:
    setting: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        return self.setting + "".join(f"-{k}={v}" for k, v in self.overrides)


def campaign_entries(only: list[str] | None = None) -> list[CampaignEntry]:
    """CAMPAIGN_ORDER, then the other IPC-10 settings by name; ``only`` keeps the named settings (in this order)."""
    entries = [CampaignEntry(name, tuple(sorted(knobs.items()))) for name, knobs in CAMPAIGN_ORDER]
    listed = {e.setting for e in entries}
    entries += [CampaignEntry(name) for name, s in sorted(published_settings().items())
                if s.ipc == 10 and name not in listed]
    if only:
        for name in only:
            get_setting(name)  # one line naming the unknown setting
        entries = [e for e in entries if e.setting in only]
    return entries


def has_paper_row(rows: list[dict], entry: CampaignEntry) -> bool:
    """A finished, uncapped paper-scale row of ``entry`` (its own knobs) on the setting's own data."""
    for r in rows:
        if (r.get("setting") == entry.setting and r.get("scale") == "paper" and not r.get("on")
                and tuple(sorted((r.get("overrides") or {}).items())) == entry.overrides
                and r.get("acc_mean") is not None and r.get("iterations", 0) >= r.get("planned_iterations", 1)
                and not any(cap in r.get("departures", "") for cap in ("trajectories ", "epochs "))):
            return True
    return False


@dataclass
class CampaignReport:
    rows: list[dict] = field(default_factory=list)  # (entry key, status, from, to, planned, seconds, accuracy)

    def table(self) -> str:
        lines = ["| entry | status | iterations this sitting | planned | seconds | accuracy % (Random %) |",
                 "|---|---|---|---:|---:|---|"]
        for r in self.rows:
            acc = "–" if r["acc"] is None else f"{100 * r['acc']:.2f} ({100 * r['random']:.2f})"
            lines.append(f"| {r['key']} | {r['status']} | {r['from']} → {r['to']} | {r['planned']} | "
                         f"{r['seconds']:.0f} | {acc} |")
        return "\n".join(lines) + "\n"


def run_campaign(directory: str | Path, *, time_limit: str | float, smoke: bool = False,
                 only: list[str] | None = None, data_root: str | None = None, store: str = "raydd-campaign-store",
                 device: str = "auto", engine: str = "eager", pack: int = 1, budget: str | float | None = None,
                 eval_reserve: str | float = "90s", ledger: str | Path | None = None,
                 progress: bool = True) -> CampaignReport:
    """One sitting of the campaign kept in ``directory`` (see the module doc), for at most ``time_limit``
    (``parse_budget``: 8m, 480s): the next entries without a paper-scale row — in ``ledger`` (default: the
    repository's) or the campaign's own — each farmed, condensed until ``eval_reserve`` before the end (or for
    ``budget``, if shorter), and evaluated only if it reached its iteration count."""
    seconds = parse_budget(time_limit)
    if seconds is None:
        raise ValueError("a campaign needs --time (e.g. 8m): the length of this sitting")
    reserve = parse_budget(eval_reserve) or 0.0
    deadline = time.perf_counter() + seconds
    root = Path(directory)
    _check_writable(root)
    entries = campaign_entries(only)
    state = _read_state(root)
    rows = read_ledger(root / LEDGER_FILE) + ([] if ledger == "" else read_ledger(default_ledger() if ledger is None
                                                                                   else ledger))
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    report = CampaignReport()
    scale, on = ("tiny", "digits") if smoke else ("paper", None)
    for entry in entries:
        done = state["entries"].get(entry.key, {}).get("status") == "done"
        if done or (not smoke and has_paper_row(rows, entry)):
            continue
        left = deadline - time.perf_counter()
        if left < reserve + 10:
            say(f"campaign: {left:.0f} s left, less than the evaluation reserve; stopping before {entry.key}")
            break
        record = state["entries"].setdefault(entry.key, {"setting": entry.setting, "overrides": dict(entry.overrides),
                                                         "sittings": []})
        run_dir = root / "runs"
        resume = (run_directory(run_dir, entry.setting, scale, overrides=dict(entry.overrides), on=on)
                  / "method.safetensors").exists()
        say(f"campaign: {entry.key} ({'resuming' if resume else 'starting'}; {left:.0f} s left in this sitting)")
        started = time.perf_counter()
        out = reproduce(entry.setting, scale=scale, on=on, data_root=data_root, store=store, workdir=str(run_dir),
                        device=device, budget=budget, resume=resume, ledger="", progress=progress, pack=pack,
                        overrides=dict(entry.overrides) or None, engine=engine, evaluate_unfinished=False,
                        condense_until=deadline - reserve)
        sitting = {"date": _now(), "device": out.row.get("device") or _device_name(device),
                   "from": out.resumed_from, "to": out.iterations, "seconds": round(time.perf_counter() - started, 1),
                   "farm": out.trajectories, "engine": engine, "method_engine": out.method_engine}
        record["sittings"].append(sitting)
        record.update(iterations=out.iterations, planned=out.planned,
                      status="done" if out.finished else "checkpoint")
        if out.finished:
            row = dict(out.row, campaign={
                "sittings": record["sittings"], "resumed": len(record["sittings"]) > 1,
                "how": "each sitting farmed the trajectories again from the same seeds on a fresh machine (equal "
                       "up to the GPU's non-determinism) and continued the method's checkpoint"})
            append_ledger(root / LEDGER_FILE, row)
        _write_state(root, state)
        report.rows.append({"key": entry.key, "status": record["status"], "from": out.resumed_from,
                            "to": out.iterations, "planned": out.planned, "seconds": sitting["seconds"],
                            "acc": None if out.result is None else out.result.mean,
                            "random": None if out.random is None else out.random.mean})
    return report


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"campaign directory {root} cannot be written ({type(err).__name__}): choose another") \
            from None


def _read_state(root: Path) -> dict:
    path = root / STATE_FILE
    if not path.exists():
        return {"entries": {}}
    try:
        state = json.loads(path.read_text())
    except ValueError:
        raise ValueError(f"{path} is not a campaign state file (JSON)") from None
    if not isinstance(state, dict) or not isinstance(state.get("entries"), dict):
        raise ValueError(f"{path} is not a campaign state file (no 'entries')")
    return state


def _write_state(root: Path, state: dict) -> None:
    """Whole or not at all: a temp file renamed into place."""
    path = root / STATE_FILE
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
    os.replace(temp, path)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _device_name(device: str) -> str:
    from ..training import resolve_device

    import torch

    dev = resolve_device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


__all__ = ["CAMPAIGN_ORDER", "CampaignEntry", "CampaignReport", "campaign_entries", "has_paper_row", "run_campaign"]
