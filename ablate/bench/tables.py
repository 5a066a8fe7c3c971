"""The bench's tables: one renderer per comparison (:data:`SECTIONS`), printed as each finishes and
gathered into ``bench.md`` beside ``bench.json``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from tabulate import tabulate

from ablate.bench.loops import LOOP_RECIPES, LOOPS
from ablate.bench.settings import COMPARISONS
from ablate.bench.timing import ratio
from ablate.records import formats_ran


def _f(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def aug_table(r: dict) -> str:
    p, t = r["per_image"], r.get("per_image_tuned") or r["per_image"]
    paths = [p] + ([t] if t is not p and t != p else []) + [r["batched"]]
    rows = [[x["path"], x["images"], _f(x["seconds"], 3), _f(x["images_per_s"], 0), _f(x["setup_seconds"], 3)]
            for x in paths]
    table = tabulate(rows, ["path", "images", "seconds", "images/s", "one-time setup s"], tablefmt="github")
    return (f"{table}\n\nbatched / per-image ({p['loader']}: preprocess {p['preprocess']}, {p['choices']} "
            f"choices, {p['workers']} workers): **{r['ratio']:.1f}x** (target >= {r['target']:.0f}x: "
            f"{'met' if r['meets_target'] else 'NOT met'}); batched / tuned per-image ({t['loader']}): "
            f"{r.get('ratio_tuned', r['ratio']):.1f}x; batch {r['batch_size']}, best of "
            f"{r['batched']['repeats']} passes")


def step_table(r: dict) -> str:
    rows = [[x["network"], x["recipe"], x["precision"], x["precision_used"], x["memory_format"],
             _f(x["images_per_s"], 0), f"{x['ratio_vs_fp32_contiguous']:.2f}x"] for x in r["rows"]]
    table = tabulate(rows, ["network", "recipe", "precision asked", "ran as", "memory format", "images/s",
                            "vs fp32 contiguous"], tablefmt="github")
    return f"{table}\n\n{r['steps']} timed steps per row after {r['warmup']} warm-up steps, one fixed random batch"


def engine_table(r: dict) -> str:
    e, b = r["engine"], r["bare"]
    rows = [["engine (ablate.train.train)", e["steps"], _f(e["seconds"], 2), _f(e["images_per_s"], 0),
             _f(e["images_per_s_with_prep"], 0)],
            ["bare loop", b["steps"], _f(b["seconds"], 2), _f(b["images_per_s"], 0), "-"]]
    table = tabulate(rows, ["loop", "steps", "seconds", "images/s", "images/s incl. prep"], tablefmt="github")
    return (f"{table}\n\nengine / bare: **{r['ratio']:.3f}** (target >= {r['target']}: "
            f"{'met' if r['meets_target'] else 'NOT met'}); including the engine's preprocessing "
            f"({e['prep_seconds']:.2f} s): {r['ratio_with_prep']:.3f}. Recipe {r['recipe']} ({r['arch']}, "
            f"{r['precision_used']}, batch {r['batch_size']}, {r['train_images']} images, 1 epoch).\n\n{r['note']}")


def startup_table(r: dict) -> str:
    rows = [["launch -> first training step", _f(r["startup_seconds"], 2)],
            ["launch -> process exit", _f(r["wall_seconds"], 2)],
            ["train time (recorded)", _f(r["train_seconds"] or 0.0, 2)],
            ["evaluation time (recorded)", _f(r["eval_seconds"] or 0.0, 2)]]
    table = tabulate(rows, ["interval", "seconds"], tablefmt="github")
    return f"{table}\n\n`{r['command']}` ({r['device']}, {r['precision_used']}, data cached)"


def _layout(row: dict) -> str:
    return formats_ran(row["precision_used"], bool(row["channels_last"]))


def loops_table(r: dict) -> str:
    rows = [[x["recipe"], x["variant_label"], _layout(x), x["loop"],
             _f(x["images_per_s"], 0), _f(x["faults_per_step"], 0), _f(x["sys_s_per_step"], 3),
             f"{x['ratio_vs_page2019']:.2f}" if "ratio_vs_page2019" in x else ""] for x in r["rows"]]
    table = tabulate(rows, ["recipe", "variant", "ran as", "loop", "images/s", "faults/step", "sys s/step",
                            "ablate / 2019 loop"], tablefmt="github")
    ev = [[x["recipe"], x["variant_label"], _layout(x), "flip" if x["tta_flip"] else "none",
           "EMA copy" if x["on_ema"] else "trained", x["images"], _f(x["seconds"], 2), _f(x["images_per_s"], 0),
           _f(x["faults"], 0), _f(x["sys_seconds"], 2)] for x in r["evaluation"]]
    ev_table = tabulate(ev, ["recipe", "variant", "ran as", "TTA", "model", "test images", "seconds", "images/s",
                             "faults", "sys s"], tablefmt="github")
    gains = "; ".join(f"{recipe} {loop} {g:.2f}x" for recipe, loop, g in loop_gains(r["rows"]))
    procs = "; ".join(f"{', '.join(p['variants'])}: {p['malloc']}" for p in r["processes"])
    notes = (f"{r['steps']} timed steps after {r['warmup']} warm-up steps; the timed steps are one whole epoch of a "
             f"{r['train_images']}-image subset (batch {r['batch_size']}), so an epoch's start counts once per epoch "
             f"as in a run. Faults are minor page faults, sys s the kernel's CPU seconds (getrusage). Defaults over "
             f"fp32 NCHW with glibc defaults: {gains}. Processes: {procs}.")
    return (f"{table}\n\n{notes}\n\nOne evaluation of the test set (`ablate.train.evaluate`, after one "
            f"untimed batch):\n\n{ev_table}")


def loop_gains(rows: Sequence[dict]) -> list[tuple[str, str, float]]:
    """(recipe, loop, defaults images/s / fp32-NCHW-glibc images/s): what the CPU defaults buy each loop."""
    by = {(x["recipe"], x["variant"], x["loop_key"]): x for x in rows}
    return [(recipe, by[(recipe, "defaults", key)]["loop"],
             ratio(by[(recipe, "defaults", key)]["images_per_s"], by[(recipe, "fp32_nchw_glibc", key)]["images_per_s"]))
            for recipe in LOOP_RECIPES for key in LOOPS]


SECTIONS = {  # comparison -> (title, table renderer)
    "aug": ("Augmentation throughput", aug_table),
    "step": ("Training-step throughput", step_table),
    "engine": ("Engine against a bare loop", engine_table),
    "page2019": ("ablate against the 2019 loop, per format and allocator", loops_table),
    "startup": ("Start-up time", startup_table),
}


def env_table(env: dict) -> str:
    return tabulate([[k, v] for k, v in env.items()], ["environment", ""], tablefmt="github")


def render_markdown(results: dict) -> str:
    """bench.md: the environment, then a section per comparison measured, in the documented order."""
    parts = ["# ablate benchmark", "", env_table(results["env"]), ""]
    for name in COMPARISONS:
        if name in results:
            title, render = SECTIONS[name]
            parts += [f"## {title}", "", render(results[name]), ""]
    return "\n".join(parts)


def write_results(results: dict, out: Path) -> None:
    """bench.json (every figure) and bench.md (the tables) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "bench.md").write_text(render_markdown(results))
