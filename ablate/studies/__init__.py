"""The studies of Posts 5-7, one module each, named as its ``conf/experiment`` file and its
``experiments/`` folder: ``hparams`` (Post 5), ``weight_decay`` (Post 6), ``batchnorm`` (Post 7); and the
sequel's ``airbench_loo`` (the airbench paper's additivity study). Each owns its charts;
``study_charts`` is the one hook the report calls.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ablate.studies import airbench_loo, batchnorm, hparams, weight_decay

if TYPE_CHECKING:
    import pandas as pd


def study_charts(runs: pd.DataFrame, out: Path,
                 curves: Optional[dict[str, pd.DataFrame]] = None) -> list[tuple[str, str]]:
    """Write the charts of the Post 5, 6 and 7 studies found in ``runs`` into ``out`` and return
    (title, file name) for each. The experiment a run came from (``+experiment=...``) says which
    chart it feeds; a heat map needs completed runs at two values or more on each axis; the Post 6
    and Post 7 charts read every run's per-epoch ``curves`` (failed runs included)."""
    import matplotlib.pyplot as plt

    charts = []
    if curves is not None and "choice.experiment" in runs:
        batchnorm_runs = runs[runs["choice.experiment"] == "batchnorm"]
        stress = batchnorm_runs[batchnorm_runs.step == "bn_stress"]
        partial = batchnorm_runs[batchnorm_runs.step == "bn_partial"]
        weight_decay_runs = runs[runs["choice.experiment"] == "weight_decay"]
        loo_runs = runs[runs["choice.experiment"] == airbench_loo.GROUP]
        for subset, plot, name, title in (
                (stress, batchnorm.plot_bn_stress, "batchnorm_stress.png",
                 "Post 7 stress test: train accuracy vs LR, with and without BN"),
                (partial, batchnorm.plot_bn_partial, "batchnorm_partial.png",
                 "Post 7 partial training: BN at max LR 5.0 vs no BN at 0.2, after 10 of 20 epochs"),
                (weight_decay_runs, weight_decay.plot_weight_decay, "weight_decay.png",
                 "Post 6: weight norms, effective steps and accuracy at equal λα"),
                (loo_runs, airbench_loo.plot_additivity, "airbench_loo.png",
                 "airbench additivity: each feature's reduction in epochs to target, observed and predicted")):
            if len(subset):
                plt.close(plot(subset, curves, out / name))
                charts.append((title, name))
    if not hparams.STUDY_COLUMNS <= set(runs):
        return charts
    descent = runs[runs["choice.experiment"] == "hparams"]
    if len(descent):
        plt.close(hparams.plot_descent(descent, out / "hparams_path.png"))
        charts.append(("Post 5 coordinate descent", "hparams_path.png"))
    for experiment, (y, title) in hparams.GRIDS.items():
        grid = runs[(runs["choice.experiment"] == experiment) & (runs.status == "completed")]
        if grid.lr_peak.nunique() >= 2 and grid[y].nunique() >= 2:
            plt.close(hparams.plot_heatmap(grid, y, out / f"{experiment}.png"))
            charts.append((title, f"{experiment}.png"))
    return charts
