"""End to end: the command line, records, errors, and a short run on real data."""
import json
import os
import subprocess
import sys

import pytest

from ablate.device import cpu_native_bf16
from ablate.records import read_summary
from ablate.run import execute
from tests.conftest import DATA, REPO, SMOKE, make_cfg, needs_data

SUMMARY_KEYS = {"status", "step", "arch", "seed", "scale", "precision_used", "device", "test_acc",
                "train_seconds", "eval_seconds", "epochs", "params", "torch_version", "git_commit"}


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "ablate.run", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_smoke_step4_writes_complete_records(tmp_path):
    summary = execute(make_cfg("+step=step4", *SMOKE), tmp_path)
    assert SUMMARY_KEYS <= set(summary)
    assert summary["status"] == "completed" and summary["precision_used"] == ("bf16" if cpu_native_bf16() else "fp32")
    assert summary["train_seconds"] > 0 and summary["eval_seconds"] > 0 and summary["params"] > 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["train_seconds"] == pytest.approx(summary["train_seconds"], abs=1e-2)
    assert (tmp_path / "config.yaml").is_file()


def test_a_failing_run_is_recorded_as_failed(tmp_path, monkeypatch):
    import ablate.train

    def explode(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(ablate.train, "evaluate", explode)
    with pytest.raises(RuntimeError):
        execute(make_cfg("+step=step4", *SMOKE), tmp_path)
    summary = read_summary(tmp_path)
    assert summary["status"] == "failed" and "boom" in summary["error"]


@pytest.mark.parametrize("arg, expected", [("batch=oops", "Available options in 'batch'"),
                                           ("arch=nosuch", "Available options in 'arch'")])
def test_cli_bad_choice_fails_before_training_naming_choices(arg, expected, tmp_path):
    out = _cli("+step=step4", arg, f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0
    assert expected in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "summary.json").exists()


def test_cli_missing_data_root_says_where_it_looked(tmp_path):
    missing = tmp_path / "nowhere"
    out = _cli("+step=step4", "scale=smoke", f"data.root={missing}", "data.download=false",
               f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 2
    assert str(missing) in out.stderr and "ABLATE_DATA" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_impossible_value_fails_before_training(tmp_path):
    out = _cli("+step=step8", "norm.splits=3", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2 and "norm.splits=3 does not divide batch_size=512" in out.stderr
    assert not (tmp_path / "summary.json").exists()


@needs_data
def test_smoke_step4_on_real_data_from_the_command_line(tmp_path, cache_dir):
    out = _cli("+step=step4", "scale=smoke", f"hydra.run.dir={tmp_path}",
               env={"ABLATE_DATA": str(DATA), "ABLATE_CACHE": str(cache_dir)})
    assert out.returncode == 0, out.stderr[-2000:]
    summary = read_summary(tmp_path)
    assert summary["status"] == "completed" and summary["scale"] == "smoke"
    assert "test acc" in out.stdout + out.stderr


@needs_data
def test_short_real_training_beats_chance_by_a_wide_margin(tmp_path, cache_dir):
    """Two epochs of the step-4 recipe at smoke width on 10k real images: far above chance (10%).
    (Not step 8: on so few steps its EMA copy stays close to the initial weights, design.md Scales.)"""
    cfg = make_cfg("+step=step4", "scale=smoke", "scale.train_size=10000", "scale.test_size=2000",
                   f"data.root={DATA}", f"data.cache_dir={cache_dir}", "progress=false")
    summary = execute(cfg, tmp_path)
    assert summary["test_acc"] > 30.0, summary


def test_resume_never_takes_a_record_of_another_precision_or_layout(tmp_path):
    """fp16 asked on a CPU may have run as fp32 or bf16, and a layout left to the device differs
    between a CPU and a GPU: a completed record is reused only for the same precision and layout.
    Records from before the layout was recorded count as the layout their config named."""
    from omegaconf import OmegaConf

    from ablate.records import config_key
    from ablate.sweep import find_completed, formats_used

    cfg = make_cfg("+step=step4", *SMOKE)
    execute(cfg, tmp_path / "0")
    key = config_key(OmegaConf.to_container(cfg, resolve=True))
    here = formats_used(cfg)
    native = "bf16" if cpu_native_bf16() else "fp32"
    assert here == {"precision_used": native, "channels_last": True}  # on this CPU, at the defaults
    assert find_completed(key, tmp_path, here) == tmp_path / "0"
    assert find_completed(key, tmp_path, dict(here, precision_used={"bf16": "fp32", "fp32": "bf16"}[native])) is None
    assert find_completed(key, tmp_path, dict(here, channels_last=False)) is None
    summary = read_summary(tmp_path / "0")
    del summary["channels_last"]  # a record written before the layout was recorded: config says None
    (tmp_path / "0" / "summary.json").write_text(json.dumps(summary))
    assert find_completed(key, tmp_path, dict(here, channels_last=False)) == tmp_path / "0"


def test_demo_runs_the_final_recipe_and_reports_it_beside_the_committed_journey(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    out = subprocess.run([sys.executable, "-m", "ablate.demo", "scale=smoke", "data=synthetic", "progress=false"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "running step8 at scale=smoke" in out.stdout and "beside the committed journey" in out.stdout
    (demo,) = (tmp_path / "runs" / "demo").iterdir()
    report = (demo / "report" / "REPORT.md").read_text()
    assert f"{demo.name}/report/REPORT.md" in out.stdout and f"{demo.name}/report/report.html" in out.stdout
    if (demo / "report" / "timeline.png").is_file():  # drawn once the pooled records hold two steps
        assert f"{demo.name}/report/timeline.png" in out.stdout
    assert "| run/." in report  # the demo's own run ...
    journey = [p.parent.name for p in (REPO / "experiments" / "journey-cpu" / "runs").glob("*/summary.json")]
    assert any(f"| runs/{name}" in report for name in journey)  # ... pooled with the committed journey's
