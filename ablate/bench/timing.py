"""How the bench times a region: the device synchronised on both sides, optionally with the process's
``getrusage`` figures around it, and the ratio of two throughputs."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from ablate.device import sync

try:
    import resource
except ImportError:  # not a Unix: wall and CPU time only, no fault counts
    resource = None  # type: ignore[assignment]


def timed(device: torch.device, work: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds that ``work()`` takes, with the device synchronised on both sides so that queued
    kernels are neither charged to the previous region nor left out of this one."""
    sync(device)
    start = time.perf_counter()
    result = work()
    sync(device)
    return time.perf_counter() - start, result


def _usage_now() -> tuple[float, float, float, int]:
    """(wall, user CPU, system CPU seconds, minor page faults) of this process so far."""
    if resource is None:
        return time.perf_counter(), time.process_time(), 0.0, 0
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt


def measured(device: torch.device, work: Callable[[], Any]) -> tuple[dict[str, float], Any]:
    """Run ``work()`` with the device synchronised on both sides; its wall seconds, user and system
    CPU seconds and minor page faults (the faults and system time are where a step that gives its
    memory back to the kernel, and faults it in again, pays)."""
    sync(device)
    before = _usage_now()
    result = work()
    sync(device)
    wall, user, system, faults = (b - a for a, b in zip(before, _usage_now()))
    return dict(seconds=wall, user_seconds=user, sys_seconds=system, faults=int(faults)), result


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN when ``b`` is not positive (a comparison that measured nothing)."""
    return a / b if b > 0 else float("nan")
