"""Muon, the optimiser of airbench94_muon (sota-facts section 3, last paragraph), written for ablate.

Muon keeps a Nesterov momentum of each conv filter's gradient and steps along its orthogonalisation:
the filter tensor is flattened to out x (in * k * k), and its update O has the singular vectors of the
momentum and singular values near 1 (O ~ U V^T for momentum = U S V^T). Every direction the gradient
has moves by about the same amount, however small its singular value.

Why not a package: torch.optim.Muon (torch >= 2.9) accepts 2-D parameters only and has no filter
renormalisation; airbench applies Muon to 4-D conv filters and rescales each filter tensor to norm
sqrt(out_channels) before its step. The few lines below do exactly that, and tests/test_muon.py checks
them against an SVD's U V^T and against torch's own Newton-Schulz iteration.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Keller Jordan's quintic coefficients: chosen to maximise the slope at 0, so that 3 iterations take
# even tiny singular values most of the way to 1; the price is that they settle in ~[0.7, 1.2], not at 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: Tensor, steps: int = 3, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximate orthogonalisation of a 2-D ``g`` by ``steps`` quintic Newton-Schulz iterations
    X <- a X + (b A + c A^2) X with A = X X^T, in ``dtype`` (bf16 as in airbench).

    X starts as g / |g|_F, so every singular value is at most 1; each iteration maps a singular value s
    to a s + b s^3 + c s^5. The wide orientation (rows <= columns) keeps A the small Gram matrix.
    """
    if g.dim() != 2:
        raise ValueError(f"newton_schulz needs a matrix, got shape {tuple(g.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """airbench94_muon's step for conv filters, with momentum mu and LR lr (its own units: the length
    of an orthogonalised step)::

        v = mu v + g;   u = g + mu v (Nesterov);   w = w * sqrt(out) / |w|;   w = w - lr * NS(u)

    The renormalisation keeps every filter tensor at norm sqrt(out_channels): its scale is then constant
    (the batch norm after it ignores scale) and the step's relative size is fixed by lr alone. No weight
    decay, as in airbench94_muon.
    """

    def __init__(self, params, lr: float = 0.24, momentum: float = 0.6, nesterov: bool = True,
                 ns_steps: int = 3) -> None:
        if lr < 0 or momentum < 0:
            raise ValueError(f"Muon needs lr >= 0 and momentum >= 0, got {lr}, {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(p.grad)
                update = p.grad.add(buf, alpha=mu) if group["nesterov"] else buf
                p.mul_(len(p) ** 0.5 / p.norm())
                ortho = newton_schulz(update.reshape(len(update), -1), group["ns_steps"])
                p.add_(ortho.view(p.shape).to(p.dtype), alpha=-group["lr"])


class Optimizers:
    """Several optimisers stepped as one (Muon for the filters, SGD for the rest): ``param_groups`` is
    all of theirs, so ``set_lr`` and the training step treat the pair like any optimiser."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = [o for o in optimizers if o.param_groups]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def defaults(self) -> dict:
        return self.optimizers[0].defaults

    def step(self, closure=None) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> list[dict]:
        return [o.state_dict() for o in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        for o, s in zip(self.optimizers, states):
            o.load_state_dict(s)
