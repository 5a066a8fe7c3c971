"""Learning-rate schedules, parameter groups and the one place where blog units become torch units.

The blog quotes per-batch learning rates for a mean loss (0.4) and weight decay 5e-4. The reference
code sums the loss over the batch and hands SGD ``lr / batch_size`` and ``weight_decay * batch_size``
(docs/references.md 0.1); the update is the same, and a summed loss keeps fp16 gradients away from
underflow, so ablate runs it that way too.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ablate.config import OptimConfig, ScheduleConfig, update_rule
from ablate.models import scale_invariant_weights


def piecewise_linear(knots: Sequence[float], values: Sequence[float]) -> Callable[[float], float]:
    """f(t) linear between (knot, value) pairs and constant beyond the ends, as np.interp."""
    knots, values = list(knots), list(values)
    return lambda t: float(np.interp(t, knots, values))


def schedule_knots(schedule: ScheduleConfig, max_epochs: float | None) -> list[float]:
    """The schedule's knots, compressed in time when a scale caps the epochs (smoke scale only)."""
    knots = [float(k) for k in schedule.knots]
    if max_epochs is not None and knots[-1] > max_epochs:
        knots = [k * max_epochs / knots[-1] for k in knots]
    return knots


def training_epochs(schedule: ScheduleConfig, max_epochs: float | None) -> float:
    """Where training ends: the last knot, or ``schedule.stop`` (compressed alike at smoke scale)."""
    knots = schedule_knots(schedule, max_epochs)
    return knots[-1] if schedule.stop is None else schedule.stop * knots[-1] / float(schedule.knots[-1])


def schedule_lrs(schedule: ScheduleConfig) -> list[float]:
    """The schedule's LR values, rescaled to ``schedule.peak`` when one is given."""
    lrs = [float(v) for v in schedule.lr]
    return lrs if schedule.peak is None else [v * schedule.peak / max(lrs) for v in lrs]


def to_torch_units(lr: float, weight_decay: float, batch_size: int) -> tuple[float, float]:
    """Blog units (per-batch LR, mean-loss WD) -> per-example LR and WD for a summed loss."""
    return lr / batch_size, weight_decay * batch_size


def _is_norm_bias(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and name == "bias"


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """Every trainable parameter gets weight decay (docs/references.md 0.2); BN biases may get their own
    LR and WD multipliers (step 8_6); with ``optim.lars`` the scale-invariant weights form a group of
    their own that ``lars_rescale_`` steps. Frozen parameters (requires_grad False) are left out."""
    lars = {id(p) for p in scale_invariant_weights(model).values()} if optim.lars else set()
    biases, scaled, others = [], [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (biases if _is_norm_bias(module, name) else scaled if id(p) in lars else others).append(p)
    groups = [dict(params=others, lr_mult=1.0, wd_mult=1.0)]
    if biases:
        groups.append(dict(params=biases, lr_mult=optim.bias_lr_mult, wd_mult=optim.bias_wd_mult))
    if scaled:
        groups.append(dict(params=scaled, lr_mult=1.0, wd_mult=1.0, lars=True))
    return groups


UPDATES = ("torch", "page2019")  # optim.update: torch.optim.SGD, or Page2019SGD


class Page2019SGD(torch.optim.Optimizer):
    """The 2019 code's Nesterov update (``torch_backend.nesterov_update``, docs/references.md 0.2)::

        g = grad + wd * w;   d = -lr * g;   v = momentum * v + d;   w = w + d + momentum * v

    The momentum buffer holds steps already scaled by the LR of their own step, where torch's SGD
    keeps raw gradients and scales the whole buffer by the current LR (w -= lr * (g + momentum * v)).
    The two agree while the LR is constant and differ whenever it changes.
    """

    def __init__(self, params, lr: float, momentum: float, weight_decay: float) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            steps = [p.grad for p in params]  # overwritten in place: zero_grad(set_to_none) frees them
            for p in params:
                if "momentum_buffer" not in self.state[p]:  # the 2019 code starts it at zero
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            if group["weight_decay"]:
                torch._foreach_add_(steps, params, alpha=group["weight_decay"])
            torch._foreach_mul_(steps, -group["lr"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, steps)
            torch._foreach_add_(steps, bufs, alpha=group["momentum"])
            torch._foreach_add_(params, steps)


def make_optimizer(model: nn.Module, optim: OptimConfig, batch_size: int) -> torch.optim.Optimizer:
    """Nesterov SGD in summed-loss units; ``set_lr`` sets each group's LR before every step.
    ``optim.update`` picks torch's SGD or the 2019 code's update (:class:`Page2019SGD`).

    A LARS group keeps its weight decay out of SGD (``lars_wd``): ``lars_rescale_`` folds it into the
    direction before rescaling, so decay turns the weight instead of shrinking its step.
    """
    _, wd = to_torch_units(0.0, optim.weight_decay, batch_size)
    groups = []
    for g in param_groups(model, optim):
        if g.get("lars"):
            # The step's length in torch units: lr/N (set_lr) x N * trust * |w| = lr * trust * |w|.
            g.update(weight_decay=0.0, lars_wd=wd * g["wd_mult"], lars_norm=batch_size * optim.lars_trust)
        else:
            g.update(weight_decay=wd * g["wd_mult"])
        groups.append(g)
    if update_rule(optim) == "page2019":
        return Page2019SGD(groups, lr=0.0, momentum=optim.momentum, weight_decay=wd)
    return torch.optim.SGD(groups, lr=0.0, momentum=optim.momentum, nesterov=optim.nesterov,
                           weight_decay=wd)


@torch.no_grad()
def lars_rescale_(optimizer: torch.optim.Optimizer) -> None:
    """Before ``optimizer.step()``: in each LARS group, replace every gradient g by the direction
    g + wd*w rescaled to length ``lars_norm`` * |w| (on the device, no host sync). Other groups are
    untouched, so this is a no-op for an optimiser without LARS groups."""
    for group in optimizer.param_groups:
        if not group.get("lars"):
            continue
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        grads = [p.grad for p in params]
        torch._foreach_add_(grads, params, alpha=group["lars_wd"])
        w_norms = torch.stack(torch._foreach_norm(params, 2, dtype=torch.float32))
        g_norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
        scales = group["lars_norm"] * w_norms / g_norms.clamp_min(torch.finfo(torch.float32).tiny)
        torch._foreach_mul_(grads, [s.to(g.dtype) for s, g in zip(scales.unbind(), grads)])


def set_lr(optimizer: torch.optim.Optimizer, lr: float, batch_size: int) -> None:
    """Set the blog-units ``lr`` on every group (a Python float: no host-device sync)."""
    per_example, _ = to_torch_units(lr, 0.0, batch_size)
    for group in optimizer.param_groups:
        group["lr"] = per_example * group["lr_mult"]
