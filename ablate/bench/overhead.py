"""Comparison ``engine``: the real engine (``ablate.train.train``) on a one-epoch step-8 recipe against
the bare loop (:mod:`ablate.bench.bare`) over the same network, data, precision and number of steps."""
from __future__ import annotations

import copy
import random
from typing import Any

import torch
from omegaconf import DictConfig
from torch.optim.optimizer import register_optimizer_step_post_hook

from ablate import data
from ablate import train as engine
from ablate.bench.bare import bare_loop
from ablate.bench.settings import ENGINE_STEP, Settings, common_overrides, compose_cfg, run_formats, whole_classes
from ablate.bench.timing import ratio, timed

ENGINE_TARGET = 0.9  # the engine within 10% of the bare loop's throughput
ENGINE_TEST_IMAGES = 512  # evaluation is outside the engine's train time; a small test set saves wall time


def engine_cfg(s: Settings) -> DictConfig:
    """The step-8 recipe for one epoch on a class-balanced subset of exactly ``steps`` batches.
    ``scale.epochs=1`` compresses the real schedule into that epoch, as the smoke scale does."""
    batch_size = s.batch_size or compose_cfg([f"+step={ENGINE_STEP}", *common_overrides(s)]).batch_size
    train_size = whole_classes(s.steps, batch_size)  # the step-8 loader drops the last partial batch
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
    """Engine and bare loop on :func:`engine_cfg`, the same number of steps checked on both sides."""
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
