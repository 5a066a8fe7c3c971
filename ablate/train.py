"""The training engine: one flat loop from data to metrics for any composed recipe.

Timing follows design.md and docs/timing.md: the device is synchronised around the timed region,
which covers preprocessing (normalise, pad, move to the device), the whitening fit, augmentation
and every training step; per-epoch evaluation is timed separately; every batch shape is run once
before the timer (torch.compile, cuDNN autotuning), the state restored after, and reported on its
own. A CPU epoch also records its CPU share and page faults, so a contended timing can be told.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ablate import augment, data
from ablate.device import (Precision, autocast, cpu_facts, device_name, keep_cpu_memory, load_average, process_usage,
                           resolve_channels_last, resolve_device, resolve_precision, set_math_flags, sync,
                           to_memory_format)
from ablate.layers import Whitening, make_act, make_norm, unfitted_allowed
from ablate.config import LossConfig
from ablate.models import (REGISTRY, build_model, count_macs, count_params, customise, initialise,
                           scale_invariant_weights)
from ablate.optim import (lars_rescale_, make_optimizer, piecewise_linear, schedule_knots, schedule_lrs,
                          set_lr, training_epochs)

log = logging.getLogger(__name__)

# new_dawn.py fits the whitening on the first 10k training images in CIFAR-10's own order, which
# mixes the classes. A class-sorted copy (any ImageFolder tree) would give 5,000 airplanes and 5,000
# automobiles, so the fit takes a random sample of 10k instead, fixed by WHITENING_SEED for every
# run, loader and source, as new_dawn.py's first 10k are the same for every run.
WHITENING_IMAGES = 10_000
WHITENING_SEED = 0
EVAL_BATCH = 1024


class Diverged(RuntimeError):
    """Training diverged (``divergence``): the run stops and is recorded as failed, ``diverged``."""


# A train loss this many times its first epoch's has left training behind: the first epoch's mean
# loss starts near chance (ln 10 = 2.3 for CIFAR-10) and a run that trains lowers it; a hundredfold
# rise is far beyond anything a training run does and well before the loss reaches inf or NaN.
DIVERGENCE_FACTOR = 100.0


def divergence(row: Mapping, first_train_loss: float | None) -> str | None:
    """Why an epoch's metrics row shows a diverged run, or None. The rule: the train or the test
    loss is not finite (NaN, inf; null in a record), or the train loss exceeds DIVERGENCE_FACTOR
    times the first epoch's train loss."""
    for key in ("train_loss", "test_loss"):
        if key in row:
            value = row[key]
            if value is None or not math.isfinite(value):
                return f"{key.replace('_', ' ')} is {value} at epoch {row.get('epoch')}"
    loss = row.get("train_loss")
    if (loss is not None and first_train_loss is not None and math.isfinite(first_train_loss)
            and first_train_loss > 0 and loss > DIVERGENCE_FACTOR * first_train_loss):
        return (f"train loss {loss:.4g} at epoch {row.get('epoch')} is over {DIVERGENCE_FACTOR:g}x the first "
                f"epoch's ({first_train_loss:.4g})")
    return None


def build_network(cfg, precision: Precision, device: torch.device) -> nn.Module:
    """The configured network with the injected norm/act layers, cast to the run's precision."""
    spec = customise(REGISTRY[cfg.arch.name], cfg.arch)
    width = cfg.arch.width_mult * cfg.scale.width_mult
    model = initialise(build_model(spec, make_norm(cfg.norm), make_act(cfg.act), width_mult=width), cfg.arch.init)
    model = model.to(device=device, dtype=precision.param_dtype)
    if precision.norm_fp32:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.float()
    if resolve_channels_last(cfg.precision.channels_last, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def loss_fn(cfg: LossConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Summed cross-entropy; with smoothing a, (1-a) CE + a * mean over classes of -log p (A3 8.3),
    which is exactly what torch's label_smoothing computes; plus ``uniform_kl`` x KL(uniform || p),
    which pulls predictions towards uniform (Post 7's partial-training loss: CE + 0.5 KL)."""
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        total = F.cross_entropy(logits, y, reduction="sum", label_smoothing=cfg.label_smoothing)
        if cfg.uniform_kl:
            # KL(u || p) = sum_c (1/C) (log(1/C) - log p_c) = -mean_c log p_c - log C
            kl = -F.log_softmax(logits, dim=1).mean(dim=1) - math.log(logits.shape[1])
            total = total + cfg.uniform_kl * kl.sum()
        return total
    return loss


def predict(model: nn.Module, x: torch.Tensor, tta_flip: bool) -> torch.Tensor:
    """Logits, averaged over the image and its mirror image when flip TTA is on (A3 8.9)."""
    logits = model(x).float()
    if tta_flip:
        logits = (logits + model(x.flip(3)).float()) / 2
    return logits


class WeightMonitor:
    """Post 6's measurements of the scale-invariant weights: each epoch's row gets every such layer's
    norm |w| at the end of the epoch and its mean effective step |w_after - w_before| / |w_before|
    over the epoch's steps. Kept on the device (no host sync per step); a copy of those weights is
    the memory cost."""

    def __init__(self, weights: dict[str, nn.Parameter]) -> None:
        self.names = list(weights)
        self.weights = [w.detach() for w in weights.values()]
        self.before = [w.clone() for w in self.weights]
        self.step_sum = torch.zeros(len(self.weights), device=self.weights[0].device)
        self.steps = 0

    def before_step(self) -> None:
        torch._foreach_copy_(self.before, self.weights)

    def after_step(self) -> None:
        deltas = torch._foreach_sub(self.weights, self.before)
        moved = torch.stack(torch._foreach_norm(deltas, 2, dtype=torch.float32))
        self.step_sum += moved / torch.stack(torch._foreach_norm(self.before, 2, dtype=torch.float32))
        self.steps += 1

    def epoch_stats(self) -> dict[str, dict[str, float]]:
        """{'weight_norm': {layer: |w|}, 'effective_step': {layer: mean |dw|/|w|}}; starts a new epoch."""
        norms = torch.stack(torch._foreach_norm(self.weights, 2, dtype=torch.float32)).tolist()
        steps = (self.step_sum / max(self.steps, 1)).tolist()
        self.step_sum.zero_()
        self.steps = 0
        return dict(weight_norm=dict(zip(self.names, norms)), effective_step=dict(zip(self.names, steps)))


class EMA:
    """Exponential moving average of the weights, updated every ``every`` steps with momentum**every.

    Every floating-point tensor of the state is averaged, BN running statistics included, as in the
    2019 code; integer buffers (BN's num_batches_tracked) are not (docs/references.md E9). The tensors are
    grouped by dtype and device, so that each group takes the fused multi-tensor path (fp16_bn32 mixes
    fp16 weights with fp32 batch norms, which a single list would make fall back to a loop).
    """

    def __init__(self, model: nn.Module, momentum: float, every: int) -> None:
        self.model = copy.deepcopy(model)
        self.decay = momentum ** every
        self.every = every
        groups: dict[tuple, tuple[list, list]] = {}
        for avg, src in zip(self.model.state_dict().values(), model.state_dict().values()):
            if avg.is_floating_point():
                pair = groups.setdefault((avg.dtype, avg.device), ([], []))
                pair[0].append(avg)
                pair[1].append(src)
        self._groups = list(groups.values())

    def maybe_update(self, step_in_epoch: int) -> None:
        if step_in_epoch % self.every == 0:  # the 2019 code restarts the counter every epoch
            with torch.no_grad():
                for avg, src in self._groups:
                    torch._foreach_lerp_(avg, src, 1.0 - self.decay)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, tta_flip: bool,
             channels_last: bool, autocast_dtype: torch.dtype | None) -> tuple[float, float]:
    """Test loss (mean cross-entropy) and accuracy (percent) over the whole test set."""
    was_training = model.training
    model.eval()
    loss, correct = torch.zeros((), device=x.device), torch.zeros((), device=x.device)
    for i in range(0, len(x), EVAL_BATCH):
        xb, yb = to_memory_format(x[i:i + EVAL_BATCH], channels_last), y[i:i + EVAL_BATCH]
        with autocast(x.device, autocast_dtype):
            logits = predict(model, xb, tta_flip)
        loss += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    return loss.item() / len(x), 100.0 * correct.item() / len(x)


def resident_training_set(images: data.Images, pad: int, device: torch.device,
                          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The training set as the device path holds it: normalised, reflect-padded by ``pad``, on the device."""
    x = data.pad_reflect(data.normalise(images.train_x.to(device)).to(dtype), pad)
    return x, images.train_y.to(device)


def whitening_sample(n_images: int, size: int = WHITENING_IMAGES, seed: int = WHITENING_SEED) -> torch.Tensor:
    """Indices of the training images the whitening is fitted on: a seeded random sample of ``size``
    (all of them when there are fewer), in data-set order."""
    if n_images <= size:
        return torch.arange(n_images)
    return torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def fit_whitening(model: nn.Module, images: data.Images, device: torch.device) -> None:
    """Fit every whitening layer on the normalised ``whitening_sample`` of the training images."""
    layers = [m for m in model.modules() if isinstance(m, Whitening)]
    if layers:
        sample = data.normalise(images.train_x[whitening_sample(len(images.train_x))].to(device))
        for m in layers:
            m.fit(sample)


def batch_shapes(n: int, batch_size: int, drop_last: bool) -> list[int]:
    """The distinct batch sizes an epoch over ``n`` items makes: the full one and the partial last."""
    sizes = [min(batch_size, n)] if n else []
    if n % batch_size and n > batch_size and not drop_last:
        sizes.append(n % batch_size)
    return sizes


def _warm_up(model: nn.Module, train_model: nn.Module, train_sizes: list[int], eval_sizes: list[int],
             device: torch.device, precision: Precision, channels_last: bool, tta_flip: bool) -> float:
    """Run every batch shape of the run once on random data before the timer: each training batch
    size forward and backward through ``train_model`` (a compiled model recompiles for a new shape;
    cuDNN autotunes each), and each evaluation batch size through ``model`` as evaluation runs it. The
    model's state (weights, BN statistics, a whitening layer's filter) is restored afterwards, and
    the global RNG is not touched."""
    state = copy.deepcopy(model.state_dict())
    g = torch.Generator(device=device).manual_seed(0)
    start = time.perf_counter()
    with unfitted_allowed(model):
        for n in train_sizes:
            x = torch.randn(n, 3, 32, 32, device=device, dtype=precision.param_dtype, generator=g)
            y = torch.randint(0, 10, (n,), device=device, generator=g)
            with autocast(device, precision.autocast):
                loss_fn(LossConfig())(train_model(to_memory_format(x, channels_last)), y).backward()
        model.eval()
        with torch.no_grad():
            for n in eval_sizes:
                x = torch.randn(n, 3, 32, 32, device=device, dtype=precision.param_dtype, generator=g)
                with autocast(device, precision.autocast):
                    predict(model, to_memory_format(x, channels_last), tta_flip)
        model.train()
    sync(device)
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    return time.perf_counter() - start


def _batches(cfg, images: data.Images, device: torch.device, dtype: torch.dtype,
             generator: torch.Generator) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """Preprocess the training set for the configured loader; return a factory of epoch iterators."""
    if cfg.loader.kind == "device":
        x, y = resident_training_set(images, cfg.augmentation.crop_pad, device, dtype)
        return lambda: augment.device_epoch(x, y, cfg.augmentation, cfg.batch_size, cfg.loader.drop_last,
                                            generator, cfg.loader.max_options)
    dataset = augment.PerImageDataset(images.train_x, images.train_y, cfg.augmentation, cfg.loader)
    loader = augment.make_loader(dataset, cfg.batch_size, cfg.loader, generator,
                                 pin_memory=device.type == "cuda")

    def epoch() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for xb, yb in augment.per_image_epoch(dataset, loader, generator, cfg.augmentation,
                                              cfg.loader.max_options):
            yield (xb.to(device, dtype, non_blocking=True), yb.to(device, non_blocking=True))
    return epoch


def steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


@dataclass
class TrainStep:
    """One training step of the engine, from a batch to updated weights: the LR, the forward pass in
    the run's precision and layout, the loss, backward, the optional LARS rescale and weight monitor,
    the optimiser step and the EMA. ``train`` calls it for every batch; the bench times the same object."""

    model: nn.Module  # what the optimiser and the EMA hold
    forward: nn.Module  # ``model`` or its compiled version
    optimizer: torch.optim.Optimizer
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    precision: Precision
    channels_last: bool
    batch_size: int
    ema: EMA | None = None
    monitor: WeightMonitor | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float, step_in_epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Train on one batch at blog-units LR ``lr``; return the summed loss and the logits."""
        set_lr(self.optimizer, lr, self.batch_size)
        with autocast(x.device, self.precision.autocast):
            logits = self.forward(to_memory_format(x, self.channels_last))
            loss = self.criterion(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lars_rescale_(self.optimizer)
        if self.monitor is not None:
            self.monitor.before_step()
        self.optimizer.step()
        if self.monitor is not None:
            self.monitor.after_step()
        if self.ema is not None:
            self.ema.maybe_update(step_in_epoch)
        return loss, logits


def _cpu_facts(device: torch.device, loop_seconds: float, usage: list, steps: int) -> dict:
    """What a CPU epoch's timing is worth: the process's CPU seconds over the loop, the share of
    its threads' time that it got (well under 1 on a machine busy with other work: ``contended``
    in the report), the load average, and the minor page faults per step."""
    if device.type != "cpu":
        return {}
    cpu_seconds, faults = usage
    return dict(cpu_seconds=round(cpu_seconds, 2),
                cpu_share=round(cpu_seconds / max(loop_seconds * torch.get_num_threads(), 1e-9), 3),
                load_avg=load_average(), faults_per_step=round(faults / max(steps, 1)))


def _weight_monitor(model: nn.Module) -> WeightMonitor | None:
    weights = scale_invariant_weights(model)
    if not weights:
        log.warning("monitor.weights: this network has no conv feeding a batch norm; nothing to monitor")
        return None
    return WeightMonitor(weights)


def train(cfg, on_start: Callable[[dict], None] = lambda info: None,
          on_epoch: Callable[[dict], None] = lambda row: None) -> dict:
    """Train the composed recipe ``cfg``; call ``on_start`` with the run's facts once the model is
    built and ``on_epoch`` with each epoch's metrics; return the final results."""
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision.name, device, cfg.precision.cpu_half)
    channels_last = resolve_channels_last(cfg.precision.channels_last, device)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)  # data order and augmentation choices
    facts = set_math_flags(device, cfg.precision.tf32)
    if device.type == "cpu":
        facts.update(keep_cpu_memory(), torch_threads=torch.get_num_threads(), **cpu_facts())

    images = data.take_subset(data.load_images(cfg.data), cfg.scale)  # disk and cache: not timed
    model = build_network(cfg, precision, device)
    info = dict(precision_used=precision.name, channels_last=channels_last, device=device_name(device),
                params=count_params(model), macs=count_macs(copy.deepcopy(model).float()),
                data_source=images.source, train_images=len(images.train_y), test_images=len(images.test_y),
                **facts)
    train_model = torch.compile(model) if cfg.compile else model
    n_train, n_test = len(images.train_y), len(images.test_y)
    warm = _warm_up(model, train_model, batch_shapes(n_train, cfg.batch_size, cfg.loader.drop_last),
                    batch_shapes(n_test, EVAL_BATCH, drop_last=False), device, precision, channels_last,
                    cfg.tta.flip) if cfg.compile or device.type == "cuda" else 0.0
    info.update(compile_seconds=round(warm, 3) if cfg.compile else None,
                warmup_seconds=round(warm, 3) if not cfg.compile else None)
    on_start(info)

    sync(device)
    start = time.perf_counter()
    epoch_batches = _batches(cfg, images, device, precision.param_dtype, generator)
    test_x = data.normalise(images.test_x.to(device)).to(precision.param_dtype)
    test_y = images.test_y.to(device)
    fit_whitening(model, images, device)  # inside the timed region, as in new_dawn.py
    sync(device)
    prep_seconds = time.perf_counter() - start

    ema = EMA(model, cfg.ema.momentum, cfg.ema.every) if cfg.ema.enabled else None
    monitor = _weight_monitor(model) if cfg.monitor.weights else None
    step = TrainStep(model, train_model, make_optimizer(model, cfg.optim, cfg.batch_size), loss_fn(cfg.loss),
                     precision, channels_last, cfg.batch_size, ema, monitor)
    knots = schedule_knots(cfg.schedule, cfg.scale.epochs)
    lr_at = piecewise_linear(knots, schedule_lrs(cfg.schedule))
    n_steps = steps_per_epoch(len(images.train_y), cfg.batch_size, cfg.loader.drop_last)
    train_seconds, eval_seconds, results = prep_seconds, 0.0, {}
    first_step_at = None  # wall clock after the first optimiser step, for start-up benchmarks
    first_train_loss = None  # the divergence rule's reference
    for epoch in range(math.ceil(training_epochs(cfg.schedule, cfg.scale.epochs))):
        sync(device)
        epoch_start = time.perf_counter()
        usage_start = process_usage()
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        bar = tqdm(epoch_batches(), total=n_steps, desc=f"epoch {epoch + 1}", leave=False,
                   disable=None if cfg.progress else True, dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):
            # The LR at the end of this step's share of the epoch, as the 2019 code counts steps.
            lr = lr_at(epoch + (i + 1) / n_steps)
            loss, logits = step(x, y, lr, i)
            if first_step_at is None:
                sync(device)
                first_step_at = time.time()
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        bar.close()
        sync(device)
        loop_seconds = time.perf_counter() - epoch_start
        usage = [end - begin for end, begin in zip(process_usage(), usage_start)]
        train_seconds += loop_seconds
        epoch_seconds = loop_seconds + (prep_seconds if epoch == 0 else 0.0)  # preprocessing counts once

        eval_start = time.perf_counter()
        test_loss, test_acc = evaluate(ema.model if ema else model, test_x, test_y, cfg.tta.flip,
                                       channels_last, precision.autocast)
        sync(device)
        eval_seconds += time.perf_counter() - eval_start
        train_loss = loss_sum.item() / max(seen, 1)
        row = dict(epoch=epoch + 1, lr=lr, train_loss=train_loss, train_acc=100.0 * correct.item() / max(seen, 1),
                   test_loss=test_loss, test_acc=test_acc, epoch_seconds=epoch_seconds,
                   train_seconds=train_seconds, eval_seconds=eval_seconds,
                   **_cpu_facts(device, loop_seconds, usage, n_steps))
        if monitor is not None:
            row.update(monitor.epoch_stats())
        on_epoch(row)  # recorded first: the rows up to a divergence are what a stress test draws
        if first_train_loss is None:
            first_train_loss = train_loss
        if (why := divergence(row, first_train_loss)) is not None:
            raise Diverged(f"{why} (lr {lr:.4g})")
        results = dict(test_acc=test_acc, test_loss=test_loss, train_loss=train_loss, epochs=epoch + 1)
    return dict(results, train_seconds=round(train_seconds, 3), eval_seconds=round(eval_seconds, 3),
                prep_seconds=round(prep_seconds, 3), first_step_at=first_step_at)
