"""ablate.bench: one --quick run end to end (all four comparisons, files, ratios), and checks that both
sides of the engine comparison really train. No performance assertions: targets live in the bench."""
from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch

import ablate.train
from ablate import bench
from ablate.train import build_network, resolve_precision
from tests.conftest import make_cfg

# Synthetic data keeps these tests independent of a CIFAR-10 copy; one thread keeps them steady on a
# shared CPU (more threads than free cores make small steps erratically slow).
QUICK = ["--quick", "--data", "synthetic", "--threads", "1"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = bench.main([*QUICK, "--out", str(out)])
    return results, out


def test_quick_run_measures_all_four_comparisons(quick_run):
    results, out = quick_run
    saved = json.loads((out / "bench.json").read_text())
    assert set(bench.COMPARISONS) <= set(saved)
    for key in ("device", "torch", "cpu_count", "torch_threads", "scale", "date"):
        assert saved["env"][key] not in (None, "")
    assert saved["env"]["scale"] == "smoke" and saved["env"]["torch_threads"] == 1

    aug = saved["aug"]
    assert aug["per_image"]["images"] == aug["batched"]["images"] > 0  # the same images on both paths
    assert aug["per_image"]["images_per_s"] > 0 and aug["batched"]["images_per_s"] > 0

    rows = saved["step"]["rows"]
    assert {r["network"] for r in rows} == {"resnet9", "resnet9_final"}
    assert {r["memory_format"] for r in rows} == {"contiguous", "channels_last"}
    assert {r["precision_used"] for r in rows} == {"fp32", "bf16"}  # what a CPU runs natively
    assert all(r["images_per_s"] > 0 and math.isfinite(r["final_loss"]) for r in rows)

    eng = saved["engine"]
    assert eng["engine"]["steps"] == eng["bare"]["steps"] == saved["settings"]["steps"]
    assert eng["engine"]["images_per_s"] > 0 and eng["bare"]["images_per_s"] > 0

    start = saved["startup"]
    assert 0 < start["startup_seconds"] < start["wall_seconds"]


def test_ratios_are_the_quotients_of_the_reported_throughputs(quick_run):
    results, out = quick_run
    saved = json.loads((out / "bench.json").read_text())
    aug, eng = saved["aug"], saved["engine"]
    assert aug["ratio"] == pytest.approx(aug["batched"]["images_per_s"] / aug["per_image"]["images_per_s"])
    assert aug["ratio_tuned"] == pytest.approx(aug["batched"]["images_per_s"] / aug["per_image_tuned"]["images_per_s"])
    assert (aug["per_image"]["loader"], aug["per_image_tuned"]["loader"]) == ("per_image_workers", "per_image")
    assert eng["ratio"] == pytest.approx(eng["engine"]["images_per_s"] / eng["bare"]["images_per_s"])
    assert eng["ratio_with_prep"] == pytest.approx(eng["engine"]["images_per_s_with_prep"] / eng["bare"]["images_per_s"])
    for row in saved["step"]["rows"]:
        base = next(r for r in saved["step"]["rows"] if r["network"] == row["network"]
                    and r["precision_used"] == "fp32" and r["memory_format"] == "contiguous")
        assert row["ratio_vs_fp32_contiguous"] == pytest.approx(row["images_per_s"] / base["images_per_s"])
    assert aug["meets_target"] == (aug["ratio"] >= aug["target"])
    assert eng["meets_target"] == (eng["ratio"] >= eng["target"])


def test_markdown_report_has_the_environment_and_a_table_per_comparison(quick_run):
    _, out = quick_run
    md = (out / "bench.md").read_text()
    for title, _ in bench.SECTIONS.values():
        assert f"## {title}" in md
    assert "| environment" in md and "| path " in md and "| network " in md and "| loop " in md
    assert "batched / per-image" in md and "engine / bare" in md and "launch -> first training step" in md


def test_only_runs_the_selected_comparisons(tmp_path):
    results = bench.main([*QUICK, "--only", "aug", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert "aug" in saved and not {"step", "engine", "startup"} & set(saved)
    assert "## Training-step throughput" not in (tmp_path / "bench.md").read_text()
    assert results["aug"]["ratio"] == saved["aug"]["ratio"]


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "aug,nosuch"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])


def test_precisions_are_what_the_device_runs():
    assert bench.device_precisions(torch.device("cpu")) == [("fp32", "fp32"), ("bf16", "bf16")]


def test_bare_loop_really_trains():
    torch.manual_seed(0)
    random.seed(0)  # the bare loop draws its crop offsets from Python's RNG
    cfg = make_cfg("+step=step8", "scale=smoke")
    cpu = torch.device("cpu")
    model = build_network(cfg, resolve_precision("fp32", cpu), cpu)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    x = torch.randn(32, 3, 40, 40)  # one padded batch, seen every step: its loss must fall
    y = torch.randint(0, 10, (32,))
    losses = bench.bare_loop(model, x, y, batch_size=32, steps=8, pad=4, autocast_dtype=None,
                             channels_last=False, lr=0.2)
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert all(math.isfinite(float(v)) for v in losses)
    assert float(losses[-1]) < float(losses[0])
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_engine_really_trains_the_counted_steps(monkeypatch):
    built = {}

    def spy(*args, **kwargs):  # keep the engine's model and a copy of its initial weights
        model = build_network(*args, **kwargs)
        built["model"], built["before"] = model, copy.deepcopy(model.state_dict())
        return model
    monkeypatch.setattr(ablate.train, "build_network", spy)
    settings = bench.parse_args([*QUICK, "--steps", "3"])
    result = bench.run_engine(bench.engine_cfg(settings))
    assert result["steps"] == 3 and result["images"] == 3 * settings.batch_size
    assert math.isfinite(result["final_loss"]) and result["images_per_s"] > 0
    trained = [name for name, p in built["model"].named_parameters() if p.requires_grad]
    changed = [n for n in trained if not torch.equal(built["model"].state_dict()[n], built["before"][n])]
    assert changed and len(changed) == len(trained)
