"""Each training trick against its definition."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ablate.layers import unfitted_allowed
from ablate.optim import make_optimizer, set_lr
from ablate.config import LossConfig
from ablate.train import EMA, build_network, loss_fn, predict, resolve_precision, steps_per_epoch
from tests.conftest import DATA, make_cfg, needs_data


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
    with unfitted_allowed(model):  # the whitening's filter does not matter here
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


@pytest.mark.parametrize("capability, runs", [((7, 0), "fp16_bn32"), ((7, 5), "fp16_bn32"), ((8, 0), "bf16"),
                                               ((9, 0), "bf16")])
def test_bf16_falls_back_on_gpus_without_bf16_tensor_cores(monkeypatch, capability, runs):
    """A V100 (7.0) or T4 (7.5) reports bf16 as supported but has no bf16 tensor cores: it runs fp16
    with fp32 BN instead. The decision follows the compute capability, not is_bf16_supported."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("bf16", torch.device("cuda")).name == runs


def test_cpu_runs_fp16_as_cpu_half_and_defaults_to_channels_last():
    from ablate.device import resolve_channels_last

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("fp16", cpu, cpu_half="bf16").autocast == torch.bfloat16
    assert resolve_precision("fp16_bn32", cpu, cpu_half="fp32").name == "fp32"
    assert resolve_channels_last(None, cpu) and not resolve_channels_last(None, cuda)
    assert not resolve_channels_last(False, cpu) and resolve_channels_last(True, cuda)


@pytest.mark.parametrize("flags, native", [({"amx_bf16": True, "avx512_bf16": True}, "amx"),
                                            ({"amx_bf16": False, "avx512_bf16": True}, "avx512_bf16"),
                                            ({"avx2": True}, None)])
def test_cpu_facts_name_the_native_bf16(monkeypatch, flags, native):
    from ablate import device

    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda: flags)
    assert device.cpu_native_bf16() == native
    facts = device.cpu_facts()
    assert facts["cpu_bf16"] == (native or "none") and facts["cpu_model"] and facts["cpu_isa"]


@pytest.mark.parametrize("native, runs", [("amx", "bf16"), ("avx512_bf16", "bf16"), (None, "fp32")])
def test_auto_cpu_half_is_bf16_only_where_the_cpu_has_it_natively(monkeypatch, native, runs):
    from ablate import device

    monkeypatch.setattr(device, "cpu_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert device.resolve_precision("fp16_bn32", cpu, cpu_half="auto").name == runs
    assert device.resolve_precision("fp16", cpu, cpu_half="auto").name == runs
    assert device.resolve_precision("fp32", cpu, cpu_half="auto").name == "fp32"  # asked fp32 stays fp32


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
    assert {"cpu_model", "cpu_isa", "cpu_bf16"} <= set(summary)  # seconds are tied to their machine


@pytest.mark.slow
def test_compile_time_is_reported_and_kept_out_of_train_time(tmp_path):
    from ablate.run import execute
    from tests.conftest import SMOKE

    summary = execute(make_cfg("+step=step4", *SMOKE, "compile=true"), tmp_path)
    assert summary["status"] == "completed" and summary["compile_seconds"] > 0
    assert summary["train_seconds"] < summary["wall_seconds"] - summary["compile_seconds"]


def test_whitening_is_fitted_on_a_sample_of_every_class(monkeypatch):
    """The fit takes a seeded random 10k, not the first 10k, which a class-sorted ImageFolder copy
    would fill with two classes; the sample is the same for every run (new_dawn.py's first 10k are)."""
    from ablate.train import WHITENING_IMAGES, whitening_sample

    labels = torch.arange(10).repeat_interleave(5000)  # sorted by class, as an ImageFolder tree
    idx = whitening_sample(len(labels))
    counts = labels[idx].bincount(minlength=10)
    assert len(idx) == WHITENING_IMAGES and len(set(idx.tolist())) == WHITENING_IMAGES
    assert counts.min() > 800 and counts.max() < 1200
    assert torch.equal(idx, whitening_sample(len(labels)))
    assert torch.equal(whitening_sample(300), torch.arange(300))  # smaller sets: every image


@needs_data
def test_whitening_fit_whitens_held_out_patches(cache_dir):
    """Fitted on the sample, the filter whitens the patches of other training images: no direction's
    second moment goes above 1 + 3% (a fit on the first 10k of the class-sorted copy, airplanes and
    automobiles only, gives 1.09). With eps 1e-2 weak directions are damped below 1 by design."""
    from ablate import data
    from ablate.config import DataConfig
    from ablate.layers import patch_whitening_filter
    from ablate.train import whitening_sample

    images = data.load_images(DataConfig(root=str(DATA), cache_dir=str(cache_dir)))
    fit = whitening_sample(len(images.train_y))
    held = torch.randperm(len(images.train_y), generator=torch.Generator().manual_seed(1))
    held = held[~torch.isin(held, fit)][:1000]
    weight = patch_whitening_filter(data.normalise(images.train_x[fit]), eps=1e-2)
    out = F.conv2d(data.normalise(images.train_x[held]).double(), weight.double())
    flat = out.transpose(0, 1).reshape(27, -1)
    moment = flat @ flat.T / (flat.shape[1] - 1)
    assert moment.diagonal().max() < 1.03
    assert moment.diagonal()[:5].min() > 0.95  # the strong directions are whitened to about 1


def test_warm_up_runs_every_batch_shape_and_restores_the_state():
    """Before the timer: each training batch size forward and backward (the full batch and the partial
    last one), each evaluation batch size (with the flipped view for TTA); afterwards the weights, BN
    statistics, whitening filter, gradients and the global RNG are as before."""
    from ablate.train import _warm_up, batch_shapes

    cfg = make_cfg("+step=step8", "scale=smoke")
    cpu = torch.device("cpu")
    model = build_network(cfg, resolve_precision("fp32", cpu), cpu)
    seen = []
    model.register_forward_hook(lambda m, inp, out: seen.append((m.training, inp[0].shape[0])))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    train_sizes, eval_sizes = batch_shapes(50_000, 512, drop_last=False), batch_shapes(10_000, 1024, False)
    assert (train_sizes, eval_sizes) == ([512, 336], [1024, 784])
    _warm_up(model, model, train_sizes, eval_sizes, cpu, resolve_precision("fp32", cpu), False, tta_flip=True)
    assert seen == [(True, 512), (True, 336), (False, 1024), (False, 1024), (False, 784), (False, 784)]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert batch_shapes(50_000, 512, drop_last=True) == [512] and batch_shapes(300, 512, False) == [300]


def test_train_fits_the_whitening_on_the_sample_before_the_first_step(monkeypatch):
    from ablate import train as engine
    from ablate.layers import Whitening

    events = []
    fit = Whitening.fit
    monkeypatch.setattr(Whitening, "fit", lambda self, images: (events.append(("fit", len(images))),
                                                                fit(self, images))[1])
    step = torch.optim.Optimizer.zero_grad
    monkeypatch.setattr(torch.optim.Optimizer, "zero_grad",
                        lambda self, set_to_none=True: (events.append(("step",)), step(self, set_to_none))[1])
    cfg = make_cfg("+step=step8", "scale=smoke", "data=synthetic", "data.synthetic_size=2000", "progress=false")
    engine.train(cfg)
    n = events[0][1]  # the smoke subset (all of it: fewer than 10k)
    assert events[0] == ("fit", n) and events[1] == ("step",) and sum(e[0] == "fit" for e in events) == 1


def test_ema_groups_its_tensors_by_dtype_for_the_fused_update():
    """fp16_bn32 mixes fp16 weights with fp32 batch norms: the EMA keeps one list per dtype, so each
    multi-tensor lerp stays on the fused path, and the average is still the closed form."""
    cfg = make_cfg("+step=step8", "scale=smoke")
    model = build_network(cfg, resolve_precision("fp16_bn32", torch.device("cuda")), torch.device("cpu"))
    ema = EMA(model, momentum=0.9, every=1)
    assert len(ema._groups) == 2
    assert all(len({t.dtype for t in avg + src}) == 1 for avg, src in ema._groups)
    floats = [k for k, v in model.state_dict().items() if v.is_floating_point()]
    assert sum(len(avg) for avg, _ in ema._groups) == len(floats)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.maybe_update(0)
    for k in floats:
        expected = 0.9 * before[k].float() + 0.1 * model.state_dict()[k].float()
        torch.testing.assert_close(ema.model.state_dict()[k].float(), expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("tf32", [False, True])
def test_tf32_flags_are_set_explicitly_and_recorded(monkeypatch, tf32):
    """"fp32" means fp32 on CUDA: matmul and cuDNN TF32 are set from precision.tf32 (off by default),
    whatever PyTorch's defaults, and the record keeps them with the CUDA and cuDNN versions."""
    from ablate.device import set_math_flags

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
        facts = set_math_flags(torch.device("cuda"), tf32)
        flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved
    assert flags == (tf32, tf32)
    assert facts["tf32_matmul"] is tf32 and facts["tf32_cudnn"] is tf32 and facts["cuda_capability"] == "8.0"
    assert {"cuda_version", "cudnn_version"} <= set(facts)
    assert set_math_flags(torch.device("cpu"), tf32) == {}


def test_lookahead_is_airbench94s():
    """sota-facts 3 / legacy/airbench94.py: after step s with s % 5 == 0, avg = lerp(avg, w, 1 - d) with
    d = 0.95^5 (s/T)^3 and w = avg; after the last step w = avg. Integer buffers are left alone."""
    from ablate.train import Lookahead

    model = nn.BatchNorm1d(1)
    total = 12
    la = Lookahead(model, momentum=0.95, every=5, power=3, total_steps=total)
    assert la.model is model  # the live model is the one evaluated
    avg = 0.0  # the initial bias
    for s in range(1, total + 1):
        with torch.no_grad():
            model.bias.add_(1.0)  # an optimiser step
        model.num_batches_tracked += 1
        live = model.bias.item()
        la.maybe_update(s - 1)
        if s % 5 == 0:
            d = 0.95 ** 5 * (s / total) ** 3
            avg = d * avg + (1 - d) * live
            assert model.bias.item() == pytest.approx(avg)  # reset to the average
        elif s == total:
            assert model.bias.item() == pytest.approx(avg)  # the last 2 steps are dropped for the average
        else:
            assert model.bias.item() == pytest.approx(live)
    assert model.num_batches_tracked.item() == total


def test_multicrop_tta_weighs_six_views_as_airbench():
    """tta_level 2 (sota-facts 3): 1/4 each for the image and its mirror, 1/8 each for the mirror pair
    shifted up-left and down-right by one pixel with reflect padding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.LazyLinear(10))
    x = torch.randn(4, 3, 8, 8)
    model(x)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [(x, 0.25), (padded[..., :8, :8], 0.125), (padded[..., 2:, 2:], 0.125)]
    expected = sum(w * (model(v) + model(v.flip(3))) for v, w in views)
    torch.testing.assert_close(predict(model, x, tta_flip=True, translate=1), expected)


def test_whitening_bias_freezes_at_its_epoch():
    """airbench94: bias.requires_grad = epoch < 3 at every epoch's start (optim.whiten_bias_epochs),
    at its place in a smoke-compressed schedule too."""
    from ablate.layers import Whitening
    from ablate.train import epoch_hooks

    cfg = make_cfg("+step=step9_4", "scale=smoke", "data=synthetic")
    model = build_network(cfg, resolve_precision("fp32", torch.device("cpu")), torch.device("cpu"))
    bias = next(m for m in model.modules() if isinstance(m, Whitening)).bias
    (hook,) = epoch_hooks(cfg, model)
    hook(0)
    assert bias.requires_grad
    hook(1)  # smoke squeezes 13.5 epochs into 2: the freeze at 3 lands at 0.44, so epoch 1 is frozen
    assert not bias.requires_grad
    full = make_cfg("+step=step9_4", "data=synthetic", "scale.width_mult=0.125")
    (hook,) = epoch_hooks(full, model)
    hook(2)
    assert bias.requires_grad
    hook(3)
    assert not bias.requires_grad


def test_a_fractional_last_epoch_stops_part_way(tmp_path):
    """airbench trains ceil(steps_per_epoch x 9.9) steps; ablate stops the last epoch at the same count."""
    from ablate.run import execute

    cfg = make_cfg("+step=step9_7", "scale=smoke", "data=synthetic", "progress=false", "batch_size=128",
                   "data.synthetic_size=1000", "scale.train_size=1000", "scale.test_size=100", "scale.epochs=null",
                   "schedule.epochs=1.5")
    summary = execute(cfg, tmp_path)
    # 1,000 images, batches of 128, the last dropped: 7 steps an epoch, ceil(10.5) = 11 steps
    assert summary["epochs"] == 2 and summary["epochs_trained"] == pytest.approx(11 / 7, abs=1e-4)
    assert summary["final_eval_seconds"] > 0


def test_compile_failure_trains_uncompiled_and_says_so(tmp_path, monkeypatch):
    """Where torch.compile cannot run (no compiler, say), the run completes eagerly and its record
    says compiled: false and why."""
    from ablate.run import execute

    def broken(model, *args, **kwargs):
        def forward(*a, **k):
            raise RuntimeError("no C compiler found")
        return forward
    monkeypatch.setattr(torch, "compile", broken)
    summary = execute(make_cfg("+step=step9", "scale=smoke", "data=synthetic", "progress=false",
                               "precision.cpu_half=fp32"), tmp_path)  # a bf16 CPU run would not try
    assert summary["status"] == "completed" and summary["compiled"] is False
    assert "no C compiler found" in summary["compile_error"]


def test_compile_is_skipped_where_it_is_known_to_compute_wrongly(tmp_path, monkeypatch, caplog):
    """bf16 autocast on a CPU trains eagerly (inductor's CPU bf16 code gave NaN gradients for
    airbench94): the run completes, its record says why it is not compiled, and its log does not
    claim to be compiling."""
    import logging

    from ablate.run import execute

    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled a bf16 CPU run"))
    with caplog.at_level(logging.INFO, logger="ablate"):
        summary = execute(make_cfg("+step=step9", "scale=smoke", "data=synthetic", "progress=false",
                                   "precision.cpu_half=bf16"), tmp_path)
    assert summary["status"] == "completed" and summary["compiled"] is False
    assert summary["precision_used"] == "bf16" and "bf16" in summary["compile_error"]
    assert "torch.compile skipped" in caplog.text and "compiling" not in caplog.text


@pytest.mark.slow
def test_step9_compiles_with_the_whitening_bias_trainable_and_frozen(tmp_path):
    """Step 9_8 on: torch.compile, warmed up before the timer in both states the run trains in (about
    80 s on a 2-core CPU with a cold inductor cache)."""
    from ablate.run import execute

    summary = execute(make_cfg("+step=step9", "scale=smoke", "data=synthetic", "progress=false",
                               "precision.cpu_half=fp32"), tmp_path)  # bf16 on a CPU trains uncompiled
    assert summary["status"] == "completed" and summary["compiled"] is True and summary["compile_seconds"] > 0


def test_divergence_rule():
    """A loss that is not finite (null in a record), or a train loss over 100x the first epoch's."""
    from ablate.train import DIVERGENCE_FACTOR, divergence

    assert DIVERGENCE_FACTOR == 100
    assert divergence({"epoch": 3, "train_loss": 0.5, "test_loss": 0.7}, 2.3) is None
    assert divergence({"epoch": 3, "train_loss": 229.0, "test_loss": 0.7}, 2.3) is None
    assert "over 100x the first epoch's" in divergence({"epoch": 3, "train_loss": 231.0, "test_loss": 1.0}, 2.3)
    assert divergence({"epoch": 2, "train_loss": 1.0, "test_loss": math.nan}, 2.3) == "test loss is nan at epoch 2"
    assert divergence({"epoch": 2, "train_loss": math.inf, "test_loss": 1.0}, 2.3) == "train loss is inf at epoch 2"
    assert divergence({"epoch": 2, "train_loss": None}, 2.3) == "train loss is None at epoch 2"


def test_a_run_whose_test_loss_goes_nan_is_failed_diverged(tmp_path, monkeypatch):
    """The train loss stays finite; the test loss is NaN from the first epoch (what an exploded
    network's evaluation gives): the run stops there, failed as diverged, its records strict JSON."""
    import json

    import ablate.train
    from ablate.records import read_summary
    from ablate.run import execute
    from ablate.train import Diverged
    from tests.conftest import SMOKE

    monkeypatch.setattr(ablate.train, "evaluate", lambda *args, **kwargs: (math.nan, 10.0))
    with pytest.raises(Diverged, match="test loss is nan at epoch 1"):
        execute(make_cfg("+step=step4", *SMOKE), tmp_path)
    summary = read_summary(tmp_path)
    assert (summary["status"], summary["failure"]) == ("failed", "diverged")

    def refuse(constant):
        raise ValueError(constant)
    rows = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["test_loss"]) for r in rows] == [(1, None)]
    json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
