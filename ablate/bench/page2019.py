"""The 2019 training loop, restated: the reference that ablate's own loop is measured against in the
``page2019`` comparison (:mod:`ablate.bench.loops`).

Page's own code was measured faster than ablate on the same CPU, and the bare loop of the ``engine``
comparison cannot show why: it shares the engine's process, memory layout and allocator setting, so
a cost both pay (glibc handing every step's activations back to the kernel and faulting them in
again; NCHW convolutions that oneDNN reorders for every call) cancels out. :class:`Page2019Loop`
restates the 2019 loop in a few lines and independently of the engine's training code: the padded
training set resident as one tensor, each epoch cropped, flipped (and cut out) as a whole by random
options, batches taken by index, summed cross-entropy, the 2019 Nesterov update written inline
(:func:`nesterov_2019_`) and the EMA every few steps. Only the network is the engine's
(:func:`same_network`), so that both loops train identical weights.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from ablate import data
from ablate import train as engine
from ablate.bench.settings import run_formats
from ablate.device import Precision, autocast

IMAGE_SIZE = 32


def same_network(cfg: DictConfig, images: data.Images, device: torch.device, precision: Precision) -> nn.Module:
    """The recipe's network, seeded, built and whitening-fitted as the engine does, so that both loops
    train identical networks from identical weights."""
    torch.manual_seed(cfg.seed)
    model = engine.build_network(cfg, precision, device)
    engine.fit_whitening(model, images, device)
    return model


def option_per_image(n: int, n_options: int, max_options: Optional[int], generator: torch.Generator) -> Tensor:
    """Which of ``n_options`` each of ``n`` images gets. Without ``max_options``, each image draws its
    own (the 2018 code's per-image choices); with it, up to that many distinct options are picked at
    random and a random shuffle of the images is cut into that many nearly equal runs, one option per
    run (the 2019 code's rule for its whole-set transforms, A3 8.1)."""
    if max_options is None:
        return torch.randint(n_options, (n,), generator=generator)
    picked = torch.randperm(n_options, generator=generator)[:max_options]
    shuffled = torch.randperm(n, generator=generator)
    out = torch.empty(n, dtype=torch.int64)
    for option, members in zip(picked.tolist(), torch.tensor_split(shuffled, len(picked))):
        out[members] = option
    return out


def grouped(option_of_image: Tensor) -> Iterator[tuple[int, Tensor]]:
    """(option, indices of the images that have it) for every option in use: one sort, not one scan
    of the whole set per option (cutout has 625 options)."""
    order = torch.argsort(option_of_image, stable=True)
    options, counts = torch.unique_consecutive(option_of_image[order], return_counts=True)
    yield from zip(options.tolist(), order.split(counts.tolist()))


def augment_epoch(x_padded: Tensor, crop_pad: int, flip: bool, cutout: int, max_options: Optional[int],
                  generator: torch.Generator, channels_last: bool) -> Tensor:
    """One epoch's training images, all at once: a 32x32 crop of each padded image, a mirror image of
    some, a zeroed ``cutout`` square in some, each choice drawn by :func:`option_per_image`. The result
    is allocated in the model's layout, so that no batch needs converting."""
    n, c = x_padded.shape[:2]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((n, c, IMAGE_SIZE, IMAGE_SIZE), dtype=x_padded.dtype, device=x_padded.device,
                      memory_format=fmt)
    span = 2 * crop_pad + 1
    for option, members in grouped(option_per_image(n, span * span, max_options, generator)):
        dy, dx = divmod(option, span)
        members = members.to(x_padded.device)
        out[members] = x_padded[members, :, dy:dy + IMAGE_SIZE, dx:dx + IMAGE_SIZE]
    if flip:
        for option, members in grouped(option_per_image(n, 2, max_options, generator)):
            if option == 1:
                members = members.to(x_padded.device)
                out[members] = out[members].flip(3)
    if cutout > 0:
        span = IMAGE_SIZE - cutout + 1
        for option, members in grouped(option_per_image(n, span * span, max_options, generator)):
            cy, cx = divmod(option, span)
            out[members.to(x_padded.device), :, cy:cy + cutout, cx:cx + cutout] = 0
    return out


Slot = tuple[Tensor, Tensor, float, float]  # weight, momentum buffer, LR multiplier, weight-decay multiplier


def update_slots(model: nn.Module, bias_lr_mult: float, bias_wd_mult: float) -> list[Slot]:
    """(weight, momentum buffer, LR multiplier, weight-decay multiplier) for every trainable parameter;
    batch-norm biases take the recipe's bias multipliers (step 8: LR x 64, weight decay / 64)."""
    slots = []
    for module in model.modules():
        is_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                lr_mult, wd_mult = (bias_lr_mult, bias_wd_mult) if is_norm and name == "bias" else (1.0, 1.0)
                slots.append((p, torch.zeros_like(p), lr_mult, wd_mult))
    return slots


@torch.no_grad()
def nesterov_2019_(slots: list[Slot], lr: float, weight_decay: float, momentum: float) -> None:
    """The 2019 code's Nesterov step on every slot, in place, then frees the gradient::

        g = grad + wd * w;   d = -lr * g;   v = momentum * v + d;   w = w + d + momentum * v

    ``lr`` and ``weight_decay`` are per example for a summed loss (blog LR / batch, WD x batch)."""
    for w, v, lr_mult, wd_mult in slots:
        d = w.grad
        d.add_(w, alpha=weight_decay * wd_mult).mul_(-lr * lr_mult)
        v.mul_(momentum).add_(d)
        w.add_(d.add_(v, alpha=momentum))
        w.grad = None


class Page2019Loop:
    """The 2019 training loop on the recipe's network, precision and layout, written without the
    engine's data path, optimiser, loss or EMA classes. Supports what the step-4 and step-8 recipes
    use: crop/flip/cutout, label smoothing, BN-bias multipliers, EMA; not LARS or the uniform-KL loss."""

    name = "2019 loop"

    def __init__(self, cfg: DictConfig, images: data.Images, device: torch.device) -> None:
        if cfg.optim.lars or cfg.loss.uniform_kl or not cfg.optim.nesterov:
            raise ValueError("the 2019 loop runs Nesterov SGD on a (label-smoothed) cross-entropy only")
        self.device, self.batch_size = device, int(cfg.batch_size)
        self.precision, self.channels_last = run_formats(cfg, device)
        self.model = same_network(cfg, images, device, self.precision)
        pad = cfg.augmentation.crop_pad
        x = data.normalise(images.train_x.to(device))
        self.x = (F.pad(x, (pad,) * 4, mode="reflect") if pad else x).to(self.precision.param_dtype)
        self.y = images.train_y.to(device)
        self.aug, self.max_options = cfg.augmentation, cfg.loader.max_options
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.smoothing = float(cfg.loss.label_smoothing)
        self.momentum, self.weight_decay = float(cfg.optim.momentum), float(cfg.optim.weight_decay)
        self.slots = update_slots(self.model, cfg.optim.bias_lr_mult, cfg.optim.bias_wd_mult)
        self.lr_at = self._schedule(cfg)
        self.ema_every = int(cfg.ema.every) if cfg.ema.enabled else 0
        self.ema_model = copy.deepcopy(self.model) if self.ema_every else None
        self.ema_pairs = [] if self.ema_model is None else [
            (avg, now) for avg, now in zip(self.ema_model.state_dict().values(), self.model.state_dict().values())
            if avg.is_floating_point()]
        self.ema_rho = float(cfg.ema.momentum) ** max(self.ema_every, 1)
        self.epoch = 0

    @staticmethod
    def _schedule(cfg: DictConfig) -> Callable[[float], float]:
        """Blog-units LR at a (fractional) epoch: linear between the schedule's knots, compressed in time
        when the scale caps the epochs, rescaled to ``schedule.peak`` when one is given."""
        knots, lrs = np.array(cfg.schedule.knots, float), np.array(cfg.schedule.lr, float)
        if cfg.scale.epochs is not None and knots[-1] > cfg.scale.epochs:
            knots = knots * cfg.scale.epochs / knots[-1]
        if cfg.schedule.peak is not None:
            lrs = lrs * cfg.schedule.peak / lrs.max()
        return lambda epoch: float(np.interp(epoch, knots, lrs))

    def step(self, x: Tensor, y: Tensor, lr: float) -> tuple[Tensor, Tensor]:
        """One training step at blog-units ``lr``; returns the summed loss and the logits, detached."""
        with autocast(self.device, self.precision.autocast):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="sum", label_smoothing=self.smoothing)
        loss.backward()
        n = self.batch_size
        nesterov_2019_(self.slots, lr / n, self.weight_decay * n, self.momentum)
        return loss.detach(), logits.detach()

    @torch.no_grad()
    def update_ema(self) -> None:
        for avg, now in self.ema_pairs:
            avg.mul_(self.ema_rho).add_(now, alpha=1.0 - self.ema_rho)

    def run_epoch(self, max_steps: int) -> tuple[int, Tensor]:
        a = self.aug
        x = augment_epoch(self.x, a.crop_pad, a.flip, a.cutout, self.max_options, self.generator, self.channels_last)
        order = torch.randperm(len(x), generator=self.generator).to(self.device)
        per_epoch = len(x) // self.batch_size  # the last partial batch is dropped
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        self.model.train()
        taken = min(per_epoch, max_steps)
        for i in range(taken):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            y = self.y[idx]
            loss, logits = self.step(x[idx], y, self.lr_at(self.epoch + (i + 1) / per_epoch))
            if self.ema_every and i % self.ema_every == 0:
                self.update_ema()
            loss_sum += loss
            correct += (logits.argmax(1) == y).sum()
        self.epoch += 1
        return taken, loss_sum
