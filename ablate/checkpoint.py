"""Checkpoints: a killed run started again goes on from its last saved epoch, and ends exactly as an
uninterrupted run would (on the CPU, bit for bit: tests/test_checkpoint.py).

``checkpoint.every=N`` saves, every N epochs, everything a training carries from one epoch to the
next (``TrainingState``): the model, the optimiser, the EMA or lookahead average, the position in
the schedule, the RNG states (torch's, the data order's, the CUDA ones) and what the data pipeline
carries over epochs (airbench's alternating flips), with the seconds measured so far. ``checkpoint.final=true`` keeps the weights that were evaluated
(the EMA's when there is one) for ``ablate eval``.

Files hold tensors and plain Python values only, written with ``torch.save`` atomically
(``records.atomic_file``) and read with ``weights_only=True``, which runs no pickled code. Saving is
outside the timed regions.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ablate.config import CheckpointConfig
from ablate.records import METRICS, atomic_file, read_metrics

log = logging.getLogger("ablate")

RESUME_FILE = "checkpoint.pt"  # the last resumable state; removed once the run completes
FINAL_FILE = "final.pt"  # the evaluated weights of a completed run (checkpoint.final=true)


@dataclass
class Counters:
    """Where a training stands at an epoch's end: what the loop counts, besides the weights."""

    epoch: int = 0  # epochs completed
    steps: int = 0  # optimiser steps taken
    train_seconds: float = 0.0  # cumulative, preprocessing included (as the metrics rows count it)
    eval_seconds: float = 0.0
    prep_seconds: float = 0.0  # the first process's preprocessing: counted once however often it resumes
    first_train_loss: Optional[float] = None  # the divergence rule's reference
    first_step_at: Optional[float] = None  # wall clock after the first optimiser step
    results: dict = field(default_factory=dict)  # the last epoch's results


@dataclass
class TrainingState:
    """Everything of a training that carries over from one epoch to the next, as one state dict."""

    model: nn.Module
    optimizer: Any  # a torch optimiser, or ablate.muon.Optimizers
    averager: Any  # ablate.train.EMA | Lookahead | None
    generator: torch.Generator  # data order and augmentation choices
    batches: Any  # ablate.train.EpochSource: what the data pipeline carries over epochs

    def state_dict(self, counters: Counters) -> dict:
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    averager=None if self.averager is None else self.averager.state_dict(),
                    batches=self.batches.state_dict(),
                    rng=dict(torch=torch.get_rng_state(), data=self.generator.get_state(),
                             cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []),
                    counters=asdict(counters))

    def load_state_dict(self, state: dict) -> Counters:
        """Put the saved state back; return the counters to go on from."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.averager is not None:
            self.averager.load_state_dict(state["averager"])
        self.batches.load_state_dict(state["batches"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["data"])
        if state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return Counters(**state["counters"])


def save(path: Path, state: dict) -> None:
    """``torch.save`` of tensors and plain values, all or nothing (a kill mid-write keeps the last one)."""
    with atomic_file(path, binary=True) as f:
        torch.save(state, f)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class Checkpoints:
    """A run's checkpoints in its directory: the state to resume from (``state``, None for a fresh
    start), a save every ``cfg.every`` epochs (``after_epoch``) and, when the run completes, its final
    weights (``finish``). ``key`` (the run's config key) keeps a checkpoint of another recipe from being
    resumed."""

    def __init__(self, run_dir: Optional[Path] = None, cfg: CheckpointConfig = CheckpointConfig(), key: str = "") -> None:
        """Without ``run_dir``, none: nothing to resume, nothing saved (the bench, unit tests)."""
        self.dir, self.every, self.final, self.key = run_dir and Path(run_dir), cfg.every, cfg.final, key
        self.state = self._resumable() if self.dir else None

    @property
    def resume_epoch(self) -> int:
        """The epochs a resumed run has behind it (0: a fresh start)."""
        return self.state["counters"]["epoch"] if self.state else 0

    def _resumable(self) -> Optional[dict]:
        path = self.dir / RESUME_FILE
        if not path.is_file():
            return None
        try:
            state = load(path)
        except Exception as err:  # a file from elsewhere, or damaged: start afresh rather than fail
            log.warning("cannot read the checkpoint %s (%s: %s); the run starts from the beginning",
                        path, type(err).__name__, err)
            return None
        if state.get("config_key") != self.key:
            log.warning("%s was saved for another recipe (config key %s, not %s); the run starts from the "
                        "beginning", path, state.get("config_key"), self.key)
            return None
        epoch = state["counters"]["epoch"]
        if [row.get("epoch") for row in read_metrics(self.dir)[0][:epoch]] != list(range(1, epoch + 1)):
            log.warning("%s lacks the metrics of the %d epochs %s saved; the run starts from the beginning",
                        self.dir / METRICS, epoch, path)
            return None
        return state

    def after_epoch(self, epoch: int, state: Callable[[], dict]) -> None:
        """Save ``state()`` when ``epoch`` (1-based, completed) is a multiple of ``every``."""
        if self.dir and self.every and epoch % self.every == 0:
            save(self.dir / RESUME_FILE, dict(state(), config_key=self.key))

    def finish(self, evaluated: nn.Module, epochs: float) -> None:
        """The run completed: keep its evaluated weights when asked, drop the resumable state."""
        if self.dir is None:
            return
        if self.final:
            save(self.dir / FINAL_FILE, dict(model=evaluated.state_dict(), config_key=self.key, epochs=epochs))
        (self.dir / RESUME_FILE).unlink(missing_ok=True)
