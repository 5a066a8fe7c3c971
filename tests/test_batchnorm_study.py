"""Post 7 study: the LR stress-test schedule, the five runs of the batchnorm experiment end to end,
their charts, frozen BN and the signal-propagation demo."""
import math
import os
import subprocess
import sys

import matplotlib
import pandas as pd
import pytest
import torch

from ablate.optim import piecewise_linear, schedule_knots, schedule_lrs
from ablate.records import read_summary
from ablate.studies.batchnorm import plot_bn_stress, signal_propagation
from ablate.layers import ShiftedReLU
from ablate.studies import study_charts
from tests.conftest import REPO, SMOKE, make_cfg

matplotlib.use("Agg")


def test_stress_schedule_is_0005_times_2_to_the_k_over_2_through_epoch_k():
    cfg = make_cfg("+experiment=batchnorm", "+batchnorm_runs=stress_bn")
    assert schedule_knots(cfg.schedule, cfg.scale.epochs)[-1] == 26  # k = 0..25, see the yaml
    lr_at = piecewise_linear(schedule_knots(cfg.schedule, None), schedule_lrs(cfg.schedule))
    for k in range(26):
        want = 0.005 * 2 ** (k / 2)
        assert lr_at(k + 0.5) == pytest.approx(want, rel=1e-7)  # mid-epoch
        # the whole epoch, including its last step at t = k+1 (the LR its metrics row records)
        for t in (k + 1 / 98, k + 0.25, k + 1):
            assert lr_at(t) == pytest.approx(want, rel=1e-7)
    assert lr_at(25.5) == pytest.approx(28.96, rel=1e-3)


POST7 = ("stress_bn", "stress_no_bn", "stress_frozen_bn", "partial_bn", "partial_no_bn")


@pytest.mark.parametrize("order", ["experiment first", "run first"])
def test_experiment_composes_the_post_7_settings(order):
    def compose(run):
        pair = ["+experiment=batchnorm", f"+batchnorm_runs={run}"]
        return make_cfg(*(pair if order == "experiment first" else pair[::-1]))

    for run in POST7:
        cfg = compose(run)
        assert cfg.arch.name == "simple" and cfg.batch_size == 512
        assert cfg.optim.weight_decay == 1e-4 and cfg.optim.momentum == 0.9 and cfg.optim.nesterov
        assert (cfg.augmentation.crop_pad, cfg.augmentation.flip, cfg.augmentation.cutout) == (4, True, 0)
        assert cfg.loader.kind == "per_image" and not cfg.loader.drop_last
        assert cfg.step.id == ("bn_stress" if run.startswith("stress") else "bn_partial")
    bn = compose("stress_bn")
    assert bn.norm.kind == "batch" and bn.norm.frozen_scale and bn.norm.frozen_bias and bn.act.kind == "relu"
    no_bn = compose("stress_no_bn")
    assert (no_bn.norm.kind, no_bn.act.kind, no_bn.arch.init) == ("none", "relu", "he")
    assert bn.arch.init == "default" and compose("partial_bn").arch.init == "default"
    assert compose("partial_no_bn").arch.init == "he"
    frozen = compose("stress_frozen_bn")
    assert (frozen.norm.kind, frozen.act.kind, frozen.arch.init) == ("none", "shifted_relu", "he")
    for run, norm, peak, acc in (("partial_bn", "batch", 5.0, 80.7), ("partial_no_bn", "none", 0.2, 83.9)):
        cfg = compose(run)
        assert cfg.norm.kind == norm and cfg.schedule.peak == peak and cfg.step.ref.accuracy == acc
        assert list(cfg.schedule.knots) == [0, 4, 20] and cfg.schedule.stop == 10
        assert (cfg.act.kind, cfg.act.beta, cfg.act.threshold) == ("softplus", 10, 2.5)
        assert cfg.loss.uniform_kl == 0.5 and cfg.loss.label_smoothing == 0


def test_shifted_relu_standardises_he_preactivations_and_keeps_deep_signals_input_dependent():
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0)) * math.sqrt(2)  # N(0, 2)
    y = ShiftedReLU()(x)
    assert y.mean().item() == pytest.approx(0, abs=5e-3) and y.var().item() == pytest.approx(1, abs=5e-3)
    relu = signal_propagation(torch.nn.ReLU(), depth=30, width=256, inputs=128)
    frozen = signal_propagation(ShiftedReLU(), depth=30, width=256, inputs=128)
    assert relu[-1] < 0.5 < 0.9 < min(frozen)  # ReLU channels drift towards constants; frozen BN's do not
    assert relu[0] > relu[-1]


def test_signal_command_writes_its_chart(tmp_path):
    from ablate.studies.batchnorm import main

    main(["signal", "--out", str(tmp_path), "--depth", "4", "--width", "32", "--inputs", "16"])
    assert (tmp_path / "signal_propagation.png").stat().st_size > 0


def test_end_to_end_five_runs_and_the_report_charts(tmp_path):
    sweep = tmp_path / "bn"
    out = subprocess.run([sys.executable, "-m", "ablate.run", "-m", "+experiment=batchnorm", *SMOKE,
                          f"hydra.sweep.dir={sweep}"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-3000:]
    records = [read_summary(p.parent) for p in sorted(sweep.glob("*/summary.json"))]
    assert len(records) == 5
    assert {r["choices"]["batchnorm_runs"] for r in records} == set(POST7)
    assert all(r["choices"]["experiment"] == "batchnorm" and r["arch"] == "simple" for r in records)
    partial = [r for r in records if r["step"] == "bn_partial"]
    assert [r["epochs"] for r in partial] == [1, 1]  # smoke: 20 epochs -> 2, stopped at 10 -> 1

    report = subprocess.run([sys.executable, "-m", "ablate.report", str(sweep)], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert report.returncode == 0, report.stderr[-3000:]
    for chart in ("batchnorm_stress.png", "batchnorm_partial.png"):
        assert (sweep / "report" / chart).stat().st_size > 0
        assert f"]({chart})" in (sweep / "report" / "REPORT.md").read_text()

    # the same chart drawn in-process, to count its lines: one per run, labelled by norm
    from ablate.report import load_runs
    runs, curves, _ = load_runs(sweep)
    fig = plot_bn_stress(runs[runs.step == "bn_stress"], curves, tmp_path / "again.png")
    labels = [line.get_label() for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")]
    run_lines = [label for label in labels if "blog" not in label]
    assert sorted(run_lines) == ["BN (affine frozen)", "frozen BN (shifted ReLU, He init)", "no BN"]


def _curve(accs, nan_at=None):
    rows = []
    for k, acc in enumerate(accs):
        loss = math.nan if nan_at is not None and k + 1 == nan_at else 1.0
        rows.append(dict(epoch=k + 1, lr=0.005 * 2 ** (k / 2), train_acc=acc, train_loss=loss))
    return pd.DataFrame(rows)


def test_chart_draws_a_diverging_run_up_to_its_nan_epoch_and_marks_it(tmp_path):
    runs = pd.DataFrame([
        dict(run="0_bn", step="bn_stress", status="completed", scale="cpu", device="cpu", seed=0,
             **{"choice.experiment": "batchnorm", "choice.norm": "batchnorm_frozen_affine"}),
        dict(run="1_none", step="bn_stress", status="failed", scale="cpu", device="cpu", seed=0,
             **{"choice.experiment": "batchnorm", "choice.norm": "none"}),
        dict(run="2_other", step="step4", status="completed", scale="cpu", device="cpu", seed=0,
             **{"choice.experiment": "arch15", "choice.norm": "batchnorm"}),
    ])
    curves = {"0_bn": _curve([20, 40, 60, 70, 80, 85]),
              "1_none": _curve([15, 30, 10.0], nan_at=3),  # loss NaN at epoch 3: Diverged stopped there
              "2_other": _curve([50])}
    assert study_charts(runs, tmp_path) == []  # without curves there is nothing to draw it from
    charts = study_charts(runs, tmp_path, curves)
    assert charts == [("Post 7 stress test: train accuracy vs LR, with and without BN", "batchnorm_stress.png")]
    assert (tmp_path / "batchnorm_stress.png").stat().st_size > 0

    fig = plot_bn_stress(runs[runs["choice.experiment"] == "batchnorm"], curves, tmp_path / "x.png")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    bn, none = lines["BN (affine frozen)"], lines["no BN"]
    assert list(bn.get_xdata()) == pytest.approx(list(curves["0_bn"].lr))
    assert list(none.get_xdata()) == pytest.approx(list(curves["1_none"].lr))  # up to the NaN epoch
    assert list(none.get_ydata()) == [15, 30, 10.0]
    [mark] = [line for label, line in lines.items() if "loss NaN at epoch 3" in label]
    assert label_of(mark).startswith("no BN") and mark.get_marker() == "x"
    assert list(mark.get_xdata()) == pytest.approx([0.01]) and list(mark.get_ydata()) == [10.0]
    assert not any("BN (affine frozen):" in label for label in lines)  # the BN run is not marked


def label_of(line):
    return line.get_label()
