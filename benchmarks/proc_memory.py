"""Peak resident memory of this process from /proc (Linux): the benchmarks' CPU memory measure."""
from __future__ import annotations


def status_kib(key: str) -> int:
    """A /proc/self/status field in KiB, e.g. VmRSS or VmHWM (the peak resident size)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_peak_kib() -> int:
    """Reset VmHWM to the current resident size (clear_refs 5) and return that size in KiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("VmRSS")
