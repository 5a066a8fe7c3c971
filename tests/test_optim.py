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


def test_decoupled_units_are_airbenchs():
    """airbench94 (sota-facts 3): torch lr = lr / (1024 (1 + 1/(1 - mu))), weight_decay = wd x N / lr
    (its SGD gets wd / lr with wd = 0.0153 x N / kilostep); BN biases at 64x the LR with the same
    absolute decay. Checked on the groups and on one SGD step against airbench's arithmetic."""
    from ablate.optim import kilostep_scale

    torch.manual_seed(0)
    model = _toy()
    model[1].weight.requires_grad_(False)
    cfg = OptimConfig(units="decoupled", momentum=0.85, weight_decay=0.0153, bias_lr_mult=64, bias_wd_mult=1 / 64)
    opt = make_optimizer(model, cfg, batch_size=1024, lr_base=11.5)
    k = 1024 * (1 + 1 / 0.15)
    assert kilostep_scale(0.85) == pytest.approx(k)
    set_lr(opt, 11.5 * 0.2, 1024)  # the first step of airbench's schedule
    main, bias = opt.param_groups
    lr, wd = 11.5 / k, 0.0153 * 1024 / k  # airbench's un-decoupled lr and wd
    assert main["lr"] == pytest.approx(0.2 * lr) and main["weight_decay"] == pytest.approx(wd / lr)
    assert bias["lr"] == pytest.approx(0.2 * 64 * lr) and bias["weight_decay"] == pytest.approx(wd / (64 * lr))
    w = model[0].weight.detach().clone()
    g = torch.randn_like(w)
    model[0].weight.grad = g.clone()
    opt.step()
    # first Nesterov step from a zero buffer: w -= lr_t (g + wd_t w) (1 + mu)
    step = 0.2 * lr * (g + wd / lr * w)
    torch.testing.assert_close(model[0].weight.detach(), w - step * 1.85)


def test_schedule_epochs_stretch_the_knots_and_smoke_compresses_them():
    s = ScheduleConfig(knots=[0, 0.23, 1], lr=[0.2, 1.0, 0.07], peak=11.5, epochs=9.9)
    assert schedule_knots(s, None) == pytest.approx([0, 0.23 * 9.9, 9.9])
    assert schedule_knots(s, 2) == pytest.approx([0, 0.46, 2])
    assert schedule_lrs(s) == pytest.approx([2.3, 11.5, 0.805])
    from ablate.optim import time_factor, training_epochs

    assert training_epochs(s, None) == pytest.approx(9.9) and time_factor(s, 2) == pytest.approx(2 / 9.9)


def test_step_at_start_is_airbenchs_lambdalr():
    """airbench steps its LambdaLR after each update, so step s of the run uses factor(s / total);
    the 2019 code counts (s + 1) / total."""
    from ablate.optim import lr_position

    assert lr_position(3, 0, 48, "start") == 3 and lr_position(3, 47, 48, "start") == pytest.approx(3 + 47 / 48)
    assert lr_position(3, 0, 48, "end") == pytest.approx(3 + 1 / 48)


def test_whitening_bias_with_a_linear_decay_has_its_own_group():
    """airbench94_muon: the whitening bias's LR falls from the base LR to 0 at whiten_bias_epochs,
    whatever the main schedule does (optim.whiten_bias_lr=linear)."""
    from ablate.layers import WHITENINGS, Whitening

    model = nn.Sequential(Whitening(5e-4, WHITENINGS["airbench2x2"], bias=True), nn.Flatten(), nn.Linear(24, 2))
    cfg = OptimConfig(units="torch", weight_decay=2e-6, whiten_bias_epochs=3, whiten_bias_lr="linear")
    opt = make_optimizer(model, cfg, batch_size=2000, lr_base=0.053, epoch_scale=0.5)  # smoke halves time
    bias = next(g for g in opt.param_groups if g["params"] == [model[0].bias])
    assert bias["decay_to"] == 1.5
    set_lr(opt, 0.04, 2000, epoch=0.75)
    assert bias["lr"] == pytest.approx(0.053 * 0.5) and opt.param_groups[0]["lr"] == pytest.approx(0.04)
    set_lr(opt, 0.03, 2000, epoch=2.0)
    assert bias["lr"] == 0.0
