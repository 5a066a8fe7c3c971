"""Tracking through MLflow and TensorBoard, read back through their own reading APIs (MlflowClient,
EventAccumulator), and a tracker that fails never breaks a run."""
import logging
import os
import re
import subprocess
import sys

import pytest

from ablate.records import read_metrics, read_summary
from ablate.run import execute
from tests.conftest import REPO, SMOKE, make_cfg


def _mlflow_client(store):
    mlflow = pytest.importorskip("mlflow", reason="tracking=mlflow needs mlflow (pip install -e '.[mlflow]')")
    from ablate.tracking import allow_file_store

    allow_file_store(store.as_uri())  # as a user reading the local store sets MLFLOW_ALLOW_FILE_STORE=true
    return mlflow.tracking.MlflowClient(tracking_uri=store.as_uri())


def test_a_sweep_is_one_mlflow_experiment_with_one_run_per_job(tmp_path):
    """Through the command line, as a user runs it; off a terminal the epoch rows carry timestamps,
    no escape codes, and each job says where it stands in the sweep."""
    client = _mlflow_client(tmp_path / "sweep" / "mlruns")
    out = subprocess.run([sys.executable, "-m", "ablate", "run", "-m", "+step=step8", *SMOKE, "seed=0,1",
                          "tracking=mlflow", f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    [experiment] = [e for e in client.search_experiments() if e.name == "sweep"]
    runs = client.search_runs([experiment.experiment_id], order_by=["tags.seed"])
    assert [(r.data.tags["step"], r.data.tags["seed"], r.info.status) for r in runs] == \
        [("step8", "0", "FINISHED"), ("step8", "1", "FINISHED")]
    for run in runs:
        # named by how the recipe differs from its step (synthetic data here), its scale and seed
        assert run.info.run_name == f"step8 · data=synthetic · smoke · s{run.data.tags['seed']}"
        history = client.get_metric_history(run.info.run_id, "test_acc")
        record = read_summary(run.data.tags["run_dir"])
        assert [m.step for m in history] == [1, 2] and history[-1].value == pytest.approx(record["test_acc"])
        assert run.data.params["optim.update"] == "page2019" and run.data.params["batch_size"] == "512"
        assert run.data.metrics["summary.train_seconds"] == pytest.approx(record["train_seconds"])
        assert {a.path for a in client.list_artifacts(run.info.run_id, "record")} == \
            {"record/config.yaml", "record/metrics.jsonl", "record/summary.json"}
        assert record["tracking"]["mlflow_run_id"] == run.info.run_id
    from ablate.report.load import load_runs

    assert len(load_runs(tmp_path / "sweep")[0]) == 2  # the store's copies of the records are not runs
    text = out.stdout + out.stderr
    assert "\x1b" not in text
    assert len(re.findall(r"^\d\d:\d\d:\d\d +1 +\d", text, re.MULTILINE)) == 2  # each job's epoch-1 row, stamped
    assert "job 1/2 · step8 · data=synthetic · seed 0 | scale smoke" in text
    assert re.search(r"job 2/2 · step8 · data=synthetic · seed 1 · about \d+ s left \(1 done\) \| scale smoke", text)


def test_tensorboard_sees_every_epoch_and_the_config_beside_the_results(tmp_path):
    pytest.importorskip("tensorboard", reason="tracking=tensorboard needs tensorboard (pip install -e '.[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    summary = execute(make_cfg("+step=step8", *SMOKE, "tracking=tensorboard", "tta=none"), tmp_path / "run")
    [logdir] = (tmp_path / "tensorboard").iterdir()  # the run selector shows the ablation: the changes, scale, seed
    assert logdir.name == "step8 · data.source=synthetic · tta.flip=false · smoke · s0"
    assert summary["tracking"]["tensorboard_dir"] == str(logdir)
    events = EventAccumulator(str(logdir), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("test_acc")] == [1, 2]
    assert events.Scalars("test_acc")[-1].value == pytest.approx(summary["test_acc"])
    assert events.Scalars("final/test_acc")[-1].value == pytest.approx(summary["test_acc"])
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["step.id"].string_value == "step8" and start.hparams["seed"].number_value == 0
    assert start.hparams["tta.flip"].bool_value is False


def test_a_tracker_that_fails_is_reported_once_and_the_run_goes_on(tmp_path, caplog, monkeypatch):
    _mlflow_client(tmp_path)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="ablate"):  # a store that cannot be created
        summary = execute(make_cfg("+step=step4", *SMOKE, "tracking=mlflow",
                                   f"tracking.uri={(blocked / 'mlruns').as_uri()}"), tmp_path / "bad-uri")
    assert summary["status"] == "completed" and [r["epoch"] for r in read_metrics(tmp_path / "bad-uri")[0]] == [1, 2]
    assert caplog.text.count("tracking=mlflow failed") == 1 and "the run and its records go on" in caplog.text

    from ablate.tracking import MlflowTracker

    def disk_full(self, row):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(MlflowTracker, "epoch", disk_full)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ablate"):  # a failure midway: every later call is skipped
        summary = execute(make_cfg("+step=step4", *SMOKE, "tracking=mlflow"), tmp_path / "full" / "run")
    assert read_summary(tmp_path / "full" / "run")["status"] == "completed"
    assert caplog.text.count("tracking=mlflow failed (OSError: [Errno 28] No space left on device)") == 1
