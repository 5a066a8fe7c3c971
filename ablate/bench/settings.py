"""What the bench measures and how much of it: the command line, resolved into :class:`Settings`, and
the recipes every comparison composes from it."""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import DictConfig

from ablate.compose import compose
from ablate.device import Precision, resolve_channels_last, resolve_device, resolve_precision
from ablate.validate import validate

COMPARISONS = ("aug", "step", "engine", "page2019", "startup")
REPO = Path(__file__).resolve().parents[2]  # the child processes run from the checkout
ENGINE_STEP = "step8"  # the recipe of the engine and start-up comparisons
PER_IMAGE_LOADERS = ("per_image", "per_image_bulk", "per_image_once", "per_image_workers")


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


def parser() -> argparse.ArgumentParser:
    """The flags of ``python -m ablate.bench``; defaults that depend on the device stay None here."""
    p = argparse.ArgumentParser(
        prog="ablate bench",
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
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> Settings:
    """The command line as :class:`Settings`, every default resolved for the device; exits on a bad value."""
    p = parser()
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


def whole_classes(steps: int, batch_size: int) -> int:
    """The smallest class-balanced subset size with ``steps`` full batches: the subset takes size // 10
    images per class, so round up to whole classes. A loader that drops the last partial batch then
    takes exactly ``steps`` steps per epoch."""
    return -(-steps * batch_size // 10) * 10


def run_formats(cfg: DictConfig, device: torch.device) -> tuple[Precision, bool]:
    """The precision and memory layout ``cfg`` runs in on ``device``: what the engine resolves, so that
    every loop the bench compares computes in exactly the same formats."""
    return (resolve_precision(cfg.precision.name, device, cfg.precision.cpu_half),
            resolve_channels_last(cfg.precision.channels_last, device))
