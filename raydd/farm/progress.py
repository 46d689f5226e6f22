"""Live farm progress (done/total, trajectories per hour, ETA) and the final summary table."""
from __future__ import annotations

import math
import sys
import time

from tqdm import tqdm

from .task import TrajectoryResult


class FarmProgress:
    """A tqdm bar counted in trajectories; epochs advance it fractionally so the ETA moves."""

    def __init__(self, total: int, skipped: int, *, enabled: bool = True):
        self.total = total
        self.done = 0
        self.start = time.perf_counter()
        self._partial: dict[str, float] = {}
        self._bar = tqdm(total=total, disable=not enabled, file=sys.stderr, unit="traj", dynamic_ncols=True,
                         bar_format="{desc} |{bar}| {percentage:3.0f}%")
        self._skipped = skipped
        self._waiting = ""
        self._elsewhere: set[str] = set()
        # redraw at most twice a second on a terminal, every 15 s into a log file
        self._min_interval = 0.5 if sys.stderr.isatty() else 15.0
        self._last_draw = -math.inf
        self._refresh(force=True)

    def epoch(self, trajectory_id: str, epoch: int, total_epochs: int) -> None:
        self._partial[trajectory_id] = min(epoch / max(total_epochs, 1), 0.999)
        self._refresh(force=False)

    def finished(self, trajectory_id: str) -> None:
        self._partial.pop(trajectory_id, None)
        self.done += 1
        self._refresh()

    def waiting(self, held_elsewhere: dict[str, str]) -> None:
        """Show that the rest is held by other live farms (id -> owner)."""
        owners = sorted(set(held_elsewhere.values()))
        self._waiting = f", waiting for {len(held_elsewhere)} claimed by {', '.join(owners)}" if owners else ""
        self._refresh()

    def finished_elsewhere(self, by_others: list[str]) -> None:
        """Trajectories another farm published while this one waited count as done."""
        for tid in by_others:
            if tid not in self._elsewhere:
                self._elsewhere.add(tid)
                self._partial.pop(tid, None)
                self.done += 1
        self._waiting = ""
        self._refresh()

    def restarted(self, trajectory_id: str) -> None:
        self._partial.pop(trajectory_id, None)
        self._refresh()

    def rate_per_hour(self) -> float:
        elapsed = time.perf_counter() - self.start
        progress = self.done + sum(self._partial.values())
        return 3600.0 * progress / elapsed if elapsed > 0 and progress > 0 else 0.0

    def _refresh(self, force: bool = True) -> None:
        now = time.perf_counter()
        if not force and now - self._last_draw < self._min_interval:
            return
        self._last_draw = now
        progress = self.done + sum(self._partial.values())
        rate = self.rate_per_hour()
        eta = (self.total - progress) / rate * 3600 if rate > 0 else math.nan
        self._bar.n = progress
        skipped = f" (+{self._skipped} already stored)" if self._skipped else ""
        self._bar.set_description_str(f"farm {self.done}/{self.total} done{skipped}, {rate:.1f} traj/h, "
                                      f"ETA {_fmt(eta)}{self._waiting}", refresh=True)

    def close(self) -> None:
        self._bar.close()


def _fmt(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def summary_table(results: list[TrajectoryResult], skipped: list[str], by_others: list[str] = ()) -> str:
    """Per trajectory: id, seed, final train/test accuracy (%), wall time, attempts, status."""
    rows = [("trajectory", "seed", "train_acc", "test_acc", "wall_s", "attempts", "status")]
    for r in sorted(results, key=lambda r: r.seed):
        rows.append((r.trajectory_id, str(r.seed), _pct(r.final.get("train_acc")), _pct(r.final.get("test_acc")),
                     f"{r.wall_time_s:.1f}", str(r.attempts), "trained"))
    for tid in skipped:
        rows.append((tid, "-", "-", "-", "-", "-", "already stored"))
    for tid in by_others:
        rows.append((tid, "-", "-", "-", "-", "-", "trained by another farm"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _pct(value) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.2f}%"
