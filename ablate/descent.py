"""Post 5's search: cyclic coordinate descent over (λ, ρ, α), and the Hydra sweeper that runs it.

Post 5 (docs/references.md) tunes the max LR λ (``schedule.peak``), the Nesterov momentum ρ
(``optim.momentum``) and the weight decay α (``optim.weight_decay``, mean-loss units) of the ResNet9
recipe by cyclic coordinate descent from a deliberately bad start. This module holds

* ``coordinate_descent``: the search itself, a pure function of an objective (tested on a fake one);
* ``CoordinateDescentSweeper``: a Hydra sweeper that runs the search with one training job per
  point, so every point is an ordinary run record of the sweep directory (and a re-run resumes,
  because ``ablate.run.execute`` skips a recipe that already completed there).

Hydra imports this module at start-up (plugin discovery, ``hydra_plugins/ablate_descent_sweeper.py``),
so it stays light: no torch, pandas or matplotlib. The study's charts are ``ablate.studies.hparams``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from hydra.plugins.launcher import Launcher

log = logging.getLogger(__name__)

AXES = ("lr", "momentum", "weight_decay")  # the order of one cycle: λ, then ρ, then α
SYMBOLS = {"lr": "λ", "momentum": "1−ρ", "weight_decay": "α"}  # what a move doubles or halves
OVERRIDES = {"lr": "schedule.peak", "momentum": "optim.momentum", "weight_decay": "optim.weight_decay"}
# A move by a factor 2**s shifts the base-2 exponents of (λ, 1−ρ, α) by s times these. Moving 1−ρ or
# α carries λ along (λ ∝ 1−ρ, λ ∝ 1/α) so that λα/(1−ρ) stays fixed, as Post 5 does.
MOVES = {"lr": (1, 0, 0), "momentum": (1, 1, 0), "weight_decay": (-1, 0, 1)}

Exponents = tuple[int, int, int]


@dataclass(frozen=True)
class Point:
    """One setting of the three hyperparameters, in the units of the config (see ablate.config)."""

    lr: float
    momentum: float
    weight_decay: float

    @property
    def invariant(self) -> float:
        """λα/(1−ρ): the combination that moves of ρ or α leave unchanged."""
        return self.lr * self.weight_decay / (1 - self.momentum)

    def scaled(self, exps: Exponents) -> Point:
        """This point with λ, 1−ρ and α multiplied by 2**exps (element by element)."""
        i, j, k = exps
        return Point(self.lr * 2.0 ** i, 1 - (1 - self.momentum) * 2.0 ** j, self.weight_decay * 2.0 ** k)

    def overrides(self) -> list[str]:
        """The Hydra overrides that train at this point."""
        return [f"{OVERRIDES[axis]}={getattr(self, axis)!r}" for axis in AXES]

    def runnable(self) -> bool:
        # ρ = 0 is excluded too: Nesterov SGD needs a momentum (torch refuses 0).
        return self.lr > 0 and self.weight_decay > 0 and 0 < 1 - self.momentum < 1


@dataclass(frozen=True)
class Trial:
    """An evaluated point, with the move that reached it from ``parent`` (the best point at the time)."""

    point: Point
    score: float
    move: str  # 'start', 'λ×2', '1−ρ÷2', 'α×2', ...
    parent: Optional[Point] = None


@dataclass(frozen=True)
class Descent:
    history: list[Trial]  # every evaluated point, in evaluation order
    best: Trial
    converged: bool  # True: a whole cycle improved nothing; False: max_runs stopped the search


def moved_axis(parent: Point, point: Point) -> tuple[str, float]:
    """The coordinate a move changed and its factor (for ρ, the factor on 1−ρ); ('', 1.0) for the same
    point. Checked in the order α, ρ, λ because a ρ or α move also rescales λ."""
    ratios = {"lr": point.lr / parent.lr, "momentum": (1 - point.momentum) / (1 - parent.momentum),
              "weight_decay": point.weight_decay / parent.weight_decay}
    for axis in reversed(AXES):
        if not math.isclose(ratios[axis], 1.0):
            return axis, ratios[axis]
    return "", 1.0


def move_label(parent: Point, point: Point) -> str:
    """'λ×2', '1−ρ÷2', 'α×2' ...: the move from ``parent`` to ``point`` (λ's compensation implied)."""
    axis, r = moved_axis(parent, point)
    return f"{SYMBOLS[axis]}{'×' if r > 1 else '÷'}{max(r, 1 / r):.3g}" if axis else "same point"


class _BudgetSpent(Exception):
    """Raised inside the search when max_runs points have been evaluated."""


def coordinate_descent(objective: Callable[[Point], float], start: Point, max_runs: int = 60) -> Descent:
    """Maximise ``objective`` by Post 5's cyclic coordinate descent, starting at ``start``.

    A cycle visits λ, then ρ, then α. For each, it first tries doubling (λ, 1−ρ or α) and keeps
    doubling while the score improves; if the first doubling does not improve, it tries halving the
    same way. Moving ρ or α rescales λ so that λα/(1−ρ) stays fixed. The search stops when a whole
    cycle improves nothing, or after ``max_runs`` evaluations. Only a strict improvement moves, so a
    flat direction is never walked forever. Points where ρ would leave (0, 1) are skipped unevaluated.

    Every point lies on the lattice start × 2**(i, j, k), and the cache is keyed by (i, j, k): integer
    exponents compare exactly where the floats (1 − ρ above all) might not, so no point is evaluated twice.
    """
    if not start.runnable():
        raise ValueError(f"start {start} needs λ > 0, α > 0 and 0 < ρ < 1")
    if max_runs < 1:
        raise ValueError(f"max_runs={max_runs} must be at least 1")
    history: list[Trial] = []
    cache: dict[Exponents, Trial] = {}

    def evaluate(exps: Exponents, parent: Optional[Trial]) -> Optional[Trial]:
        """The trial at ``exps`` (run now unless cached), or None where ρ would leave (0, 1)."""
        if exps in cache:
            return cache[exps]
        point = start.scaled(exps)
        if not point.runnable():
            return None
        if len(history) >= max_runs:
            raise _BudgetSpent
        move = move_label(parent.point, point) if parent else "start"
        trial = Trial(point, objective(point), move, parent.point if parent else None)
        cache[exps] = trial
        history.append(trial)
        log.info("coordinate descent, run %d: %s -> λ=%g ρ=%g α=%g: %.2f", len(history), move,
                 point.lr, point.momentum, point.weight_decay, trial.score)
        return trial

    here: Exponents = (0, 0, 0)
    best = evaluate(here, None)
    assert best is not None
    try:
        improved = True
        while improved:
            improved = False
            for axis in AXES:
                for sign in (1, -1):
                    moved = False
                    while True:
                        there = _step(here, axis, sign)
                        trial = evaluate(there, best)
                        if trial is None or not trial.score > best.score:
                            break
                        here, best, moved = there, trial, True
                    if moved:  # the other direction leads back to where this one came from
                        improved = True
                        break
        converged = True
    except _BudgetSpent:
        converged = False
    log.info("coordinate descent %s after %d runs: best %.2f at λ=%g ρ=%g α=%g",
             "converged" if converged else "stopped by max_runs", len(history), best.score,
             best.point.lr, best.point.momentum, best.point.weight_decay)
    return Descent(history, best, converged)


def _step(exps: Exponents, axis: str, sign: int) -> Exponents:
    """The lattice point one move along ``axis`` (sign +1 doubles, -1 halves)."""
    i, j, k = (e + sign * d for e, d in zip(exps, MOVES[axis]))
    return i, j, k


def replay(points: list[Point], scores: list[float]) -> list[Trial]:
    """The trials of a descent from its runs in launch order (for the report): each run moved from
    the best run before it, which is exactly how ``coordinate_descent`` chooses its next point."""
    trials: list[Trial] = []
    best: Optional[Trial] = None
    for point, score in zip(points, scores):
        score = score if math.isfinite(score) else -math.inf  # a failed run
        trials.append(Trial(point, score, move_label(best.point, point) if best else "start",
                            best.point if best else None))
        if best is None or score > best.score:
            best = trials[-1]
    return trials


# --------------------------------------------------------------------------------------------------
# The Hydra sweeper


@dataclass
class CoordinateDescentSweeperConf:
    # Hydra instantiates sweepers only from the hydra_plugins namespace; that module subclasses the
    # sweeper below and adds nothing.
    _target_: str = "hydra_plugins.ablate_descent_sweeper.CoordinateDescentSweeper"
    lr: float = 0.001  # the start point (Post 5's deliberately bad one)
    momentum: float = 0.5
    weight_decay: float = 0.01
    max_runs: int = 60  # a cap on training runs; Post 5 converged after 22
    params: Optional[dict[str, str]] = None  # fixed overrides for every job, e.g. {'+step': 'step5'}


def register_sweeper() -> None:
    """Make ``hydra/sweeper=coordinate_descent`` available (called by ablate.compose.register)."""
    ConfigStore.instance().store(group="hydra/sweeper", name="coordinate_descent",
                                 node=CoordinateDescentSweeperConf, provider="ablate")


class CoordinateDescentSweeper(Sweeper):
    """Runs ``coordinate_descent`` with one Hydra job per point, launched one at a time (each point
    depends on the scores before it). A job's return value is its test accuracy; a failed job (None)
    scores -inf. Each job is an ordinary run of the sweep directory, numbered in evaluation order."""

    def __init__(self, lr: float, momentum: float, weight_decay: float, max_runs: int,
                 params: Optional[dict[str, str]] = None) -> None:
        super().__init__()
        self.start = Point(lr, momentum, weight_decay)
        self.max_runs = max_runs
        self.params = dict(params or {})
        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher: Optional[Launcher] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def fixed_overrides(self, arguments: list[str]) -> list[str]:
        """``params`` then the command line (which wins on the same key), refusing sweeps and the
        three searched keys: the search owns those."""
        loader = self.hydra_context.config_loader if self.hydra_context else None
        parser = OverridesParser.create(config_loader=loader)
        fixed: dict[str, str] = {}
        for o in parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments)):
            key = o.get_key_element()
            if o.is_sweep_override():
                raise HydraException(f"the coordinate-descent sweeper runs one recipe: '{o.input_line}' "
                                     "is a sweep")
            if key.lstrip("+~") in OVERRIDES.values():
                raise HydraException(f"'{key}' is searched by the coordinate-descent sweeper; set its start "
                                     "with hydra.sweeper.lr / .momentum / .weight_decay")
            fixed[key] = f"{key}={o.get_value_element_as_str()}"
        return list(fixed.values())

    def sweep(self, arguments: list[str]) -> Descent:
        assert self.config is not None and self.launcher is not None
        launcher, fixed = self.launcher, self.fixed_overrides(arguments)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # as the basic sweeper does
        job_idx = count()

        def objective(point: Point) -> float:
            [ret] = launcher.launch([fixed + point.overrides()], initial_job_idx=next(job_idx))
            accuracy = ret.return_value  # re-raises what the job raised, as the basic sweeper does
            return -math.inf if accuracy is None else float(accuracy)

        return coordinate_descent(objective, self.start, self.max_runs)
