"""Post 7's batch-norm study (docs/references.md C, ``batch_norm_post.ipynb``): its charts and its one
computation that is not a training run.

* ``plot_bn_stress``: the LR stress test, train accuracy against the epoch's LR, one line per run
  (BN with frozen affine map, no BN, frozen BN), marking where a run's loss became NaN;
* ``plot_bn_partial``: the partial-training comparison, BN (max LR 5.0) against no BN (0.2) after 10
  of 20 epochs, per-epoch curves and the final train/test accuracy beside the blog's;
* ``signal_propagation`` / ``plot_signal_propagation``: the post's 50-layer fully connected ReLU net,
  where every channel's output becomes almost the same for every input, and the "frozen BN"
  (shifted ReLU) that keeps it input-dependent: ``python -m ablate.studies.batchnorm signal --out DIR``.

The runs come from ``+experiment=batchnorm`` (conf/batchnorm_runs/ names each run); ``ablate.studies.study_charts``
calls the plots when the report meets those runs. pandas and matplotlib are imported inside functions.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import nn

from ablate.layers import ShiftedReLU
from ablate.train import DIVERGENCE_FACTOR, divergence
from ablate.charts import panel_groups, panels, runs_with_curves

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


# Post 7 (docs/references.md C), full scale: (LR, train accuracy) the blog quotes, and the no-BN NaN.
BN_STRESS_BLOG = {"with BN": [(0.905, 85.3), (2.56, 85.0), (28.96, 56.0)], "without BN": [(0.113, 65.9)]}
BN_STRESS_BLOG_NAN_LR = 0.32  # the no-BN loss is NaN at the blog's epoch 12 (LR 0.005·2^6)
# Partial training after 10 of 20 epochs: (train %, test %).
BN_PARTIAL_BLOG = {"BN": (85.8, 80.7), "no BN": (83.3, 83.9)}

RUN_LABELS = {  # conf/batchnorm_runs/ option -> what the chart calls the run
    "stress_bn": "BN (affine frozen)", "stress_no_bn": "no BN",
    "stress_frozen_bn": "frozen BN (shifted ReLU, He init)", "partial_bn": "BN", "partial_no_bn": "no BN",
}
NORM_LABELS = {"batchnorm_frozen_affine": "BN (affine frozen)", "none": "no BN"}  # records without a run option


def run_label(run: "pd.Series") -> str:
    """The chart label of a Post 7 run: its conf/batchnorm_runs option (``post7`` in records made
    before that group was renamed), or (older records still) its norm option."""
    option = next((v for v in (run.get("choice.batchnorm_runs"), run.get("choice.post7")) if isinstance(v, str)),
                  None)
    if option is not None:
        return RUN_LABELS.get(option, option)
    norm = run.get("choice.norm", "?")
    return NORM_LABELS.get(norm, f"norm={norm}")


def _line_label(run: "pd.Series", panel: "pd.DataFrame") -> str:
    """``run_label``, plus the seed when the panel holds several seeds of a run."""
    several_seeds = "seed" in panel and panel.seed.nunique() > 1
    return run_label(run) + (f", seed {run['seed']}" if several_seeds else "")


def _diverged_at(curve: "pd.DataFrame") -> Optional[int]:
    """Index of the first row that ``ablate.train.divergence`` calls diverged (the epoch ``Diverged``
    stopped at): a loss that is not finite, or a train loss far above the first epoch's."""
    if "train_loss" not in curve or not len(curve):
        return None
    rows = curve.astype(object).where(curve.notna(), None).to_dict("records")  # NaN as the record's null
    first = rows[0]["train_loss"]
    bad = [i for i, row in enumerate(rows) if divergence(row, first) is not None]
    return bad[0] if bad else None


def plot_bn_stress(runs: "pd.DataFrame", curves: dict[str, "pd.DataFrame"], path: Path) -> "Figure":
    """Post 7's stress test: train accuracy (y) against the epoch's LR (x, log axis), one line per run,
    read from the runs' metrics rows, so failed runs are drawn up to the epoch they stopped at. Where
    a run's train loss became non-finite, a red x marks that epoch (its row's LR and accuracy) and a
    dotted line its LR; a run that failed otherwise is marked at its last row. The blog's quoted
    points are drawn hollow for comparison. One panel per scale and device."""
    groups = panel_groups(runs)
    fig, axes = panels(len(groups), 11.5, 5.5)
    for ax, ((scale, device), g) in zip(axes, groups):
        for r, curve in runs_with_curves(g, curves, {"lr", "train_acc"}):
            label = _line_label(r, g)
            stop = _diverged_at(curve)
            shown = curve if stop is None else curve.iloc[:stop + 1]
            (line,) = ax.plot(shown.lr, shown.train_acc, marker="o", markersize=3, label=label)
            if stop is not None:
                lr, acc = float(curve.lr.iloc[stop]), float(curve.train_acc.iloc[stop])
                epoch = int(curve.epoch.iloc[stop]) if "epoch" in curve else stop + 1
                loss = float(curve.train_loss.iloc[stop])
                what = "loss NaN" if not math.isfinite(loss) else f"loss {loss:.3g}, over {DIVERGENCE_FACTOR:g}x epoch 1's,"
                ax.axvline(lr, color=line.get_color(), linestyle=":", alpha=0.7)
                ax.plot([lr], [acc], marker="x", markersize=12, mew=2.5, color="tab:red", linestyle="none",
                        label=f"{label}: {what} at epoch {epoch} (LR {lr:.3g})")
            elif r["status"] != "completed":
                lr, acc = float(curve.lr.iloc[-1]), float(curve.train_acc.iloc[-1])
                ax.plot([lr], [acc], marker="x", markersize=12, mew=2.5, color="tab:red", linestyle="none",
                        label=f"{label}: {r['status']} after epoch {len(curve)} (LR {lr:.3g})")
        for (name, points), marker in zip(BN_STRESS_BLOG.items(), ("s", "D")):
            ax.scatter(*zip(*points), marker=marker, facecolors="none", edgecolors="gray",
                       label=f"blog {name} (full scale)")
        ax.axvline(BN_STRESS_BLOG_NAN_LR, color="gray", linestyle="--", alpha=0.5,
                   label=f"blog: no-BN loss NaN at LR {BN_STRESS_BLOG_NAN_LR:g}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate of the epoch (per batch, mean loss; 0.005·2^(k/2) in epoch k)")
        ax.set_ylabel("train accuracy (%)")
        ax.set_title(f"Post 7 LR stress test, simple net ({scale}, {device}): train accuracy vs LR, "
                     "with and without BN", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside: the curves fill the axes
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_bn_partial(runs: "pd.DataFrame", curves: dict[str, "pd.DataFrame"], path: Path) -> "Figure":
    """Post 7's partial training: per scale and device, the per-epoch train (solid) and test (dashed)
    accuracy of each run, and bars of the last epoch's train and test accuracy beside the blog's."""
    import numpy as np

    groups = panel_groups(runs)
    fig, axes = panels(2 * len(groups), 6, 4.5)
    for (ax, bars), ((scale, device), g) in zip(zip(axes[::2], axes[1::2]), groups):
        finals = []
        for r, curve in runs_with_curves(g, curves, {"train_acc", "test_acc"}):
            label = _line_label(r, g)
            (line,) = ax.plot(curve.epoch, curve.train_acc, marker="o", markersize=3, label=f"{label} train")
            ax.plot(curve.epoch, curve.test_acc, "--", marker="o", markersize=3, color=line.get_color(),
                    label=f"{label} test")
            finals.append((label, float(curve.train_acc.iloc[-1]), float(curve.test_acc.iloc[-1])))
        ax.set_xlabel("epoch (of the 20-epoch schedule, stopped at 10)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"Post 7 partial training ({scale}, {device})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        x = np.arange(len(finals))
        for offset, (name, index) in zip((-0.2, 0.2), (("train", 1), ("test", 2))):
            values = [f[index] for f in finals]
            bars.bar(x + offset, values, width=0.4, label=f"measured {name}")
            blog = [BN_PARTIAL_BLOG.get(f[0].split(",")[0], (math.nan, math.nan))[index - 1] for f in finals]
            bars.scatter(x + offset, blog, marker="_", s=400, color="black", zorder=3,
                         label=f"blog {name} (full scale)")
            for xi, v in zip(x + offset, values):
                bars.text(xi, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
        bars.set_xticks(x, [f[0] for f in finals])
        bars.set_ylabel("accuracy after the last epoch (%)")
        bars.set_title("BN at max LR 5.0 vs no BN at 0.2 (blog: BN trains further, generalises worse)",
                       fontsize=9)
        bars.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


@torch.no_grad()
def signal_propagation(act: nn.Module, depth: int = 50, width: int = 2048, inputs: int = 256,
                       seed: int = 0) -> list[float]:
    """Post 7's deep fully connected net: ``depth`` linear layers of ``width`` units, He-initialised,
    each followed by ``act``, fed ``inputs`` N(0, 1) vectors. Returns, per layer, how much of a
    channel's output still depends on the input: the channel's standard deviation over the inputs
    divided by its root mean square, averaged over channels (1: all variation, 0: a constant)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(inputs, width, generator=generator)
    varying = []
    for _ in range(depth):
        weight = torch.randn(width, width, generator=generator) * math.sqrt(2 / width)
        x = act(x @ weight.T)
        rms = x.pow(2).mean(0).sqrt().clamp_min(torch.finfo(x.dtype).tiny)
        varying.append(float((x.std(0) / rms).mean()))
    return varying


SIGNAL_ACTS = {"ReLU": nn.ReLU, "frozen BN: (ReLU − √(1/π)) / √(1 − 1/π)": ShiftedReLU}


def plot_signal_propagation(path: Path, depth: int = 50, width: int = 2048, inputs: int = 256) -> "Figure":
    """The share of each channel's output that varies with the input, layer by layer, for ReLU and
    for Post 7's frozen BN (shifted ReLU)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, act in SIGNAL_ACTS.items():
        ax.plot(range(1, depth + 1), signal_propagation(act(), depth, width, inputs), marker="o",
                markersize=3, label=name)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("std over inputs / RMS, mean over channels")
    ax.set_title(f"Post 7: {depth}-layer fully connected net, width {width}, He init, {inputs} N(0,1) inputs\n"
                 "with ReLU each channel drifts towards a constant output; frozen BN keeps it input-dependent",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ablate.studies.batchnorm",
                                     description="Post 7 charts that need no training run.")
    parser.add_argument("chart", choices=["signal"], help="signal: the 50-layer signal-propagation demo")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for signal_propagation.png")
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--inputs", type=int, default=256)
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "signal_propagation.png"
    plot_signal_propagation(path, args.depth, args.width, args.inputs)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
