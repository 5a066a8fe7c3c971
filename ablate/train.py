"""The training engine: one flat loop from data to metrics for any composed recipe.

Timing follows design.md: the device is synchronised around the timed region; the timed region
covers preprocessing (normalise, pad, move to the device), the whitening computation, augmentation
and every training step; per-epoch evaluation is timed separately; torch.compile and the cuDNN
warm-up run before the timer on a throw-away copy of the state and are reported on their own.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ablate import augment, data
from ablate.layers import Whitening, make_act, make_norm
from ablate.config import LossConfig
from ablate.models import (REGISTRY, build_model, count_macs, count_params, customise, initialise,
                           scale_invariant_weights)
from ablate.optim import (lars_rescale_, make_optimizer, piecewise_linear, schedule_knots, schedule_lrs,
                          set_lr, training_epochs)

log = logging.getLogger(__name__)

WHITENING_IMAGES = 10_000  # new_dawn.py fits the whitening on the first 10k training images
EVAL_BATCH = 1024


class Diverged(RuntimeError):
    """The training loss stopped being finite."""


@dataclass
class Precision:
    """How a requested precision runs on this device."""

    name: str  # what actually runs (recorded as precision_used)
    param_dtype: torch.dtype  # model weights and inputs
    norm_fp32: bool  # keep normalisation layers in fp32
    autocast: torch.dtype | None  # autocast dtype, if any


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """Map a requested precision to what the device runs natively (design.md: say which ran).

    CPUs have no fast fp16 convolutions (they are emulated, orders of magnitude slower), so fp16 and
    fp16_bn32 run in fp32 there; bf16 autocast runs on both CPU and CUDA.
    """
    if name in ("fp16", "fp16_bn32") and device.type == "cpu":
        name = "fp32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = "fp16_bn32"
    return {
        "fp32": Precision("fp32", torch.float32, False, None),
        "fp16": Precision("fp16", torch.float16, False, None),
        "fp16_bn32": Precision("fp16_bn32", torch.float16, True, None),
        "bf16": Precision("bf16", torch.float32, False, torch.bfloat16),
    }[name]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return "cpu"


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
    if cfg.precision.channels_last:
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
    2019 code; integer buffers (BN's num_batches_tracked) are not (journey-facts E9).
    """

    def __init__(self, model: nn.Module, momentum: float, every: int) -> None:
        self.model = copy.deepcopy(model)
        self.decay = momentum ** every
        self.every = every
        self._avg = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        self._src = [t for t in model.state_dict().values() if t.is_floating_point()]

    def maybe_update(self, step_in_epoch: int) -> None:
        if step_in_epoch % self.every == 0:  # the 2019 code restarts the counter every epoch
            with torch.no_grad():
                torch._foreach_lerp_(self._avg, self._src, 1.0 - self.decay)


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


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in the memory format the model runs in (``precision.channels_last``)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``, or a no-op context when the precision uses none."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def resident_training_set(images: data.Images, pad: int, device: torch.device,
                          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The training set as the device path holds it: normalised, reflect-padded by ``pad``, on the device."""
    x = data.pad_reflect(data.normalise(images.train_x.to(device)).to(dtype), pad)
    return x, images.train_y.to(device)


def fit_whitening(model: nn.Module, images: data.Images, device: torch.device) -> None:
    """Fit every whitening layer on the first WHITENING_IMAGES normalised training images (new_dawn.py)."""
    for m in model.modules():
        if isinstance(m, Whitening):
            m.fit(data.normalise(images.train_x[:WHITENING_IMAGES].to(device)))


def _warm_up(model: nn.Module, train_model: nn.Module, batch_size: int, device: torch.device,
             precision: Precision, channels_last: bool) -> float:
    """One forward/backward on random data so that compilation and cuDNN autotuning happen before
    the timer; the model's state (weights and BN statistics) is restored afterwards."""
    state = copy.deepcopy(model.state_dict())
    start = time.perf_counter()
    x = torch.randn(batch_size, 3, 32, 32, device=device, dtype=precision.param_dtype)
    y = torch.randint(0, 10, (batch_size,), device=device)
    with autocast(device, precision.autocast):
        loss_fn(LossConfig())(train_model(to_memory_format(x, channels_last)), y).backward()
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
    precision = resolve_precision(cfg.precision.name, device)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)  # data order and augmentation choices
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    images = data.take_subset(data.load_images(cfg.data), cfg.scale)  # disk and cache: not timed
    model = build_network(cfg, precision, device)
    info = dict(precision_used=precision.name, device=device_name(device), params=count_params(model),
                macs=count_macs(copy.deepcopy(model).float()), data_source=images.source,
                train_images=len(images.train_y), test_images=len(images.test_y))
    train_model = torch.compile(model) if cfg.compile else model
    warm = _warm_up(model, train_model, cfg.batch_size, device, precision, cfg.precision.channels_last) \
        if cfg.compile or device.type == "cuda" else 0.0
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

    optimizer = make_optimizer(model, cfg.optim, cfg.batch_size)
    ema = EMA(model, cfg.ema.momentum, cfg.ema.every) if cfg.ema.enabled else None
    criterion = loss_fn(cfg.loss)
    monitor = _weight_monitor(model) if cfg.monitor.weights else None
    knots = schedule_knots(cfg.schedule, cfg.scale.epochs)
    lr_at = piecewise_linear(knots, schedule_lrs(cfg.schedule))
    n_steps = steps_per_epoch(len(images.train_y), cfg.batch_size, cfg.loader.drop_last)
    train_seconds, eval_seconds, results = prep_seconds, 0.0, {}
    first_step_at = None  # wall clock after the first optimiser step, for start-up benchmarks
    for epoch in range(math.ceil(training_epochs(cfg.schedule, cfg.scale.epochs))):
        sync(device)
        epoch_start = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        bar = tqdm(epoch_batches(), total=n_steps, desc=f"epoch {epoch + 1}", leave=False,
                   disable=None if cfg.progress else True, dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):
            # The LR at the end of this step's share of the epoch, as the 2019 code counts steps.
            lr = lr_at(epoch + (i + 1) / n_steps)
            set_lr(optimizer, lr, cfg.batch_size)
            with autocast(device, precision.autocast):
                logits = train_model(to_memory_format(x, cfg.precision.channels_last))
                loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lars_rescale_(optimizer)
            if monitor is not None:
                monitor.before_step()
            optimizer.step()
            if monitor is not None:
                monitor.after_step()
            if ema is not None:
                ema.maybe_update(i)
            if first_step_at is None:
                sync(device)
                first_step_at = time.time()
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        bar.close()
        sync(device)
        loop_seconds = time.perf_counter() - epoch_start
        train_seconds += loop_seconds
        epoch_seconds = loop_seconds + (prep_seconds if epoch == 0 else 0.0)  # preprocessing counts once

        eval_start = time.perf_counter()
        test_loss, test_acc = evaluate(ema.model if ema else model, test_x, test_y, cfg.tta.flip,
                                       cfg.precision.channels_last, precision.autocast)
        sync(device)
        eval_seconds += time.perf_counter() - eval_start
        train_loss = loss_sum.item() / max(seen, 1)
        row = dict(epoch=epoch + 1, lr=lr, train_loss=train_loss, train_acc=100.0 * correct.item() / max(seen, 1),
                   test_loss=test_loss, test_acc=test_acc, epoch_seconds=epoch_seconds,
                   train_seconds=train_seconds, eval_seconds=eval_seconds)
        if monitor is not None:
            row.update(monitor.epoch_stats())
        on_epoch(row)
        if not math.isfinite(train_loss):
            raise Diverged(f"training loss is {train_loss} at epoch {epoch + 1} (lr {lr:.4g})")
        results = dict(test_acc=test_acc, test_loss=test_loss, train_loss=train_loss, epochs=epoch + 1)
    return dict(results, train_seconds=round(train_seconds, 3), eval_seconds=round(eval_seconds, 3),
                prep_seconds=round(prep_seconds, 3), first_step_at=first_step_at)
