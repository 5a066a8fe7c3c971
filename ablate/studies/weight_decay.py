"""Post 6's weight-decay study (docs/references.md C): the chart of ``+experiment=weight_decay``.

The runs record, each epoch, the norm |w| of every scale-invariant weight (a conv feeding a batch norm)
and its mean effective step |dw|/|w| (``monitor.weights``, ``ablate.train.WeightMonitor``). The chart
shows what the post argues:

* the norms settle where growth from the (orthogonal) gradient steps balances weight decay, and the
  effective step settles to a value set by λα alone. As a guide the chart draws the equilibrium of
  SGD with momentum on a scale-invariant weight, sqrt(2 λ(t) α / (1 + ρ)) (the "spherical motion
  dynamics" result of Wan et al., 2021; the post's own closed form was not recovered, docs/references.md E3);
* runs with different (λ, α) at equal λα end with similar accuracy;
* without weight decay the norms grow and the effective step decays; LARS fixes each layer's step.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from ablate.charts import panel_groups, runs_with_curves

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure



def run_label(run: "pd.Series") -> str:
    """'λ=0.4, α=5e-4' from the run's max LR and weight decay, '+ LARS' for a conf/weight_decay_runs LARS run."""
    option = f'{run.get("choice.weight_decay_runs", "")} {run.get("choice.post6", "")}'  # post6: the group's old name
    lars = "lars" in option or bool(run.get("lars", False))
    return f"λ={run['lr_peak']:g}, α={run['weight_decay']:g}" + (" + LARS" if lars else "")


def layer_table(curve: "pd.DataFrame", column: str) -> "pd.DataFrame":
    """Epochs x layers of a monitored quantity ('weight_norm' or 'effective_step') of one run."""
    import pandas as pd

    rows = [r if isinstance(r, dict) else {} for r in curve[column]]
    return pd.DataFrame(rows, index=curve.epoch.to_numpy())


def equilibrium_step(lr: float, weight_decay: float, momentum: float) -> float:
    """Effective step |dw|/|w| per step at which a scale-invariant weight's norm stops changing under
    SGD with momentum ρ, LR λ and weight decay α (mean-loss units): sqrt(2λα / (1 + ρ))."""
    return math.sqrt(2 * lr * weight_decay / (1 + momentum))


def plot_weight_decay(runs: "pd.DataFrame", curves: dict[str, "pd.DataFrame"], path: Path) -> "Figure":
    """Four panels per scale and device: total norm of the scale-invariant weights per epoch; their
    mean effective step per epoch with the equilibrium guide per λα; each layer's effective step
    averaged over the run; final test accuracy per run, grouped by λα."""
    import matplotlib.pyplot as plt
    import numpy as np

    groups = panel_groups(runs)
    fig, grid = plt.subplots(len(groups), 4, figsize=(24, 5 * len(groups)), squeeze=False)
    for axes, ((scale, device), g) in zip(grid, groups):
        norm_ax, step_ax, layer_ax, acc_ax = axes
        guides: dict[float, tuple] = {}
        finals = []
        for r, curve in runs_with_curves(g, curves, {"weight_norm"}, order=["weight_decay", "lr_peak"]):
            label = run_label(r)
            norms, steps = layer_table(curve, "weight_norm"), layer_table(curve, "effective_step")
            (line,) = norm_ax.plot(norms.index, np.sqrt((norms ** 2).sum(axis=1)), marker="o", markersize=3,
                                   label=label)
            color = line.get_color()
            step_ax.plot(steps.index, steps.mean(axis=1), marker="o", markersize=3, color=color, label=label)
            layer_ax.plot(range(1, steps.shape[1] + 1), steps.mean(axis=0), marker="o", markersize=3,
                          color=color, label=label)
            product = r["lr_peak"] * r["weight_decay"]
            if product > 0 and "LARS" not in label:
                guides.setdefault(round(product, 12), (curve.epoch, curve.lr, r["weight_decay"], r["momentum"]))
            if r["status"] == "completed":
                finals.append((label, product, float(r["test_acc"]), color))
        for product, (epochs, lrs, wd, momentum) in guides.items():
            step_ax.plot(epochs, [equilibrium_step(lr, wd, momentum) for lr in lrs], "--", color="gray",
                         label=f"equilibrium √(2λ(t)α/(1+ρ)), λα={product:.3g}")
        norm_ax.set_title(f"Post 6 ({scale}, {device}): norm of the scale-invariant weights", fontsize=9)
        norm_ax.set_xlabel("epoch")
        norm_ax.set_ylabel("√(Σ layers |w|²)")
        step_ax.set_title("effective step |Δw|/|w| per step, mean over layers and the epoch", fontsize=9)
        step_ax.set_xlabel("epoch")
        step_ax.set_yscale("log")
        layer_ax.set_title("each layer's effective step, mean over the run", fontsize=9)
        layer_ax.set_xlabel("scale-invariant layer (input to output)")
        layer_ax.set_yscale("log")
        for ax in (norm_ax, step_ax, layer_ax):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        x = np.arange(len(finals))
        acc_ax.bar(x, [f[2] for f in finals], color=[f[3] for f in finals])
        for xi, (_, product, acc, _) in zip(x, finals):
            acc_ax.text(xi, acc, f"{acc:.2f}\nλα={product:.2g}", ha="center", va="bottom", fontsize=7)
        acc_ax.set_xticks(x, [f[0] for f in finals], rotation=30, ha="right", fontsize=7)
        if finals:
            low = min(f[2] for f in finals)
            acc_ax.set_ylim(max(0.0, low - 5), max(f[2] for f in finals) + 3)
        acc_ax.set_ylabel("final test accuracy (%)")
        acc_ax.set_title("equal λα, different (λ, α): similar accuracy?", fontsize=9)
        acc_ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig
