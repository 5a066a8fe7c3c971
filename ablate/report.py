"""Turn run records into a results table, statistics, charts and a REPORT.md.

``python -m ablate.report <runs dir> [--out <dir>]`` scans every ``summary.json`` below the runs
directory (single runs and sweeps, any depth). A broken or partial record is reported and skipped,
never fatal; failed and unfinished runs appear in the run table with their status and stay out of
the statistics. Nothing here mixes scales or devices: they are part of every grouping key.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: reports are written on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from scipy import stats  # noqa: E402

from ablate.compose import CONF_DIR  # noqa: E402
from ablate.records import (CONFIG, METRICS, SUMMARY, published_seconds, read_config, read_metrics,  # noqa: E402
                            recipe_key, record_problems, writable_dir_problem)
from ablate.charts import runs_with_curves  # noqa: E402
from ablate.studies import study_charts  # noqa: E402

GROUP_KEYS = ["step", "arch", "scale", "device", "recipe"]  # one aggregate row per recipe, scale, device


def journey_order(conf_dir: Path = CONF_DIR) -> list[str]:
    """Step ids in journey order, read from the step chain itself (each step names its parent)."""
    parents = {}
    for path in (conf_dir / "step").glob("*.yaml"):
        defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults", [])
        parent = next((d for d in defaults if isinstance(d, str) and d != "_self_"), None)
        parents[path.stem] = parent
    children = {p: c for c, p in parents.items()}
    order, step = [], next(s for s, p in parents.items() if p is None)
    while step is not None:
        order.append(step)
        step = children.get(step)
    return order


def _check_numbers(summary: dict) -> None:
    for key in ("test_acc", "train_seconds", "eval_seconds", "epochs", "seed"):
        value = summary.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{SUMMARY} field {key}={value!r} is not a number")


def _recipe_key(config: dict) -> str:
    """The config key without the seed: runs that differ only by seed share a recipe."""
    return recipe_key(config) if config else ""


def _to_target(metrics: list[dict], target: float, prep_seconds: float, timing: str) -> tuple[float, float]:
    """Seconds (in the step's published convention, ``published_seconds``) and epochs at the first
    epoch whose test accuracy reaches ``target``."""
    for row in metrics:
        if row.get("test_acc", -1) >= target:
            seconds = published_seconds(row["train_seconds"], row.get("eval_seconds", math.nan), prep_seconds,
                                        timing)
            return seconds, row["epoch"]
    return math.nan, math.nan


# A CPU epoch whose threads got less than this share of their CPU time was fighting other work: its
# seconds can be up to twice an undisturbed run's (ablate.train records cpu_share per epoch).
CONTENDED_SHARE = 0.7


def timing_note(summary: dict, metrics: list[dict]) -> str:
    """Why a run's seconds are not an exclusive timing: 'gpu shared' when parallel jobs trained on one
    GPU at once, 'contended' when a CPU run's median epoch got under CONTENDED_SHARE of its threads'
    time; '' for a clean timing."""
    if summary.get("gpu_shared"):
        return "gpu shared"
    shares = sorted(row["cpu_share"] for row in metrics if isinstance(row.get("cpu_share"), (int, float)))
    if shares and shares[len(shares) // 2] < CONTENDED_SHARE:
        return "contended"
    return ""


def _lr_peak(schedule: dict) -> float:
    """The max LR λ a run used: ``schedule.peak`` when set, else the schedule's largest value."""
    if schedule.get("peak") is not None:
        return schedule["peak"]
    return max(schedule.get("lr") or [math.nan])


def load_runs(root: Path, target: float | None = None) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], list[str]]:
    """One row per run below ``root``, the per-epoch metrics of each run, and the problems met."""
    rows, curves, problems = [], {}, []
    for path in sorted(Path(root).rglob(SUMMARY)):
        run_dir = path.parent
        try:
            summary = json.loads(path.read_text())
            if not isinstance(summary, dict) or "status" not in summary:
                raise ValueError("no status field")
        except (OSError, ValueError) as err:
            problems.append(f"{path}: unreadable summary ({err}); skipped")
            continue
        try:  # a record that parses but holds the wrong shapes or types is skipped, never fatal
            _check_numbers(summary)
            config = read_config(run_dir)
            if config is None:
                problems.append(f"{run_dir / CONFIG}: missing or unreadable config")
                config = {}
            metrics, torn = read_metrics(run_dir)
            if torn:
                problems.append(f"{run_dir / METRICS}: a torn line was dropped")
            if inconsistent := record_problems(run_dir, summary, config, metrics):  # warned, left out
                problems += inconsistent
                continue
            ref = config.get("step", {}).get("ref", {})
            goal = target if target is not None else config.get("target_acc", 94.0)
            timing = ref.get("timing", "with_eval")
            prep_s = summary.get("prep_seconds") or 0.0
            seconds, epochs = _to_target(metrics, goal, prep_s, timing)
            train_s, eval_s = summary.get("train_seconds", math.nan), summary.get("eval_seconds", math.nan)
            row = dict(run=str(run_dir.relative_to(root)) if run_dir != Path(root) else ".",
                       status=summary["status"], step=summary.get("step"), arch=summary.get("arch"),
                       scale=summary.get("scale"), seed=summary.get("seed"), device=summary.get("device"),
                       precision_used=summary.get("precision_used"), torch_version=summary.get("torch_version"),
                       test_acc=summary.get("test_acc", math.nan), epochs=summary.get("epochs", len(metrics)),
                       train_seconds=train_s, eval_seconds=eval_s,
                       # the measured time in the convention of the step's published reference
                       time_s=published_seconds(train_s, eval_s, prep_s, timing), timing=timing,
                       target=goal, time_to_target=seconds, epochs_to_target=epochs,
                       ref_time_s=ref.get("time_s"), ref_acc=ref.get("accuracy"),
                       ref_note=ref.get("accuracy_note", ""), recipe=_recipe_key(config),
                       timing_note=timing_note(summary, metrics),
                       error=summary.get("error", ""),
                       # the Post 5 hyperparameters as run (studies sweep them as values, not choices)
                       lr_peak=_lr_peak(config.get("schedule", {})),
                       momentum=config.get("optim", {}).get("momentum", math.nan),
                       weight_decay=config.get("optim", {}).get("weight_decay", math.nan),
                       batch_size=config.get("batch_size", math.nan))
            row.update({f"choice.{k}": v for k, v in (summary.get("choices") or {}).items()})
            rows.append(row)
            curves[row["run"]] = pd.DataFrame(metrics)
        except (AttributeError, TypeError, ValueError, KeyError) as err:
            problems.append(f"{run_dir}: unusable record ({type(err).__name__}: {err}); skipped")
    runs = pd.DataFrame(rows)
    if len(runs):
        order = {s: i for i, s in enumerate(journey_order())}
        runs = runs.assign(_o=runs.step.map(order)).sort_values(["_o", "arch", "scale", "seed"]).drop(columns="_o")
    return runs.reset_index(drop=True), curves, problems


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """Per recipe, scale and device: n, mean/std/95% interval of test accuracy, the share of runs
    reaching the target, mean times, and time-to-target (with how many runs never reached it)."""
    done = runs[runs.status == "completed"] if len(runs) else runs
    out = []
    for key, g in done.groupby(GROUP_KEYS, sort=False):
        n, acc = len(g), g.test_acc.astype(float)
        timed, note = _clean_timings(g)
        mean, std = acc.mean(), acc.std(ddof=1) if n > 1 else math.nan
        half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
        reached = g.time_to_target.notna()
        out.append(dict(zip(GROUP_KEYS, key), n=n, acc_mean=mean, acc_std=std, ci95_low=mean - half,
                        ci95_high=mean + half, target=g.target.iloc[0], share_reaching=reached.mean(),
                        train_s=timed.train_seconds.mean(), eval_s=timed.eval_seconds.mean(),
                        time_s=timed.time_s.mean(), timing=g.timing.iloc[0], timing_note=note,
                        time_to_target=timed.time_to_target[timed.time_to_target.notna()].mean()
                        if reached.any() else math.nan,
                        never_reached=int((~reached).sum()), epochs=g.epochs.iloc[0],
                        ref_time_s=g.ref_time_s.iloc[0], ref_acc=g.ref_acc.iloc[0],
                        precision_used=", ".join(sorted(set(g.precision_used.dropna()))),
                        torch_version=", ".join(sorted(set(g.torch_version.dropna())))))
    return pd.DataFrame(out)


def _clean_timings(g: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The runs whose seconds count for a recipe's times, and a note on what was left out: flagged
    timings (``timing_note``) are excluded when the recipe has clean ones, and marked when it has none."""
    notes = g.timing_note if "timing_note" in g else pd.Series([""] * len(g), index=g.index)
    flagged = notes.fillna("") != ""
    if not flagged.any():
        return g, ""
    kinds = ", ".join(sorted(set(notes[flagged])))
    if flagged.all():
        return g, f"all {len(g)} {kinds}"
    return g[~flagged], f"{int(flagged.sum())}/{len(g)} {kinds}, excluded"


def _journey_rows(agg: pd.DataFrame) -> pd.DataFrame:
    """The aggregate rows of journey steps, in journey order, one per step (first scale/device)."""
    order = journey_order()
    rows = agg[agg.step.isin(order)].copy()
    rows["_o"] = rows.step.map({s: i for i, s in enumerate(order)})
    return rows.sort_values("_o").drop_duplicates("step").drop(columns="_o")


def _speedups(times: Sequence[float]) -> list[float]:
    return [math.nan] + [a / b if b else math.nan for a, b in zip(times, times[1:])]


def plot_timeline(agg: pd.DataFrame, path: Path) -> plt.Figure:
    """Measured and published time per step in journey order (each in its step's timing
    convention), accuracy annotated, speed-up over the previous step; below, times normalised by
    the first step so journeys on different hardware compare."""
    rows = _journey_rows(agg)
    x = np.arange(len(rows))
    measured, ref = rows.time_s.to_numpy(float), rows.ref_time_s.to_numpy(float)
    fig, (ax, nax) = plt.subplots(2, 1, figsize=(max(8, 0.55 * len(rows) + 3), 9), sharex=True,
                                  gridspec_kw=dict(height_ratios=[3, 2]))
    w = 0.4
    ax.bar(x - w / 2, measured, w, label="measured (this machine)", color="tab:blue")
    ax.bar(x + w / 2, ref, w, label="published (V100)", color="tab:gray")
    ax.set_yscale("log")
    ax.set_ylabel("seconds (log)")
    for xi, t, acc, n in zip(x, measured, rows.acc_mean, rows.n):
        ax.annotate(f"{acc:.1f}%\nn={n}", (xi - w / 2, t), ha="center", va="bottom", fontsize=7)
    scale = ", ".join(sorted(set(rows.scale)))
    device = ", ".join(sorted(set(rows.device)))
    ax.set_title(f"The journey: train time per step (scale {scale}; {device})\nPosts 1-4 times include "
                 f"per-epoch evaluation, Post 8 times exclude it", fontsize=9)
    ax.legend(fontsize=8)
    nax.plot(x, measured / measured[0], "o-", label="measured ÷ first step")
    nax.plot(x, ref / ref[0], "s--", color="tab:gray", label="published ÷ first step")
    for xi, t, up, rup in zip(x, measured / measured[0], _speedups(measured), _speedups(ref)):
        if not math.isnan(up):
            nax.annotate(f"×{up:.2f}\n(×{rup:.2f})", (xi, t), ha="center", va="bottom", fontsize=7,
                         color="tab:green", xytext=(0, 6), textcoords="offset points")
    nax.set_ylabel(f"time ÷ {rows.step.iloc[0]} time")
    nax.set_title("Normalised; green: speed-up over the previous step, measured (published)", fontsize=9)
    nax.set_xticks(x, rows.step, rotation=60, ha="right", fontsize=8)
    nax.legend(fontsize=8)
    nax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def plot_architectures(agg: pd.DataFrame, path: Path) -> plt.Figure:
    """Accuracy against train time for the networks trained at one step (the Post 4 search)."""
    rows = agg[agg.step == "step4_6"] if (agg.step == "step4_6").sum() > 1 else agg
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.errorbar(rows.train_s, rows.acc_mean, yerr=rows.acc_std.fillna(0), fmt="o", capsize=3)
    for _, r in rows.iterrows():
        ax.annotate(r.arch, (r.train_s, r.acc_mean), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("train seconds")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Architectures at {', '.join(sorted(set(rows.step)))} (scale "
                 f"{', '.join(sorted(set(rows.scale)))}; {', '.join(sorted(set(rows.device)))}; "
                 f"n = {int(rows.n.min())}–{int(rows.n.max())} per network)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def plot_curves(runs: pd.DataFrame, curves: dict[str, pd.DataFrame], path: Path) -> plt.Figure:
    """Per-epoch test accuracy, one line per run, coloured by step."""
    fig, ax = plt.subplots(figsize=(9, 6))
    steps = list(dict.fromkeys(runs.step))
    colours = dict(zip(steps, plt.cm.viridis(np.linspace(0, 0.9, max(len(steps), 1)))))
    labelled = set()
    for r, c in runs_with_curves(runs, curves, {"epoch", "test_acc"}, order=None):
        label = f"{r.step} ({r.arch})" if r.step not in labelled else None
        labelled.add(r.step)
        ax.plot(c.epoch, c.test_acc, color=colours[r.step], alpha=0.8, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy per epoch", fontsize=9)
    ax.grid(alpha=0.3)
    if labelled:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def _markdown(df: pd.DataFrame, columns: list[str]) -> str:
    return df[[c for c in columns if c in df]].to_markdown(index=False, floatfmt=".2f")


def write_report(root: Path, out: Path, target: float | None = None) -> dict[str, Path]:
    """Write runs.csv/.parquet, aggregate.csv/.parquet, the charts and REPORT.md into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    runs, curves, problems = load_runs(root, target)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    if runs.empty:
        what = "no usable run records" if problems else "no run records (summary.json) found"
        raise SystemExit(f"ablate.report: {what} under {root}")
    agg = aggregate(runs)
    files = {}
    for name, df in (("runs", runs), ("aggregate", agg)):
        df.to_csv(out / f"{name}.csv", index=False)
        df.to_parquet(out / f"{name}.parquet", index=False)
        files[name] = out / f"{name}.csv"
    charts = []
    if len(_journey_rows(agg)) >= 2:  # a timeline needs at least two steps
        plt.close(plot_timeline(agg, out / "timeline.png"))
        charts.append(("Timeline", "timeline.png"))
    if agg.arch.nunique() > 1:
        plt.close(plot_architectures(agg, out / "architectures.png"))
        charts.append(("Architectures", "architectures.png"))
    charts += study_charts(runs, out, curves)  # Post 5/7 studies: descent path, heat maps, BN stress test
    plt.close(plot_curves(runs, curves, out / "curves.png"))
    charts.append(("Per-epoch test accuracy", "curves.png"))
    files.update({c: out / c for _, c in charts})

    counts = runs.status.value_counts().to_dict()
    lines = [f"# ablate report: {root}", "",
             f"{len(runs)} runs ({', '.join(f'{v} {k}' for k, v in counts.items())}); "
             f"scales: {', '.join(sorted(set(runs.scale.dropna())))}; devices: {', '.join(sorted(set(runs.device.dropna())))}; "
             f"torch {', '.join(sorted(set(runs.torch_version.dropna())))}.", "",
             "Every number below comes from the runs listed at the end, at the scale and on the device "
             "named in its row. Accuracies are percent; `time_s` follows the published convention of "
             "each step (Posts 1-4: training loop + per-epoch evaluation, preprocessing excluded; Post 8: "
             "preprocessing + training loop, evaluation excluded); published references are single-V100 "
             "numbers at full scale. A `timing_note` marks seconds that were not exclusive: `gpu shared` "
             "(parallel jobs on one GPU) or `contended` (a CPU run whose threads got under "
             f"{CONTENDED_SHARE:.0%} of their CPU time); such runs are left out of a recipe's times when "
             "it has clean ones.", "", "## Aggregates", "",
             _markdown(agg, ["step", "arch", "scale", "device", "n", "acc_mean", "acc_std", "ci95_low",
                             "ci95_high", "share_reaching", "time_s", "train_s", "eval_s", "time_to_target",
                             "never_reached", "timing_note", "ref_time_s", "ref_acc", "precision_used"]), ""]
    for title, name in charts:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    lines += ["## Runs", "", _markdown(runs, ["run", "status", "step", "arch", "scale", "seed", "device",
                                             "test_acc", "train_seconds", "eval_seconds", "epochs",
                                             "time_to_target", "timing_note", "error"]), ""]
    if problems:
        lines += ["## Records skipped or repaired", ""] + [f"* {p}" for p in problems] + [""]
    (out / "REPORT.md").write_text("\n".join(lines))
    files["report"] = out / "REPORT.md"
    return files


def _percent(text: str) -> float:
    """``--target``: a finite percentage, 0 to 100."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 100:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage from 0 to 100")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ablate.report", description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, help="a directory of run records (searched at any depth)")
    parser.add_argument("--out", type=Path, help="where to write the report (default: <runs>/report)")
    parser.add_argument("--target", type=_percent, help="accuracy target in percent (default: each run's)")
    args = parser.parse_args(argv)
    if not args.runs.is_dir():
        parser.error(f"{args.runs} is not a directory")
    out = args.out or args.runs / "report"
    if problem := writable_dir_problem(out):
        parser.error(f"cannot write the report to {out} ({problem}); choose another with --out")
    files = write_report(args.runs, out, args.target)
    for name, path in files.items():
        print(f"{name:>14}: {path}")


if __name__ == "__main__":
    main()
