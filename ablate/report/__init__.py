"""Turn run records into tables, verdicts, charts, REPORT.md and report.html.

``python -m ablate.report <runs dir> [--out <dir>]`` reads every run record below the directory and
writes the report. The rooms: ``load`` (records into one row per run, with its recipe label from
``labels``), ``stats`` (aggregates per recipe, verdicts per step), ``timeline`` and ``figures``
(the charts), ``document`` (the files). Nothing here mixes scales or devices.

The names below are imported on first use, so that a run, which only needs ``labels`` to name itself
to a tracker, does not load pandas and matplotlib.
"""
from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "aggregate": "stats", "verdicts": "stats", "main": "document", "write_report": "document",
    "architecture_step": "figures", "plot_architectures": "figures", "plot_curves": "figures",
    "journey_order": "load", "journey_steps": "load", "load_runs": "load", "timing_note": "load",
    "plot_timeline": "timeline",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'ablate.report' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ablate.report.{_HOMES[name]}"), name)
