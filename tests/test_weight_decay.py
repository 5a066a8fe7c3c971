"""Post 6: which weights are scale invariant, the weight-norm / effective-step monitor, LARS-style
steps, the weight_decay experiment end to end and its chart."""
import math
import os
import subprocess
import sys
from collections import OrderedDict

import matplotlib
import pandas as pd
import pytest
import torch
from torch import nn

from ablate.config import OptimConfig
from ablate.models import REGISTRY, build_model, init_he, scale_invariant_weights
from ablate.layers import make_act, make_norm
from ablate.config import ActConfig, NormConfig
from ablate.optim import lars_rescale_, make_optimizer, set_lr
from ablate.records import read_summary
from ablate.train import WeightMonitor
from ablate.studies.weight_decay import equilibrium_step, plot_weight_decay
from tests.conftest import REPO, SMOKE, make_cfg

matplotlib.use("Agg")


def _net(name: str, norm: str = "batch") -> nn.Module:
    return build_model(REGISTRY[name], make_norm(NormConfig(kind=norm)), make_act(ActConfig()), width_mult=0.125)


def test_resnet9_convs_all_feed_a_batch_norm_and_the_loss_ignores_their_scale():
    model = _net("resnet9").train()
    weights = scale_invariant_weights(model)
    assert len(weights) == 8  # prep, layer1-3 and the four residual convs
    x = torch.randn(8, 3, 32, 32)
    reference = model(x)
    with torch.no_grad():
        for w in weights.values():
            w.mul_(3.0)
    assert torch.allclose(model(x), reference, atol=1e-4)  # batch norm undoes every rescaling
    assert scale_invariant_weights(_net("resnet9", norm="none")) == {}


def test_only_convs_that_feed_a_norm_count_in_a_preact_net():
    model = _net("preact18").train()
    weights = scale_invariant_weights(model)
    assert weights and all(name.endswith("conv1.weight") for name in weights)
    x = torch.randn(8, 3, 32, 32)
    reference = model(x)
    with torch.no_grad():  # conv2 is added to the shortcut before any norm: its scale matters
        next(m for m in model.modules() if hasattr(m, "conv2")).conv2.weight.mul_(3.0)
    assert not torch.allclose(model(x), reference, atol=1e-4)


def test_he_init_draws_weights_with_variance_2_over_fan_in():
    layer = init_he(nn.Sequential(nn.Conv2d(64, 128, 3)))[0]
    assert layer.weight.var().item() == pytest.approx(2 / (64 * 9), rel=0.05)


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("block", nn.Sequential(OrderedDict([("conv", nn.Conv2d(3, 4, 3, bias=False)), ("norm", nn.BatchNorm2d(4))]))),
        ("flat", nn.Flatten()), ("fc", nn.Linear(4 * 30 * 30, 10)),
    ]))


def test_monitor_gives_the_weight_norm_and_the_mean_relative_step():
    model = _toy()
    weights = scale_invariant_weights(model)
    assert list(weights) == ["block.conv.weight"]
    monitor = WeightMonitor(weights)
    w = weights["block.conv.weight"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = []
    for _ in range(3):
        before = w.detach().clone()
        model(torch.randn(4, 3, 32, 32)).square().sum().backward()
        monitor.before_step()
        opt.step()
        opt.zero_grad()
        monitor.after_step()
        expected.append(((w - before).norm() / before.norm()).item())
    stats = monitor.epoch_stats()
    assert stats["weight_norm"]["block.conv.weight"] == pytest.approx(w.norm().item(), rel=1e-6)
    assert stats["effective_step"]["block.conv.weight"] == pytest.approx(sum(expected) / 3, rel=1e-5)
    assert all(e > 0 for e in expected)
    monitor.before_step()
    monitor.after_step()  # a new epoch starts from zero: no step taken, step 0
    assert monitor.epoch_stats()["effective_step"]["block.conv.weight"] == 0


def test_lars_moves_each_scale_invariant_layer_by_lr_times_trust_of_its_norm():
    model = _toy()
    optim = OptimConfig(momentum=0.0, nesterov=False, weight_decay=5e-4, lars=True, lars_trust=0.02)
    opt = make_optimizer(model, optim, batch_size=4)
    [lars_group] = [g for g in opt.param_groups if g.get("lars")]
    w = model.block.conv.weight
    assert lars_group["params"] == [w] and lars_group["weight_decay"] == 0.0
    set_lr(opt, 0.4, batch_size=4)
    model(torch.randn(4, 3, 32, 32)).square().sum().backward()
    direction = w.grad + 5e-4 * 4 * w.detach()  # the summed-loss gradient plus the decay, torch units
    fc_before, w_before = model.fc.weight.detach().clone(), w.detach().clone()
    fc_grad = model.fc.weight.grad.clone()
    lars_rescale_(opt)
    opt.step()
    step = w.detach() - w_before
    assert (step.norm() / w_before.norm()).item() == pytest.approx(0.4 * 0.02, rel=1e-5)
    assert torch.allclose(step / step.norm(), -direction / direction.norm(), atol=1e-6)
    # everything else is plain SGD with its weight decay
    expected_fc = fc_before - 0.4 / 4 * (fc_grad + 5e-4 * 4 * fc_before)
    assert torch.allclose(model.fc.weight.detach(), expected_fc, atol=1e-6)


def test_lars_is_off_by_default_and_then_a_no_op():
    model = _toy()
    opt = make_optimizer(model, OptimConfig(), batch_size=4)
    assert not any(g.get("lars") for g in opt.param_groups)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    lars_rescale_(opt)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_equilibrium_step_depends_on_the_product_of_lr_and_weight_decay_only():
    assert equilibrium_step(0.4, 5e-4, 0.9) == pytest.approx(math.sqrt(2 * 2e-4 / 1.9))
    assert equilibrium_step(0.1, 2e-3, 0.9) == pytest.approx(equilibrium_step(1.6, 1.25e-4, 0.9))


POST6 = ("lr0.1_wd2e-3", "lr0.2_wd1e-3", "lr0.4_wd5e-4", "lr0.8_wd2.5e-4", "lr1.6_wd1.25e-4", "lr0.4_wd0",
         "lars_lr0.4_wd5e-4")


def test_experiment_holds_lr_times_weight_decay_fixed_and_monitors_weights():
    products = set()
    for run in POST6:
        cfg = make_cfg("+step=step6", f"+weight_decay_runs={run}", "+experiment=weight_decay")
        assert cfg.monitor.weights and cfg.arch.name == "resnet9" and cfg.optim.lars == run.startswith("lars")
        if cfg.optim.weight_decay:
            products.add(round(cfg.schedule.peak * cfg.optim.weight_decay, 12))
    assert products == {2e-4}


def test_end_to_end_smoke_sweep_and_chart(tmp_path):
    sweep = tmp_path / "wd"
    some = "lr0.1_wd2e-3,lr0.4_wd5e-4,lr0.4_wd0,lars_lr0.4_wd5e-4"
    out = subprocess.run([sys.executable, "-m", "ablate.run", "-m", "+experiment=weight_decay", *SMOKE,
                          f"+weight_decay_runs={some}", f"hydra.sweep.dir={sweep}"], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-3000:]
    records = [read_summary(p.parent) for p in sorted(sweep.glob("*/summary.json"))]
    assert len(records) == 4 and all(r["status"] == "completed" for r in records)
    rows = [pd.read_json(p, lines=True) for p in sorted(sweep.glob("*/metrics.jsonl"))]
    for metrics in rows:
        norms = metrics.weight_norm.iloc[-1]
        assert len(norms) == 8 and all(v > 0 for v in norms.values())
        assert all(v > 0 for v in metrics.effective_step.iloc[-1].values())

    report = subprocess.run([sys.executable, "-m", "ablate.report", str(sweep)], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert report.returncode == 0, report.stderr[-3000:]
    assert (sweep / "report" / "weight_decay.png").stat().st_size > 0
    assert "](weight_decay.png)" in (sweep / "report" / "REPORT.md").read_text()

    from ablate.report import load_runs
    runs, curves, _ = load_runs(sweep)
    fig = plot_weight_decay(runs, curves, tmp_path / "again.png")
    labels = {line.get_label() for line in fig.axes[0].get_lines()}
    assert {"λ=0.1, α=0.002", "λ=0.4, α=0.0005", "λ=0.4, α=0", "λ=0.4, α=0.0005 + LARS"} <= labels
    guides = [line.get_label() for line in fig.axes[1].get_lines() if line.get_label().startswith("equilibrium")]
    assert len(guides) == 1  # the two plain decaying runs share λα = 2e-4; α = 0 has none, LARS is not SGD
