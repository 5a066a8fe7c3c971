import numpy as np
import pytest
import torch
from torch import nn

from ablate.config import OptimConfig, ScheduleConfig
from ablate.optim import (make_optimizer, param_groups, piecewise_linear, schedule_knots, schedule_lrs,
                          set_lr, to_torch_units)


@pytest.mark.parametrize("knots, values", [
    ([0, 5, 24], [0, 0.4, 0]), ([0, 15, 15, 30, 35], [0, 0.1, 0.105, 0.005, 0]),
    ([0, 2, 8, 10], [0, 1.0, 0.1, 0.1]),
])
def test_schedule_equals_np_interp(knots, values):
    f = piecewise_linear(knots, values)
    for t in np.linspace(-1, knots[-1] + 2, 301):
        assert f(t) == pytest.approx(np.interp(t, knots, values))


def test_schedule_compression_scales_knots_only_when_capped():
    s = ScheduleConfig(knots=[0, 5, 24], lr=[0, 0.4, 0])
    assert schedule_knots(s, None) == [0, 5, 24]
    assert schedule_knots(s, 30) == [0, 5, 24]
    assert schedule_knots(s, 2) == pytest.approx([0, 5 / 12, 2])


def test_units_follow_the_reference_code():
    # docs/references.md 0.1: Post 4 bs 512, peak 0.4 -> 7.81e-4 per example, WD 0.256 as passed
    lr, wd = to_torch_units(0.4, 5e-4, 512)
    assert lr == pytest.approx(7.8125e-4) and wd == pytest.approx(0.256)


def _toy():
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def test_bias_groups_get_multiplied_lr_and_wd():
    model = _toy()
    model[1].weight.requires_grad_(False)  # frozen BN scale: not in the optimiser at all
    opt = make_optimizer(model, OptimConfig(bias_lr_mult=64, bias_wd_mult=1 / 64), batch_size=512)
    set_lr(opt, 1.0, 512)
    main, bias = opt.param_groups
    assert bias["params"] == [model[1].bias]
    assert bias["lr"] == pytest.approx(64 / 512) and main["lr"] == pytest.approx(1 / 512)
    assert bias["weight_decay"] == pytest.approx(5e-4 * 512 / 64) and main["weight_decay"] == pytest.approx(0.256)
    assert all(p is not model[1].weight for g in opt.param_groups for p in g["params"])
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9


@pytest.mark.parametrize("update", ["torch", "page2019"])
def test_summed_loss_steps_equal_mean_loss_nesterov_in_blog_units(update):
    """Three steps in torch units (summed loss, lr / N, wd * N) with Nesterov momentum 0.9 and a
    changing LR equal the blog-units update written by hand on the mean loss: torch's rule
    (v = mu v + g; w -= lr (g + mu v)) or the 2019 code's (d = -lr g; v = mu v + d; w += d + mu v)."""
    torch.manual_seed(0)
    n, mu, wd = 8, 0.9, 5e-4
    model = nn.Linear(3, 1, bias=False)
    x, y = torch.randn(n, 3), torch.randn(n, 1)
    opt = make_optimizer(model, OptimConfig(momentum=mu, update=update), batch_size=n)
    w = model.weight.detach().clone().double()
    v = torch.zeros_like(w)
    for k, lr in enumerate([0.4, 0.1, 0.7]):
        set_lr(opt, lr, n)
        opt.zero_grad()
        ((model(x) - y) ** 2).sum().backward()
        g = (2 * (x.double() @ w.T - y.double()) * x.double()).mean(0, keepdim=True) + wd * w  # mean loss
        if update == "torch":
            v = g if k == 0 else mu * v + g  # torch starts its buffer at the first gradient
            w = w - lr * (g + mu * v)
        else:
            d = -lr * g
            v = mu * v + d
            w = w + d + mu * v
        opt.step()
        torch.testing.assert_close(model.weight.double(), w, rtol=1e-5, atol=1e-6)
    assert len(param_groups(model, OptimConfig())) == 1


def test_peak_rescales_the_schedule():
    s = ScheduleConfig(knots=[0, 2, 8, 10], lr=[0, 1.0, 0.1, 0.1])
    assert schedule_lrs(s) == [0, 1.0, 0.1, 0.1]
    s.peak = 0.5
    assert schedule_lrs(s) == pytest.approx([0, 0.5, 0.05, 0.05])


def test_training_stops_at_schedule_stop_compressed_like_the_knots():
    from ablate.config import ScheduleConfig
    from ablate.optim import training_epochs

    partial = ScheduleConfig(knots=[0, 4, 20], lr=[0, 1, 0], stop=10)
    assert training_epochs(partial, None) == 10
    assert training_epochs(partial, 2) == 1  # smoke: 20 epochs become 2, so epoch 10 becomes 1
    assert training_epochs(ScheduleConfig(knots=[0, 5, 24], lr=[0, 0.4, 0]), None) == 24
