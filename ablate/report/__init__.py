"""Turn run records into tables, verdicts, charts, REPORT.md and report.html.

``python -m ablate.report <runs dir> [--out <dir>]`` reads every run record below the directory and
writes the report. The rooms: ``load`` (records into one row per run, with its recipe label from
``labels``), ``stats`` (aggregates per recipe, verdicts per step), ``timeline`` and ``figures``
(the charts), ``document`` (the files). Nothing here mixes scales or devices.
"""
from ablate.report.document import main, write_report
from ablate.report.figures import architecture_step, plot_architectures, plot_curves
from ablate.report.load import journey_order, journey_steps, load_runs, timing_note
from ablate.report.stats import aggregate, verdicts
from ablate.report.timeline import plot_timeline

__all__ = ["aggregate", "architecture_step", "journey_order", "journey_steps", "load_runs", "main", "plot_architectures", "plot_curves",
           "plot_timeline", "timing_note", "verdicts", "write_report"]
