"""Comparison ``step``: training-step throughput (forward + backward + SGD) of ResNet9 (the Post 4
recipe) and the final network (the step-8 recipe), per precision the device runs x memory format."""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from tqdm import tqdm

from ablate import train as engine
from ablate.bench.bare import BARE_LR
from ablate.bench.settings import Settings, common_overrides, compose_cfg, run_formats
from ablate.bench.timing import ratio, timed
from ablate.device import PRECISIONS, autocast, resolve_precision, to_memory_format
from ablate.layers import Whitening
from ablate.optim import make_optimizer, set_lr

# The two networks, each in the recipe it trains with, so that its norm and activation layers (ghost
# BN, CELU, whitening stem for the final net) are the real ones.
STEP_NETWORKS = (("resnet9", ("+step=step4",)), ("resnet9_final", ("+step=step8", "arch=resnet9_final")))

def device_precisions(device: torch.device) -> list[tuple[str, str]]:
    """(requested, used) for every precision that runs as itself on this device: CPU fp32, bf16;
    CUDA fp32, fp16, fp16_bn32, bf16. A request that maps onto one already listed is left out."""
    seen, out = set(), []
    for name in PRECISIONS:
        used = resolve_precision(name, device).name
        if used not in seen:
            seen.add(used)
            out.append((name, used))
    return sorted(out, key=lambda p: p[1] != "fp32")  # fp32 first: the baseline of the ratios


def fit_whitening_on(model: nn.Module, x: Tensor) -> None:
    """Fit the network's whitening layers (if any) on the batch ``x``. The step comparison has no data
    set, and an unfitted whitening layer refuses to run; fitted on the random batch it computes a real
    filter, so every layer after it sees inputs of the usual scale."""
    for m in model.modules():
        if isinstance(m, Whitening):
            m.fit(x.float())


def time_train_steps(cfg: DictConfig, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """Images/s of forward + backward + SGD step on one fixed random batch (no data loading), as
    the engine runs a step: its network, loss, optimiser, precision and memory format."""
    precision, channels_last = run_formats(cfg, device)
    torch.manual_seed(cfg.seed)
    model = engine.build_network(cfg, precision, device)
    optimizer = make_optimizer(model, cfg.optim, cfg.batch_size)
    set_lr(optimizer, BARE_LR, cfg.batch_size)
    criterion = engine.loss_fn(cfg.loss)
    x = torch.randn(cfg.batch_size, 3, 32, 32, device=device).to(precision.param_dtype)
    fit_whitening_on(model, x)
    x = to_memory_format(x, channels_last)
    y = torch.randint(0, 10, (cfg.batch_size,), device=device)

    def step() -> Tensor:
        with autocast(device, precision.autocast):
            loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def run(n: int) -> Tensor:
        loss = torch.zeros((), device=device)
        for _ in range(n):
            loss = step()  # never read inside the loop: no host-device sync per step
        return loss

    run(warmup)
    seconds, loss = timed(device, lambda: run(steps))
    return dict(precision_used=precision.name, seconds=seconds, steps=steps, batch_size=cfg.batch_size,
                images_per_s=steps * cfg.batch_size / seconds, final_loss=float(loss))


def bench_steps(s: Settings, device: torch.device) -> dict[str, Any]:
    """Every network x precision x memory format; each row's ratio is to its network's fp32 contiguous row."""
    grid = [(net, recipe, prec, cl) for net, recipe in STEP_NETWORKS for prec in device_precisions(device)
            for cl in (False, True)]
    rows = []
    for net, recipe, (asked, used), channels_last in tqdm(grid, desc="step throughput", disable=None, leave=False):
        cfg = compose_cfg([*recipe, f"precision={asked}", f"precision.channels_last={str(channels_last).lower()}",
                           *common_overrides(s)], s.batch_size)
        row = time_train_steps(cfg, device, s.steps, s.warmup)
        rows.append(dict(network=net, recipe=recipe[0].split("=")[1], precision=asked,
                         memory_format="channels_last" if channels_last else "contiguous", **row))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next configuration starts from the same free memory
    for row in rows:  # each network's fp32 contiguous row is the baseline of its ratios
        base = next(r for r in rows if r["network"] == row["network"] and r["precision_used"] == "fp32"
                    and r["memory_format"] == "contiguous")
        row["ratio_vs_fp32_contiguous"] = ratio(row["images_per_s"], base["images_per_s"])
    return dict(rows=rows, steps=s.steps, warmup=s.warmup)
