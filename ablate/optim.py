"""Learning-rate schedules, parameter groups and the one place where configured units become torch units.

The blog quotes per-batch learning rates for a mean loss (0.4) and weight decay 5e-4. The reference
code sums the loss over the batch and hands SGD ``lr / batch_size`` and ``weight_decay * batch_size``
(docs/references.md 0.1); the update is the same, and a summed loss keeps fp16 gradients away from
underflow, so ablate runs it that way too. airbench writes its numbers in other units (``UNITS``):
``decoupled`` and ``torch``, converted here as well.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ablate.config import OptimConfig, ScheduleConfig, update_rule
from ablate.layers import Whitening
from ablate.models import scale_invariant_weights
from ablate.muon import Muon, Optimizers


def piecewise_linear(knots: Sequence[float], values: Sequence[float]) -> Callable[[float], float]:
    """f(t) linear between (knot, value) pairs and constant beyond the ends, as np.interp."""
    knots, values = list(knots), list(values)
    return lambda t: float(np.interp(t, knots, values))


def _stretched_knots(schedule: ScheduleConfig) -> list[float]:
    """The knots, stretched to end at ``schedule.epochs`` when it is set."""
    knots = [float(k) for k in schedule.knots]
    if schedule.epochs is not None:
        knots = [k * schedule.epochs / knots[-1] for k in knots]
    return knots


def schedule_knots(schedule: ScheduleConfig, max_epochs: float | None) -> list[float]:
    """The schedule's knots (stretched to ``schedule.epochs``), compressed in time when a scale caps the
    epochs (smoke scale only)."""
    knots = _stretched_knots(schedule)
    if max_epochs is not None and knots[-1] > max_epochs:
        knots = [k * max_epochs / knots[-1] for k in knots]
    return knots


def time_factor(schedule: ScheduleConfig, max_epochs: float | None) -> float:
    """How a scale's compression maps the run's epochs: 1 unless smoke squeezes the schedule. Any other
    rule given in epochs (the whitening bias's freeze) is multiplied by it, so it keeps its place."""
    return schedule_knots(schedule, max_epochs)[-1] / _stretched_knots(schedule)[-1]


def training_epochs(schedule: ScheduleConfig, max_epochs: float | None) -> float:
    """Where training ends: the last knot, or ``schedule.stop`` (compressed alike at smoke scale)."""
    knots = schedule_knots(schedule, max_epochs)
    return knots[-1] if schedule.stop is None else schedule.stop * knots[-1] / float(schedule.knots[-1])


STEP_AT = {"end": 1, "start": 0}  # schedule.step_at: step i of n runs at epoch + (i + offset) / n


def lr_position(epoch: int, step: int, steps_per_epoch: int, step_at: str) -> float:
    """The fractional epoch whose LR step ``step`` of ``epoch`` runs at (``schedule.step_at``)."""
    return epoch + (step + STEP_AT[step_at]) / steps_per_epoch


def schedule_lrs(schedule: ScheduleConfig) -> list[float]:
    """The schedule's LR values, rescaled to ``schedule.peak`` when one is given."""
    lrs = [float(v) for v in schedule.lr]
    return lrs if schedule.peak is None else [v * schedule.peak / max(lrs) for v in lrs]


def to_torch_units(lr: float, weight_decay: float, batch_size: int) -> tuple[float, float]:
    """Blog units (per-batch LR, mean-loss WD) -> per-example LR and WD for a summed loss."""
    return lr / batch_size, weight_decay * batch_size


def kilostep_scale(momentum: float) -> float:
    """airbench's 1024 * (1 + 1 / (1 - momentum)): with a constant gradient, Nesterov momentum makes
    each step 1 + 1/(1 - mu) times the gradient step, so an LR divided by this (and counted per 1024
    examples) gives the same average step whatever the momentum."""
    return 1024 * (1 + 1 / (1 - momentum))


def lr_scale(units: str, batch_size: int, momentum: float) -> float:
    """torch's per-example LR (summed loss) per configured LR unit (``optim.units``)."""
    if units == "page":
        return 1 / batch_size
    if units == "decoupled":
        return 1 / kilostep_scale(momentum)
    if units == "torch":
        return 1.0
    raise ValueError(f"unknown optim.units {units!r}; choose one of {', '.join(UNITS)}")


def torch_weight_decay(units: str, weight_decay: float, batch_size: int, lr_base: float | None) -> float:
    """torch's weight_decay coefficient for ``optim.weight_decay`` in ``units``.

    page: mean-loss WD x N (docs/references.md 0.1). decoupled and torch (airbench): the decay per
    step at the base LR is fixed, wd x N in the LR's own scale (airbench94: 0.0153 x 1024 / kilostep;
    airbench94_muon: 2e-6 x 2000), whatever the LR: torch's coefficient is then wd x N / lr_base.
    The decay still follows the schedule's shape over time, as in airbench's SGD.
    """
    if units == "page":
        return weight_decay * batch_size
    if lr_base is None or lr_base <= 0:
        raise ValueError(f"optim.units={units} gives the weight decay relative to the schedule's base LR: "
                         "pass lr_base (the schedule's peak)")
    lr_scale(units, batch_size, 0.0)  # an unknown unit fails here
    return weight_decay * batch_size / lr_base


UNITS = ("page", "decoupled", "torch")  # optim.units


def _is_norm_bias(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and name == "bias"


def _head(model: nn.Module) -> nn.Module | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


WHITEN_BIAS_LR = ("schedule", "linear")  # optim.whiten_bias_lr


def _kind(model: nn.Module, module: nn.Module, name: str, p: nn.Parameter, optim: OptimConfig, lars: set) -> str:
    """Which group a trainable parameter joins (param_groups)."""
    if _is_norm_bias(module, name):
        return "bias"
    if update_rule(optim) == "muon" and p.dim() == 4:
        return "muon"
    if id(p) in lars:
        return "lars"
    if isinstance(module, Whitening) and optim.whiten_bias_lr == "linear":
        return "whiten_bias"
    if module is _head(model) and (optim.head_lr_mult != 1 or optim.head_wd_mult != 1):
        return "head"
    return "others"


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """Every trainable parameter gets weight decay (docs/references.md 0.2); BN biases may get their own
    LR and WD multipliers (step 8_6), and so may the classifier (airbench94_muon); with ``optim.lars``
    the scale-invariant weights form a group of their own that ``lars_rescale_`` steps; with
    ``optim.update=muon`` the conv filters form Muon's group; with ``optim.whiten_bias_lr=linear`` the
    whitening bias has its own LR decay. Frozen parameters (requires_grad False) are left out."""
    lars = {id(p) for p in scale_invariant_weights(model).values()} if optim.lars else set()
    found: dict[str, list] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                found.setdefault(_kind(model, module, name, p, optim, lars), []).append(p)
    settings = dict(others=dict(), bias=dict(lr_mult=optim.bias_lr_mult, wd_mult=optim.bias_wd_mult),
                    lars=dict(lars=True), muon=dict(muon=True, wd_mult=0.0),
                    head=dict(lr_mult=optim.head_lr_mult, wd_mult=optim.head_wd_mult),
                    whiten_bias=dict(decay_to=optim.whiten_bias_epochs))
    groups = [dict(params=found.get("others", []), lr_mult=1.0, wd_mult=1.0)]
    for kind in ("bias", "lars", "muon", "head", "whiten_bias"):
        if found.get(kind):
            groups.append(dict(dict(params=found[kind], lr_mult=1.0, wd_mult=1.0), **settings[kind]))
    return groups


UPDATES = ("torch", "page2019", "muon")  # optim.update: torch.optim.SGD, Page2019SGD, or Muon + torch's SGD


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


def make_optimizer(model: nn.Module, optim: OptimConfig, batch_size: int, lr_base: float | None = None,
                   epoch_scale: float = 1.0) -> torch.optim.Optimizer:
    """Nesterov SGD in summed-loss units; ``set_lr`` sets each group's LR before every step.
    ``optim.update`` picks torch's SGD, the 2019 code's update (:class:`Page2019SGD`) or Muon for the
    conv filters beside torch's SGD (airbench94_muon). ``lr_base`` is the schedule's peak, which the
    ``decoupled`` and ``torch`` units measure the weight decay against (and Muon's LR follows);
    ``epoch_scale`` compresses rules given in epochs as a scale compresses the schedule (``time_factor``).

    A LARS group keeps its weight decay out of SGD (``lars_wd``): ``lars_rescale_`` folds it into the
    direction before rescaling, so decay turns the weight instead of shrinking its step.
    """
    wd = torch_weight_decay(optim.units, optim.weight_decay, batch_size, lr_base)
    scale = lr_scale(optim.units, batch_size, optim.momentum)
    groups = []
    for g in param_groups(model, optim):
        g.update(lr_scale=scale, lr_base=lr_base)
        if g.get("decay_to") is not None:
            g["decay_to"] *= epoch_scale
        if g.get("lars"):
            # The step's length in torch units: lr/N (set_lr) x N * trust * |w| = lr * trust * |w|.
            g.update(weight_decay=0.0, lars_wd=wd * g["wd_mult"], lars_norm=batch_size * optim.lars_trust)
        elif g.get("muon"):
            # Muon's LR is its own step length: optim.muon_lr at the schedule's peak, following its shape.
            if not lr_base:
                raise ValueError("optim.update=muon follows the schedule's shape: pass lr_base (its peak)")
            g.update(lr_scale=1.0, lr_mult=optim.muon_lr / lr_base)
        else:
            g.update(weight_decay=wd * g["wd_mult"])
        groups.append(g)
    rule = update_rule(optim)
    if rule == "page2019":
        return Page2019SGD(groups, lr=0.0, momentum=optim.momentum, weight_decay=wd)
    sgd = [g for g in groups if not g.get("muon")]
    optimizer = torch.optim.SGD(sgd, lr=0.0, momentum=optim.momentum, nesterov=optim.nesterov, weight_decay=wd)
    if rule != "muon":
        return optimizer
    muon = [g for g in groups if g.get("muon")]
    return Optimizers(optimizer, Muon(muon, lr=0.0, momentum=optim.muon_momentum, ns_steps=optim.muon_ns_steps))


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


def set_lr(optimizer: torch.optim.Optimizer, lr: float, batch_size: int, epoch: float | None = None) -> None:
    """Set the scheduled ``lr`` (in ``optim.units``; blog units for groups made elsewhere) on every group
    (a Python float: no host-device sync). A group with its own decay (``decay_to``, the whitening bias
    of airbench94_muon) runs from the base LR linearly to 0 at that epoch instead, ``epoch`` being the
    step's position in the run."""
    for group in optimizer.param_groups:
        value = lr
        if group.get("decay_to") is not None and epoch is not None:
            value = group["lr_base"] * max(0.0, 1.0 - epoch / group["decay_to"])
        group["lr"] = value * group.get("lr_scale", 1 / batch_size) * group["lr_mult"]
