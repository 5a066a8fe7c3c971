"""Comparison ``page2019``: ablate's loop against the 2019 loop (:mod:`ablate.bench.page2019`) on steps
4 and 8, on the same network and formats.

Each recipe is trained both ways, from fp32 NCHW with glibc's allocator defaults to the CPU defaults
(channels_last, memory kept), one change at a time (:data:`LOOP_VARIANTS`). :func:`time_loop` times a
fixed number of steps and reads ``getrusage`` around them: images/s, minor page faults and kernel
seconds per step, where the allocator's cost shows first. The first and last variants also time one
evaluation of the test set. glibc's defaults are measured in a child process
(``python -m ablate.bench --page2019-child SPEC``), because the allocator setting
(``ablate.device.keep_cpu_memory``) cannot be undone inside a process.
"""
from __future__ import annotations

import copy
import gc
import itertools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from ablate import data
from ablate import train as engine
from ablate.bench.page2019 import Page2019Loop, same_network
from ablate.bench.settings import REPO, Settings, common_overrides, compose_cfg, run_formats, whole_classes
from ablate.bench.timing import measured, ratio
from ablate.device import device_name, keep_cpu_memory, resolve_device, set_math_flags
from ablate.optim import make_optimizer, piecewise_linear, schedule_knots, schedule_lrs
from ablate.validate import validate


@dataclass(frozen=True)
class LoopVariant:
    """One way of running both loops: the formats asked for and the allocator setting of the process."""

    name: str
    label: str
    precision: Optional[str]  # None: the recipe's own, resolved for the device (precision.cpu_half)
    channels_last: Optional[bool]  # None: the device's own layout (a CPU: channels_last)
    keep_memory: bool  # keep_cpu_memory() in the measuring process; False: ABLATE_MALLOC=default
    evaluate: bool  # also time one evaluation of the test set


# Before (plain fp32 NCHW, glibc as it comes) to after (the defaults a CPU run now gets), one change at a time.
LOOP_VARIANTS = (
    LoopVariant("fp32_nchw_glibc", "fp32 NCHW, glibc defaults", "fp32", False, False, True),
    LoopVariant("fp32_nchw_kept", "fp32 NCHW, kept memory", "fp32", False, True, False),
    LoopVariant("fp32_cl_kept", "fp32 channels_last, kept memory", "fp32", True, True, False),
    LoopVariant("defaults", "defaults (recipe precision, device layout, kept memory)", None, None, True, True),
)
LOOP_RECIPES = ("step4", "step8")
LOOPS = ("engine", "page2019")  # the keys of measure_recipe's results, in table order
QUICK_TEST_IMAGES = 100  # test images evaluated with --quick
CHILD_FLAG = "--page2019-child"  # internal: the child process of bench_loops (see run_loop_child)


# --------------------------------------------------------------------------------------------------
# Both loops on one recipe, in this process


class Loop(Protocol):
    """What :func:`time_loop` needs of a training loop."""

    name: str
    batch_size: int

    def run_epoch(self, max_steps: int) -> tuple[int, Tensor]:
        """Start a fresh epoch and take at most ``max_steps`` steps of it; return (steps taken, loss sum)."""


class EngineLoop:
    """The engine's per-step work for ``cfg``: its batches (``_batches``: the per-image DataLoader for
    step 4, the batched device path for step 8), LR schedule and ``ablate.train.TrainStep`` (autocast,
    loss, optimiser, LARS rescale, EMA), with the on-device loss/accuracy sums of ``train``."""

    name = "ablate engine"

    def __init__(self, cfg: DictConfig, images: data.Images, device: torch.device) -> None:
        self.device, self.batch_size = device, int(cfg.batch_size)
        self.precision, self.channels_last = precision, channels_last = run_formats(cfg, device)
        generator = torch.Generator().manual_seed(cfg.seed)  # data order and augmentation choices
        model = same_network(cfg, images, device, precision)
        self.batches = engine._batches(cfg, images, device, precision.param_dtype, generator)
        self.ema = ema = engine.EMA(model, cfg.ema.momentum, cfg.ema.every) if cfg.ema.enabled else None
        self.step = engine.TrainStep(model, model, make_optimizer(model, cfg.optim, cfg.batch_size),
                                     engine.loss_fn(cfg.loss), precision, channels_last, int(cfg.batch_size), ema)
        self.lr_at = piecewise_linear(schedule_knots(cfg.schedule, cfg.scale.epochs), schedule_lrs(cfg.schedule))
        self.steps_per_epoch = engine.steps_per_epoch(len(images.train_y), cfg.batch_size, cfg.loader.drop_last)
        self.epoch = 0

    @property
    def eval_model(self) -> nn.Module:
        """The network the engine evaluates: the EMA copy when the recipe keeps one."""
        return self.ema.model if self.ema is not None else self.step.model

    def run_epoch(self, max_steps: int) -> tuple[int, Tensor]:
        self.step.model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        taken = 0
        # islice stops before fetching batch max_steps: a per-image batch costs real work
        for i, (x, y) in enumerate(itertools.islice(self.batches(), max_steps)):
            loss, logits = self.step(x, y, self.lr_at(self.epoch + (i + 1) / self.steps_per_epoch), i)
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(1) == y).sum()
            taken += 1
        self.epoch += 1
        return taken, loss_sum


def run_steps(loop: Loop, n: int) -> Tensor:
    """``n`` steps of ``loop``, from a fresh epoch, starting more epochs when one runs out; the loss sum."""
    done, total = 0, None
    while done < n:
        taken, loss = loop.run_epoch(n - done)
        if taken == 0:
            raise RuntimeError(f"{loop.name}: an epoch gave no batch of {loop.batch_size}")
        done += taken
        total = loss if total is None else total + loss
    return total


def time_loop(loop: Loop, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """Images/s, faults/step and system seconds/step over ``steps`` steps after ``warmup`` untimed
    ones. The timed steps start a fresh epoch, so that the epoch's start (the whole-set augmentation,
    the per-image choices) is inside the window once, as it is once per epoch in a real run."""
    if warmup:
        run_steps(loop, warmup)
    usage, loss = measured(device, lambda: run_steps(loop, steps))
    images = steps * loop.batch_size
    return dict(loop=loop.name, steps=steps, images=images, images_per_s=images / usage["seconds"],
                faults_per_step=usage["faults"] / steps, sys_s_per_step=usage["sys_seconds"] / steps,
                user_s_per_step=usage["user_seconds"] / steps, mean_loss=float(loss) / images, **usage)


def time_evaluation(loop: EngineLoop, images: data.Images, cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """One evaluation of the test set with ``ablate.train.evaluate`` as the engine runs it at the end
    of an epoch (the EMA copy when the recipe has one, flip TTA when it asks), after one untimed batch
    so that first-call costs stay out, as they do after a run's first epoch."""
    test_x = data.normalise(images.test_x.to(device)).to(loop.precision.param_dtype)
    test_y = images.test_y.to(device)
    model, args = loop.eval_model, (bool(cfg.tta.flip), loop.channels_last, loop.precision.autocast)
    engine.evaluate(model, test_x[:engine.EVAL_BATCH], test_y[:engine.EVAL_BATCH], *args)
    usage, (loss, acc) = measured(device, lambda: engine.evaluate(model, test_x, test_y, *args))
    return dict(images=len(test_y), tta_flip=bool(cfg.tta.flip), on_ema=loop.ema is not None,
                images_per_s=len(test_y) / usage["seconds"], test_acc=acc, **usage)


def measure_recipe(cfg: DictConfig, images: data.Images, device: torch.device, steps: int, warmup: int,
                   evaluate: bool) -> dict[str, Any]:
    """Both loops on ``cfg`` (the engine's first), and the engine's evaluation when ``evaluate``.
    Each loop is dropped before the next is built, so that neither runs beside the other's memory."""
    precision, channels_last = run_formats(cfg, device)
    set_math_flags(device, cfg.precision.tf32)  # CUDA's TF32 switches, as train() sets them; nothing on a CPU
    out: dict[str, Any] = dict(precision_used=precision.name, channels_last=channels_last,
                               batch_size=int(cfg.batch_size), train_images=len(images.train_y))
    for key, make in (("engine", EngineLoop), ("page2019", Page2019Loop)):
        loop = make(cfg, images, device)
        out[key] = time_loop(loop, device, steps, warmup)
        if evaluate and isinstance(loop, EngineLoop):
            out["evaluation"] = time_evaluation(loop, images, cfg, device)
        del loop
        gc.collect()
    return out


# --------------------------------------------------------------------------------------------------
# Every recipe x variant, the glibc-default variants in a child process


def loop_cfg(s: Settings, recipe: str, variant: LoopVariant, composed: Optional[dict] = None) -> DictConfig:
    """The recipe in the variant's formats, on a class-balanced subset of ``steps`` x batch images,
    so that the timed steps are exactly one epoch: its start (whole-set augmentation, per-image
    choices) weighs on the figures as it does in a real run, per step. ``composed`` caches each
    recipe's composition (a second of Hydra each): the variants differ only in ``precision.name`` and
    ``precision.channels_last``, which are set on a copy, as the ``precision`` option and the
    override would set them."""
    composed = {} if composed is None else composed
    if recipe not in composed:
        composed[recipe] = compose_cfg([f"+step={recipe}", *common_overrides(s)], s.batch_size)
    cfg = copy.deepcopy(composed[recipe])
    if variant.precision is not None:
        cfg.precision.name = variant.precision
    if variant.channels_last is not None:
        cfg.precision.channels_last = variant.channels_last
    train_size = whole_classes(s.steps, cfg.batch_size)  # extra images are never batched
    cfg.scale.train_size = train_size
    if s.quick:  # evaluation dominates a quick run otherwise; its numbers mean nothing anyway
        cfg.scale.test_size = QUICK_TEST_IMAGES
    if s.data == "synthetic":
        cfg.data.synthetic_size = max(cfg.data.synthetic_size, train_size)
    validate(cfg)
    return cfg


def measure_loop_variants(s: Settings, names: Sequence[str]) -> dict[str, Any]:
    """In this process: every recipe x the named variants, both loops each. The allocator setting is
    the process's (``keep_cpu_memory``, which honours ABLATE_MALLOC=default), as a CPU run sets it."""
    device = resolve_device(s.device)
    malloc = keep_cpu_memory() if device.type == "cpu" else dict(malloc="not a CPU run: unchanged")
    variants = {v.name: v for v in LOOP_VARIANTS}
    images: dict[tuple, data.Images] = {}
    composed: dict[str, DictConfig] = {}
    rows = []
    for recipe in LOOP_RECIPES:
        for name in names:
            cfg = loop_cfg(s, recipe, variants[name], composed)
            key = (cfg.scale.train_size, cfg.scale.test_size)
            if key not in images:  # the same subset for every recipe and variant: loaded once
                images[key] = data.take_subset(data.load_images(cfg.data), cfg.scale)
            result = measure_recipe(cfg, images[key], device, s.steps, s.warmup, variants[name].evaluate)
            rows.append(dict(recipe=recipe, variant=name, **result))
    return dict(rows=rows, torch_threads=torch.get_num_threads(), pid=os.getpid(), **malloc)


def run_loop_child(spec_path: str) -> None:
    """Entry of the child process (``python -m ablate.bench --page2019-child SPEC``): measure the
    spec's variants with the parent's settings and write the results where the spec says."""
    spec = json.loads(Path(spec_path).read_text())
    s = Settings(**{**spec["settings"], "only": tuple(spec["settings"]["only"])})
    if s.threads:
        torch.set_num_threads(s.threads)
    Path(spec["out"]).write_text(json.dumps(measure_loop_variants(s, spec["variants"])))


def spawn_loop_child(s: Settings, names: Sequence[str], keep_memory: bool) -> dict[str, Any]:
    """Measure ``names`` in a fresh process with the allocator as asked: glibc's setting is
    process-wide and cannot be undone, so glibc's defaults need a process of their own."""
    with tempfile.TemporaryDirectory(prefix="ablate-bench-") as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps(dict(settings=asdict(s), variants=list(names), out=str(out))))
        env = {k: v for k, v in os.environ.items() if k != "ABLATE_MALLOC"}
        if not keep_memory:
            env["ABLATE_MALLOC"] = "default"
        if s.threads:
            env["OMP_NUM_THREADS"] = str(s.threads)
        cmd = [sys.executable, "-m", "ablate.bench", CHILD_FLAG, str(spec)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        if proc.returncode == 2 and "ablate.bench:" in proc.stderr:  # a data problem: say it as __main__ does
            raise data.DataError(proc.stderr.strip().split("ablate.bench:", 1)[1].strip())
        if proc.returncode != 0:
            raise RuntimeError(f"loop measurement failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def loop_rows(children: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """Flatten the children's results into table rows (recipe x variant x loop, in the documented
    order, each with its process's allocator setting) and evaluation rows; the ablate rows carry
    ablate / 2019 loop images/s."""
    found = {(r["recipe"], r["variant"]): dict(r, malloc=c["malloc"]) for c in children for r in c["rows"]}
    rows, evals = [], []
    for recipe in LOOP_RECIPES:
        for v in LOOP_VARIANTS:
            r = found[(recipe, v.name)]
            common = dict(recipe=recipe, variant=v.name, variant_label=v.label, precision_used=r["precision_used"],
                          channels_last=r["channels_last"], malloc=r["malloc"])
            for key in LOOPS:
                row = dict(common, loop_key=key, **r[key])
                if key == "engine":
                    row["ratio_vs_page2019"] = ratio(r["engine"]["images_per_s"], r["page2019"]["images_per_s"])
                rows.append(row)
            if "evaluation" in r:
                evals.append(dict(common, **r["evaluation"]))
    return rows, evals


def bench_loops(s: Settings, device: torch.device) -> dict[str, Any]:
    """Both loops on steps 4 and 8 in every variant. The glibc-default variants run in a child process
    (ABLATE_MALLOC=default), since this process keeps its memory (cli.run_all); the kept-memory ones run
    here, or in a second child when this process was started with ABLATE_MALLOC=default. One after
    the other: never side by side on a shared CPU."""
    groups = [[v.name for v in LOOP_VARIANTS if v.keep_memory == keep] for keep in (False, True)]
    here = os.environ.get("ABLATE_MALLOC", "") != "default"
    children = [spawn_loop_child(s, groups[0], keep_memory=False),
                measure_loop_variants(s, groups[1]) if here else spawn_loop_child(s, groups[1], keep_memory=True)]
    rows, evals = loop_rows(children)
    first = children[0]["rows"][0]
    return dict(rows=rows, evaluation=evals, steps=s.steps, warmup=s.warmup, batch_size=first["batch_size"],
                train_images=first["train_images"], device=device_name(device),
                processes=[dict(variants=names, malloc=c["malloc"], torch_threads=c["torch_threads"], pid=c["pid"])
                           for names, c in zip(groups, children)])
