"""Each training trick against its definition."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ablate.optim import make_optimizer, set_lr
from ablate.config import LossConfig
from ablate.train import EMA, build_network, loss_fn, predict, resolve_precision, steps_per_epoch
from tests.conftest import make_cfg


def test_label_smoothing_equals_the_formula():
    torch.manual_seed(0)
    logits, y = torch.randn(16, 10), torch.randint(0, 10, (16,))
    logp = F.log_softmax(logits, 1)
    expected = (0.8 * -logp[torch.arange(16), y] + 0.2 * -logp.mean(1)).sum()
    assert loss_fn(LossConfig(label_smoothing=0.2))(logits, y).item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss_fn(LossConfig())(logits, y).item() == pytest.approx(F.cross_entropy(logits, y, reduction="sum").item())


def test_uniform_kl_term_is_the_kl_divergence_from_uniform():
    torch.manual_seed(0)
    logits, y = torch.randn(16, 10), torch.randint(0, 10, (16,))
    p = F.softmax(logits, 1)
    kl = (0.1 * (torch.log(torch.tensor(0.1)) - torch.log(p))).sum(1)  # KL(u || p) per example
    expected = F.cross_entropy(logits, y, reduction="sum") + 0.5 * kl.sum()
    assert loss_fn(LossConfig(uniform_kl=0.5))(logits, y).item() == pytest.approx(expected.item(), rel=1e-5)
    uniform = torch.zeros(4, 10)  # uniform predictions: the KL term is 0
    assert loss_fn(LossConfig(uniform_kl=1.0))(uniform, y[:4]).item() == pytest.approx(4 * math.log(10), rel=1e-6)


def test_ema_equals_the_closed_form_and_skips_integer_buffers():
    model = nn.BatchNorm1d(1)
    ema = EMA(model, momentum=0.9, every=2)
    decay, expected = 0.9 ** 2, 0.0  # the EMA starts from the initial bias 0
    for step, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0]):
        with torch.no_grad():
            model.bias.fill_(value)
        model.num_batches_tracked += 1
        ema.maybe_update(step)
        if step % 2 == 0:
            expected = decay * expected + (1 - decay) * value
    assert ema.model.bias.item() == pytest.approx(expected)
    assert ema.model.num_batches_tracked.item() == 0


def test_flip_tta_averages_the_two_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.LazyLinear(10))
    x = torch.randn(4, 3, 8, 8)
    expected = (model(x) + model(torch.flip(x, dims=[3]))) / 2
    assert torch.allclose(predict(model, x, tta_flip=True), expected, atol=1e-6)
    assert not torch.allclose(predict(model, x, tta_flip=False), expected, atol=1e-4)


def test_frozen_bn_scales_stay_put_and_bias_groups_move_faster():
    cfg = make_cfg("+step=step8", "scale=smoke")
    model = build_network(cfg, resolve_precision("fp32", torch.device("cpu")), torch.device("cpu"))
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    scales = [m.weight.detach().clone() for m in bns]
    biases = [m.bias.detach().clone() for m in bns]
    opt = make_optimizer(model, cfg.optim, cfg.batch_size)
    set_lr(opt, 1.0, cfg.batch_size)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    loss_fn(LossConfig(label_smoothing=0.2))(model(x), y).backward()
    opt.step()
    assert all(torch.equal(m.weight, s) and torch.all(s == 1) for m, s in zip(bns, scales))
    assert any(not torch.equal(m.bias, b) for m, b in zip(bns, biases))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1 / 512, 64 / 512])


def test_precision_maps_to_what_the_device_runs():
    cpu = torch.device("cpu")
    assert resolve_precision("fp16_bn32", cpu).name == "fp32"
    assert resolve_precision("fp16", cpu).param_dtype == torch.float32
    assert resolve_precision("bf16", cpu).autocast == torch.bfloat16
    cuda = torch.device("cuda")
    assert resolve_precision("fp16_bn32", cuda).norm_fp32 and resolve_precision("fp16", cuda).param_dtype == torch.float16


def test_steps_per_epoch_keeps_or_drops_the_last_batch():
    assert steps_per_epoch(50_000, 512, drop_last=True) == 97
    assert steps_per_epoch(50_000, 512, drop_last=False) == 98
    assert steps_per_epoch(50_000, 128, drop_last=False) == 391 == math.ceil(50_000 / 128)


def test_bf16_autocast_and_channels_last_run(tmp_path):
    from ablate.run import execute
    from tests.conftest import SMOKE

    summary = execute(make_cfg("+step=step8", *SMOKE, "precision=bf16", "precision.channels_last=true"), tmp_path)
    assert summary["status"] == "completed" and summary["precision_used"] == "bf16"
    assert math.isfinite(summary["test_loss"])


@pytest.mark.slow
def test_compile_time_is_reported_and_kept_out_of_train_time(tmp_path):
    from ablate.run import execute
    from tests.conftest import SMOKE

    summary = execute(make_cfg("+step=step4", *SMOKE, "compile=true"), tmp_path)
    assert summary["status"] == "completed" and summary["compile_seconds"] > 0
    assert summary["train_seconds"] < summary["wall_seconds"] - summary["compile_seconds"]
