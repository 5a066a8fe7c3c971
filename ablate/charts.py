"""Chart helpers shared by the report and the studies: one panel per scale and device, and each run
with its per-epoch curve.

matplotlib is imported inside the functions, so importing this module costs nothing at start-up.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

PANEL_KEYS = ["scale", "device"]  # a chart never pools scales or devices: one panel each


def panels(n: int, width: float, height: float) -> tuple["Figure", list[Any]]:
    """A figure with ``n`` panels side by side, each ``width`` x ``height`` inches."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, list(axes[0])


def panel_groups(runs: "pd.DataFrame") -> list[tuple[tuple[str, str], "pd.DataFrame"]]:
    """The runs split by (scale, device), in a stable order: one chart panel each."""
    return list(runs.groupby(PANEL_KEYS, sort=True))


def runs_with_curves(runs: "pd.DataFrame", curves: dict[str, "pd.DataFrame"], needs: set[str],
                     order: str | list[str] | None = "run") -> Iterator[tuple["pd.Series", "pd.DataFrame"]]:
    """Each run (sorted by ``order``; None keeps the table's order) with its per-epoch curve, skipping
    runs whose curve is missing, empty or lacks one of the ``needs`` columns (a failed run's curve
    stops where it stopped)."""
    for _, run in (runs if order is None else runs.sort_values(order)).iterrows():
        curve = curves.get(run["run"])
        if curve is not None and not curve.empty and needs <= set(curve):
            yield run, curve
