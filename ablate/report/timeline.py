"""The timeline: every step of the journey, one row each, published and measured side by side.

Rows run down the page in journey order, each labelled by its one-line change, with a header row
for every post (and a note where Post 8 stops counting evaluation). Columns share the rows:

* the published times (one V100, full scale), coloured by their timing convention;
* one panel of measured times per scale and device: seconds of different machines never share an
  axis. Each bar is a recipe's mean time in its step's convention, with the spread over seeds, its
  time to target as a diamond, its accuracy and n, and its ratio to the row above (green faster,
  red slower). A recipe whose mean accuracy misses the target is hatched grey;
* the normalised panel: each series divided by its time at one common step, so journeys measured
  on different hardware and the published one compare on one axis.

Ablations of a step (a recipe labelled with changes) get rows of their own under it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ablate.compose import CONF_DIR
from ablate.report.labels import SEPARATOR, shorten
from ablate.report.load import DEFAULT_TARGET, journey_steps

STAGES = {"baseline": "DAWNBench baseline", "1": "Post 1 · baseline", "2": "Post 2 · mini-batches",
          "3": "Post 3 · regularisation", "4": "Post 4 · architecture", "5": "Post 5 · hyperparameters",
          "6": "Post 6 · weight decay", "7": "Post 7 · batch norm", "8": "Post 8 · bag of tricks",
          "9": "Sequel · airbench94 (A100)", "10": "Sequel · airbench94_muon (A100)"}
CONVENTION = {"with_eval": ("training + per-epoch evaluation (Posts 1–4)", "#4c72b0", "#a8b6cc"),
              "train_only": ("training only, evaluation excluded (Post 8)", "#dd8452", "#e8c3a8"),
              "train_tta": ("training + final TTA pass (airbench)", "#55a868", "#b5d8bd")}
HEADER_NOTES = {"train_only": " (times: no evaluation)", "train_tta": " (times: final TTA in)"}
# Page's final recipe took 26 s on his V100 and 14.9 s on an A100 (Keller Jordan's re-run, sota-facts
# 1 row 6): the normalised panel puts published A100 seconds on the V100 scale by that ratio, so one
# published series runs through both eras.
TO_V100 = {"V100": 1.0, "A100": 26 / 14.9}
MISSED = dict(facecolor="#d9d9d9", hatch="////", edgecolor="#7f7f7f")
FASTER, SLOWER = "#2a9d3f", "#c0392b"
ROW_INCHES = 0.3


JOURNEYS = ("journey", "journey_sequel")  # the conf/experiment replays whose steps are the timeline's rows


def journey_sweep(conf_dir: Path = CONF_DIR) -> list[str]:
    """The steps ``+experiment=journey`` and ``journey_sequel`` run: the timeline's rows when nothing
    says otherwise."""
    steps = []
    for name in JOURNEYS:
        path = conf_dir / "experiment" / f"{name}.yaml"
        if path.is_file():
            sweep = yaml.safe_load(path.read_text())
            steps += str(sweep["hydra"]["sweeper"]["params"]["+step"]).split(",")
    return steps


def timeline_rows(agg: pd.DataFrame) -> list[dict]:
    """The rows, top to bottom: post headers, then each step between the first and the last one
    measured (the journey sweep's steps, and any other step that was measured), then its ablations."""
    steps = journey_steps()
    measured = set(agg.step)
    index = [i for i, s in enumerate(steps) if s["id"] in measured]
    if not index:
        return []
    shown = set(journey_sweep()) | measured
    labels = agg.label if "label" in agg else agg.step
    rows, stage, timing = [], None, None
    for s in steps[index[0]:index[-1] + 1]:
        if s["id"] not in shown:
            continue
        ref = s.get("ref") or {}
        if s.get("stage") != stage:
            stage = s.get("stage")
            switch = timing is not None and ref.get("timing") != timing
            note = HEADER_NOTES.get(ref.get("timing"), "") if switch else ""
            rows.append(dict(kind="header", text=STAGES.get(str(stage), f"stage {stage}") + note))
        timing = ref.get("timing")
        rows.append(dict(kind="step", step=s["id"], label=s["id"], text=f"{s['id']}  {_short(s.get('change', ''))}",
                         ref_time=ref.get("time_s"), ref_acc=ref.get("accuracy"), timing=timing,
                         hardware=ref.get("hardware", "V100")))
        for label in sorted(set(labels[agg.step == s["id"]]) - {s["id"]}):
            rows.append(dict(kind="ablation", step=s["id"], label=label,
                             text="   " + shorten(label.split(SEPARATOR, 1)[-1], 44), timing=timing))
    return rows


def _short(change: str, width: int = 46) -> str:
    """A step's change in a few words: up to its first ';', cut to ``width``."""
    text = change.split(";")[0].strip()
    return text if len(text) <= width else text[:width - 1] + "…"


def _log_axis(ax, values: list[float], room: float = 6.0) -> None:
    """A log axis with 1-2-5 ticks printed as plain numbers, ``room`` x the largest value wide (space
    for the bar texts)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    finite = [v for v in values if v and math.isfinite(v) and v > 0]
    if not finite:
        return
    ax.set_xscale("log")
    ax.set_xlim(min(finite) / 1.6, max(finite) * room)
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(axis="x", which="major", alpha=0.25)


def _ratio_text(ratio: float) -> tuple[str, str]:
    if not math.isfinite(ratio):
        return "", "black"
    return f" ×{ratio:.2f}", FASTER if ratio < 1 else SLOWER if ratio > 1 else "black"


def _draw_bars(ax, ys: list[float], series: list[dict], title: str) -> None:
    """One panel of horizontal bars: ``series`` holds per row time, spread, time to target, accuracy,
    n, whether it missed the target, its timing convention and its ratio to the row above."""
    for y, s in zip(ys, series):
        if s is None or not math.isfinite(s["time"]):
            continue
        colour = CONVENTION.get(s["timing"], CONVENTION["with_eval"])[1 if s.get("measured") else 2]
        style = MISSED if s["missed"] else dict(facecolor=colour)
        ax.barh(y, s["time"], height=0.7, xerr=s.get("err") if s.get("err") else None,
                error_kw=dict(ecolor="black", lw=0.8, capsize=2), **style)
        if math.isfinite(s.get("to_target", math.nan)):
            ax.plot(s["to_target"], y, "D", color="black", ms=3.5)
        x = s["time"] + (s.get("err") or 0)
        ax.text(x * 1.08, y, s["text"], va="center", fontsize=6.5)
        ratio, colour = _ratio_text(s["ratio"])
        if ratio:
            ax.annotate(ratio, (x * 1.08, y), xytext=(0, -5.5), textcoords="offset points", fontsize=6,
                        color=colour, va="center")
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("seconds (log)", fontsize=7)
    ax.tick_params(axis="x", labelsize=6.5)


def _ratio_to_previous(time: float, timing: str, previous: tuple[float, str] | None) -> float:
    """Time over the previous step's, when both count the same seconds (not across Post 8's switch)."""
    if previous is None or previous[1] != timing or not previous[0]:
        return math.nan
    return time / previous[0]


def _published(rows: list[dict]) -> list[dict | None]:
    """The published bar of each row (steps only)."""
    out, previous = [], None
    for r in rows:
        t = r.get("ref_time") if r["kind"] == "step" else None
        if t is None or not math.isfinite(float(t)):
            out.append(None)
            continue
        t, acc = float(t), r.get("ref_acc")
        missed = acc is not None and math.isfinite(float(acc)) and float(acc) < DEFAULT_TARGET
        out.append(dict(time=t, missed=missed, timing=r["timing"], ratio=_ratio_to_previous(t, r["timing"], previous),
                        norm_time=t * TO_V100.get(r.get("hardware", "V100"), math.nan),
                        text=f"{t:,.{0 if t >= 10 else 1}f} s" + (f" · {float(acc):g}%" if acc is not None else "")))
        previous = (t, r["timing"])
    return out


def _measured(rows: list[dict], panel: pd.DataFrame) -> list[dict | None]:
    """The measured bar of each row in one panel: the recipe with the row's label."""
    by_label = {r.label: r for r in panel.itertuples()}
    out, previous = [], None
    for r in rows:
        a = by_label.get(r.get("label")) if r["kind"] != "header" else None
        if a is None or not math.isfinite(a.time_s):
            out.append(None)
            continue
        n = int(a.n)
        missed = math.isfinite(a.target) and a.acc_mean < a.target
        err = a.time_std if n > 1 and math.isfinite(a.time_std) else None
        ratio = _ratio_to_previous(a.time_s, a.timing, previous) if r["kind"] == "step" else math.nan
        out.append(dict(time=a.time_s, err=err, to_target=a.time_to_target, missed=missed, timing=a.timing,
                        measured=True, ratio=ratio, text=f"{a.time_s:,.0f} s · {a.acc_mean:.1f}% · n={n}"))
        if r["kind"] == "step":
            previous = (a.time_s, a.timing)
    return out


def _normalised(ax, ys: list[float], named: list[tuple[str, list[dict | None], str]], rows: list[dict]) -> str:
    """Each series over its time at the first step every series has (else its own first); returns
    the step it was normalised by."""
    present = [{i for i, s in enumerate(series) if s is not None and rows[i]["kind"] == "step"}
               for _, series, _ in named]
    common = sorted(set.intersection(*present)) if present else []
    base_step = rows[common[0]]["step"] if common else None
    values = []
    for (name, series, colour), have in zip(named, present):
        if not have:
            continue
        def seconds(s: dict) -> float:
            return s.get("norm_time", s["time"])

        base = seconds(series[common[0] if common else min(have)])
        pts = [(ys[i], seconds(series[i]) / base) for i in sorted(have)]
        values += [v for _, v in pts]
        ax.plot([p[1] for p in pts], [p[0] for p in pts], "-", color=colour, lw=1, alpha=0.7, label=name)
        for k, (y, v) in enumerate(pts):
            step_colour = colour if k == 0 else (FASTER if v < pts[k - 1][1] else SLOWER)
            ax.plot(v, y, "o", ms=3.5, color=step_colour, mec=colour, mew=0.6)
    ax.axvline(1.0, color="black", lw=0.6, alpha=0.5)
    _log_axis(ax, values, room=1.6)
    ax.set_title(f"normalised: time ÷ time at {base_step or 'each series’ first step'}\n"
                 "dot green: faster than the row above, red: slower", fontsize=8)
    ax.set_xlabel("× (log)", fontsize=7)
    ax.tick_params(axis="x", labelsize=6.5)
    ax.legend(fontsize=6, loc="lower left")
    return base_step or ""


def plot_timeline(agg: pd.DataFrame, path: Path):
    """Draw the timeline of ``agg`` (``ablate.report.stats.aggregate``) into ``path``; returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.lines import Line2D

    agg = agg.assign(label=agg.label if "label" in agg else agg.step)
    for column in ("time_std", "time_to_target", "target"):
        if column not in agg:
            agg[column] = math.nan
    rows = timeline_rows(agg)
    panels = list(agg.groupby(["scale", "device"], sort=True))
    n = len(rows)
    ys = list(np.arange(n)[::-1].astype(float))
    widths = [3.2] + [3.6] * len(panels) + [3.0]
    fig, axes = plt.subplots(1, len(widths), figsize=(sum(widths) + 3.4, ROW_INCHES * n + 2.2), sharey=True,
                             gridspec_kw=dict(width_ratios=widths, wspace=0.08))
    published = _published(rows)
    _draw_bars(axes[0], ys, published, "published, full scale:\none V100 (Posts), one A100 (sequel)")
    _log_axis(axes[0], [s["time"] for s in published if s])
    named = [("published (V100; A100 × 26/14.9)", published, "#555555")]
    palette = plt.cm.tab10(np.linspace(0, 1, 10))
    for k, ((scale, device), panel) in enumerate(panels):
        ax = axes[1 + k]
        series = _measured(rows, panel)
        _draw_bars(ax, ys, series, f"measured: scale {scale}\n{device}")
        _log_axis(ax, [s["time"] + (s.get("err") or 0) for s in series if s])
        named.append((f"scale {scale} · {device}", series, palette[(k + 1) % 10]))
    _normalised(axes[-1], ys, named, rows)
    for ax in axes:
        for y, r in zip(ys, rows):
            if r["kind"] == "header":
                ax.axhline(y + 0.5, color="black", lw=0.7, alpha=0.6)
        ax.set_ylim(-0.8, n - 0.2)
    axes[0].set_yticks(ys, [r["text"] for r in rows], fontsize=7)
    for label, r in zip(axes[0].get_yticklabels(), rows):
        if r["kind"] == "header":
            label.set_fontweight("bold")
        elif r["kind"] == "ablation":
            label.set_style("italic")
    axes[0].tick_params(axis="y", length=0)
    handles = [Patch(color=c[1], label=f"measured, {c[0]}") for c in CONVENTION.values()]
    handles += [Patch(color=c[2], label=f"published, {c[0]}") for c in CONVENTION.values()]
    handles += [Patch(**MISSED, label="mean accuracy below the target"),
                Line2D([], [], marker="D", color="black", ls="", ms=4, label="time to target"),
                Line2D([], [], color="black", marker="|", ls="", label="error bar: sd over seeds (n ≥ 2)")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False)
    targets = ", ".join(f"{s} {t:g}%" for s, t in agg.groupby("scale").target.first().items() if math.isfinite(t))
    fig.suptitle("The journey, step by step: published and measured time per step, each in its step's "
                 f"timing convention (target: {targets or '—'}; ×: time over the row above)", fontsize=9)
    fig.subplots_adjust(left=3.3 / (sum(widths) + 3.4), right=0.99, top=1 - 0.75 / (ROW_INCHES * n + 2.2),
                        bottom=1.0 / (ROW_INCHES * n + 2.2))
    fig.savefig(path, dpi=130)
    return fig
