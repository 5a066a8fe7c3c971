"""The report's other charts: per-epoch curves by recipe, and the Post 4 architectures.

Every chart has a panel per scale and device (``ablate.charts.panel_groups``): seconds of two machines
never share an axis, and neither do accuracies of two scales.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ablate.charts import panel_groups, panels, runs_with_curves
from ablate.records import published_seconds
from ablate.report.labels import shorten

# Published 20-epoch results of the Post 4 networks (docs/references.md A2 4.6 and 4.9, B3): only the
# backbone and ResNet9 were given as numbers; the other networks appeared in a chart.
PUBLISHED_20_EPOCHS = {"backbone": (91.1, 47.0), "residual_l1l3": (93.8, 66.0)}


def recipe_curves(runs: pd.DataFrame, curves: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per recipe (scale, device, label) and epoch: the mean, lowest and highest test accuracy over its
    runs, how many runs reached that epoch, and their mean cumulative seconds in the step's convention."""
    parts = []
    for run, curve in runs_with_curves(runs, curves, {"epoch", "test_acc"}, order=None):
        seconds = [published_seconds(t, e, run.prep_seconds, run.timing) if "train_seconds" in curve else math.nan
                   for t, e in zip(curve.get("train_seconds", [math.nan] * len(curve)),
                                   curve.get("eval_seconds", [0.0] * len(curve)))]
        parts.append(pd.DataFrame(dict(scale=run.scale, device=run.device, label=run.label, epoch=curve.epoch,
                                       test_acc=curve.test_acc, seconds=seconds, target=run.target)))
    if not parts:
        return pd.DataFrame(columns=["scale", "device", "label", "epoch", "mean", "low", "high", "n", "seconds"])
    long = pd.concat(parts, ignore_index=True)
    grouped = long.groupby(["scale", "device", "label", "epoch"], sort=False)
    return grouped.agg(mean=("test_acc", "mean"), low=("test_acc", "min"), high=("test_acc", "max"),
                       n=("test_acc", "size"), seconds=("seconds", "mean"), target=("target", "first")).reset_index()


def _colours(labels: list[str]) -> dict[str, tuple]:
    import matplotlib.pyplot as plt

    cmap = plt.cm.tab20 if len(labels) <= 20 else plt.cm.turbo
    return {label: cmap(i / max(len(labels) - 1, 1) if len(labels) > 20 else i % 20)
            for i, label in enumerate(labels)}


def plot_curves(runs: pd.DataFrame, curves: dict[str, pd.DataFrame], path: Path):
    """Test accuracy per epoch and against training seconds, one line per recipe (the mean over its
    seeds, a band from the lowest to the highest run), the target dashed; a row of panels per scale
    and device."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    table = recipe_curves(runs, curves)
    groups = list(table.groupby(["scale", "device"], sort=True)) or [(("", ""), table)]
    labels = list(dict.fromkeys(runs.label)) if "label" in runs else []
    colours = _colours(labels)
    fig, axes = plt.subplots(len(groups), 2, figsize=(14, 4.6 * len(groups)), squeeze=False)
    for ((scale, device), group), (ax, tax) in zip(groups, axes):
        for label, c in group.groupby("label", sort=False):
            c = c.sort_values("epoch")
            colour = colours.get(label, "black")
            ax.plot(c.epoch, c["mean"], color=colour, lw=1.3, label=shorten(label, 50))
            tax.plot(c.seconds, c["mean"], color=colour, lw=1.3)
            if (c.n > 1).any():
                ax.fill_between(c.epoch, c.low, c.high, color=colour, alpha=0.18, lw=0)
                tax.fill_between(c.seconds, c.low, c.high, color=colour, alpha=0.18, lw=0)
        target = group.target.dropna()
        for a in (ax, tax):
            if len(target) and math.isfinite(target.iloc[0]):
                a.axhline(target.iloc[0], color="black", ls="--", lw=0.8, label=None)
            a.grid(alpha=0.3)
            a.set_ylabel("test accuracy (%)")
            if len(group):
                a.set_ylim(max(0, group["mean"].groupby(group.label).last().min() - 25), min(100, group.high.max() + 2))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        tax.set_xscale("log")
        tax.set_xlabel("seconds (log), in each step's timing convention")
        ax.set_title(f"per epoch · scale {scale} · {device}", fontsize=9)
        tax.set_title(f"against training time · scale {scale} · {device}", fontsize=9)
        if len(target):
            ax.annotate(f"target {target.iloc[0]:g}%", (0.01, target.iloc[0]), xycoords=("axes fraction", "data"),
                        fontsize=7, va="bottom")
    # One legend for every panel: a recipe keeps its colour across panels, and each panel may hold
    # recipes the others lack (one device ran step 8 only, another the whole journey).
    legend = {}
    for ax in axes[:, 0]:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(name, handle)
    names, handles = list(legend), list(legend.values())
    if handles:
        fig.legend(handles, names, loc="center right", fontsize=6.5, ncol=1 + len(names) // 32, frameon=False,
                   title="recipe (mean over seeds; band: lowest to highest run)", title_fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.8 if handles else 1, 1))
    fig.savefig(path, dpi=120)
    return fig


def pareto_front(times: np.ndarray, accs: np.ndarray) -> list[int]:
    """Indices of the points no other point beats on both time (lower) and accuracy (higher), by time."""
    order = np.argsort(times, kind="stable")
    front, best = [], -math.inf
    for i in order:
        if accs[i] > best:
            front.append(int(i))
            best = accs[i]
    return front


def architecture_step(agg: pd.DataFrame) -> str | None:
    """The step at which several networks were trained (the Post 4 search: step4_6 first), or None."""
    counts = agg.groupby("step").arch.nunique() if len(agg) else pd.Series(dtype=int)
    several = [s for s, n in counts.items() if n > 1]
    return "step4_6" if "step4_6" in several else (several[0] if several else None)


def plot_architectures(agg: pd.DataFrame, path: Path):
    """The networks trained at one step (the Post 4 search, step4_6 when present): accuracy against
    time with its Pareto front, a panel per scale and device; then each network's accuracy with the
    published 20-epoch results marked where they exist."""
    import matplotlib.pyplot as plt

    step = architecture_step(agg)
    if step is None:
        raise ValueError("no step of these records trained more than one network")
    rows = agg[agg.step == step]
    rows = rows.sort_values("n", ascending=False).drop_duplicates(["arch", "scale", "device"])  # one recipe each
    groups = panel_groups(rows)
    fig, axes = panels(len(groups) + 1, 6.2, 5.2)
    for ax, ((scale, device), g) in zip(axes, groups):
        ax.errorbar(g.train_s, g.acc_mean, yerr=g.acc_std.fillna(0), fmt="o", capsize=3, ms=4)
        for _, r in g.iterrows():
            ax.annotate(r.arch, (r.train_s, r.acc_mean), fontsize=7, xytext=(4, 3), textcoords="offset points")
        front = pareto_front(g.train_s.to_numpy(float), g.acc_mean.to_numpy(float))
        f = g.iloc[front]
        ax.step(f.train_s, f.acc_mean, where="post", color="tab:red", lw=1, alpha=0.7, label="Pareto front")
        ax.set_xlabel("train seconds")
        ax.set_ylabel("test accuracy (%)")
        n = f"{int(g.n.min())}" if g.n.min() == g.n.max() else f"{int(g.n.min())}–{int(g.n.max())}"
        ax.set_title(f"{', '.join(sorted(set(g.step)))} · scale {scale} · {device} · n = {n} per network",
                     fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    bax = axes[-1]
    names = sorted(set(rows.arch), key=lambda a: rows[rows.arch == a].acc_mean.mean())
    for k, ((scale, device), g) in enumerate(groups):
        means = g.set_index("arch").acc_mean
        bax.barh(np.arange(len(names)) + 0.8 * k / len(groups), [means.get(a, math.nan) for a in names],
                 height=0.8 / len(groups), label=f"measured · {scale} · {device}", alpha=0.85)
    for i, a in enumerate(names):
        if a in PUBLISHED_20_EPOCHS:
            acc, secs = PUBLISHED_20_EPOCHS[a]
            bax.plot(acc, i, "k|", ms=14, mew=2)
            bax.annotate(f"published {acc:g}% ({secs:g} s, V100)", (acc, i), xytext=(3, 5), textcoords="offset points",
                         fontsize=6.5)
    bax.set_yticks(np.arange(len(names)), names, fontsize=7)
    bax.set_xlabel("test accuracy (%)")
    bax.set_xlim(max(0, np.nanmin(rows.acc_mean) - 5), 100)
    bax.set_title("accuracy per network; | published 20-epoch result, full scale\n"
                  "(only the backbone and ResNet9 were published as numbers)", fontsize=8)
    bax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig
