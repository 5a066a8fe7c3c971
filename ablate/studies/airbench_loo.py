"""The airbench additivity study (sota-facts 2.2): the chart and table of ``+experiment=airbench_loo``.

Each of the 19 recipes (``conf/airbench_loo/``) gets its **epochs to target**: the first epoch whose
mean test accuracy over the recipe's seeds reaches the target, counted in epochs trained (a run's last
epoch may be fractional); censored (NaN, with ``censored`` True) when no epoch does. The published
value of each recipe is its ``step.ref.epochs`` in the same file, transcribed from the paper's figure
data (cifar10-zoo ``make_figures.py``).

The chart follows the paper's two additivity figures. For each feature f, the reduction in epochs to
target it brings to a base (all off; whitening alone) is set beside two predictions made from leaving
f out of the full recipe: additive, (no_f - all_on), and multiplicative, base x (1 - all_on / no_f).
Bars are the published numbers in the paper's hatching; black diamonds are the measured ones, per
scale and device.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ablate.charts import panel_groups, runs_with_curves
from ablate.compose import CONF_DIR

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

FEATURES = ("whiten", "dirac", "scalebias", "lookahead", "tta", "altflip")  # make_figures.py's order
GROUP = "airbench_loo"  # the config group, and the experiment's name
CHOICE = f"choice.{GROUP}"


def recipe_order() -> list[str]:
    """The recipes as the paper's data lists them: all on, each left out, all off, each alone, whitening
    plus each other."""
    return (["all_on", *(f"no_{f}" for f in FEATURES), "all_off", *(f"only_{f}" for f in FEATURES),
             *(f"whiten_{f}" for f in FEATURES[1:])])


def published_epochs(conf_dir: Path = CONF_DIR) -> dict[str, float]:
    """Each recipe's published epochs to 94%, from its own file (``step.ref.epochs``, inherited along
    its ``defaults``), in ``recipe_order``."""
    files = {p.stem: yaml.safe_load(p.read_text()) or {} for p in sorted((conf_dir / GROUP).glob("*.yaml"))}

    def epochs(name: str) -> float:
        data = files[name]
        own = ((data.get("step") or {}).get("ref") or {}).get("epochs")
        if own is not None:
            return float(own)
        parent = next(d for d in data.get("defaults", []) if isinstance(d, str) and d != "_self_")
        return epochs(parent)
    order = {name: i for i, name in enumerate(recipe_order())}
    return {name: epochs(name) for name in sorted(files, key=lambda n: order.get(n, len(order)))}


def epochs_to_target(runs: "pd.DataFrame", curves: dict[str, "pd.DataFrame"], target: float) -> tuple[float, bool]:
    """The first epoch (in epochs trained) whose mean test accuracy over ``runs`` reaches ``target``,
    and whether it is censored (no epoch reached it, or there is no target)."""
    import pandas as pd

    rows = [curve.assign(seed=run["seed"]) for run, curve in runs_with_curves(runs, curves, {"test_acc", "epoch"})]
    if not rows or not math.isfinite(target):
        return math.nan, True
    table = pd.concat(rows)
    if "epochs_trained" not in table:
        table["epochs_trained"] = table["epoch"]
    mean = table.groupby("epoch").agg(acc=("test_acc", "mean"), trained=("epochs_trained", "mean"))
    reached = mean[mean.acc >= target]
    return (float(reached.trained.iloc[0]), False) if len(reached) else (math.nan, True)


def measured_epochs(runs: "pd.DataFrame", curves: dict[str, "pd.DataFrame"]) -> "pd.DataFrame":
    """One row per recipe, scale and device: n, mean final accuracy, epochs to target, censored."""
    import pandas as pd

    out = []
    if CHOICE not in runs:
        return pd.DataFrame(out)
    for (scale, device), panel in panel_groups(runs[runs.status == "completed"]):
        for name, g in panel.groupby(CHOICE):
            epochs, censored = epochs_to_target(g, curves, float(g.target.iloc[0]))
            out.append(dict(recipe=name, scale=scale, device=device, n=len(g), acc_mean=g.test_acc.mean(),
                            target=g.target.iloc[0], epochs_to_target=epochs, censored=censored))
    return pd.DataFrame(out)


def additivity(epochs: dict[str, float], base: str, features: tuple[str, ...]) -> dict[str, list[float]]:
    """The paper's bars for ``features`` added to ``base`` ('all_off', or 'only_whiten'): the reductions
    predicted from the leave-one-out runs and the one observed (``base`` minus base-plus-f)."""
    def get(name: str) -> float:
        return epochs.get(name, math.nan)

    with_f = {"all_off": "only_{}", "only_whiten": "whiten_{}"}[base]
    full = get("all_on")
    return dict(
        multiplicative=[get(base) * (1 - full / get(f"no_{f}")) for f in features],
        additive=[get(f"no_{f}") - full for f in features],
        observed=[get(base) - get(with_f.format(f)) for f in features])


def _epochs_map(measured: "pd.DataFrame") -> dict[str, float]:
    return {r.recipe: (r.epochs_to_target if not r.censored else math.nan) for r in measured.itertuples()}


HATCH = {"multiplicative": "\\\\", "additive": "//", "observed": ".."}
COLOUR = {"multiplicative": "#8fb3d9", "additive": "#f2b880", "observed": "#a5d6a7"}


def _bars(ax, published: dict[str, float], measured: dict[str, float], base: str, features: tuple[str, ...],
          title: str) -> None:
    pub, got = additivity(published, base, features), additivity(measured, base, features)
    for k, kind in enumerate(("multiplicative", "additive", "observed")):
        xs = [i + (k - 1) * 0.27 for i in range(len(features))]
        ax.bar(xs, pub[kind], width=0.25, color=COLOUR[kind], hatch=HATCH[kind], edgecolor="#333",
               label=f"{kind} (published)" if kind != "observed" else "observed (published)")
        points = [(x, v) for x, v in zip(xs, got[kind]) if math.isfinite(v)]
        if points:
            ax.plot(*zip(*points), "D", color="black", ms=4, label="measured" if k == 0 else None)
    ax.axhline(0, color="black", lw=0.6)
    labels = list(features) if base == "all_off" else [f"+{f}" for f in features]
    ax.set_xticks(range(len(features)), labels, fontsize=8)
    ax.set_ylabel("reduction in epochs to target", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6.5)


def _epochs_panel(ax, published: dict[str, float], rows: "pd.DataFrame", target: float) -> None:
    names = list(published)
    ys = range(len(names))[::-1]
    ax.barh(list(ys), [published[n] for n in names], color="#d0d0d0", edgecolor="#555", label="published (to 94%)")
    by_name = {r.recipe: r for r in rows.itertuples()}
    for y, name in zip(ys, names):
        r = by_name.get(name)
        if r is None or not math.isfinite(target):
            continue
        if r.censored:
            ax.text(published[name] * 1.02, y, "not reached", va="center", fontsize=6.5, color="#c0392b")
        else:
            ax.plot(r.epochs_to_target, y, "D", color="black", ms=4)
    ax.set_yticks(list(ys), names, fontsize=7)
    ax.set_xlabel("epochs to target", fontsize=8)
    ax.set_title("epochs to target per recipe: published bars, measured diamonds", fontsize=9)


def plot_additivity(runs: "pd.DataFrame", curves: dict[str, "pd.DataFrame"], path: Path) -> "Figure":
    """Per scale and device: the paper's two additivity figures (published bars, measured diamonds)
    and the epochs to target of every recipe; the numbers go beside the chart as ``<name>.csv``."""
    import matplotlib.pyplot as plt

    published = published_epochs()
    measured = measured_epochs(runs, curves)
    if len(measured):
        measured.assign(published_epochs=measured.recipe.map(published)).to_csv(path.with_suffix(".csv"), index=False)
    groups = list(measured.groupby(["scale", "device"], sort=True)) if len(measured) else [(("—", "—"), measured)]
    fig, grid = plt.subplots(len(groups), 3, figsize=(21, 5.5 * len(groups)), squeeze=False,
                             gridspec_kw=dict(width_ratios=[1.2, 1.0, 0.9]))
    for axes, ((scale, device), rows) in zip(grid, groups):
        got = _epochs_map(rows) if len(rows) else {}
        target = rows.target.iloc[0] if len(rows) else math.nan
        where = f"scale {scale} · {device} · target {target:g}%" if math.isfinite(target) else \
            f"scale {scale} · {device} · no target at this scale: measured epochs undefined"
        _bars(axes[0], published, got, "all_off", FEATURES, f"Speedup by feature (from all off)\n{where}")
        _bars(axes[1], published, got, "only_whiten", FEATURES[1:],
              f"Speedup by feature added to the whitening network\n{where}")
        _epochs_panel(axes[2], published, rows, target)
    fig.suptitle("airbench additivity (sota-facts 2.2): each feature's reduction in epochs to target, observed "
                 "and as predicted from leaving it out of the full recipe", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


