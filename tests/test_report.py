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

from ablate.report import aggregate, journey_order, load_runs, plot_architectures, plot_timeline, write_report
from tests.conftest import REPO, SMOKE


def _record(root, name, step="step4", arch="resnet9", seed=0, status="completed", accs=(90.0, 94.1),
            train_s=10.0, timing="with_eval", ref_time=79.0, scale="cpu"):
    run = root / name
    run.mkdir(parents=True)
    config = {"step": {"id": step, "ref": {"time_s": ref_time, "timing": timing, "accuracy": 94.08}},
              "arch": {"name": arch}, "seed": seed, "scale": {"name": scale}, "target_acc": 94.0}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [dict(epoch=i + 1, test_acc=a, train_seconds=train_s * (i + 1) / len(accs),
                 eval_seconds=1.0 * (i + 1) / len(accs)) for i, a in enumerate(accs)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = dict(status=status, step=step, arch=arch, seed=seed, scale=scale, device="cpu",
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
    assert "![Timeline](timeline.png)" in report and "scales: cpu" in report and "| step0" in report
    assert len(pd.read_parquet(tmp_path / "rep" / "runs.parquet")) == 3


def test_timeline_has_a_pair_of_bars_per_step_in_journey_order(tmp_path):
    for i, step in enumerate(["step8", "step1", "step0", "step4"]):
        _record(tmp_path, f"{i}", step=step, train_s=50.0 / (i + 1))
    fig = plot_timeline(aggregate(load_runs(tmp_path)[0]), tmp_path / "t.png")
    ax, nax = fig.axes
    assert len(ax.patches) == 8
    assert [t.get_text() for t in nax.get_xticklabels()] == ["step0", "step1", "step4", "step8"]
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_architecture_chart_labels_every_network(tmp_path):
    names = ["backbone", "extra_l1", "residual_l1l3"]
    for i, arch in enumerate(names):
        _record(tmp_path, f"{i}", step="step4_6", arch=arch, accs=(80.0 + i,))
    fig = plot_architectures(aggregate(load_runs(tmp_path)[0]), tmp_path / "a.png")
    assert sorted(t.get_text() for t in fig.axes[0].texts) == sorted(names)


def test_journey_experiment_lists_steps_in_journey_order():
    order = journey_order()
    assert order[0] == "step0" and order[-1] == "step8" and order.index("step4_9") < order.index("step4")
    listed = yaml.safe_load((REPO / "conf/experiment/journey.yaml").read_text())
    steps = listed["hydra"]["sweeper"]["params"]["+step"].split(",")
    aliases = {"step1_4", "step3_3", "step4_10", "step8_9", "step5", "step6", "step7"}
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
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    nbclient.NotebookClient(notebook, timeout=180, resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2 and (tmp_path / "timeline.png").is_file()


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
                  "scale": {"name": "cpu"}, "target_acc": 94.0}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        # prep 2 s; each epoch 10 s of loop and 1 s of evaluation; cumulative train_seconds include prep
        rows = [dict(epoch=e, test_acc=acc, train_seconds=2.0 + 10.0 * e, eval_seconds=1.0 * e)
                for e, acc in ((1, 90.0), (2, 94.5), (3, 95.0))]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "summary.json").write_text(json.dumps(dict(
            status="completed", step="step4", arch="resnet9", seed=0, scale="cpu", device="cpu", test_acc=95.0,
            epochs=3, train_seconds=32.0, eval_seconds=3.0, prep_seconds=2.0)))

    record("posts1to4", "with_eval")
    record("post8", "train_only")
    runs = load_runs(tmp_path)[0].set_index("run")
    assert runs.loc["posts1to4", "time_s"] == pytest.approx(30.0 + 3.0)  # loop + eval, no prep
    assert runs.loc["posts1to4", "time_to_target"] == pytest.approx(20.0 + 2.0)
    assert runs.loc["post8", "time_s"] == pytest.approx(32.0)  # prep + loop, no eval
    assert runs.loc["post8", "time_to_target"] == pytest.approx(22.0)


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
