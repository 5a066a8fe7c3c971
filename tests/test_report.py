"""Results table, statistics, charts and sweep resume."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from scipy import stats

from ablate.report import aggregate, journey_order, load_runs, plot_architectures, plot_timeline, verdicts, write_report
from tests.conftest import REPO, SMOKE


def _record(root, name, step="step4", arch="resnet9", seed=0, status="completed", accs=(90.0, 94.1),
            train_s=10.0, timing="with_eval", ref_time=79.0, scale="full", device="cpu"):
    run = root / name
    run.mkdir(parents=True)
    config = {"step": {"id": step, "ref": {"time_s": ref_time, "timing": timing, "accuracy": 94.08}},
              "arch": {"name": arch}, "seed": seed, "scale": {"name": scale}, "target_acc": 94.0}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [dict(epoch=i + 1, test_acc=a, train_seconds=train_s * (i + 1) / len(accs),
                 eval_seconds=1.0 * (i + 1) / len(accs)) for i, a in enumerate(accs)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = dict(status=status, step=step, arch=arch, seed=seed, scale=scale, device=device,
                   precision_used="fp32", torch_version="2.x", epochs=len(accs), train_seconds=train_s,
                   eval_seconds=1.0, choices={"arch": arch})
    if status == "completed":
        summary["test_acc"] = accs[-1]
    else:
        summary["error"] = "RuntimeError: boom"
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_aggregate_statistics_on_hand_made_records(tmp_path):
    accs = [94.2, 93.9, 94.3]
    for seed, acc in enumerate(accs):
        _record(tmp_path / "sweep", f"{seed}", seed=seed, accs=(90.0, acc), train_s=10.0 + seed)
    _record(tmp_path / "sweep", "3", seed=3, status="failed", accs=(50.0,))
    bad = tmp_path / "sweep" / "4"
    bad.mkdir()
    (bad / "summary.json").write_text('{"status": "compl')  # torn file: reported, skipped
    _record(tmp_path, "deep/er/single", step="step8", timing="train_only", ref_time=26.0, accs=(93.0,))

    runs, _, problems = load_runs(tmp_path)
    assert len(runs) == 5 and sorted(runs.status) == ["completed"] * 4 + ["failed"]
    assert any("4/summary.json" in p for p in problems)
    assert list(runs.step.drop_duplicates()) == ["step4", "step8"]  # journey order, not listing order

    agg = aggregate(runs).set_index("step")
    row = agg.loc["step4"]
    mean, std = sum(accs) / 3, pd.Series(accs).std()
    half = stats.t.ppf(0.975, 2) * std / math.sqrt(3)
    assert row.n == 3 and row.acc_mean == pytest.approx(mean) and row.acc_std == pytest.approx(std)
    assert (row.ci95_low, row.ci95_high) == pytest.approx((mean - half, mean + half))
    assert row.share_reaching == pytest.approx(2 / 3) and row.never_reached == 1
    assert row.time_to_target == pytest.approx((11.0 + 13.0) / 2)  # seeds 0 and 2 at their last epoch, + eval
    assert row.time_s == pytest.approx(12.0)  # Posts 1-4 convention: train + eval
    assert agg.loc["step8"].time_s == pytest.approx(10.0)  # Post 8 convention: train only
    assert agg.loc["step8"].n == 1 and math.isnan(agg.loc["step8"].acc_std)


def test_report_command_writes_tables_charts_and_markdown(tmp_path):
    for i, step in enumerate(["step0", "step4", "step8"]):
        _record(tmp_path / "runs", f"{i}", step=step, train_s=100.0 / (i + 1))
    out = subprocess.run([sys.executable, "-m", "ablate.report", str(tmp_path / "runs"), "--out",
                          str(tmp_path / "rep")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("runs.csv", "runs.parquet", "aggregate.csv", "aggregate.parquet", "timeline.png",
                 "curves.png", "REPORT.md"):
        assert (tmp_path / "rep" / name).is_file(), name
    report = (tmp_path / "rep" / "REPORT.md").read_text()
    assert "![Timeline](timeline.png)" in report and "scales: full" in report and "| step0" in report
    assert len(pd.read_parquet(tmp_path / "rep" / "runs.parquet")) == 3


def test_timeline_has_a_row_per_step_in_journey_order_and_a_bar_per_series(tmp_path):
    for i, step in enumerate(["step8", "step1", "step0", "step4"]):
        _record(tmp_path, f"{i}", step=step, train_s=50.0 / (i + 1))
    fig = plot_timeline(aggregate(load_runs(tmp_path)[0]), tmp_path / "t.png")
    published, measured, normalised = fig.axes
    ticks = [t.get_text() for t in published.get_yticklabels()]
    steps = [t.split()[0] for t in ticks if t.startswith("step")]
    assert steps == [s for s in journey_order() if s in {"step0", "step1", "step1_1", "step1_2", "step1_3",
                                                           "step2", "step3_1", "step3_2", "step3", "step4_1",
                                                           "step4_2", "step4_3", "step4_4", "step4_5", "step4_6",
                                                           "step4_9", "step4", "step8_1", "step8_2", "step8_3",
                                                           "step8_4", "step8_5", "step8_6", "step8_7", "step8_8",
                                                           "step8"}]
    assert any("Post 8" in t and "no evaluation" in t for t in ticks)  # the timing switch is named
    assert len(measured.patches) == 4 and len(published.patches) == len(steps)  # unmeasured steps: no bar
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_architecture_chart_labels_every_network(tmp_path):
    names = ["backbone", "extra_l1", "residual_l1l3"]
    for i, arch in enumerate(names):
        _record(tmp_path, f"{i}", step="step4_6", arch=arch, accs=(80.0 + i,))
    fig = plot_architectures(aggregate(load_runs(tmp_path)[0]), tmp_path / "a.png")
    assert sorted(t.get_text() for t in fig.axes[0].texts) == sorted(names)


def test_journey_experiment_lists_steps_in_journey_order():
    order = journey_order()
    assert order[0] == "step0" and order[-1] == "step10" and order.index("step4_9") < order.index("step4")
    assert order.index("step8") + 1 == order.index("step9_0")  # the sequel follows Post 8
    steps = []
    for name in ("journey", "journey_sequel"):
        listed = yaml.safe_load((REPO / f"conf/experiment/{name}.yaml").read_text())
        steps += listed["hydra"]["sweeper"]["params"]["+step"].split(",")
    aliases = {"step1_4", "step3_3", "step4_10", "step8_9", "step5", "step6", "step7", "step9_8"}
    assert steps == [s for s in order if s not in aliases]


def test_arch15_experiment_sweeps_the_fifteen_networks():
    listed = yaml.safe_load((REPO / "conf/experiment/arch15.yaml").read_text())["hydra"]["sweeper"]["params"]
    archs = listed["arch"].split(",")
    assert len(set(archs)) == 15 and listed["+step"] == "step4_6"


def _completed(sweep):
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")
            if json.loads(p.read_text())["status"] == "completed"}


def test_killed_sweep_resumes_without_rerunning_finished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "ablate.run", "-m", "+step=step4", *SMOKE, "seed=0,1,2,3",
           f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while len(_completed(sweep)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole sweep dies at once, as on a lost node
    proc.wait()
    first = _completed(sweep)
    assert 2 <= len(first) < 4, "the sweep should be killed part way"

    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    final = _completed(sweep)
    assert len(final) == 4 and sorted(s["seed"] for s in final.values()) == [0, 1, 2, 3]
    for name, summary in first.items():  # finished jobs were not run again
        assert final[name]["finished"] == summary["finished"]
    assert out.stdout.count("not run again") + out.stderr.count("not run again") == len(first)
    assert f"4 jobs: {4 - len(first)} completed, 0 failed, {len(first)} skipped" in out.stdout


def test_notebook_runs_against_a_small_results_table(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for i, (step, arch) in enumerate([("step0", "preact18_repeat"), ("step4", "resnet9"), ("step8", "resnet9")]):
        _record(tmp_path / "runs", f"{i}", step=step, arch=arch, train_s=90.0 / (i + 1))
    write_report(tmp_path / "runs", tmp_path / "rep")
    notebook = nbformat.read(REPO / "notebooks" / "journey.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), "outputs not stripped"
    monkeypatch.setenv("ABLATE_RESULTS", str(tmp_path / "rep" / "runs.parquet"))
    monkeypatch.setenv("ABLATE_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    (tmp_path / "figures").mkdir()
    work = tmp_path / "notebooks"  # where it runs: no figure may land there (the source tree, in real use)
    work.mkdir()
    nbclient.NotebookClient(notebook, timeout=180, resources={"metadata": {"path": str(work)}}).execute()
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2 and (tmp_path / "figures" / "timeline.png").is_file()
    assert list(work.iterdir()) == []


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    """Job 0 cannot find its data (recorded as failed, with the error); job 1 still runs; the sweep
    says so in its closing line and exits non-zero."""
    sweep = tmp_path / "sweep"
    out = subprocess.run([sys.executable, "-m", "ablate.run", "-m", "+step=step4", "scale=smoke", "progress=false",
                          "data=default,synthetic", f"data.root={tmp_path / 'missing'}", "data.download=false",
                          f"hydra.sweep.dir={sweep}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "2 jobs: 1 completed, 1 failed, 0 skipped" in out.stdout and "failed: job 0" in out.stdout
    summaries = sorted((json.loads(p.read_text()) for p in sweep.glob("*/summary.json")),
                       key=lambda s: s["choices"]["data"])
    assert [s["status"] for s in summaries] == ["failed", "completed"]
    assert "DataError" in summaries[0]["error"] and "missing" in summaries[0]["error"]
    assert summaries[0]["failure"] == "data"


def test_one_timing_rule_for_total_time_and_time_to_target(tmp_path):
    """docs/references.md 0.3: Posts 1-4 count the training loop and the per-epoch evaluation but not the
    preprocessing (79 s = 74 s + 7 s - 2 s); Post 8 counts preprocessing and the loop, no evaluation.
    The total and the time to target follow the same rule."""
    def record(name: str, timing: str) -> None:
        run = tmp_path / name
        run.mkdir()
        config = {"step": {"id": "step4", "ref": {"timing": timing}}, "arch": {"name": "resnet9"}, "seed": 0,
                  "scale": {"name": "full"}, "target_acc": 94.0}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        # prep 2 s; each epoch 10 s of loop and 1 s of evaluation; cumulative train_seconds include prep
        rows = [dict(epoch=e, test_acc=acc, train_seconds=2.0 + 10.0 * e, eval_seconds=1.0 * e)
                for e, acc in ((1, 90.0), (2, 94.5), (3, 95.0))]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "summary.json").write_text(json.dumps(dict(
            status="completed", step="step4", arch="resnet9", seed=0, scale="full", device="cpu", test_acc=95.0,
            epochs=3, train_seconds=32.0, eval_seconds=3.0, prep_seconds=2.0)))

    record("posts1to4", "with_eval")
    record("post8", "train_only")
    runs = load_runs(tmp_path)[0].set_index("run")
    assert runs.loc["posts1to4", "time_s"] == pytest.approx(30.0 + 3.0)  # loop + eval, no prep
    assert runs.loc["posts1to4", "time_to_target"] == pytest.approx(20.0 + 2.0)
    assert runs.loc["post8", "time_s"] == pytest.approx(32.0)  # prep + loop, no eval
    assert runs.loc["post8", "time_to_target"] == pytest.approx(22.0)


def test_a_few_starved_epochs_that_dominate_the_seconds_make_a_run_contended():
    """Shares are weighted by each epoch's seconds: most epochs clean, but the starved ones holding most
    of the run's time, is a contended timing; the reverse (one short slow epoch) is not."""
    from ablate.report.load import timing_note

    starved = [dict(cpu_share=0.07, epoch_seconds=765.0), dict(cpu_share=0.1, epoch_seconds=637.0)]
    clean = [dict(cpu_share=0.98, epoch_seconds=40.0) for _ in range(6)]
    assert timing_note({}, starved + clean) == "contended"
    assert timing_note({}, [dict(cpu_share=0.3, epoch_seconds=5.0)] + clean) == ""


def test_contended_cpu_runs_are_flagged_and_left_out_of_the_times(tmp_path):
    """A CPU run whose epochs got well under their threads' share of CPU time is marked `contended`
    and its seconds do not enter the recipe's times while a clean run exists."""
    clean = _record(tmp_path, "clean", seed=0, train_s=10.0)
    busy = _record(tmp_path, "busy", seed=1, train_s=30.0)
    for run, share in ((clean, 0.97), (busy, 0.45)):
        rows = [dict(json.loads(line), cpu_share=share) for line in (run / "metrics.jsonl").read_text().splitlines()]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = load_runs(tmp_path)[0].set_index("run")
    assert (runs.loc["clean", "timing_note"], runs.loc["busy", "timing_note"]) == ("", "contended")
    row = aggregate(runs.reset_index()).iloc[0]
    assert row.n == 2 and row.train_s == pytest.approx(10.0) and "1/2 contended" in row.timing_note


# --------------------------------------------------------------------------------------------------
# Recipe labels, verdicts, the timeline's marks and the self-contained HTML (issue 13)


def _composed(*overrides):
    from omegaconf import OmegaConf

    from ablate.compose import compose

    cfg = compose(list(overrides), return_hydra_config=True)
    choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra")}
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return OmegaConf.to_container(cfg, resolve=True), choices


@pytest.mark.parametrize("overrides, label", [
    (("+step=step8", "schedule.peak=0.8"), "step8 · schedule.peak=0.8"),
    (("+step=step4_6", "arch=residual_l2"), "step4_6 · arch=residual_l2"),
    (("+step=step8", "tta=none", "optim.momentum=0.8"), "step8 · tta=none · optim.momentum=0.8"),
    (("+step=step8", "scale=cpu", "seed=3", "precision.cpu_half=bf16", "progress=false"), "step8"),
])
def test_a_recipe_is_labelled_by_how_it_differs_from_its_step(overrides, label):
    from ablate.report.labels import recipe_changes, recipe_label

    config, choices = _composed(*overrides)
    step = config["step"]["id"]
    assert recipe_label(step, recipe_changes(step, config, choices)) == label


def test_a_named_recipe_leads_its_label():
    """+recipe=fenwicks changes the loader, the augmentation and the weight decay of step 4: its label
    names the recipe first, then what it brings."""
    from ablate.report.labels import recipe_changes

    config, choices = _composed("+step=step4", "+recipe=fenwicks")
    changes = recipe_changes("step4", config, choices)
    assert changes[0] == "recipe=fenwicks" and len(changes) > 1


def _write(root, name, config, choices, accs, train_s, device="cpu", precision="fp32", cpu=None, seed=0):
    run = root / name
    run.mkdir(parents=True)
    config = dict(config, seed=seed)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [dict(epoch=i + 1, test_acc=a, train_seconds=train_s * (i + 1) / len(accs),
                 eval_seconds=0.1 * (i + 1)) for i, a in enumerate(accs)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = dict(status="completed", step=config["step"]["id"], arch=config["arch"]["name"], seed=seed,
                   scale=config["scale"]["name"], device=device, precision_used=precision, torch_version="2.x",
                   epochs=len(accs), train_seconds=train_s, eval_seconds=0.1 * len(accs), prep_seconds=0.0,
                   test_acc=accs[-1], choices=choices, **(cpu or {}))
    (run / "summary.json").write_text(json.dumps(summary))


def test_two_recipes_of_one_step_are_two_entries_everywhere(tmp_path):
    """The acceptance case: a sweep of schedule.peak=0.8,1.0 on step 8 is two recipes, each labelled by
    its difference, in the aggregates, the verdicts (against their step) and the timeline."""
    base, choices = _composed("+step=step8", "scale=smoke")
    _write(tmp_path, "plain", base, choices, (50.0, 60.0, 70.0), 30.0)
    for i, peak in enumerate((0.8, 1.2)):
        config, choices = _composed("+step=step8", "scale=smoke", f"schedule.peak={peak}")
        for seed in (0, 1):
            _write(tmp_path, f"p{i}s{seed}", config, choices, (50.0, 60.0, 70.0 + seed), 30.0 + seed, seed=seed)
    runs = load_runs(tmp_path)[0]
    agg = aggregate(runs)
    assert sorted(agg.label) == ["step8", "step8 · schedule.peak=0.8", "step8 · schedule.peak=1.2"]
    assert set(agg[agg.label != "step8"].n) == {2}
    v = verdicts(runs).set_index("label")
    assert list(v.loc[["step8 · schedule.peak=0.8"], "vs"]) == ["step8"]
    assert v.loc["step8 · schedule.peak=0.8", "verdict"] == "no published claim"
    fig = plot_timeline(agg, tmp_path / "t.png")
    ticks = [t.get_text().strip() for t in fig.axes[0].get_yticklabels()]
    assert "schedule.peak=0.8" in ticks and "schedule.peak=1.2" in ticks


def test_recipes_that_labels_would_merge_stay_apart(tmp_path):
    """Two recipes differing only in what labels leave out (the fp16 mapping asked for) are told apart
    by the precision that ran, or by their recipe key where that is the same too."""
    for i, half in enumerate(("fp32", "bf16")):
        config, choices = _composed("+step=step8", "scale=smoke", f"precision.cpu_half={half}")
        _write(tmp_path / "ran", f"r{i}", config, choices, (50.0, 60.0), 10.0, precision=half)
        _write(tmp_path / "same", f"r{i}", config, choices, (50.0, 60.0), 10.0, precision="fp32")
    assert sorted(aggregate(load_runs(tmp_path / "ran")[0]).label) == ["step8 · ran bf16", "step8 · ran fp32"]
    labels = sorted(aggregate(load_runs(tmp_path / "same")[0]).label)
    assert len(labels) == 2 and all(lab.startswith("step8 #") for lab in labels)


def test_accuracy_difference_is_welchs_t_test_with_two_runs_or_more():
    from ablate.report.stats import accuracy_difference

    a, b = pd.Series([94.2, 94.0, 94.3]), pd.Series([93.6, 93.9])
    d = accuracy_difference(a, b, pooled_sd=1.0)
    assert d["acc_test"] == "Welch t" and d["acc_p"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert d["acc_diff"] == pytest.approx(a.mean() - b.mean()) and d["acc_low"] < d["acc_diff"] < d["acc_high"]
    single = accuracy_difference(pd.Series([94.2]), pd.Series([93.6]), pooled_sd=0.15)
    assert single["acc_test"].startswith("normal") and single["acc_high"] - single["acc_low"] == pytest.approx(
        2 * stats.norm.ppf(0.975) * 0.15 * math.sqrt(2))


@pytest.mark.parametrize("low, high, claim, sign, verdict", [
    (0.5, 2.0, "change", 1, "reproduced"), (-2.0, -0.5, "change", 1, "not reproduced"),
    (-0.5, 2.0, "change", 1, "inconclusive"), (-0.3, 0.4, "holds", 1, "reproduced"),
    (0.7, 1.5, "holds", 1, "not reproduced"), (-0.2, 0.9, "holds", 1, "inconclusive"),
])
def test_a_verdict_follows_the_interval(low, high, claim, sign, verdict):
    from ablate.report.stats import judge

    got, seeds = judge(low, high, claim, sign, margin=0.5, sd=0.2, estimate=(low + high) / 2, published=1.0)
    assert got == verdict and (seeds >= 2) == (verdict == "inconclusive")


def test_verdicts_of_the_journey_on_hand_made_records(tmp_path):
    """4_2 -> 4_3: published 56% -> 85.6% in 36/32 of the time; measured +20 points, 1.1x the time, 3
    seeds each: reproduced. 2 -> 3_1 (fp32 batch norm) on a CPU where both ran fp32: no analogue.
    3_1 -> 3_2 claims 0.87x the time; measured 1.3x with a tight spread: not reproduced."""
    def steps(step, accs, times):
        config, choices = _composed(f"+step={step}", "scale=cpu")
        for seed, (acc, t) in enumerate(zip(accs, times)):
            _write(tmp_path, f"{step}_{seed}", config, choices, (acc - 5, acc - 2, acc), t, seed=seed)

    steps("step2", (88.0, 88.2, 87.9), (100.0, 101.0, 99.0))
    steps("step3_1", (88.1, 88.0, 88.2), (100.0, 100.5, 99.5))
    steps("step3_2", (88.3, 88.1, 88.2), (130.0, 131.0, 129.0))
    steps("step4_2", (60.0, 61.0, 59.5), (50.0, 50.5, 49.5))
    steps("step4_3", (80.0, 81.0, 80.5), (55.0, 55.5, 54.5))
    v = verdicts(load_runs(tmp_path)[0]).set_index("step")
    assert v.loc["step4_3", "vs"] == "step4_2" and v.loc["step4_3", "acc_verdict"] == "reproduced"
    assert v.loc["step4_3", "time_verdict"] == "reproduced" and v.loc["step4_3", "verdict"] == "reproduced"
    assert v.loc["step3_1", "verdict"] == "no analogue" and "both steps ran fp32" in v.loc["step3_1", "note"]
    assert v.loc["step3_2", "time_verdict"] == "not reproduced" and v.loc["step3_2", "verdict"] == "not reproduced"
    assert v.loc["step3_2", "time_ratio"] == pytest.approx(1.3, rel=0.01)


def test_timeline_hatches_a_step_below_target_and_keeps_devices_apart(tmp_path):
    intel = dict(cpu_model="Intel(R) Xeon(R) Processor", cpu_isa="AVX512")
    amd = dict(cpu_model="AMD EPYC", cpu_isa="AVX2")
    for step, acc in (("step4_6", 80.0), ("step4", 87.0)):
        config, choices = _composed(f"+step={step}", "scale=cpu")
        _write(tmp_path, f"{step}_i", config, choices, (70.0, acc), 100.0, cpu=intel)
        _write(tmp_path, f"{step}_a", config, choices, (70.0, acc), 250.0, cpu=amd)
    agg = aggregate(load_runs(tmp_path)[0])
    assert set(agg.device) == {"cpu · Intel Xeon · AVX512", "cpu · AMD EPYC · AVX2"}
    fig = plot_timeline(agg, tmp_path / "t.png")
    published, amd_panel, intel_panel, normalised = fig.axes
    assert "AMD" in amd_panel.get_title() and "Intel" in intel_panel.get_title()
    hatched = [p.get_hatch() for p in intel_panel.patches]
    assert hatched == ["////", None]  # step4_6 at 80% misses the cpu-scale target of 86%; step4 reaches it
    texts = " ".join(t.get_text() for t in intel_panel.texts)
    assert "100 s · 80.0% · n=1" in texts and "100 s · 87.0% · n=1" in texts


def test_report_html_is_self_contained_and_markdown_has_no_nan(tmp_path):
    for i, step in enumerate(["step0", "step4", "step8"]):
        _record(tmp_path / "runs", f"{i}", step=step, train_s=100.0 / (i + 1))
    files = write_report(tmp_path / "runs", tmp_path / "rep")
    page = files["html"].read_text()
    assert page.count("data:image/png;base64,") >= 2 and "<script>" in page and "<table" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched at view time
    report = files["report"].read_text()
    assert "nan" not in report.lower().replace("nanoseconds", "")
    assert max(len(line) for line in report.splitlines() if line.startswith("|")) < 160
    assert (tmp_path / "rep" / "verdicts.csv").is_file()


def test_curves_draw_one_mean_line_and_band_per_recipe(tmp_path):
    from ablate.report import plot_curves

    config, choices = _composed("+step=step8", "scale=cpu")
    for seed in (0, 1, 2):
        _write(tmp_path, f"s{seed}", config, choices, (60.0 + seed, 80.0 + seed, 86.0 + seed), 30.0, seed=seed)
    runs, curves, _ = load_runs(tmp_path)
    fig = plot_curves(runs, curves, tmp_path / "c.png")
    per_epoch, per_second = fig.axes[:2]
    lines = [line for line in per_epoch.get_lines() if line.get_label() == "step8"]
    assert len(lines) == 1 and list(lines[0].get_ydata()) == pytest.approx([61.0, 81.0, 87.0])  # the mean
    assert len(per_epoch.collections) == 1  # the band over seeds
    assert any(line.get_ydata()[0] == 86.0 for line in per_epoch.get_lines() if line.get_linestyle() == "--")
    assert per_second.get_xscale() == "log"
    ticks = per_epoch.xaxis.get_major_locator()()
    assert all(float(t).is_integer() for t in ticks)


def test_curves_legend_names_the_recipes_of_every_panel(tmp_path):
    """One device ran step 8 only, another step 4 only: the one legend names both panels' recipes, not
    only the first panel's."""
    from ablate.report import plot_curves

    amd = dict(cpu_model="AMD EPYC", cpu_isa="AVX2")
    for step, cpu in (("step8", amd), ("step4", None)):
        config, choices = _composed(f"+step={step}", "scale=cpu")
        _write(tmp_path, f"{step}_{bool(cpu)}", config, choices, (60.0, 80.0, 87.0), 30.0, cpu=cpu)
    runs, curves, _ = load_runs(tmp_path)
    assert runs.device.nunique() == 2
    fig = plot_curves(runs, curves, tmp_path / "c.png")
    (legend,) = fig.legends
    assert sorted(text.get_text() for text in legend.get_texts()) == ["step4", "step8"]


def test_airbench_timing_counts_training_and_the_final_evaluation_pass(tmp_path):
    """sota-facts 2.4 (step.ref.timing=train_tta): preprocessing with the whitening fit and the training
    loop count, and the final TTA pass; the per-epoch logging evaluation does not. The time to target at
    epoch e counts that epoch's evaluation as the final pass."""
    run = tmp_path / "airbench"
    run.mkdir()
    config = {"step": {"id": "step9", "ref": {"timing": "train_tta"}}, "arch": {"name": "airbench94"}, "seed": 0,
              "scale": {"name": "full"}, "target_acc": 94.0}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [dict(epoch=e, test_acc=acc, train_seconds=2.0 + 10.0 * e, eval_seconds=1.5 * e, epoch_eval_seconds=1.5)
            for e, acc in ((1, 90.0), (2, 94.5), (3, 95.0))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps(dict(
        status="completed", step="step9", arch="airbench94", seed=0, scale="full", device="cpu", test_acc=95.0,
        epochs=3, train_seconds=32.0, eval_seconds=4.5, prep_seconds=2.0, final_eval_seconds=1.5)))
    runs = load_runs(tmp_path)[0].set_index("run")
    assert runs.loc["airbench", "time_s"] == pytest.approx(32.0 + 1.5)
    assert runs.loc["airbench", "time_to_target"] == pytest.approx(22.0 + 1.5)


def test_timeline_draws_the_sequel_after_post_8_on_one_normalised_axis(tmp_path):
    """The sequel gets its own header (A100, final TTA counted) after Post 8; the normalised panel puts
    the published A100 seconds on the V100 scale by Page's 26 s / 14.9 s, so one published line runs
    through both eras."""
    for i, (step, timing, ref) in enumerate([("step8", "train_only", 26.0), ("step9_0", "train_tta", 14.2),
                                              ("step10", "train_tta", 2.59)]):
        _record(tmp_path, f"{i}", step=step, arch="airbench94", timing=timing, ref_time=ref, train_s=100.0 - 30 * i)
    fig = plot_timeline(aggregate(load_runs(tmp_path)[0]), tmp_path / "t.png")
    published, measured, normalised = fig.axes
    ticks = [t.get_text() for t in published.get_yticklabels()]
    assert any(t.startswith("Sequel") and "A100" in t for t in ticks)
    assert ticks.index(next(t for t in ticks if t.startswith("Sequel"))) > ticks.index(
        next(t for t in ticks if t.startswith("Post 8")))
    line = next(ln for ln in normalised.get_lines() if ln.get_label().startswith("published"))
    values = list(line.get_xdata())
    assert values[0] == pytest.approx(1.0)  # step 8, the common step
    assert any(v == pytest.approx(14.2 * 26 / 14.9 / 26) for v in values)
