"""Post 5's hyperparameter study: cyclic coordinate descent over (λ, ρ, α) and its charts.

Post 5 (journey-facts C) tunes the max LR λ (``schedule.peak``), the Nesterov momentum ρ
(``optim.momentum``) and the weight decay α (``optim.weight_decay``, mean-loss units) of the ResNet9
recipe by cyclic coordinate descent from a deliberately bad start. This module holds

* ``coordinate_descent``: the search itself, a pure function of an objective (tested on a fake one);
* ``CoordinateDescentSweeper``: a Hydra sweeper that runs the search with one training job per
  point, so every point is an ordinary run record of the sweep directory (and a re-run resumes,
  because ``ablate.run.execute`` skips a recipe that already completed there);
* the study charts ``python -m ablate.report`` adds for the ``hparams*`` experiments: the descent
  path, and heat maps over (λ, α) and (λ, N) with the flat directions λα = const and λ/N = const.
* ``study_charts``, the one hook the report calls for every study: it also draws Post 6's chart
  (``ablate.wd_study``) and Post 7's (``ablate.bn_study``) when their experiments' runs are present.

The module is imported at Hydra start-up (plugin discovery), so pandas and matplotlib are imported
only inside the chart functions.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure
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
    _target_: str = "hydra_plugins.ablate_studies.CoordinateDescentSweeper"
    lr: float = 0.001  # the start point (Post 5's deliberately bad one)
    momentum: float = 0.5
    weight_decay: float = 0.01
    max_runs: int = 60  # a cap on training runs; Post 5 converged after 22
    params: Optional[dict[str, str]] = None  # fixed overrides for every job, e.g. {'+step': 'step5'}


def register_sweeper() -> None:
    """Make ``hydra/sweeper=coordinate_descent`` available (called by ablate.run.register_all)."""
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


# --------------------------------------------------------------------------------------------------
# Charts for ``python -m ablate.report``: the runs table carries lr_peak, momentum, weight_decay and
# batch_size (read from each run's config), and choice.experiment names the study a run belongs to.

PANEL_KEYS = ["scale", "device"]  # a chart never pools scales or devices: one panel each
MOVE_COLOURS = {"start": "tab:gray", "λ": "tab:blue", "1−ρ": "tab:orange", "α": "tab:green"}


def _job_number(run: str) -> float:
    """Hydra's job number, the prefix of a sweep subdir (conf/config.yaml); launch order for a descent."""
    m = re.match(r"(\d+)_", Path(run).name)
    return int(m.group(1)) if m else math.inf


def _panels(n: int, width: float, height: float) -> tuple[Figure, list[Any]]:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, list(axes[0])


def plot_descent(runs: pd.DataFrame, path: Path) -> Figure:
    """The descent path: test accuracy of each run in launch order, labelled with its move and
    coloured by the coordinate moved (filled: it improved, so the search went on from there; x: the
    run failed), with the best-so-far line. One panel per scale, device and seed."""
    runs = runs.assign(_job=runs.run.map(_job_number)).sort_values(["_job", "run"])
    groups = list(runs.groupby(PANEL_KEYS + ["seed"], sort=True))
    fig, axes = _panels(len(groups), 11, 5.5)
    for ax, ((scale, device, seed), g) in zip(axes, groups):
        points = [Point(r.lr_peak, r.momentum, r.weight_decay) for r in g.itertuples()]
        scores = [float(a) if s == "completed" else math.nan for a, s in zip(g.test_acc, g.status)]
        trials = replay(points, scores)
        floor = min([t.score for t in trials if math.isfinite(t.score)] or [0.0])  # failed runs go here
        best, best_line = -math.inf, []
        for x, t in enumerate(trials, start=1):
            axis = moved_axis(t.parent, t.point)[0] if t.parent else "start"
            colour = MOVE_COLOURS.get(SYMBOLS.get(axis, axis), "tab:red")  # red: a repeated point
            y = t.score if math.isfinite(t.score) else floor
            ax.scatter([x], [y], s=40, marker="o" if math.isfinite(t.score) else "x", color=colour,
                       facecolors=colour if t.score > best else "none", zorder=3)
            ax.annotate(t.move, (x, y), xytext=(0, 6), textcoords="offset points", ha="center",
                        va="bottom", fontsize=7, rotation=90)
            best = max(best, t.score)
            best_line.append(max(best, floor))
        ax.step(range(1, len(trials) + 1), best_line, where="post", color="black", alpha=0.5,
                label="best so far")
        for label, colour in MOVE_COLOURS.items():
            ax.scatter([], [], color=colour, label=label if label == "start" else f"{label} moved")
        top = max(trials, key=lambda t: t.score)
        ax.set_title(f"Post 5 coordinate descent ({scale}, {device}, seed {seed}): best {top.score:.2f}% "
                     f"at λ={top.point.lr:g}, ρ={top.point.momentum:g}, α={top.point.weight_decay:g} "
                     f"after {len(trials)} runs\nblog (full scale): 30.6% at λ=0.001, ρ=0.5, α=0.01 → "
                     "94.2% after 22 runs", fontsize=9)
        ax.set_xlabel("run (launch order)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_xticks(range(1, len(trials) + 1))
        ax.margins(y=0.3)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def _edges(values: list[float]) -> list[float]:
    """Cell edges on a log axis: geometric midpoints, and the same ratio beyond the ends."""
    if len(values) == 1:
        return [values[0] / math.sqrt(2), values[0] * math.sqrt(2)]
    mids = [math.sqrt(a * b) for a, b in zip(values, values[1:])]
    return [values[0] ** 2 / mids[0]] + mids + [values[-1] ** 2 / mids[-1]]


def plot_heatmap(runs: pd.DataFrame, y: str, path: Path) -> Figure:
    """Mean test accuracy of completed ``runs`` over max LR λ (x) and ``y`` ('weight_decay' α or
    'batch_size' N), both on log axes, with the flat direction through the best cell drawn: λα =
    const for α, λ/N = const for N (Post 5). Cells without a completed run stay blank (a diverged
    run, say). One panel per scale and device."""
    import numpy as np

    groups = list(runs.groupby(PANEL_KEYS, sort=True))
    fig, axes = _panels(len(groups), 7.5, 6)
    name = {"weight_decay": "weight decay α", "batch_size": "batch size N"}[y]
    for ax, ((scale, device), g) in zip(axes, groups):
        grid = g.pivot_table(index=y, columns="lr_peak", values="test_acc", aggfunc="mean")
        acc = grid.to_numpy(float)
        xs, ys = [float(v) for v in grid.columns], [float(v) for v in grid.index]
        xe, ye = _edges(xs), _edges(ys)
        mesh = ax.pcolormesh(xe, ye, np.ma.masked_invalid(acc), cmap="viridis")
        fig.colorbar(mesh, ax=ax, label="test accuracy (%)")
        for (yi, xi), a in np.ndenumerate(acc):
            if not math.isnan(a):  # dark text on the bright end of the colour map
                ax.text(xs[xi], ys[yi], f"{a:.1f}", ha="center", va="center", fontsize=7,
                        color="black" if mesh.norm(a) > 0.6 else "white")
        by, bx = np.unravel_index(np.nanargmax(acc), acc.shape)
        lam, other, line = xs[bx], ys[by], np.geomspace(xe[0], xe[-1], 50)
        if y == "weight_decay":  # λα fixed: α = c / λ
            ax.plot(line, lam * other / line, "--", color="tab:red",
                    label=f"λα = {lam * other:.3g}, through the best cell")
        else:  # λ/N fixed: N = λ / c
            ax.plot(line, line * other / lam, "--", color="tab:red",
                    label=f"λ/N = {lam / other:.3g}, through the best cell")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlim(xe[0], xe[-1])
        ax.set_ylim(ye[0], ye[-1])
        ax.set_xticks(xs, [f"{v:g}" for v in xs])
        ax.set_yticks(ys, [f"{v:g}" for v in ys])
        ax.minorticks_off()
        ax.set_xlabel("max learning rate λ")
        ax.set_ylabel(name)
        ax.legend(fontsize=7, loc="upper right")
        n = g.groupby([y, "lr_peak"]).size()
        per_cell = f"{n.min()}" if n.min() == n.max() else f"{n.min()}–{n.max()}"
        ax.set_title(f"Test accuracy over λ and {name} ({scale}, {device}; {per_cell} run(s) per cell, "
                     f"mean)\nPost 5: accuracy changes little along the dashed line", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


STUDY_COLUMNS = {"lr_peak", "momentum", "weight_decay", "batch_size", "choice.experiment"}
GRIDS = {  # experiment -> (the other axis, chart title)
    "hparams_lr_wd": ("weight_decay", "Post 5 grid: max LR × weight decay"),
    "hparams_lr_bs": ("batch_size", "Post 5 grid: max LR × batch size"),
}


def study_charts(runs: pd.DataFrame, out: Path,
                 curves: Optional[dict[str, pd.DataFrame]] = None) -> list[tuple[str, str]]:
    """Write the charts of the Post 5, 6 and 7 studies found in ``runs`` into ``out`` and return
    (title, file name) for each. The experiment a run came from (``+experiment=...``) says which
    chart it feeds; a heat map needs completed runs at two values or more on each axis; the Post 6
    and Post 7 charts read every run's per-epoch ``curves`` (failed runs included)."""
    import matplotlib.pyplot as plt

    from ablate import bn_study, wd_study

    charts = []
    if curves is not None and "choice.experiment" in runs:
        post7 = runs[runs["choice.experiment"] == "batchnorm"]
        stress = post7[post7.step == "bn_stress"]
        partial = post7[post7.step == "bn_partial"]
        post6 = runs[runs["choice.experiment"] == "weight_decay"]
        for subset, plot, name, title in (
                (stress, bn_study.plot_bn_stress, "batchnorm_stress.png",
                 "Post 7 stress test: train accuracy vs LR, with and without BN"),
                (partial, bn_study.plot_bn_partial, "batchnorm_partial.png",
                 "Post 7 partial training: BN at max LR 5.0 vs no BN at 0.2, after 10 of 20 epochs"),
                (post6, wd_study.plot_weight_decay, "weight_decay.png",
                 "Post 6: weight norms, effective steps and accuracy at equal λα")):
            if len(subset):
                plt.close(plot(subset, curves, out / name))
                charts.append((title, name))
    if not STUDY_COLUMNS <= set(runs):
        return charts
    descent = runs[runs["choice.experiment"] == "hparams"]
    if len(descent):
        plt.close(plot_descent(descent, out / "hparams_path.png"))
        charts.append(("Post 5 coordinate descent", "hparams_path.png"))
    for experiment, (y, title) in GRIDS.items():
        grid = runs[(runs["choice.experiment"] == experiment) & (runs.status == "completed")]
        if grid.lr_peak.nunique() >= 2 and grid[y].nunique() >= 2:
            plt.close(plot_heatmap(grid, y, out / f"{experiment}.png"))
            charts.append((title, f"{experiment}.png"))
    return charts
