"""Post 5's charts: the coordinate-descent path, and heat maps over (λ, α) and (λ, N) with the flat
directions λα = const and λ/N = const. The search itself is ``ablate.descent``.

The runs table carries lr_peak, momentum, weight_decay and batch_size (read from each run's config),
and ``choice.experiment`` names the study a run belongs to (``hparams``, ``hparams_lr_wd``, ...).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ablate.charts import PANEL_KEYS, panel_groups, panels
from ablate.descent import SYMBOLS, Point, moved_axis, replay

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

MOVE_COLOURS = {"start": "tab:gray", "λ": "tab:blue", "1−ρ": "tab:orange", "α": "tab:green"}


def _job_number(run: str) -> float:
    """Hydra's job number, the prefix of a sweep subdir (conf/config.yaml); launch order for a descent."""
    m = re.match(r"(\d+)_", Path(run).name)
    return int(m.group(1)) if m else math.inf


def plot_descent(runs: pd.DataFrame, path: Path) -> Figure:
    """The descent path: test accuracy of each run in launch order, labelled with its move and
    coloured by the coordinate moved (filled: it improved, so the search went on from there; x: the
    run failed), with the best-so-far line. One panel per scale, device and seed."""
    runs = runs.assign(_job=runs.run.map(_job_number)).sort_values(["_job", "run"])
    groups = list(runs.groupby(PANEL_KEYS + ["seed"], sort=True))
    fig, axes = panels(len(groups), 11, 5.5)
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

    groups = panel_groups(runs)
    fig, axes = panels(len(groups), 7.5, 6)
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
