"""No orphans: the worker processes of a sweep's launcher end when the launcher ends, however it ends.

After a SIGKILL of the process that launched a joblib sweep, its loky workers kept training with no
parent for as long as their jobs lasted, and idle ones waited for work forever, while a sweep
started again met them in its runs. So each worker is tied to the launcher (``tie_to_launcher``)
as it starts, before it reads any work (``tie_joblib_workers`` makes joblib's loky backend run it as
the workers' initializer), and again as each job starts (``die_with_launcher``):

* on Linux the kernel sends the worker SIGKILL when its parent dies (``PR_SET_PDEATHSIG``);
* elsewhere a watchdog thread checks the parent every second.

Jobs whose parent is not the launcher are left alone: SLURM's (SLURM ends its jobs' processes
itself) and submitit_local's, which submitit starts under a controller meant to outlive the
launcher, as a cluster's jobs outlive their submitter; the run locks keep a sweep started again
from training their runs twice. This module imports nothing heavy, so a worker is tied at once.
"""
from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import threading
import time
from typing import Callable

LAUNCHER_PID_ENV = "ABLATE_SWEEP_PID"  # set by ablate.sweep.SweepCallback in the launcher
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_tied = False


def _parent_death_signal(sig: int) -> bool:
    """Ask the Linux kernel to send ``sig`` to this process when its parent dies; False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, every: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


def tie_to_launcher(launcher: int) -> None:
    """End this process when ``launcher``, its parent, ends (once per process; a no-op when the
    parent is another process, or in the launcher itself)."""
    global _tied
    if _tied or launcher == os.getpid() or os.getppid() != launcher:
        return
    _tied = True
    if not _parent_death_signal(signal.SIGKILL):
        threading.Thread(target=_watch_parent, args=(launcher,), daemon=True, name="ablate-watchdog").start()
    if os.getppid() != launcher:  # the launcher died before the signal was armed
        os._exit(1)


def _worker_started(launcher: int) -> None:
    """joblib's initializer of a loky worker. Its parent was ``launcher`` when it was started, so
    another parent now means the launcher died while the worker was starting: it ends at once."""
    if os.getppid() != launcher:
        os._exit(1)
    tie_to_launcher(launcher)


def die_with_launcher() -> None:
    """``tie_to_launcher`` for the launcher the environment names (``ABLATE_SWEEP_PID``), if any."""
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    if launcher.isdigit():
        tie_to_launcher(int(launcher))


def tie_joblib_workers() -> Callable[[], None]:
    """Make the loky workers that joblib starts from this process tie themselves to it as they start
    (their initializer), before they read any work; return what undoes it. Hydra's joblib launcher hard-codes
    ``backend='loky'`` and passes no initializer, so the factory registered under that name is
    wrapped (``joblib.register_parallel_backend``). Without joblib, nothing is done."""
    try:
        from joblib import register_parallel_backend
        from joblib.parallel import BACKENDS
    except ImportError:
        return lambda: None
    previous = BACKENDS.get("loky")
    if previous is None:
        return lambda: None
    register_parallel_backend("loky", functools.partial(previous, initializer=_worker_started,
                                                        initargs=(os.getpid(),)))
    return lambda: register_parallel_backend("loky", previous)
