"""Fidelity of the journey's tricks to their published definitions (docs/references.md, steps.md).

Each test checks one trick against the definition in the spec, through the code that a real run
uses (``ablate.train.train``, ``build_network``, ``make_optimizer``, the composed Hydra config), and
is written so that it fails if the trick were broken: the EMA's per-epoch step counter and the
evaluated copy (A3, EMA mechanics), fp16 with fp32 batch norm (A1 3.1), every step's LR schedule
(A1-A3, E7, E10), the CELU alphas (A3 8.4, 8.6), the per-step LR convention (A, notation), the
two Nesterov updates (0.1, 0.2, E9) and which of them each step runs (0.2).

The expected values are transcribed by hand from the spec, never read from the YAML files under test.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import ablate.train as train_mod
from ablate.config import OptimConfig
from ablate.validate import validate
from ablate.device import resolve_precision
from ablate.layers import GhostBatchNorm, ShiftedReLU
from ablate.optim import Page2019SGD, make_optimizer, schedule_knots, schedule_lrs, set_lr, training_epochs
from tests.conftest import REPO, SMOKE, make_cfg

CPU = torch.device("cpu")
STEP_IDS = sorted(p.stem for p in (REPO / "conf" / "step").glob("*.yaml"))


# ---------------------------------------------------------------------------------------------------
# 1. EMA inside train(): updates at steps 0, 5, 10, ... of each epoch; the EMA copy is evaluated.
# ---------------------------------------------------------------------------------------------------

EMA_STEPS = 16  # 2,050 training images (205 a class) / batch 128, last partial batch dropped: steps 0..15
# (not a multiple of 5, so an EMA counter that did not restart each epoch would update at other steps)
EMA_EPOCHS = 2  # scale=smoke compresses step 8's 10 epochs to 2


@pytest.fixture(scope="module")
def ema_run():
    """Train step 8 at smoke scale once, spying on the EMA, the optimiser and evaluate()."""
    cfg = make_cfg("+step=step8", *SMOKE, "batch_size=128", "data.synthetic_size=2050",
                   "scale.train_size=2050", "scale.test_size=100")
    validate(cfg)
    assert cfg.loader.drop_last and cfg.batch_size == 128
    rec = SimpleNamespace(ema=None, source=None, calls=[], evaluated=[], epoch=0, position=0, opt_steps=0)
    orig_init, orig_update = train_mod.EMA.__init__, train_mod.EMA.maybe_update
    orig_make_optimizer, orig_evaluate = train_mod.make_optimizer, train_mod.evaluate

    def spy_init(self, model, momentum, every):
        rec.ema, rec.source = self, model
        orig_init(self, model, momentum, every)

    def spy_make_optimizer(*args, **kwargs):
        opt = orig_make_optimizer(*args, **kwargs)
        step = opt.step

        def counted_step(*a, **k):
            rec.opt_steps += 1
            return step(*a, **k)
        opt.step = counted_step
        return opt

    def spy_update(self, step_in_epoch):
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        source = {k: v.detach().clone() for k, v in rec.source.state_dict().items()}
        orig_update(self, step_in_epoch)
        after = self.model.state_dict()
        changed = any(not torch.equal(before[k], after[k]) for k in after)
        rec.calls.append(dict(epoch=rec.epoch, arg=step_in_epoch, position=rec.position,
                              opt_steps=rec.opt_steps, changed=changed,
                              before=before, source=source, after={k: v.clone() for k, v in after.items()}))
        rec.position += 1

    def spy_evaluate(model, *args, **kwargs):
        rec.evaluated.append(dict(epoch=rec.epoch, model=model))
        rec.epoch += 1
        rec.position = 0
        rec.opt_steps = 0
        return orig_evaluate(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod.EMA, "__init__", spy_init)
        mp.setattr(train_mod.EMA, "maybe_update", spy_update)
        mp.setattr(train_mod, "make_optimizer", spy_make_optimizer)
        mp.setattr(train_mod, "evaluate", spy_evaluate)
        train_mod.train(cfg)
    return cfg, rec


def test_ema_updates_at_steps_0_5_10_of_every_epoch_after_the_optimiser_step(ema_run):
    """A3 "EMA mechanics": the step counter restarts every epoch and the average is updated after
    the optimiser step at steps 0, 5, 10, ... of each epoch (A3 8.8: every 5 steps)."""
    _, rec = ema_run
    assert len(rec.calls) == EMA_EPOCHS * EMA_STEPS
    for epoch in range(EMA_EPOCHS):
        calls = [c for c in rec.calls if c["epoch"] == epoch]
        # the engine hands the EMA the step's index within the epoch, restarting at 0
        assert [c["arg"] for c in calls] == list(range(EMA_STEPS))
        assert [c["position"] for c in calls] == list(range(EMA_STEPS))
        # called after that step's optimiser step
        assert [c["opt_steps"] for c in calls] == list(range(1, EMA_STEPS + 1))
        updated = [c["position"] for c in calls if c["changed"]]
        assert updated == [0, 5, 10, 15], f"epoch {epoch}: EMA updated at steps {updated}"


def test_ema_update_is_a_lerp_with_decay_099_to_the_5_on_floats_only(ema_run):
    """A3 8.8 and EMA mechanics: each update is avg = rho*avg + (1-rho)*w with rho = 0.99^5, over every
    floating-point tensor of the state (BN running statistics included); integer counters are not
    averaged (E9)."""
    _, rec = ema_run
    rho = 0.99 ** 5
    updates = [c for c in rec.calls if c["changed"]]
    assert updates
    for c in updates:
        for k, after in c["after"].items():
            before, source = c["before"][k], c["source"][k]
            if after.is_floating_point():
                expected = rho * before.double() + (1 - rho) * source.double()
                torch.testing.assert_close(after.double(), expected, rtol=1e-5, atol=1e-6, msg=k)
            else:
                assert torch.equal(after, before), f"integer buffer {k} was averaged"
    assert any("running_mean" in k for k in updates[0]["after"])  # BN statistics are in the average


def test_each_epoch_evaluates_the_ema_copy(ema_run):
    """A3 8.8: "Eval uses the EMA model": the model evaluated after every epoch is the EMA's copy, not
    the model being trained."""
    _, rec = ema_run
    assert [e["epoch"] for e in rec.evaluated] == list(range(EMA_EPOCHS))
    for e in rec.evaluated:
        assert e["model"] is rec.ema.model
        assert e["model"] is not rec.source


# ---------------------------------------------------------------------------------------------------
# 2. Precision: fp16 with fp32 batch norm (A1 3.1), whole-model fp16 (A1 1.1-2), CPU mapping.
# ---------------------------------------------------------------------------------------------------

def _is_batch_norm(m: nn.Module) -> bool:
    # Any layer that keeps batch statistics, whatever its class (GhostBatchNorm included).
    return isinstance(m, (nn.modules.batchnorm._BatchNorm, GhostBatchNorm)) or hasattr(m, "running_mean")


def _float_tensors(model: nn.Module):
    """(module, qualified name, tensor) for every floating-point parameter and buffer, each once."""
    for mod_name, m in model.named_modules():
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if t is not None and t.is_floating_point():
                yield m, f"{mod_name}.{name}", t


@pytest.mark.parametrize("step,norm_class", [("step4", nn.BatchNorm2d), ("step8", GhostBatchNorm)])
def test_fp16_bn32_keeps_every_batch_norm_fp32_and_the_rest_fp16(step, norm_class):
    """A1 3.1: "fp16 convs, fp32 BN": on a half-precision device every batch norm (ghost BN too) holds
    fp32 parameters and statistics and every other parameter and buffer is fp16."""
    cfg = make_cfg(f"+step={step}", *SMOKE)
    assert cfg.precision.name == "fp16_bn32"
    precision = resolve_precision("fp16_bn32", torch.device("cuda"))  # the GPU mapping, no CUDA needed
    model = train_mod.build_network(cfg, precision, CPU)
    assert any(type(m) is norm_class for m in model.modules())
    n_bn = n_other = 0
    for m, name, t in _float_tensors(model):
        if _is_batch_norm(m):
            assert t.dtype == torch.float32, f"{name} is {t.dtype}, batch norm must stay fp32"
            n_bn += 1
        else:
            assert t.dtype == torch.float16, f"{name} is {t.dtype}, expected fp16"
            n_other += 1
    assert n_bn and n_other
    counters = [b for m in model.modules() if _is_batch_norm(m) for n, b in m.named_buffers(recurse=False)
                if n == "num_batches_tracked"]
    assert counters and all(not c.is_floating_point() for c in counters)


@pytest.mark.parametrize("step", ["step0", "step8"])
def test_fp16_casts_the_whole_model_batch_norm_included(step):
    """A1 1.1-2 and the "fp16" notation of A: the model is cast to half precision, BN too."""
    cfg = make_cfg(f"+step={step}", *SMOKE)
    precision = resolve_precision("fp16", torch.device("cuda"))
    model = train_mod.build_network(cfg, precision, CPU)
    tensors = list(_float_tensors(model))
    assert any(_is_batch_norm(m) for m, _, _ in tensors)
    assert all(t.dtype == torch.float16 for _, _, t in tensors), \
        [name for _, name, t in tensors if t.dtype != torch.float16]


def test_half_precisions_run_as_cpu_half_on_a_cpu():
    """ablate's own rule (design.md; PrecisionConfig.cpu_half): a CPU has no fast fp16, so fp16 and
    fp16_bn32 run as ``precision.cpu_half``: by default ``auto``, bf16 where the CPU has it natively and
    fp32 elsewhere; fp32 or bf16 when asked; and say so."""
    assert make_cfg().precision.cpu_half == "auto"
    for name in ("fp16", "fp16_bn32"):
        p = resolve_precision(name, CPU)
        assert (p.name, p.param_dtype, p.autocast, p.norm_fp32) == ("fp32", torch.float32, None, False)
        p = resolve_precision(name, CPU, "bf16")
        assert (p.name, p.param_dtype, p.autocast) == ("bf16", torch.float32, torch.bfloat16)
    model = train_mod.build_network(make_cfg("+step=step8", *SMOKE), resolve_precision("fp16_bn32", CPU), CPU)
    assert all(t.dtype == torch.float32 for _, _, t in _float_tensors(model))


# ---------------------------------------------------------------------------------------------------
# 3. Every step's LR schedule, transcribed by hand from steps.md / docs/references.md A1-A3.
# ---------------------------------------------------------------------------------------------------

_CYCLE35 = ([0, 15, 30, 35], [0, 0.1, 0.005, 0])  # A1 1.2-1.5
_CYCLE35_044 = ([0, 15, 30, 35], [0, 0.44, 0.005, 0])  # A1 2 (0.005 knot not rescaled, E10), 3.1
_POST4_20 = ([0, 4, 20], [0, 0.4, 0])  # A2 4.1-4.9
_POST4_24 = ([0, 5, 24], [0, 0.4, 0])  # A2 4.10, A3 8.0-8.1
_FINAL10 = ([0, 2, 8, 10], [0, 1.0, 0.1, 0.1])  # A3 8.9 / new_dawn.py: 0.1 held over epochs 8-10

SCHEDULES = {
    # A1 1.1 "as 0" with E7's kink: the LR jumps 0.100 -> 0.105 at epoch 15 (a repeated knot)
    "step0": ([0, 15, 15, 30, 35], [0, 0.1, 0.105, 0.005, 0]),
    "step1_1": _CYCLE35, "step1_2": _CYCLE35, "step1_3": _CYCLE35, "step1_4": _CYCLE35, "step1": _CYCLE35,
    "step2": _CYCLE35_044, "step3_1": _CYCLE35_044,
    "step3_2": ([0, 8, 30], [0, 0.4, 0]),  # A1 3.3
    "step3_3": ([0, 8, 30], [0, 0.6, 0]), "step3": ([0, 8, 30], [0, 0.6, 0]),  # A1 3.4
    "step4_1": _POST4_20, "step4_2": _POST4_20, "step4_3": _POST4_20, "step4_4": _POST4_20,
    "step4_5": _POST4_20, "step4_6": _POST4_20, "step4_9": _POST4_20,
    "step4_10": _POST4_24, "step4": _POST4_24, "step5": _POST4_24, "step6": _POST4_24, "step7": _POST4_24,
    "step8_1": _POST4_24,
    "step8_2": ([0, 5, 25], [0, 0.4, 0]),  # A3 8.2b
    "step8_3": ([0, 4.6, 23], [0, 0.4, 0]),  # A3 8.3
    "step8_4": ([0, 4, 20], [0, 0.4, 0]),  # A3 8.4
    "step8_5": ([0, 3.6, 18], [0, 0.6, 0]),  # A3 8.5
    "step8_6": ([0, 3.4, 17], [0, 0.6, 0]),  # A3 8.6: 17 epochs, warm-up = 1/5 of the run
    "step8_7": ([0, 2.8, 14], [0, 1.0, 0]),  # A3 8.7
    "step8_8": ([0, 2.6, 11, 13], [0, 1.0, 0.1, 0.1]),  # A3 8.8: [0, ep/5, ep-2, ep], ep = 13, floor 0.1
    "step8_9": _FINAL10, "step8": _FINAL10,
    # sota-facts 2.1 and the zoo's scripts: LR 10 (steps 0-4) then 11.5 per 1024 examples, times
    # 0.2 -> 1 at 20% -> 0 (steps 0-4) or 0.2 -> 1 at 23% -> 0.07 (step 5 on), over the row's epochs
    "step9_0": ([0, 6.8, 34], [2.0, 10.0, 0.0]), "step9_1": ([0, 4.2, 21], [2.0, 10.0, 0.0]),
    "step9_2": ([0, 3.6, 18], [2.0, 10.0, 0.0]), "step9_3": ([0, 2.7, 13.5], [2.0, 10.0, 0.0]),
    "step9_4": ([0, 2.7, 13.5], [2.0, 10.0, 0.0]), "step9_5": ([0, 2.76, 12], [2.3, 11.5, 0.805]),
    "step9_6": ([0, 2.484, 10.8], [2.3, 11.5, 0.805]), "step9_7": ([0, 2.277, 9.9], [2.3, 11.5, 0.805]),
    "step9_8": ([0, 2.277, 9.9], [2.3, 11.5, 0.805]), "step9": ([0, 2.277, 9.9], [2.3, 11.5, 0.805]),
    # sota-facts 3, airbench94_muon: no warm-up, 0.053 (the BN biases' LR) linearly to 0 over 8 epochs
    "step10": ([0, 8], [0.053, 0.0]),
}
SEQUEL = {s for s in SCHEDULES if s.startswith("step9") or s == "step10"}


def test_every_step_has_a_transcribed_schedule():
    """steps.md: the table below covers exactly the step ids of conf/step/."""
    assert set(STEP_IDS) == set(SCHEDULES)


@pytest.mark.parametrize("step", STEP_IDS)
def test_step_schedule_matches_the_published_one(step):
    """steps.md and docs/references.md A1-A3 (E7 kink, E10 unscaled 0.005 knot, A3 8.8/8.9 0.1 floors):
    the knots and LR values the engine runs for each step at full scale."""
    cfg = make_cfg(f"+step={step}")
    knots, lrs = SCHEDULES[step]
    assert schedule_knots(cfg.schedule, cfg.scale.epochs) == pytest.approx(knots)
    assert schedule_lrs(cfg.schedule) == pytest.approx(lrs)
    assert cfg.schedule.stop is None
    assert training_epochs(cfg.schedule, cfg.scale.epochs) == pytest.approx(knots[-1])
    # airbench's LambdaLR is stepped after each update: step s runs at s / total
    assert cfg.schedule.step_at == ("start" if step in SEQUEL else "end")


# ---------------------------------------------------------------------------------------------------
# 4. CELU alpha on the built network.
# ---------------------------------------------------------------------------------------------------

_ACT_BEFORE_8_4 = ("relu", None)
ACTIVATIONS = {s: _ACT_BEFORE_8_4 for s in SCHEDULES}
ACTIVATIONS.update({"step8_4": ("celu", 0.075), "step8_5": ("celu", 0.075),  # A3 8.4 (8.5 keeps it)
                    **{s: ("celu", 0.3) for s in ("step8_6", "step8_7", "step8_8", "step8_9", "step8")},  # A3 8.6
                    **{s: ("gelu", None) for s in SEQUEL}})  # sota-facts 3: GELU throughout the sequel


def _activations(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if type(m).__module__ == "torch.nn.modules.activation" or isinstance(m, ShiftedReLU)]


@pytest.mark.parametrize("step", STEP_IDS)
def test_activation_of_the_built_network(step):
    """A3 8.4: CELU alpha 0.075 replaces ReLU; A3 8.6: alpha 0.3 (= 4 x 0.075) from step 8_6 on;
    ReLU everywhere before step 8_4 (B1, B3). Checked on every activation module of the built net,
    by attribute and by value: CELU(x) = alpha (exp(x/alpha) - 1) for x < 0."""
    kind, alpha = ACTIVATIONS[step]
    cfg = make_cfg(f"+step={step}", *SMOKE)
    model = train_mod.build_network(cfg, resolve_precision("fp32", CPU), CPU)
    acts = _activations(model)
    assert acts
    x = torch.tensor([-1.0, -0.1, 0.5])
    for m in acts:
        if kind == "relu":
            assert type(m) is nn.ReLU, f"{step}: {m}"
        elif kind == "gelu":
            assert type(m) is nn.GELU and m.approximate == "none", f"{step}: {m}"
            torch.testing.assert_close(m(x), x * 0.5 * (1 + torch.erf(x / 2 ** 0.5)))
        else:
            assert type(m) is nn.CELU and m.alpha == pytest.approx(alpha), f"{step}: {m}"
            expected = torch.where(x > 0, x, alpha * (torch.exp(x / alpha) - 1))
            torch.testing.assert_close(m(x), expected)


# ---------------------------------------------------------------------------------------------------
# 5. The LR of step i of an epoch: t = epoch + (i + 1) / n_steps.
# ---------------------------------------------------------------------------------------------------

LR_KNOTS, LR_VALUES = [0, 0.7, 2], [0, 1, 0.2]


@pytest.fixture(scope="module", params=["per_image", "device"])
def lr_run(request):
    """Train the default recipe at smoke scale on a tiny two-epoch schedule, recording set_lr's calls."""
    cfg = make_cfg(*SMOKE, f"loader={request.param}", "batch_size=128", "data.synthetic_size=1000",
                   "scale.train_size=1000", "scale.test_size=100",
                   f"schedule.knots={LR_KNOTS}", f"schedule.lr={LR_VALUES}")
    validate(cfg)
    calls, info = [], {}
    orig_set_lr = train_mod.set_lr

    def spy_set_lr(optimizer, lr, batch_size, *position):
        orig_set_lr(optimizer, lr, batch_size, *position)
        calls.append((lr, [g["lr"] for g in optimizer.param_groups], batch_size))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "set_lr", spy_set_lr)
        train_mod.train(cfg, on_start=info.update)
    return cfg, calls, info


def test_lr_of_step_i_is_the_schedule_at_epoch_plus_i_plus_1_over_n(lr_run):
    """Notation of docs/references.md A ("evaluated per step at the fractional epoch") as the 2018/2019 code
    counts it: step i of epoch e (n steps an epoch) runs at LR(e + (i+1)/n), handed to SGD divided by
    the batch size (0.1)."""
    cfg, calls, _ = lr_run
    # 1,000 images at batch 128: 8 steps keeping the last partial batch, 7 dropping it (0.4)
    n = 7 if cfg.loader.drop_last else 8
    epochs = 2
    assert len(calls) == epochs * n
    expected = [float(np.interp(e + (i + 1) / n, LR_KNOTS, LR_VALUES)) for e in range(epochs) for i in range(n)]
    assert [lr for lr, _, _ in calls] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    for lr, group_lrs, batch_size in calls:
        assert batch_size == 128
        assert group_lrs == pytest.approx([lr / 128] * len(group_lrs), rel=1e-12, abs=1e-15)


def test_train_reports_fp16_bn32_running_as_fp32_on_a_cpu(lr_run):
    """The default precision fp16_bn32 runs as precision.cpu_half on a CPU (auto: bf16 on a CPU with
    native bf16, fp32 on one without) and train() says so."""
    from ablate.device import cpu_native_bf16

    cfg, _, info = lr_run
    assert cfg.precision.name == "fp16_bn32" and cfg.precision.cpu_half == "auto"
    assert info["precision_used"] == ("bf16" if cpu_native_bf16() else "fp32")


# ---------------------------------------------------------------------------------------------------
# 6. The optimiser update: torch Nesterov SGD (2018) and the 2019 code's Nesterov step.
# ---------------------------------------------------------------------------------------------------

MOMENTUM, WD, BATCH = 0.9, 5e-4, 8
BIAS_LR_MULT, BIAS_WD_MULT = 64.0, 1 / 64  # A3 8.6, to cover a second parameter group
CHANGING_LRS = [0.1, 0.4, 0.25, 0.05, 0.3, 1.0]  # blog units, a different LR every step
CONSTANT_LRS = [0.4] * 6


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double()


def _grads(model: nn.Module, steps: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()] for _ in range(steps)]


def _multipliers(model: nn.Module) -> list[tuple[float, float]]:
    """(lr_mult, wd_mult) of each parameter, in model.parameters() order: the BN bias has its own."""
    bias = model[1].bias
    return [(BIAS_LR_MULT, BIAS_WD_MULT) if p is bias else (1.0, 1.0) for p in model.parameters()]


def _optimise(update: str, lrs: list[float]) -> list[torch.Tensor]:
    model = _tiny_model()
    opt = make_optimizer(model, OptimConfig(update=update, momentum=MOMENTUM, weight_decay=WD,
                                            bias_lr_mult=BIAS_LR_MULT, bias_wd_mult=BIAS_WD_MULT), BATCH)
    for lr, grads in zip(lrs, _grads(model, len(lrs))):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        set_lr(opt, lr, BATCH)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _reference(update: str, lrs: list[float]) -> list[torch.Tensor]:
    """Hand-written updates in the code's units: per-example LR lr/N, WD wd*N on a summed loss (0.1)."""
    model = _tiny_model()
    ws = [p.detach().clone() for p in model.parameters()]
    vs: list[torch.Tensor | None] = [None] * len(ws)
    for lr, grads in zip(lrs, _grads(model, len(lrs))):
        for j, ((lr_mult, wd_mult), grad) in enumerate(zip(_multipliers(model), grads)):
            lr_t, wd_t = lr * lr_mult / BATCH, WD * wd_mult * BATCH
            w = ws[j]
            g = grad + wd_t * w
            if update == "torch":  # torch.optim.SGD, nesterov: buffer of raw gradients, starts at g
                vs[j] = g.clone() if vs[j] is None else MOMENTUM * vs[j] + g
                ws[j] = w - lr_t * (g + MOMENTUM * vs[j])
            else:  # 2019 torch_backend.nesterov_update: buffer of LR-scaled steps, starts at 0
                d = -lr_t * g
                vs[j] = (torch.zeros_like(w) if vs[j] is None else MOMENTUM * vs[j]) + d
                ws[j] = w + d + MOMENTUM * vs[j]
    return ws


def test_update_rule_picks_the_published_optimiser():
    """0.2: Posts 1-4 run torch.optim.SGD(momentum 0.9, nesterov); the 2019 code its own Nesterov step.
    Both receive lr/N and wd*N (0.1)."""
    model = _tiny_model()
    torch_opt = make_optimizer(model, OptimConfig(update="torch"), BATCH)
    assert type(torch_opt) is torch.optim.SGD
    assert torch_opt.defaults["nesterov"] is True and torch_opt.defaults["momentum"] == 0.9
    assert torch_opt.defaults["dampening"] == 0
    page_opt = make_optimizer(model, OptimConfig(update="page2019"), BATCH)
    assert type(page_opt) is Page2019SGD and page_opt.defaults["momentum"] == 0.9
    for opt in (torch_opt, page_opt):
        assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([5e-4 * BATCH] * len(opt.param_groups))
        set_lr(opt, 0.4, BATCH)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4 / BATCH] * len(opt.param_groups))


@pytest.mark.parametrize("update", ["torch", "page2019"])
def test_update_equals_its_reference_under_a_changing_lr(update):
    """0.2: torch: g = grad + wd w; v = mu v + g (v = g at first); w -= lr (g + mu v).
    2019: g = grad + wd w; d = -lr g; v = mu v + d (v = 0 at first); w += d + mu v.
    Six steps, momentum 0.9, weight decay, a new LR every step, a BN-bias group at LR x64, WD /64."""
    got, expected = _optimise(update, CHANGING_LRS), _reference(update, CHANGING_LRS)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)


def test_the_two_updates_differ_when_the_lr_changes_and_agree_when_it_is_constant():
    """0.2 / E9: the 2019 step "matches PyTorch's Nesterov only while the LR is constant". With a constant
    LR they agree from the first step on: torch's buffer starts at g (= mu*0 + g), so the 2019 buffer is
    always -lr times torch's and the two updates are the same number; only rounding differs."""
    for a, b in zip(_optimise("torch", CONSTANT_LRS), _optimise("page2019", CONSTANT_LRS)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    changing = zip(_optimise("torch", CHANGING_LRS), _optimise("page2019", CHANGING_LRS))
    assert max((a - b).abs().max().item() for a, b in changing) > 1e-4


POST8_STEPS = {"step8_1", "step8_2", "step8_3", "step8_4", "step8_5", "step8_6", "step8_7", "step8_8", "step8_9",
               "step8"}
BIAS64_STEPS = {"step8_6", "step8_7", "step8_8", "step8_9", "step8"}


@pytest.mark.parametrize("step", sorted(set(STEP_IDS) - SEQUEL))
def test_each_step_runs_the_optimiser_of_its_code(step):
    """0.2: Nesterov 0.9 and WD 5e-4 on every parameter throughout; Posts 1-4 (steps 0-7) ran torch's SGD,
    Post 8 (steps 8_1 on) the 2019 code's own step; from 8.6 the BN biases get LR x64 and WD /64."""
    cfg = make_cfg(f"+step={step}")
    opt = cfg.optim
    assert (opt.momentum, opt.nesterov, opt.weight_decay) == (0.9, True, pytest.approx(5e-4))
    assert opt["update"] == ("page2019" if step in POST8_STEPS else "torch")
    mults = (64, 1 / 64) if step in BIAS64_STEPS else (1, 1)
    assert (opt.bias_lr_mult, opt.bias_wd_mult) == pytest.approx(mults)
    assert not opt.lars


# ---------------------------------------------------------------------------------------------------
# 7. The sequel: each step's optimiser, and step 9 = airbench94, step 10 = airbench94_muon (sota-facts 3).
# ---------------------------------------------------------------------------------------------------

BIAS64_SEQUEL = {"step9_3", "step9_4", "step9_5", "step9_6", "step9_7", "step9_8", "step9"}


@pytest.mark.parametrize("step", sorted(SEQUEL - {"step10"}))
def test_each_airbench_step_runs_airbenchs_sgd(step):
    """The zoo's scripts: torch's Nesterov SGD, momentum 0.85, decoupled units, WD 0.0153 per 1024
    examples on every parameter; BN biases at 64x the LR with the same absolute decay from step 3."""
    opt = make_cfg(f"+step={step}").optim
    assert (opt.momentum, opt.nesterov, opt["update"], opt.units) == (0.85, True, "torch", "decoupled")
    assert opt.weight_decay == pytest.approx(0.0153)
    mults = (64, 1 / 64) if step in BIAS64_SEQUEL else (1, 1)
    assert (opt.bias_lr_mult, opt.bias_wd_mult) == pytest.approx(mults)
    assert opt.whiten_bias_epochs == (3 if step in BIAS64_SEQUEL - {"step9_3"} else None)


def test_step9_is_airbench94():
    """sota-facts section 3, item by item."""
    cfg = make_cfg("+step=step9")
    assert (cfg.arch.name, cfg.arch.init, cfg.arch.whiten_eps, cfg.arch.stem) == ("airbench94", "dirac", 5e-4, None)
    assert cfg.batch_size == 1024 and cfg.loader.drop_last and cfg.loader.max_options is None
    assert training_epochs(cfg.schedule, None) == pytest.approx(9.9)
    assert cfg.act.kind == "gelu" and cfg.precision.name == "fp16_bn32"
    assert (cfg.norm.kind, cfg.norm.frozen_scale, cfg.norm.momentum, cfg.norm.eps) == ("batch", True, 0.4, 1e-12)
    assert (cfg.optim.units, cfg.optim.momentum, cfg.optim.weight_decay) == ("decoupled", 0.85, pytest.approx(0.0153))
    assert (cfg.optim.bias_lr_mult, cfg.optim.bias_wd_mult, cfg.optim.whiten_bias_epochs) == (64, 1 / 64, 3)
    assert cfg.loss.label_smoothing == 0.2
    assert list(cfg.schedule.knots) == [0, 0.23, 1] and schedule_lrs(cfg.schedule) == pytest.approx([2.3, 11.5, 0.805])
    assert (cfg.augmentation.crop_pad, cfg.augmentation.flip, cfg.augmentation.alternating_flip,
            cfg.augmentation.cutout) == (2, True, True, 0)
    assert (cfg.tta.flip, cfg.tta.translate) == (True, 1)
    assert (cfg.ema.enabled, cfg.ema.kind, cfg.ema.momentum, cfg.ema.every, cfg.ema.power) == \
        (True, "lookahead", 0.95, 5, 3)
    assert cfg.compile and cfg.step.ref.timing == "train_tta"
    spec = train_mod.customise(train_mod.REGISTRY[cfg.arch.name], cfg.arch)
    assert (spec.whitening, spec.logit_scale, spec.pool_before_norm) == ("airbench2x2", 1 / 9, True)


def test_step10_is_airbench94_muon():
    cfg = make_cfg("+step=step10")
    o = cfg.optim
    assert (o["update"], o.units, o.muon_lr, o.muon_momentum, o.muon_ns_steps) == ("muon", "torch", 0.24, 0.6, 3)
    assert (o.momentum, o.nesterov, o.weight_decay) == (0.85, True, pytest.approx(2e-6))
    assert schedule_lrs(cfg.schedule)[0] == pytest.approx(0.053)
    assert schedule_lrs(cfg.schedule)[0] * o.head_lr_mult == pytest.approx(0.67)
    assert (o.whiten_bias_epochs, o.whiten_bias_lr) == (3, "linear")
    assert cfg.batch_size == 2000 and training_epochs(cfg.schedule, None) == 8 and not cfg.ema.enabled
    assert cfg.arch.name == "airbench94_muon" and cfg.arch.init == "dirac_unit_head"
    assert train_mod.REGISTRY["airbench94_muon"].logit_scale == 1 / 256 and cfg.compile
