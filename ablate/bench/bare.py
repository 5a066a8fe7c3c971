"""The bare loop: the least a training loop must do, written with plain PyTorch. It is the reference
the engine is measured against (comparison ``engine``), so it must not use the engine (``ablate.train``)
or anything the engine adds per step (``tests/test_imports.py`` checks that it never imports it)."""
from __future__ import annotations

import random
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ablate.device import autocast, to_memory_format
from ablate.optim import to_torch_units

BARE_LR = 0.4  # blog units (per-batch LR of a mean loss); constant, the bare loop has no schedule


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
