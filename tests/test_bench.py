"""ablate.bench: one --quick run end to end (every comparison, files, ratios), and checks that both
sides of the engine and 2019-loop comparisons really train. No performance assertions: targets live
in the bench."""
from __future__ import annotations

import copy
import json
import math
import os
import random

import pytest
import torch

import ablate.train
from ablate import data
from ablate.bench import bare, cli, loops, overhead, page2019, steps, tables
from ablate.bench.settings import COMPARISONS, parse_args
from ablate.optim import make_optimizer, set_lr
from ablate.train import build_network, loss_fn, resolve_precision
from tests.conftest import make_cfg

# Synthetic data keeps these tests independent of a CIFAR-10 copy; one thread keeps them steady on a
# shared CPU (more threads than free cores make small steps erratically slow).
QUICK = ["--quick", "--data", "synthetic", "--threads", "1"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = cli.main([*QUICK, "--out", str(out)])
    return results, out


def test_quick_run_measures_every_comparison(quick_run):
    results, out = quick_run
    saved = json.loads((out / "bench.json").read_text())
    assert set(COMPARISONS) <= set(saved)
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
    for title, _ in tables.SECTIONS.values():
        assert f"## {title}" in md
    assert "| environment" in md and "| path " in md and "| network " in md and "| loop " in md
    assert "batched / per-image" in md and "engine / bare" in md and "launch -> first training step" in md


def test_only_runs_the_selected_comparisons(tmp_path):
    results = cli.main([*QUICK, "--only", "aug", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert "aug" in saved and not {"step", "engine", "page2019", "startup"} & set(saved)
    assert "## Training-step throughput" not in (tmp_path / "bench.md").read_text()
    assert results["aug"]["ratio"] == saved["aug"]["ratio"]


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        parse_args(["--only", "aug,nosuch"])
    with pytest.raises(SystemExit):
        parse_args(["--steps", "0"])


def test_precisions_are_what_the_device_runs():
    assert steps.device_precisions(torch.device("cpu")) == [("fp32", "fp32"), ("bf16", "bf16")]


def test_bare_loop_really_trains():
    torch.manual_seed(0)
    random.seed(0)  # the bare loop draws its crop offsets from Python's RNG
    cfg = make_cfg("+step=step8", "scale=smoke")
    cpu = torch.device("cpu")
    model = build_network(cfg, resolve_precision("fp32", cpu), cpu)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    x = torch.randn(32, 3, 40, 40)  # one padded batch, seen every step: its loss must fall
    steps.fit_whitening_on(model, x[:, :, 4:36, 4:36])  # the step-8 network's whitening refuses to run unfitted
    y = torch.randint(0, 10, (32,))
    losses = bare.bare_loop(model, x, y, batch_size=32, steps=8, pad=4, autocast_dtype=None,
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
    settings = parse_args([*QUICK, "--steps", "3"])
    result = overhead.run_engine(overhead.engine_cfg(settings))
    assert result["steps"] == 3 and result["images"] == 3 * settings.batch_size
    assert math.isfinite(result["final_loss"]) and result["images_per_s"] > 0
    trained = [name for name, p in built["model"].named_parameters() if p.requires_grad]
    changed = [n for n in trained if not torch.equal(built["model"].state_dict()[n], built["before"][n])]
    assert changed and len(changed) == len(trained)


# --------------------------------------------------------------------------------------------------
# ablate's loop against the 2019 loop


def test_quick_run_compares_both_loops_in_every_variant(quick_run):
    _, out = quick_run
    r = json.loads((out / "bench.json").read_text())["page2019"]
    rows = {(x["recipe"], x["variant"], x["loop_key"]): x for x in r["rows"]}
    expected = {(recipe, v.name, loop) for recipe in loops.LOOP_RECIPES for v in loops.LOOP_VARIANTS
                for loop in loops.LOOPS}
    assert set(rows) == expected and len(r["rows"]) == len(expected)
    for x in r["rows"]:
        assert math.isfinite(x["images_per_s"]) and x["images_per_s"] > 0
        assert x["steps"] == 2 and x["faults_per_step"] >= 0 and x["sys_s_per_step"] >= 0
        assert math.isfinite(x["mean_loss"])
    for (recipe, variant, loop), x in rows.items():
        if loop == "engine":
            other = rows[(recipe, variant, "page2019")]
            assert x["ratio_vs_page2019"] == pytest.approx(x["images_per_s"] / other["images_per_s"])
        # the formats each variant asked for are the formats both loops ran in (on this CPU)
        assert variant == "defaults" or x["precision_used"] == "fp32"
        assert x["channels_last"] == (variant in ("fp32_cl_kept", "defaults"))
        assert ("ABLATE_MALLOC=default" in x["malloc"]) == (variant == "fp32_nchw_glibc")
    glibc, kept = r["processes"]
    assert glibc["pid"] != os.getpid() and glibc["variants"] == ["fp32_nchw_glibc"]
    evals = {(x["recipe"], x["variant"]): x for x in r["evaluation"]}
    assert set(evals) == {(recipe, v) for recipe in loops.LOOP_RECIPES for v in ("fp32_nchw_glibc", "defaults")}
    for (recipe, _), x in evals.items():
        assert x["seconds"] > 0 and x["images"] == loops.QUICK_TEST_IMAGES
        assert x["tta_flip"] == x["on_ema"] == (recipe == "step8")
    md = (out / "bench.md").read_text()
    assert "| recipe " in md and "ablate / 2019 loop" in md and "faults/step" in md and "| TTA " in md


def _loop_cfg(*extra: str):
    """The step-8 recipe at smoke scale, fp32 NCHW, on synthetic data, with a small batch."""
    cfg = make_cfg("+step=step8", "scale=smoke", "data=synthetic", "precision=fp32",
                   "precision.channels_last=false", *extra)
    cfg.batch_size = 32
    return cfg


def _synthetic_images(cfg) -> data.Images:
    return data.take_subset(data.load_images(cfg.data), cfg.scale)


def test_inline_2019_update_matches_page2019sgd_and_not_torch_sgd():
    """Three steps at changing LRs (the rules differ only when the LR changes), BN-bias multipliers
    and per-example units included: the 2019 loop's weights must equal those of ablate's Page2019SGD,
    as make_optimizer builds it, and differ from torch's SGD."""
    torch.manual_seed(0)
    cfg = _loop_cfg()
    cpu = torch.device("cpu")
    loop = page2019.Page2019Loop(cfg, _synthetic_images(cfg), cpu)
    start = copy.deepcopy(loop.model)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    lrs = (0.4, 0.1, 0.7)

    def reference(update: str) -> torch.nn.Module:
        model = copy.deepcopy(start)
        cfg.optim["update"] = update  # a DictConfig's .update is a method: set the key by subscription
        opt = make_optimizer(model, cfg.optim, cfg.batch_size)
        criterion = loss_fn(cfg.loss)
        for lr in lrs:
            set_lr(opt, lr, cfg.batch_size)
            opt.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()
            opt.step()
        return model

    for lr in lrs:
        loop.step(x, y, lr)
    page, sgd = reference("page2019"), reference("torch")
    assert any(g.get("lr_mult", 1.0) != 1.0 for g in make_optimizer(start, cfg.optim, 32).param_groups)
    mine = dict(loop.model.named_parameters())
    for name, p in page.named_parameters():
        torch.testing.assert_close(mine[name], p, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.allclose(mine[n], p, rtol=1e-5, atol=1e-6) for n, p in sgd.named_parameters())


def test_2019_loop_really_trains():
    torch.manual_seed(0)
    cfg = _loop_cfg()
    loop = page2019.Page2019Loop(cfg, _synthetic_images(cfg), torch.device("cpu"))
    ema_before = copy.deepcopy(loop.ema_model.state_dict())
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))  # one batch, seen every step
    losses = [float(loop.step(x, y, lr=0.2)[0]) for _ in range(8)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    taken, loss_sum = loop.run_epoch(max_steps=2)  # the epoch path: augmentation, batches, EMA
    assert taken == 2 and math.isfinite(float(loss_sum))
    assert any(not torch.equal(v, loop.ema_model.state_dict()[k]) for k, v in ema_before.items())


def test_2019_epoch_augmentation_draws_crops_flips_and_cutouts_of_each_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, 40, 40) + 5  # padded by 4; + 5 so that no pixel is a cutout's 0
    for max_options in (None, 3):
        out = page2019.augment_epoch(x, 4, False, 0, max_options, g, channels_last=False)
        offsets = []
        for i in range(len(x)):
            found = [(dy, dx) for dy in range(9) for dx in range(9)
                     if torch.equal(out[i], x[i, :, dy:dy + 32, dx:dx + 32])]
            assert found, f"image {i} is no crop of its padded source"
            offsets.append(found[0])
        if max_options is not None:  # at most 3 distinct crops, each given to an equal share
            counts = sorted(offsets.count(o) for o in set(offsets))
            assert len(counts) <= 3 and counts[-1] - counts[0] <= 1
    inner = x[:, :, 4:36, 4:36]
    flipped = page2019.augment_epoch(inner, 0, True, 0, 2, g, channels_last=True)
    assert flipped.is_contiguous(memory_format=torch.channels_last)
    mirrored = [bool(torch.equal(flipped[i], inner[i].flip(2))) for i in range(len(inner))]
    assert all(m or torch.equal(flipped[i], inner[i]) for i, m in enumerate(mirrored)) and sum(mirrored) == 30
    cut = page2019.augment_epoch(inner, 0, False, 8, None, g, channels_last=False)
    zeroed = (cut == 0).all(dim=1)  # N x 32 x 32: the cut-out pixels
    assert (zeroed.sum(dim=(1, 2)) == 64).all()
    assert torch.equal(cut[~zeroed[:, None].expand_as(cut)], inner[~zeroed[:, None].expand_as(inner)])
