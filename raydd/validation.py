"""One family of one-line validation errors, shared by every config in raydd.

Each check names the value where the user set it (``where``: ``"EDCEvalConfig.epochs"``,
``"scheduler.grace_period"``, ``"ipc"``), shows what was given and what is accepted, and
raises ValueError before any work starts.

>>> check_int("scheduler.grace_period", 0)
Traceback (most recent call last):
ValueError: scheduler.grace_period=0 is invalid: expected an integer >= 1
"""
from __future__ import annotations

import math
from typing import Any, Iterable


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(where: str, value: Any, *, low: int = 1, high: int | None = None, none_ok: bool = False) -> Any:
    """An integer in [low, high] (bools refused); returns it."""
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{where}={value!r} is invalid: expected an integer {bound}"
                         + (" or None" if none_ok else ""))
    return value


def check_range(where: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, none_ok: bool = False) -> Any:
    """A finite number in the interval (None only with ``none_ok``: an unset optional field); returns it."""
    if value is None and none_ok:
        return None
    lo = "-inf" if low is None else f"{'(' if low_open else '['}{low}"
    hi = "inf)" if high is None else f"{high}{')' if high_open else ']'}"
    if not is_number(value):
        raise ValueError(f"{where}={value!r} is invalid: expected a number in {lo}, {hi}")
    ok = (low is None or (value > low if low_open else value >= low)) and \
         (high is None or (value < high if high_open else value <= high))
    if not ok:
        raise ValueError(f"{where}={value!r} is out of range: expected {lo}, {hi}")
    return value


def check_choice(where: str, value: Any, accepted: Iterable[Any]) -> Any:
    """One of ``accepted``; returns it."""
    accepted = tuple(accepted)
    if value not in accepted:
        raise ValueError(f"{where}={value!r} is invalid: accepted {', '.join(str(a) for a in accepted)}")
    return value


def check_bool(where: str, value: Any, meaning: str = "") -> bool:
    """True or False (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{where}={value!r} is invalid: expected true or false{f' ({meaning})' if meaning else ''}")
    return value


def check_writable(where: str, path: Any, *, directory: bool = False) -> str:
    """A local path a command will write (a file, or with ``directory`` a folder), checked before any work: its
    nearest existing ancestor must be a directory this process can create files in (probed with a uniquely named
    file that is removed again), and the path itself not a directory (a file) or not a file (a folder). Returns the
    path; URIs (``s3://...``) are left to the filesystem that writes them."""
    import os
    import tempfile

    text = os.fspath(path)
    if "://" in text:
        return text
    target = os.path.abspath(os.path.expanduser(text))
    if os.path.exists(target) and os.path.isdir(target) != directory:
        kind = "a directory" if os.path.isdir(target) else "a file"
        raise ValueError(f"{where} {text} is {kind}: expected {'a folder' if directory else 'a file path'}")
    parent = target if directory and os.path.isdir(target) else os.path.dirname(target)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{where} {text} cannot be written: {parent} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".raydd-write-probe-", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"{where} {text} cannot be written ({type(err).__name__} in {parent}): choose a "
                         f"writable location") from None
    return text


def check_ray_address(where: str, address: Any, *, timeout_s: float = 3.0) -> Any:
    """A Ray cluster address (``host:port`` or ``ray://host:port``) that answers a TCP connection within
    ``timeout_s``, checked before any work: a one-line error instead of Ray's half-minute of retries and its
    traceback. ``None``, ``auto`` and ``local`` are left to Ray."""
    import socket
    from urllib.parse import urlsplit

    if address in (None, "", "auto", "local"):
        return address
    text = str(address)
    parts = urlsplit(text if "://" in text else f"ray://{text}")
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"{where}={text!r} is invalid: expected host:port or ray://host:port")
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s):
            pass
    except OSError as err:
        raise ValueError(f"{where}={text!r}: no Ray cluster answers there ({type(err).__name__}: "
                         f"{err.strerror or err}); check the address, or leave it out to start a local "
                         f"cluster") from None
    return address
