"""What a run shows while it works: on a terminal, bars (tqdm) for the set-up phases that take a while
and for each epoch, with the running train loss and the LR; off a terminal (SLURM, CI, a pipe),
plain log lines with timestamps and no escape codes.

tqdm decides by itself: ``disable=None`` turns a bar off when its stream is not a terminal. A bar
reads the train loss, which lives on the device, without making the device wait (``LaggedValue``),
so the step loop never synchronises for it.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Iterable, Iterator, Optional

import torch
from tqdm import tqdm

log = logging.getLogger("ablate")

PHASE_BAR_DELAY = 2.0  # seconds before a set-up phase shows a bar: quick phases only say what they do
REFRESH_SECONDS = 0.5  # how often an epoch bar reads the running loss


def on_terminal() -> bool:
    """Whether the run's log lines go to a terminal (Hydra's console handler writes to stdout)."""
    return sys.stdout.isatty()


def timestamp() -> str:
    """The time of day for a log line read off a terminal, where no bar shows the time passing."""
    return time.strftime("%H:%M:%S")


@contextlib.contextmanager
def phase(what: str, total: Optional[int] = None, unit: str = "it") -> Iterator[tqdm]:
    """A set-up phase: one log line saying what it does, and, on a terminal, a bar of ``total`` units
    when the phase lasts longer than PHASE_BAR_DELAY (``update`` the bar it yields)."""
    log.info("%s ...", what)
    bar = tqdm(total=total, desc=what, unit=unit, leave=False, delay=PHASE_BAR_DELAY, dynamic_ncols=True,
               disable=None if total else True)
    try:
        yield bar
    finally:
        bar.close()


class LaggedValue:
    """A device scalar read without waiting for the device. On a GPU each read starts a copy to pinned
    host memory behind the queued work and returns the last copy that has landed (None before the
    first): the value shown lags by one refresh, and the step loop never synchronises. On a CPU the
    value is read as it is."""

    def __init__(self, device: torch.device) -> None:
        self.host = torch.zeros((), pin_memory=True) if device.type == "cuda" else None
        self.landed: Optional[torch.cuda.Event] = None
        self.value: Optional[float] = None

    def read(self, value: torch.Tensor) -> Optional[float]:
        if self.host is None:
            return float(value)
        if self.landed is not None and self.landed.query():  # the copy before this one is on the host
            self.value, self.landed = float(self.host), None
        if self.landed is None:
            self.host.copy_(value.detach(), non_blocking=True)
            self.landed = torch.cuda.Event()
            self.landed.record()
        return self.value


class EpochBar:
    """tqdm over one epoch's batches, showing the running mean train loss and the LR (refreshed every
    REFRESH_SECONDS at most). Off a terminal, or with ``progress=false``, it is a plain iteration."""

    def __init__(self, batches: Iterable, total: int, desc: str, enabled: bool, device: torch.device) -> None:
        self.bar = tqdm(batches, total=total, desc=desc, leave=False, dynamic_ncols=True,
                        disable=None if enabled else True)
        self.loss = LaggedValue(device)
        self.next_refresh = 0.0

    def __iter__(self) -> Iterator:
        return iter(self.bar)

    def show(self, loss_sum: torch.Tensor, seen: int, lr: float) -> None:
        """Called after every step: the loss summed over the ``seen`` images so far, and the step's LR."""
        if self.bar.disable or time.monotonic() < self.next_refresh:
            return
        self.next_refresh = time.monotonic() + REFRESH_SECONDS
        loss = self.loss.read(loss_sum / max(seen, 1))
        self.bar.set_postfix_str(("" if loss is None else f"loss {loss:.4f} · ") + f"lr {lr:.4g}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def duration(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``2.1 h``: a duration as a person reads it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
