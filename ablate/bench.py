"""Benchmark: ``python -m ablate.bench [--scale cpu|full|smoke] [--steps N] [--only aug,step,engine,page2019,startup]``.

Five comparisons, measured side by side on one machine, each with its ratio:

1. ``aug``      augmentation throughput: the early steps' per-image DataLoader path against the step-8
                batched device path, same settings (pad-crop 4, flip, cutout 8), same images.
2. ``step``     training-step throughput (forward + backward + SGD) of ResNet9 (the Post 4 recipe) and
                the final network (the step-8 recipe), per precision the device runs x memory format.
3. ``engine``   the real engine (``ablate.train.train``) on a one-epoch step-8 recipe against a bare
                ~15-line PyTorch loop over the same network, data, precision and number of steps.
4. ``page2019`` ablate's loop (its data path, step, optimiser, EMA) against a plain restatement of Page's
                2019 loop (``ablate.bench_page2019``) on steps 4 and 8, same network and formats: images/s,
                page faults and kernel seconds per step, from fp32 NCHW with glibc's allocator defaults to
                the CPU defaults (channels_last, memory kept; glibc's defaults in a child process, as the
                setting cannot be undone); plus one test-set evaluation in the first and last of these.
5. ``startup``  wall time from launching ``python -m ablate.run +step=step8 scale=smoke`` to its first
                training step, and the subprocess's total wall time.

Every timed region is bracketed by device synchronisation and excludes warm-up, as design.md asks.
Results go to ``bench.json`` and ``bench.md`` in ``--out`` (default ``runs/bench/<time>``) with the
environment they were measured in. Performance targets are printed here, never asserted in tests.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tabulate import tabulate
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from tqdm import tqdm

from ablate import augment, bench_page2019, data
from ablate import train as engine
# run_formats: precision and layout as the engine resolves them (ablate.device; cpu_half, channels_last None)
from ablate.bench_page2019 import formats as run_formats
from ablate.device import PRECISIONS
from ablate.validate import validate
from ablate.device import (autocast, cpu_count, cpu_facts, device_name, keep_cpu_memory, resolve_device,
                           resolve_precision, sync, to_memory_format)
from ablate.layers import Whitening
from ablate.optim import make_optimizer, set_lr, to_torch_units
from ablate.compose import compose

COMPARISONS = ("aug", "step", "engine", "page2019", "startup")
AUG_TARGET = 10.0  # the acceptance target: batched path >= 10x the per-image path
ENGINE_TARGET = 0.9  # the engine within 10% of the bare loop's throughput
REPO = Path(__file__).resolve().parent.parent

# The two networks of the step comparison, each in the recipe it trains with, so that its norm and
# activation layers (ghost BN, CELU, whitening stem for the final net) are the real ones.
STEP_NETWORKS = (("resnet9", ("+step=step4",)), ("resnet9_final", ("+step=step8", "arch=resnet9_final")))
# The augmentation both paths apply: the step 3_2 - 8_6 settings.
AUG_OVERRIDES = ("augmentation=crop_flip_cutout8",)
PER_IMAGE_LOADERS = ("per_image", "per_image_bulk", "per_image_once", "per_image_workers")
ENGINE_STEP = "step8"
BARE_LR = 0.4  # blog units (per-batch LR of a mean loss); constant, the bare loop has no schedule
ENGINE_TEST_IMAGES = 512  # evaluation is outside the engine's train time; a small test set saves wall time


@dataclass
class Settings:
    """What to measure and how much of it (the command line, with defaults resolved for the device)."""

    scale: str
    device: str
    steps: int  # timed steps per training configuration, and the engine/bare-loop step count
    warmup: int  # untimed steps before each timed training region
    images: int  # images per augmentation pass
    batch_size: Optional[int]  # None: each recipe's own (512)
    repeats: int  # augmentation passes per path; the fastest counts
    per_image_loader: str  # loader option of the per-image path judged (per_image_workers = step 0)
    workers: Optional[int]  # DataLoader workers of the per-image path; None: the loader option's own
    threads: Optional[int]  # torch CPU threads (also OMP_NUM_THREADS of the start-up run); None: torch's default
    data: str  # config group option: 'default' (CIFAR-10) or 'synthetic' (tests)
    only: tuple[str, ...]
    quick: bool
    out: str


# --------------------------------------------------------------------------------------------------
# Command line and configuration


def parse_args(argv: Optional[Sequence[str]] = None) -> Settings:
    p = argparse.ArgumentParser(
        prog="python -m ablate.bench",
        description="Measure, side by side: augmentation paths, training-step throughput per precision and "
                    "memory format, the engine against a bare PyTorch loop, ablate's loop against the 2019 "
                    "loop per format and allocator setting, and the start-up time of a run. "
                    "Writes bench.json and bench.md.")
    p.add_argument("--scale", choices=("cpu", "full", "smoke"), default=None,
                   help="model/data scale (default: full on CUDA, cpu on CPU, smoke with --quick)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--steps", type=int, default=None,
                   help="timed training steps per configuration, and the epoch length of the page2019 comparison "
                        "(default: 20 on CPU, 50 on CUDA, 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before each timing (default 2, 1 with --quick)")
    p.add_argument("--images", type=int, default=None,
                   help="images per augmentation pass, same for both paths (default 10000, 1024 with --quick)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="override every recipe's batch size (default: the recipes' own, 512; 64 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="augmentation passes per path, the fastest counts (default 3)")
    p.add_argument("--per-image-loader", default="per_image_workers", choices=PER_IMAGE_LOADERS,
                   help="loader option of the per-image path the target is judged against (default "
                        "per_image_workers: step 0's torchvision-style loader, per-image preprocessing, one RNG "
                        "call per choice, 4 workers restarted every epoch); the tuned per_image loader of steps "
                        "1_4 to 8_0 is always measured beside it")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers of the per-image path (default: the loader option's, 0 for per_image)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads, for this process and the start-up run (default: torch's choice)")
    p.add_argument("--data", choices=("default", "synthetic"), default="default",
                   help="data config option; synthetic is for tests only (default: CIFAR-10 via ABLATE_DATA)")
    p.add_argument("--only", default=",".join(COMPARISONS), help=f"comma-separated subset of {','.join(COMPARISONS)}")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for tests (numbers mean nothing)")
    p.add_argument("--out", default=None, help="output directory (default runs/bench/<time>)")
    a = p.parse_args(argv)

    only = tuple(s.strip() for s in a.only.split(",") if s.strip())
    if not only or set(only) - set(COMPARISONS):
        p.error(f"--only takes a comma-separated subset of {','.join(COMPARISONS)}, got {a.only!r}")
    for name in ("steps", "images", "repeats", "batch_size"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if (a.warmup is not None and a.warmup < 0) or (a.workers is not None and a.workers < 0):
        p.error("--warmup and --workers must be >= 0")
    if a.threads is not None and a.threads < 1:
        p.error("--threads must be >= 1")
    cuda = resolve_device(a.device).type == "cuda"
    return Settings(
        scale=a.scale or ("smoke" if a.quick else "full" if cuda else "cpu"),
        device=a.device,
        steps=a.steps or (2 if a.quick else 50 if cuda else 20),
        warmup=a.warmup if a.warmup is not None else (1 if a.quick else 2),
        images=a.images or (1024 if a.quick else 10_000),
        batch_size=a.batch_size or (64 if a.quick else None),
        repeats=a.repeats or (1 if a.quick else 3),
        per_image_loader=a.per_image_loader,
        workers=a.workers,
        threads=a.threads,
        data=a.data,
        only=tuple(c for c in COMPARISONS if c in only),  # always in the documented order
        quick=a.quick,
        out=a.out or time.strftime("runs/bench/%Y-%m-%d_%H-%M-%S"),
    )


def compose_cfg(overrides: Sequence[str], batch_size: Optional[int] = None) -> DictConfig:
    """Compose conf/config.yaml exactly as ``python -m ablate.run`` does, then validate it: the bench
    measures the real recipes, not hand-made dicts. ``batch_size`` replaces the recipe's value
    afterwards (the ``batch_size`` group only offers the published sizes)."""
    cfg = compose(overrides)
    if batch_size is not None:
        cfg.batch_size = batch_size
    validate(cfg)
    return cfg


def common_overrides(s: Settings, images: int = 0) -> list[str]:
    """Scale, device, data source and no progress bars (their output would interleave with the bench's)."""
    out = [f"scale={s.scale}", f"device={s.device}", f"data={s.data}", "progress=false"]
    if s.data == "synthetic":  # enough synthetic images for the largest subset asked for
        out.append(f"data.synthetic_size={max(1024, images)}")
    return out


def ablate_version() -> str:
    """The installed package's version, else the checkout's pyproject.toml version."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("ablate")
    except PackageNotFoundError:  # run from a checkout that was never pip-installed
        try:
            import tomllib
            return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
        except Exception:  # Python 3.10 (no tomllib) or no pyproject.toml
            return "unknown"


def environment(s: Settings, device: torch.device) -> dict[str, Any]:
    """Where the figures were measured; stored with them in bench.json and bench.md."""
    return dict(
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        device=device_name(device),
        torch=torch.__version__,
        cuda=torch.version.cuda if device.type == "cuda" else None,
        python=platform.python_version(),
        ablate=ablate_version(),
        host=platform.node(),
        **cpu_facts(),
        cpu_count=os.cpu_count(),
        cpus_usable=cpu_count(),
        torch_threads=torch.get_num_threads(),
        # Other work on the machine disturbs every figure; the 1-minute load before the bench shows it.
        load_average=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        scale=s.scale,
        data=s.data,
        quick=s.quick,
    )


def timed(device: torch.device, work: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds that ``work()`` takes, with the device synchronised on both sides so that queued
    kernels are neither charged to the previous region nor left out of this one."""
    sync(device)
    start = time.perf_counter()
    result = work()
    sync(device)
    return time.perf_counter() - start, result


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


# --------------------------------------------------------------------------------------------------
# (1) Augmentation: per-image DataLoader path vs batched device path


def per_image_pass(dataset: augment.PerImageDataset, cfg: DictConfig, device: torch.device,
                   generator: torch.Generator) -> int:
    """One epoch of the per-image path as the engine runs it, batches moved to the device; returns
    the number of images produced. The DataLoader (and its workers, restarted every epoch as in
    PyTorch 0.4) is built inside, because that cost recurs every epoch."""
    loader = augment.make_loader(dataset, cfg.batch_size, cfg.loader, generator, pin_memory=device.type == "cuda")
    seen = 0
    for xb, _ in augment.per_image_epoch(dataset, loader, generator, cfg.augmentation):
        xb = xb.to(device, non_blocking=True)
        seen += len(xb)
    return seen


def batched_pass(x_padded: Tensor, y: Tensor, cfg: DictConfig, generator: torch.Generator) -> int:
    """One epoch of the device path, every batch taken; returns the number of images produced."""
    seen = 0
    # drop_last=False and max_options=None: exactly the images and the choice rules of the per-image pass
    for xb, _ in augment.device_epoch(x_padded, y, cfg.augmentation, cfg.batch_size, False, generator, None):
        seen += len(xb)
    return seen


def fastest_pass(device: torch.device, repeats: int, one_pass: Callable[[], int]) -> dict[str, Any]:
    """Best of ``repeats`` timed passes (the least disturbed one) and its images/s."""
    best, images = float("inf"), 0
    for _ in range(repeats):
        seconds, images = timed(device, one_pass)
        best = min(best, seconds)
    return dict(images=images, seconds=best, images_per_s=images / best, repeats=repeats)


TUNED_PER_IMAGE = "per_image"  # steps 1_4 to 8_0: preprocessed once, choices in bulk, no workers


def measure_per_image(s: Settings, loader: str, workers: Optional[int], x: Tensor, y: Tensor,
                      device: torch.device, gen: torch.Generator) -> dict[str, Any]:
    """Throughput of one per-image loader option over ``x``: warmed up, fastest of ``s.repeats``."""
    extra = [] if workers is None else [f"loader.workers={workers}"]
    cfg = compose_cfg([f"loader={loader}", *extra, *AUG_OVERRIDES, *common_overrides(s, s.images)], s.batch_size)
    # With preprocess=once the dataset normalises and pads the whole set at construction (step 1_2 on):
    # a one-time cost, reported beside the per-epoch throughput but not in it, as for the device path.
    setup, dataset = timed(device, lambda: augment.PerImageDataset(x, y, cfg.augmentation, cfg.loader))
    warm = min(len(y), 2 * cfg.batch_size)  # first-call costs (allocations, kernel loading) stay out
    per_image_pass(augment.PerImageDataset(x[:warm], y[:warm], cfg.augmentation, cfg.loader), cfg, device, gen)
    result = fastest_pass(device, s.repeats, lambda: per_image_pass(dataset, cfg, device, gen))
    result.update(path=f"per-image DataLoader ({loader})", loader=loader, workers=cfg.loader.workers,
                  preprocess=cfg.loader.preprocess, choices=cfg.loader.choices, setup_seconds=setup)
    return result


def bench_augmentation(s: Settings, device: torch.device) -> dict[str, Any]:
    """The batched device path against the per-image path it replaced (``s.per_image_loader``, step 0's
    by default, which the target is judged on) and against the tuned per-image loader of steps 1_4 to
    8_0, so that both the journey's gain and the gain over a well-written per-image loader show."""
    cfg = compose_cfg([*AUG_OVERRIDES, *common_overrides(s, s.images)], s.batch_size)
    images = data.load_images(cfg.data)
    n = min(s.images, len(images.train_y))
    x, y = images.train_x[:n], images.train_y[:n]
    gen = torch.Generator().manual_seed(0)

    setup_batched, x_padded = timed(device, lambda: data.pad_reflect(data.normalise(x.to(device)),
                                                                     cfg.augmentation.crop_pad))
    y_dev = y.to(device)
    batched_pass(x_padded[:min(n, 2 * cfg.batch_size)], y_dev[:min(n, 2 * cfg.batch_size)], cfg, gen)
    batched = fastest_pass(device, s.repeats, lambda: batched_pass(x_padded, y_dev, cfg, gen))
    batched.update(path="batched on device", setup_seconds=setup_batched)
    per_image = measure_per_image(s, s.per_image_loader, s.workers, x, y, device, gen)
    tuned = (measure_per_image(s, TUNED_PER_IMAGE, None, x, y, device, gen)
             if s.per_image_loader != TUNED_PER_IMAGE else per_image)
    r = ratio(batched["images_per_s"], per_image["images_per_s"])
    return dict(per_image=per_image, per_image_tuned=tuned, batched=batched, ratio=r,
                ratio_tuned=ratio(batched["images_per_s"], tuned["images_per_s"]),
                target=AUG_TARGET, meets_target=r >= AUG_TARGET,
                batch_size=cfg.batch_size, augmentation=OmegaConf.to_container(cfg.augmentation))


# --------------------------------------------------------------------------------------------------
# (2) Training-step throughput per network x precision x memory format


def device_precisions(device: torch.device) -> list[tuple[str, str]]:
    """(requested, used) for every precision that runs as itself on this device: CPU fp32, bf16;
    CUDA fp32, fp16, fp16_bn32, bf16. A request that maps onto one already listed is left out."""
    seen, out = set(), []
    for name in PRECISIONS:
        used = resolve_precision(name, device).name
        if used not in seen:
            seen.add(used)
            out.append((name, used))
    return sorted(out, key=lambda p: p[1] != "fp32")  # fp32 first: the baseline of the ratios


def fit_whitening_on(model: nn.Module, x: Tensor) -> None:
    """Fit the network's whitening layers (if any) on the batch ``x``. The step comparison has no data
    set, and an unfitted whitening layer refuses to run; fitted on the random batch it computes a real
    filter, so every layer after it sees inputs of the usual scale."""
    for m in model.modules():
        if isinstance(m, Whitening):
            m.fit(x.float())


def time_train_steps(cfg: DictConfig, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """Images/s of forward + backward + SGD step on one fixed random batch (no data loading), as
    the engine runs a step: its network, loss, optimiser, precision and memory format."""
    precision, channels_last = run_formats(cfg, device)
    torch.manual_seed(cfg.seed)
    model = engine.build_network(cfg, precision, device)
    optimizer = make_optimizer(model, cfg.optim, cfg.batch_size)
    set_lr(optimizer, BARE_LR, cfg.batch_size)
    criterion = engine.loss_fn(cfg.loss)
    x = torch.randn(cfg.batch_size, 3, 32, 32, device=device).to(precision.param_dtype)
    fit_whitening_on(model, x)
    x = to_memory_format(x, channels_last)
    y = torch.randint(0, 10, (cfg.batch_size,), device=device)

    def step() -> Tensor:
        with autocast(device, precision.autocast):
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def run(n: int) -> Tensor:
        loss = torch.zeros((), device=device)
        for _ in range(n):
            loss = step()  # never read inside the loop: no host-device sync per step
        return loss

    run(warmup)
    seconds, loss = timed(device, lambda: run(steps))
    return dict(precision_used=precision.name, seconds=seconds, steps=steps, batch_size=cfg.batch_size,
                images_per_s=steps * cfg.batch_size / seconds, final_loss=float(loss))


def bench_steps(s: Settings, device: torch.device) -> dict[str, Any]:
    grid = [(net, recipe, prec, cl) for net, recipe in STEP_NETWORKS for prec in device_precisions(device)
            for cl in (False, True)]
    rows = []
    for net, recipe, (asked, used), channels_last in tqdm(grid, desc="step throughput", disable=None, leave=False):
        cfg = compose_cfg([*recipe, f"precision={asked}", f"precision.channels_last={str(channels_last).lower()}",
                           *common_overrides(s)], s.batch_size)
        row = time_train_steps(cfg, device, s.steps, s.warmup)
        rows.append(dict(network=net, recipe=recipe[0].split("=")[1], precision=asked,
                         memory_format="channels_last" if channels_last else "contiguous", **row))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next configuration starts from the same free memory
    for row in rows:  # each network's fp32 contiguous row is the baseline of its ratios
        base = next(r for r in rows if r["network"] == row["network"] and r["precision_used"] == "fp32"
                    and r["memory_format"] == "contiguous")
        row["ratio_vs_fp32_contiguous"] = ratio(row["images_per_s"], base["images_per_s"])
    return dict(rows=rows, steps=s.steps, warmup=s.warmup)


# --------------------------------------------------------------------------------------------------
# (3) The engine against a bare minimal loop


def engine_cfg(s: Settings) -> DictConfig:
    """The step-8 recipe for one epoch on a class-balanced subset of exactly ``steps`` batches.
    ``scale.epochs=1`` compresses the real schedule into that epoch, as the smoke scale does."""
    batch_size = s.batch_size or compose_cfg([f"+step={ENGINE_STEP}", *common_overrides(s)]).batch_size
    # The subset takes size // 10 images per class: round up to whole classes; the step-8 loader drops
    # the last partial batch, so this gives exactly ``steps`` steps.
    train_size = -(-s.steps * batch_size // 10) * 10
    cfg = compose_cfg([f"+step={ENGINE_STEP}", *common_overrides(s, train_size), f"scale.train_size={train_size}",
                       f"scale.test_size={ENGINE_TEST_IMAGES}", "scale.epochs=1"], s.batch_size)
    expected = engine.steps_per_epoch(train_size, cfg.batch_size, cfg.loader.drop_last)
    if expected != s.steps:
        raise RuntimeError(f"a {train_size}-image subset gives {expected} steps of {cfg.batch_size}, not {s.steps}")
    return cfg


class StepCounter:
    """Counts every optimiser step taken in the process while active (a global torch hook), so that
    the engine's step count is checked rather than assumed."""

    def __enter__(self) -> StepCounter:
        self.steps = 0
        self._handle = register_optimizer_step_post_hook(self._count)
        return self

    def _count(self, *_: Any) -> None:
        self.steps += 1

    def __exit__(self, *_: Any) -> None:
        self._handle.remove()


def run_engine(cfg: DictConfig) -> dict[str, Any]:
    """The real engine on ``cfg``; images/s from its own synchronised timing, with and without the
    one-time preprocessing that its train time includes."""
    with StepCounter() as counter:
        results = engine.train(cfg)
    images = counter.steps * cfg.batch_size
    loop_seconds = results["train_seconds"] - results["prep_seconds"]
    return dict(steps=counter.steps, images=images, seconds=loop_seconds, images_per_s=images / loop_seconds,
                prep_seconds=results["prep_seconds"], train_seconds=results["train_seconds"],
                images_per_s_with_prep=images / results["train_seconds"], final_loss=results["train_loss"])


def bare_loop(model: nn.Module, x_padded: Tensor, y: Tensor, batch_size: int, steps: int, pad: int,
              autocast_dtype: Optional[torch.dtype], channels_last: bool, weight_decay: float = 5e-4,
              lr: float = BARE_LR) -> list[Tensor]:
    """The ceiling: the least a training loop must do. Shuffle, one random crop offset per batch,
    random flips, forward, summed cross-entropy, backward, Nesterov SGD. No schedule, EMA or records;
    losses come back as device tensors (reading them would sync the device every step)."""
    lr, wd = to_torch_units(lr, weight_decay, batch_size)  # summed loss, as the engine runs SGD
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                          nesterov=True, weight_decay=wd)
    order, per_epoch, losses = torch.randperm(len(y), device=y.device), len(y) // batch_size, []
    for i in range(steps):
        idx = order[(i % per_epoch) * batch_size:(i % per_epoch + 1) * batch_size]
        dy, dx = random.randint(0, 2 * pad), random.randint(0, 2 * pad)  # host RNG: no device sync
        xb = x_padded[idx, :, dy:dy + 32, dx:dx + 32]
        xb = torch.where(torch.rand(len(idx), 1, 1, 1, device=xb.device) < 0.5, xb.flip(3), xb)
        xb = to_memory_format(xb, channels_last)
        with autocast(xb.device, autocast_dtype):
            loss = F.cross_entropy(model(xb).float(), y[idx], reduction="sum")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def time_bare_loop(cfg: DictConfig, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """The bare loop on the engine's network, data, batch size and precision: ``warmup`` untimed
    steps on a throw-away copy of the model, then ``steps`` timed ones from the fresh model."""
    precision, channels_last = run_formats(cfg, device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = engine.build_network(cfg, precision, device)
    images = data.take_subset(data.load_images(cfg.data), cfg.scale)  # the engine's subset
    # The engine's network and data, prepared as the engine prepares them; not timed for the bare loop.
    engine.fit_whitening(model, images, device)
    x, y = engine.resident_training_set(images, cfg.augmentation.crop_pad, device, precision.param_dtype)
    args = (x, y, cfg.batch_size)
    kwargs = dict(pad=cfg.augmentation.crop_pad, autocast_dtype=precision.autocast,
                  channels_last=channels_last, weight_decay=cfg.optim.weight_decay)
    if warmup:
        bare_loop(copy.deepcopy(model), *args, steps=warmup, **kwargs)
    with StepCounter() as counter:
        seconds, losses = timed(device, lambda: bare_loop(model, *args, steps=steps, **kwargs))
    n_images = counter.steps * cfg.batch_size
    return dict(steps=counter.steps, images=n_images, seconds=seconds, images_per_s=n_images / seconds,
                first_loss=float(losses[0]), final_loss=float(losses[-1]))


def bench_engine(s: Settings, device: torch.device) -> dict[str, Any]:
    cfg = engine_cfg(s)
    precision, channels_last = run_formats(cfg, device)
    # Order: the bare loop's warm-up also warms the process for the engine (kernel and allocator
    # caches), which warms up only on CUDA; then the engine; then the bare loop's timed steps.
    bare_warm = time_bare_loop(cfg, device, steps=max(1, s.warmup), warmup=0)
    eng = run_engine(cfg)
    bare = time_bare_loop(cfg, device, steps=s.steps, warmup=s.warmup)
    if eng["steps"] != bare["steps"]:
        raise RuntimeError(f"engine took {eng['steps']} steps, the bare loop {bare['steps']}: not comparable")
    r = ratio(eng["images_per_s"], bare["images_per_s"])
    return dict(
        engine=eng, bare=bare, ratio=r, ratio_with_prep=ratio(eng["images_per_s_with_prep"], bare["images_per_s"]),
        target=ENGINE_TARGET, meets_target=r >= ENGINE_TARGET, recipe=cfg.step.id, arch=cfg.arch.name,
        precision_used=precision.name, channels_last=channels_last, batch_size=cfg.batch_size,
        train_images=int(cfg.scale.train_size), process_warmup_steps=bare_warm["steps"],
        note=("Images/s exclude the engine's one-time preprocessing (normalise, pad, copy to the device, "
              "whitening fit), which its train time includes by design: the bare loop is handed the same "
              "data already prepared, so leaving it out on both sides isolates the per-step overhead. "
              "The engine runs the full step-8 recipe (LR schedule, EMA, label smoothing, BN-bias groups, "
              "per-epoch batched augmentation); the bare loop runs none of it."),
    )


# --------------------------------------------------------------------------------------------------
# (4) ablate's loop against the 2019 loop, per precision, memory layout and allocator setting


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
    train_size = -(-s.steps * cfg.batch_size // 10) * 10  # whole classes; extra images are never batched
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
            result = bench_page2019.measure_recipe(cfg, images[key], device, s.steps, s.warmup,
                                                   variants[name].evaluate)
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
        if proc.returncode == 2 and "ablate.bench:" in proc.stderr:  # a data problem: say it as main() does
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
    (ABLATE_MALLOC=default), since this process keeps its memory (run_all); the kept-memory ones run
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


# --------------------------------------------------------------------------------------------------
# (5) Start-up time of a run


def bench_startup(s: Settings) -> dict[str, Any]:
    """Launch a smoke-scale step-8 run as a user would and time it to its first optimiser step."""
    with tempfile.TemporaryDirectory(prefix="ablate-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        overrides = [f"+step={ENGINE_STEP}", f"hydra.run.dir={run_dir}",
                     *[o for o in common_overrides(s) if not o.startswith("scale=")], "scale=smoke"]
        cmd = [sys.executable, "-m", "ablate.run", *overrides]
        launched = time.time()  # wall clock: compared with the run's first_step_at, also wall clock
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(s.threads)} if s.threads else {}))
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        finished = time.time()
        if proc.returncode != 0:
            raise RuntimeError(f"start-up run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("first_step_at") is None:
        raise RuntimeError("the run's summary.json has no first_step_at")
    return dict(command="python -m ablate.run " + " ".join(o for o in overrides if not o.startswith("hydra.run.dir")),
                startup_seconds=summary["first_step_at"] - launched, wall_seconds=finished - launched,
                train_seconds=summary.get("train_seconds"), eval_seconds=summary.get("eval_seconds"),
                device=summary.get("device"), precision_used=summary.get("precision_used"))


# --------------------------------------------------------------------------------------------------
# Reporting


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
    return f"{row['precision_used']} {'channels_last' if row['channels_last'] else 'NCHW'}"


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
    parts = ["# ablate benchmark", "", env_table(results["env"]), ""]
    for name in COMPARISONS:
        if name in results:
            title, render = SECTIONS[name]
            parts += [f"## {title}", "", render(results[name]), ""]
    return "\n".join(parts)


def write_results(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "bench.md").write_text(render_markdown(results))


# --------------------------------------------------------------------------------------------------
# Entry point


def run_comparisons(s: Settings, device: torch.device) -> Iterator[tuple[str, dict]]:
    """Each selected comparison in turn, as it finishes."""
    runners: dict[str, Callable[[], dict]] = {
        "aug": lambda: bench_augmentation(s, device),
        "step": lambda: bench_steps(s, device),
        "engine": lambda: bench_engine(s, device),
        "page2019": lambda: bench_loops(s, device),
        "startup": lambda: bench_startup(s),
    }
    for name in s.only:
        start = time.perf_counter()
        result = runners[name]()
        result["bench_seconds"] = time.perf_counter() - start
        yield name, result


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the selected comparisons, print a table per comparison, write bench.json and bench.md."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [CHILD_FLAG]:  # a child process of the page2019 comparison
        run_loop_child(argv[1])
        return {}
    s = parse_args(argv)
    threads_before = torch.get_num_threads()
    if s.threads:
        # On a shared CPU, more threads than free cores make OpenMP barriers spin and steps slow down
        # erratically; a fixed thread count gives steadier figures.
        torch.set_num_threads(s.threads)
    try:
        return run_all(s)
    finally:
        torch.set_num_threads(threads_before)  # main() may be called in-process (tests)


def run_all(s: Settings) -> dict:
    device = resolve_device(s.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the engine does
    # The allocator setting a CPU run makes (process-wide, not undoable), made before anything is
    # measured so that no comparison depends on whether the engine already ran in this process.
    memory = keep_cpu_memory() if device.type == "cpu" else {}
    results: dict[str, Any] = dict(env=dict(environment(s, device), **memory), settings=asdict(s))
    print(env_table(results["env"]), flush=True)
    start = time.perf_counter()
    for name, result in run_comparisons(s, device):
        results[name] = result
        title, render = SECTIONS[name]
        print(f"\n## {title} ({result['bench_seconds']:.0f} s)\n\n{render(result)}", flush=True)
    results["bench_seconds"] = time.perf_counter() - start
    out = Path(s.out)
    write_results(results, out)
    print(f"\nwrote {out / 'bench.json'} and {out / 'bench.md'} ({results['bench_seconds']:.0f} s in all)")
    return results


if __name__ == "__main__":
    try:
        main()
    except data.DataError as err:
        print(f"ablate.bench: {err}", file=sys.stderr)
        sys.exit(2)
