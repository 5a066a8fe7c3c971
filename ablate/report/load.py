"""Reading run records into tables: one row per run, with its per-epoch curve.

Every ``summary.json`` below a directory is read (single runs and sweeps, any depth). A broken or
partial record is reported and skipped, never fatal; failed and unfinished runs stay in the run
table with their status. Each run gets the label of its recipe (``ablate.report.labels``), the
device it ran on (a CPU by its name and instruction set: seconds of two machines are never one
series), its time in the convention of its step's published reference, and its time to target.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import yaml

from ablate.compose import journey_order, journey_steps  # noqa: F401 (the report's API)
from ablate.records import (CONFIG, METRICS, SUMMARY, formats_ran, published_seconds, read_config, read_metrics,
                            recipe_key, record_problems)
from ablate.report.labels import SEPARATOR, read_overrides, recipe_changes, recipe_label

# The accuracy a run has to reach, by scale, where its record keeps the default 94%. At scale=cpu the
# networks are a quarter as wide and the final recipes reach about 86.5-87.5% (experiments/journey-cpu),
# so 94% would mark every step as missing it; 86% plays its part there: a little under what the
# published recipes reach at that scale, as 94% is at full scale. Smoke runs have no target.
SCALE_TARGETS = {"cpu": 86.0, "smoke": math.nan}
DEFAULT_TARGET = 94.0
# tracking=mlflow's local store (ablate.tracking) keeps copies of each run's records as artifacts, under
# the sweep directory by default: they are not runs of their own.
TRACKER_STORE = "mlruns"


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
                                        timing, row.get("epoch_eval_seconds", 0.0))
            return seconds, row["epoch"]
    return math.nan, math.nan


# A CPU epoch whose threads got less than this share of their CPU time was fighting other work: its
# seconds can be up to twice an undisturbed run's (ablate.train records cpu_share per epoch).
CONTENDED_SHARE = 0.7


def timing_note(summary: dict, metrics: list[dict]) -> str:
    """Why a run's seconds are not an exclusive timing: 'gpu shared' when parallel jobs trained on one
    GPU at once, 'contended' when a CPU run's threads got under CONTENDED_SHARE of their time over the
    whole run (its epochs' shares weighted by their seconds: a few starved epochs can dominate the
    total, as 3 epochs at 0.07-0.4 made up 86% of one step-10 run's seconds); '' for a clean timing."""
    if summary.get("gpu_shared"):
        return "gpu shared"
    timed = [(row["cpu_share"], row.get("epoch_seconds") or 0.0) for row in metrics
             if isinstance(row.get("cpu_share"), (int, float))]
    if not any(t for _, t in timed):  # records without epoch seconds: every epoch weighs the same
        timed = [(share, 1.0) for share, _ in timed]
    if timed and sum(share * t for share, t in timed) / sum(t for _, t in timed) < CONTENDED_SHARE:
        return "contended"
    return ""


def _lr_peak(schedule: dict) -> float:
    """The max LR λ a run used: ``schedule.peak`` when set, else the schedule's largest value."""
    if schedule.get("peak") is not None:
        return schedule["peak"]
    return max(schedule.get("lr") or [math.nan])


def device_label(summary: dict) -> str:
    """The device a run's seconds belong to: a GPU by its name, a CPU by its name and instruction set
    (``cpu · Intel Xeon · AVX512``); ``cpu`` alone for records older than the CPU facts."""
    device = str(summary.get("device") or "?")
    model = summary.get("cpu_model")
    if device != "cpu" or not model:
        return device
    short = re.sub(r"\((R|TM)\)|\bCPU\b|\bProcessor\b|@.*$", "", str(model))
    return " · ".join(p for p in ("cpu", " ".join(short.split()), summary.get("cpu_isa")) if p)


def target_for(scale: str | None, recorded: float | None, given: float | None) -> float:
    """The accuracy target a run is judged by: ``given`` (``--target``), else the record's, except that a
    reduced scale replaces the schema's full-scale default by its own (SCALE_TARGETS)."""
    if given is not None:
        return given
    if recorded is None or recorded == DEFAULT_TARGET:
        return SCALE_TARGETS.get(str(scale), DEFAULT_TARGET)
    return recorded


def epoch_seconds(metrics: list[dict], prep_seconds: float, timing: str) -> list[float]:
    """Each epoch's seconds in the step's timing convention: the steps of ``published_seconds`` over
    the cumulative times (a train_only run's preprocessing stays in its total, not in an epoch)."""
    cumulative = [published_seconds(prep_seconds, 0.0, prep_seconds, timing)]
    for row in metrics:
        train, evals = row.get("train_seconds"), row.get("eval_seconds", 0.0)
        if not isinstance(train, (int, float)) or not isinstance(evals, (int, float)):
            return []
        cumulative.append(published_seconds(train, evals, prep_seconds, timing))
    return list(np.diff(cumulative))


def within_run_spread(metrics: list[dict], prep_seconds: float, timing: str) -> float:
    """The spread of a run's total time implied by its epoch-to-epoch variation: sqrt(epochs) x the
    standard deviation of its epochs' seconds. It is what a single run can say about its own timing
    noise; over seeds the report uses the spread between runs."""
    seconds = epoch_seconds(metrics, prep_seconds, timing)
    if len(seconds) < 3:
        return math.nan
    return float(np.std(seconds, ddof=1) * math.sqrt(len(seconds)))


def _read_record(root: Path, run_dir: Path, summary: dict, target: float | None,
                 problems: list[str]) -> tuple[dict | None, list[dict]]:
    """One run's row and its metrics; no row for a directory that does not hold one training of one
    recipe (``records.record_problems``: the problems say why)."""
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
        return None, metrics
    step_block = config.get("step") or {}
    ref = step_block.get("ref") or {}
    scale = summary.get("scale")
    goal = target_for(scale, config.get("target_acc"), target)
    timing = ref.get("timing", "with_eval")
    prep_s = summary.get("prep_seconds") or 0.0
    seconds, epochs = _to_target(metrics, goal, prep_s, timing)
    train_s, eval_s = summary.get("train_seconds", math.nan), summary.get("eval_seconds", math.nan)
    step = summary.get("step") or step_block.get("id")
    changes = recipe_changes(step, config, summary.get("choices"), read_overrides(run_dir))
    row = dict(run=str(run_dir.relative_to(root)) if run_dir != Path(root) else ".",
               status=summary["status"], step=step, label=recipe_label(step, changes),
               changes=" ".join(changes), arch=summary.get("arch"), scale=scale, seed=summary.get("seed"),
               device=device_label(summary), precision_used=summary.get("precision_used"),
               channels_last=summary.get("channels_last"), torch_version=summary.get("torch_version"),
               test_acc=summary.get("test_acc", math.nan), epochs=summary.get("epochs", len(metrics)),
               train_seconds=train_s, eval_seconds=eval_s, prep_seconds=prep_s,
               # the measured time in the convention of the step's published reference
               time_s=published_seconds(train_s, eval_s, prep_s, timing, summary.get("final_eval_seconds", 0.0)),
               timing=timing,
               time_spread=within_run_spread(metrics, prep_s, timing),
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
    return row, metrics


def _formats(run: pd.Series) -> str:
    ran = formats_ran(run.precision_used, run.channels_last)
    return f"ran {ran}" if run.precision_used else ran


def _distinct_labels(runs: pd.DataFrame) -> pd.DataFrame:
    """Two recipes of one step, scale and device never share a label. Where they would (they differ
    only in what labels leave out: the fp16 mapping or the layout asked for), the formats that ran are
    appended (``step8 · ran bf16 channels_last``), and the recipe key where even those agree."""
    for _, group in runs.groupby(["step", "scale", "device", "label"], dropna=False, sort=False):
        recipes = list(dict.fromkeys(group.recipe))
        if len(recipes) < 2:
            continue
        formats = {r: _formats(group[group.recipe == r].iloc[0]) for r in recipes}
        for recipe in recipes:
            hit = group.index[group.recipe == recipe]
            distinct = list(formats.values()).count(formats[recipe]) == 1 and formats[recipe]
            suffix = f"{SEPARATOR}{formats[recipe]}" if distinct else f" #{recipe[:6]}"
            runs.loc[hit, "label"] = runs.loc[hit, "label"] + suffix
    return runs


def load_runs(roots: Path | Sequence[Path], target: float | None = None
              ) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], list[str]]:
    """One row per run below ``roots`` (one directory or several, whose runs are pooled: a run is
    named by its path below its root, prefixed by the root's name when there are several), the
    per-epoch metrics of each run, and the problems met."""
    roots = [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]
    rows, curves, problems = [], {}, []
    for root in roots:
        for path in sorted(root.rglob(SUMMARY)):
            if TRACKER_STORE in path.relative_to(root).parts:  # an MLflow store's copies of the records
                continue
            run_dir = path.parent
            try:
                summary = json.loads(path.read_text())
                if not isinstance(summary, dict) or "status" not in summary:
                    raise ValueError("no status field")
            except (OSError, ValueError) as err:
                problems.append(f"{path}: unreadable summary ({err}); skipped")
                continue
            try:  # a record that parses but holds the wrong shapes or types is skipped, never fatal
                row, metrics = _read_record(root, run_dir, summary, target, problems)
            except (AttributeError, TypeError, ValueError, KeyError) as err:
                problems.append(f"{run_dir}: unusable record ({type(err).__name__}: {err}); skipped")
                continue
            if row is None:
                continue
            if len(roots) > 1:
                row["run"] = f"{root.name}/{row['run']}"
            rows.append(row)
            curves[row["run"]] = pd.DataFrame(metrics)
    runs = pd.DataFrame(rows)
    if len(runs):
        order = {s: i for i, s in enumerate(journey_order())}
        runs = runs.assign(_o=runs.step.map(order)).sort_values(["_o", "label", "scale", "seed"]).drop(columns="_o")
        runs = _distinct_labels(runs.reset_index(drop=True))
    return runs.reset_index(drop=True), curves, problems
