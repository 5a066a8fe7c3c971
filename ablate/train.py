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
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ablate import augment, data
from ablate.checkpoint import Checkpoints, Counters, TrainingState
from ablate.device import (Precision, autocast, cpu_facts, device_name, keep_cpu_memory, load_average, process_usage,
                           resolve_channels_last, resolve_device, resolve_precision, set_math_flags, sync,
                           to_memory_format)
from ablate.layers import Whitening, make_act, make_norm, unfitted_allowed
from ablate.config import EMAConfig, LossConfig, batch_size_of
from ablate.models import (REGISTRY, build_model, count_macs, count_params, count_weights, customise, initialise,
                           scale_invariant_weights)
from ablate.optim import (lars_rescale_, lr_position, make_optimizer, piecewise_linear, schedule_knots,
                          schedule_lrs, set_lr, time_factor, training_epochs)
from ablate.progress import EpochBar, phase

log = logging.getLogger(__name__)

# new_dawn.py fits the whitening on the first 10k training images in CIFAR-10's own order, which
# mixes the classes (airbench: the first 5k). A class-sorted copy (any ImageFolder tree) would give
# 5,000 airplanes and 5,000 automobiles, so the fit takes a random sample of that size instead
# (WhiteningVariant.images), fixed by WHITENING_SEED for every run, loader and source, as the first
# 10k (5k) are the same for every run.
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


def _mirror_average(model: nn.Module, x: torch.Tensor, tta_flip: bool) -> torch.Tensor:
    logits = model(x).float()
    if tta_flip:
        logits = (logits + model(x.flip(3)).float()) / 2
    return logits


def predict(model: nn.Module, x: torch.Tensor, tta_flip: bool, translate: int = 0) -> torch.Tensor:
    """Logits, averaged over the image and its mirror image when flip TTA is on (A3 8.9). With
    ``translate`` t, airbench's multi-crop TTA (tta_level 2): that average weighs 1/2, and the same
    average over the image shifted by (-t, -t) and by (+t, +t) (reflect padding) 1/4 each: 6 views
    with flip, weights 1/4, 1/4 and 1/8 x 4."""
    logits = _mirror_average(model, x, tta_flip)
    if translate:
        size, t = x.shape[-1], translate
        padded = F.pad(x, (t, t, t, t), mode="reflect")
        shifted = [padded[..., :size, :size], padded[..., 2 * t:2 * t + size, 2 * t:2 * t + size]]
        logits = 0.5 * logits + 0.25 * sum(_mirror_average(model, v, tta_flip) for v in shifted)
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

    def state_dict(self) -> dict:  # for checkpoints (ablate.checkpoint)
        return dict(model=self.model.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])  # copied into the tensors _groups holds


class Lookahead:
    """airbench94's lookahead (sota-facts section 3, legacy/airbench94.py): after every ``every``-th step
    s of the run (counted over the whole run, from 1) the average moves towards the live weights with
    decay momentum**every * (s / total)**power, and the live weights are reset to it; after the last step
    they are set to the average. So the average barely lags at first and smooths hard at the end. It
    covers every floating-point tensor of the state (BN statistics included), as airbench's does.
    ``model`` is the live network, which is also the one evaluated.

    The cifar10-zoo ablation scripts start the average only after epoch 3 and reset the live weights
    to it at every epoch's end; airbench94 itself, which step 9 must be, averages from the first step
    and resets once at the end. ablate runs airbench94's rule everywhere.
    """

    def __init__(self, model: nn.Module, momentum: float, every: int, power: float, total_steps: int) -> None:
        self.model = model
        self.decay = momentum ** every
        self.every, self.power, self.total = every, power, max(total_steps, 1)
        self.steps = 0
        live = [v for v in model.state_dict().values() if v.is_floating_point()]
        self._pairs = [(v.detach().clone(), v) for v in live]

    @torch.no_grad()
    def _pull(self, decay: float) -> None:
        for avg, live in self._pairs:
            avg.lerp_(live, 1.0 - decay)
            live.copy_(avg)

    def maybe_update(self, step_in_epoch: int) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            self._pull(self.decay * (self.steps / self.total) ** self.power)
        if self.steps == self.total:
            self._pull(1.0)  # the average unchanged, the live weights set to it

    def state_dict(self) -> dict:  # for checkpoints; the live weights are the model's own
        return dict(average=[avg for avg, _ in self._pairs], steps=self.steps)

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for (avg, _), saved in zip(self._pairs, state["average"]):
            avg.copy_(saved)
        self.steps = state["steps"]


AVERAGERS: dict[str, Callable[[EMAConfig, nn.Module, int], "EMA | Lookahead"]] = {
    "ema": lambda cfg, model, total: EMA(model, cfg.momentum, cfg.every),
    "lookahead": lambda cfg, model, total: Lookahead(model, cfg.momentum, cfg.every, cfg.power, total),
}


def make_averager(cfg: EMAConfig, model: nn.Module, total_steps: int) -> EMA | Lookahead | None:
    """The configured weight averaging (``ema.kind``), or None when ``ema.enabled`` is off."""
    return AVERAGERS[cfg.kind](cfg, model, total_steps) if cfg.enabled else None


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, tta_flip: bool,
             channels_last: bool, autocast_dtype: torch.dtype | None, translate: int = 0) -> tuple[float, float]:
    """Test loss (mean cross-entropy) and accuracy (percent) over the whole test set."""
    was_training = model.training
    model.eval()
    loss, correct = torch.zeros((), device=x.device), torch.zeros((), device=x.device)
    for i in range(0, len(x), EVAL_BATCH):
        xb, yb = to_memory_format(x[i:i + EVAL_BATCH], channels_last), y[i:i + EVAL_BATCH]
        with autocast(x.device, autocast_dtype):
            logits = predict(model, xb, tta_flip, translate)
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
    for m in model.modules():
        if isinstance(m, Whitening):
            sample = whitening_sample(len(images.train_x), m.variant.images)
            with phase(f"fitting the whitening on {len(sample):,} training images"):
                m.fit(data.normalise(images.train_x[sample].to(device)))


def _biased_whitenings(model: nn.Module) -> list[Whitening]:
    return [m for m in model.modules() if isinstance(m, Whitening) and m.bias is not None]


@contextmanager
def whitening_bias_frozen(model: nn.Module) -> Iterator[None]:
    """The model with its whitening biases frozen inside the block (the warm-up's second state)."""
    layers = _biased_whitenings(model)
    for m in layers:
        m.freeze_bias(True)
    try:
        yield
    finally:
        for m in layers:
            m.freeze_bias(False)


def whitening_bias_freeze(model: nn.Module, after_epochs: float) -> Callable[[int], None]:
    """An epoch hook: the whitening biases train while epoch < ``after_epochs`` and are frozen from then
    on (airbench94: ``bias.requires_grad = epoch < 3`` at each epoch's start)."""
    layers = _biased_whitenings(model)

    def hook(epoch: int) -> None:
        for m in layers:
            m.freeze_bias(epoch >= after_epochs)
    return hook


def epoch_hooks(cfg, model: nn.Module) -> list[Callable[[int], None]]:
    """What changes the model at an epoch's start, from the config: called with the epoch index."""
    hooks = []
    if cfg.optim.whiten_bias_epochs is not None:
        factor = time_factor(cfg.schedule, cfg.scale.epochs)
        hooks.append(whitening_bias_freeze(model, cfg.optim.whiten_bias_epochs * factor))
    return hooks


def warm_up_states(cfg) -> list[Callable[[nn.Module], ContextManager]]:
    """The model states the training steps will meet, each a different graph for torch.compile: as built,
    and with the whitening bias frozen when the run freezes it (airbench compiles both for the same reason)."""
    states: list[Callable[[nn.Module], ContextManager]] = [lambda model: nullcontext()]
    if cfg.optim.whiten_bias_epochs is not None:
        states.append(whitening_bias_frozen)
    return states


def batch_shapes(n: int, batch_size: int, drop_last: bool) -> list[int]:
    """The distinct batch sizes an epoch over ``n`` items makes: the full one and the partial last."""
    sizes = [min(batch_size, n)] if n else []
    if n % batch_size and n > batch_size and not drop_last:
        sizes.append(n % batch_size)
    return sizes


def _warm_up(model: nn.Module, train_model: nn.Module, train_sizes: list[int], eval_sizes: list[int],
             device: torch.device, precision: Precision, channels_last: bool, tta_flip: bool, translate: int = 0,
             states: list[Callable[[nn.Module], ContextManager]] | None = None) -> float:
    """Run every batch shape of the run once on random data before the timer: each training batch
    size forward and backward through ``train_model`` in each of the model ``states`` (a compiled model
    recompiles for a new shape or a newly frozen parameter; cuDNN autotunes each), and each evaluation
    batch size through ``model`` as evaluation runs it. The model's state (weights, BN statistics, a
    whitening layer's filter) is restored afterwards, also when a pass fails, and the global RNG is not
    touched."""
    state = copy.deepcopy(model.state_dict())
    g = torch.Generator(device=device).manual_seed(0)
    start = time.perf_counter()
    try:
        with unfitted_allowed(model):
            for in_state in states or [lambda m: nullcontext()]:
                with in_state(model):
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
                        predict(model, to_memory_format(x, channels_last), tta_flip, translate)
    finally:
        model.train()
        sync(device)
        model.zero_grad(set_to_none=True)
        model.load_state_dict(state)
    return time.perf_counter() - start


# Inductor's CPU code for bf16 autocast gave NaN gradients for airbench94's network (GELU; torch 2.14.1,
# eager finite, the aot_eager backend finite), which surfaced only as a diverged run: such a run trains
# eagerly, as where compiling fails.
COMPILE_UNSOUND = {("cpu", torch.bfloat16): "inductor's CPU bf16 code gave NaN gradients (torch 2.14.1)"}


def compile_unsound(device: torch.device, precision: Precision) -> str | None:
    """Why torch.compile is not trusted on this device in this precision (``COMPILE_UNSOUND``); None when it is."""
    return COMPILE_UNSOUND.get((device.type, precision.autocast))


def compile_and_warm_up(cfg, model: nn.Module, warm: Callable[[nn.Module], float], device: torch.device,
                        precision: Precision) -> tuple[nn.Module, dict]:
    """``torch.compile`` the model and warm it up (``warm(train_model)`` runs ``_warm_up``); where
    compiling fails (no compiler toolchain, an unsupported op on this device) or is known to compute
    wrongly (``COMPILE_UNSOUND``), train eagerly instead and say so: the record's ``compiled`` is what
    actually ran, ``compile_error`` why not."""
    if not cfg.compile:
        return model, dict(compiled=False)
    if unsound := compile_unsound(device, precision):
        log.warning("torch.compile skipped: %s; training uncompiled", unsound)
        return model, dict(compiled=False, compile_seconds=None, compile_error=f"skipped: {unsound}")
    try:
        compiled = torch.compile(model)
        seconds = warm(compiled)
        return compiled, dict(compiled=True, compile_seconds=round(seconds, 3))
    except Exception as err:  # torch.compile fails in many ways (dynamo, inductor, the C compiler)
        log.warning("torch.compile failed on this device (%s: %s); training uncompiled", type(err).__name__,
                    str(err).splitlines()[0] if str(err) else "")
        from torch import _dynamo

        _dynamo.reset()  # drop what the failed attempt cached
        return model, dict(compiled=False, compile_seconds=None,
                           compile_error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


@dataclass
class EpochSource:
    """A factory of training epochs (call it for the next epoch's batches), with what the pipeline
    carries from one epoch to the next, for checkpoints: airbench's alternating flips, or a per-image
    dataset's own generator (``PerImageDataset.state_dict``)."""

    make: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    carried: list

    def __call__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.make()

    def state_dict(self) -> list[dict]:
        return [part.state_dict() for part in self.carried]

    def load_state_dict(self, states: list[dict]) -> None:
        for part, state in zip(self.carried, states):
            part.load_state_dict(state)


def _batches(cfg, images: data.Images, device: torch.device, dtype: torch.dtype, generator: torch.Generator,
             batch_size: int | None = None) -> EpochSource:
    """Preprocess the training set for the configured loader; return the source of its epochs of
    ``batch_size`` batches (``cfg.batch_size`` unless given)."""
    batch_size = batch_size or cfg.batch_size
    if cfg.loader.kind == "device":
        x, y = resident_training_set(images, cfg.augmentation.crop_pad, device, dtype)
        flips = augment.AlternatingFlips(len(x), generator) if cfg.augmentation.alternating_flip else None
        return EpochSource(lambda: augment.device_epoch(x, y, cfg.augmentation, batch_size, cfg.loader.drop_last,
                                                        generator, cfg.loader.max_options,
                                                        flips=flips.next_epoch() if flips else None),
                           [flips] if flips else [])
    dataset = augment.PerImageDataset(images.train_x, images.train_y, cfg.augmentation, cfg.loader)
    loader = augment.make_loader(dataset, batch_size, cfg.loader, generator,
                                 pin_memory=device.type == "cuda")

    def epoch() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for xb, yb in augment.per_image_epoch(dataset, loader, generator, cfg.augmentation,
                                              cfg.loader.max_options):
            yield (xb.to(device, dtype, non_blocking=True), yb.to(device, non_blocking=True))
    return EpochSource(epoch, [dataset])


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

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float, step_in_epoch: int,
                 position: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Train on one batch at the scheduled LR ``lr`` (``position``: the step's fractional epoch, for
        groups with a schedule of their own); return the summed loss and the logits."""
        set_lr(self.optimizer, lr, self.batch_size, position)
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
          on_epoch: Callable[[dict], None] = lambda row: None, checkpoints: Checkpoints | None = None) -> dict:
    """Train the composed recipe ``cfg``; call ``on_start`` with the run's facts once the model is
    built and ``on_epoch`` with each epoch's metrics; return the final results. ``checkpoints`` saves
    the training state every ``checkpoint.every`` epochs and, holding a saved state, resumes from it."""
    checkpoints = checkpoints or Checkpoints()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision.name, device, cfg.precision.cpu_half)
    channels_last = resolve_channels_last(cfg.precision.channels_last, device)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)  # data order and augmentation choices
    facts = set_math_flags(device, cfg.precision.tf32)
    if device.type == "cpu":
        facts.update(keep_cpu_memory(), torch_threads=torch.get_num_threads(), **cpu_facts())

    images = data.take_subset(data.load_images(cfg.data), cfg.scale)  # disk and cache: not timed
    # A batch larger than the (smoke) training subset is the whole subset: a class-balanced 1,024 is 1,020.
    batch = min(batch_size_of(cfg), len(images.train_y))
    with phase(f"building {cfg.arch.name} on {device_name(device)} ({precision.name})"):
        model = build_network(cfg, precision, device)
    info = dict(precision_used=precision.name, channels_last=channels_last, device=device_name(device),
                params=count_params(model), weights=count_weights(model),
                macs=count_macs(copy.deepcopy(model).float()),
                data_source=images.source, train_images=len(images.train_y), test_images=len(images.test_y),
                **({"batch_size_used": batch} if batch != cfg.batch_size else {}), **facts)
    n_train, n_test = len(images.train_y), len(images.test_y)

    def warm(train_model: nn.Module) -> float:
        return _warm_up(model, train_model, batch_shapes(n_train, batch, cfg.loader.drop_last),
                        batch_shapes(n_test, EVAL_BATCH, drop_last=False), device, precision, channels_last,
                        cfg.tta.flip, cfg.tta.translate, warm_up_states(cfg))

    compiling = cfg.compile and not compile_unsound(device, precision)  # else the phase would say "compiling" wrongly
    warming = ("compiling (torch.compile) and warming up every batch shape" if compiling else
               "warming up every batch shape (cuDNN autotuning)")
    with phase(warming) if compiling or device.type == "cuda" else nullcontext():
        train_model, compiled = compile_and_warm_up(cfg, model, warm, device, precision)
        warmup = round(warm(model), 3) if device.type == "cuda" and not compiled["compiled"] else 0.0
    info.update(compiled)
    info.update(compile_seconds=compiled.get("compile_seconds"), warmup_seconds=None if compiled["compiled"] else warmup)
    on_start(info)

    sync(device)
    start = time.perf_counter()
    epoch_batches = _batches(cfg, images, device, precision.param_dtype, generator, batch)
    test_x = data.normalise(images.test_x.to(device)).to(precision.param_dtype)
    test_y = images.test_y.to(device)
    fit_whitening(model, images, device)  # inside the timed region, as in new_dawn.py and airbench
    sync(device)
    prep_seconds = time.perf_counter() - start

    n_steps = steps_per_epoch(n_train, batch, cfg.loader.drop_last)
    epochs = training_epochs(cfg.schedule, cfg.scale.epochs)
    total_steps = math.ceil(round(n_steps * epochs, 6))  # a fractional last epoch stops part-way (airbench)
    ema = make_averager(cfg.ema, model, total_steps)
    monitor = _weight_monitor(model) if cfg.monitor.weights else None
    optimizer = make_optimizer(model, cfg.optim, batch, lr_base=max(schedule_lrs(cfg.schedule)),
                               epoch_scale=time_factor(cfg.schedule, cfg.scale.epochs))
    step = TrainStep(model, train_model, optimizer, loss_fn(cfg.loss), precision, channels_last, batch, ema, monitor)
    knots = schedule_knots(cfg.schedule, cfg.scale.epochs)
    lr_at = piecewise_linear(knots, schedule_lrs(cfg.schedule))
    hooks = epoch_hooks(cfg, model)
    state = TrainingState(model, optimizer, ema, generator, epoch_batches)
    # A resumed run goes on from its checkpoint's counters: its seconds so far, with the preprocessing
    # of the run that saved it (this process's preprocessing is reported apart, resumed_prep_seconds).
    run = state.load_state_dict(checkpoints.state) if checkpoints.state else Counters(
        train_seconds=prep_seconds, prep_seconds=prep_seconds)
    evaluated = ema.model if ema else model
    for epoch in range(run.epoch, math.ceil(epochs)):
        for hook in hooks:
            hook(epoch)
        sync(device)
        epoch_start = time.perf_counter()
        usage_start = process_usage()
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        bar = EpochBar(epoch_batches(), n_steps, f"epoch {epoch + 1}/{math.ceil(epochs)}", cfg.progress, device)
        for i, (x, y) in enumerate(bar):
            if run.steps >= total_steps:
                break
            # The LR at the end of this step's share of the epoch, as the 2019 code counts steps (or at
            # its start, schedule.step_at=start, as airbench's LambdaLR does).
            position = lr_position(epoch, i, n_steps, cfg.schedule.step_at)
            lr = lr_at(position)
            loss, logits = step(x, y, lr, i, position)
            run.steps += 1
            if run.first_step_at is None:
                sync(device)
                run.first_step_at = time.time()
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            bar.show(loss_sum, seen, lr)
        bar.close()
        sync(device)
        loop_seconds = time.perf_counter() - epoch_start
        usage = [end - begin for end, begin in zip(process_usage(), usage_start)]
        run.train_seconds += loop_seconds
        epoch_seconds = loop_seconds + (run.prep_seconds if epoch == 0 else 0.0)  # preprocessing counts once

        eval_start = time.perf_counter()
        test_loss, test_acc = evaluate(evaluated, test_x, test_y, cfg.tta.flip, channels_last, precision.autocast,
                                       cfg.tta.translate)
        sync(device)
        epoch_eval_seconds = time.perf_counter() - eval_start
        run.eval_seconds += epoch_eval_seconds
        train_loss = loss_sum.item() / max(seen, 1)
        row = dict(epoch=epoch + 1, lr=lr, train_loss=train_loss, train_acc=100.0 * correct.item() / max(seen, 1),
                   test_loss=test_loss, test_acc=test_acc, epoch_seconds=epoch_seconds,
                   train_seconds=run.train_seconds, eval_seconds=run.eval_seconds,
                   # this epoch's evaluation alone: the final pass airbench's convention times (train_tta)
                   epoch_eval_seconds=epoch_eval_seconds, epochs_trained=round(run.steps / n_steps, 4),
                   **_cpu_facts(device, loop_seconds, usage, n_steps))
        if monitor is not None:
            row.update(monitor.epoch_stats())
        on_epoch(row)  # recorded first: the rows up to a divergence are what a stress test draws
        if run.first_train_loss is None:
            run.first_train_loss = train_loss
        if (why := divergence(row, run.first_train_loss)) is not None:
            raise Diverged(f"{why} (lr {lr:.4g})")
        run.epoch = epoch + 1
        run.results = dict(test_acc=test_acc, test_loss=test_loss, train_loss=train_loss, epochs=epoch + 1,
                           epochs_trained=row["epochs_trained"], final_eval_seconds=round(epoch_eval_seconds, 3))
        checkpoints.after_epoch(run.epoch, lambda: state.state_dict(run))  # outside the timed regions
    checkpoints.finish(evaluated, run.results.get("epochs_trained", epochs))
    resumed = {"resumed_prep_seconds": round(prep_seconds, 3)} if checkpoints.state else {}
    return dict(run.results, train_seconds=round(run.train_seconds, 3), eval_seconds=round(run.eval_seconds, 3),
                prep_seconds=round(run.prep_seconds, 3), first_step_at=run.first_step_at, **resumed)
