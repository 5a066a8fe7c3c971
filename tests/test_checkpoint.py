"""Checkpoints: a run killed after epoch 1 and started again ends exactly as an uninterrupted run, its
record says it resumed and what was measured before; final weights evaluate again as recorded."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from ablate.checkpoint import FINAL_FILE, RESUME_FILE
from ablate.evaluation import evaluate_run
from ablate.records import read_config, read_metrics, read_summary, record_problems
from ablate.run import execute
from tests.conftest import REPO, SMOKE, make_cfg

# What does not depend on timing: every metric of every epoch and the final results must be equal.
TIMED = {"epoch_seconds", "train_seconds", "eval_seconds", "epoch_eval_seconds", "cpu_seconds", "cpu_share",
         "load_avg", "faults_per_step"}

# Killed by SIGKILL (no clean-up at all) right after the first checkpoint is on disk.
KILL_AFTER_FIRST_CHECKPOINT = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
import ablate.checkpoint as checkpoint
from ablate.run import execute
from tests.conftest import make_cfg

save = checkpoint.save
def save_then_die(path, state):
    save(path, state)
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save = save_then_die
execute(make_cfg(*{overrides!r}), Path({run_dir!r}))
"""


def _untimed(rows):
    return [{k: v for k, v in row.items() if k not in TIMED} for row in rows]


# step 8: the device loader, Page's EMA, ghost BN, whitening, the 2019 update, flip TTA;
# step 9_7: lookahead, alternating flips, multi-crop TTA, a frozen whitening bias; step 4: the per-image loader.
# step8 stays in the default suite; the other two (10-20 s each) run with -m slow.
@pytest.mark.parametrize("step", ["step8", pytest.param("step9_7", marks=pytest.mark.slow),
                                  pytest.param("step4", marks=pytest.mark.slow)])
def test_a_run_killed_after_epoch_1_resumes_and_ends_as_an_uninterrupted_one(step, tmp_path):
    overrides = [f"+step={step}", *SMOKE, "checkpoint.every=1", "checkpoint.final=true"]
    whole = execute(make_cfg(*overrides), tmp_path / "whole")

    killed = tmp_path / "killed"
    script = KILL_AFTER_FIRST_CHECKPOINT.format(repo=str(REPO), overrides=overrides, run_dir=str(killed))
    child = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert read_summary(killed)["status"] == "running" and len(read_metrics(killed)[0]) == 1
    saved = torch.load(killed / RESUME_FILE, weights_only=True)  # tensors and plain values only
    assert saved["counters"]["epoch"] == 1

    resumed = execute(make_cfg(*overrides), killed)  # the same command, the same run directory
    for key in ("test_acc", "test_loss", "train_loss", "epochs", "epochs_trained"):
        assert resumed[key] == whole[key], key
    rows, whole_rows = read_metrics(killed)[0], read_metrics(tmp_path / "whole")[0]
    assert _untimed(rows) == _untimed(whole_rows)
    assert record_problems(killed, resumed, read_config(killed), rows) == []  # epochs 1..N, one recipe
    # The record says so, with the seconds measured before the kill (epoch 1's, preprocessing included).
    [entry] = resumed["resumed"]
    assert entry["from_epoch"] == 1 and entry["train_seconds_before"] == pytest.approx(rows[0]["train_seconds"], abs=1e-3)
    assert entry["eval_seconds_before"] == pytest.approx(rows[0]["eval_seconds"], abs=1e-3)
    assert resumed["train_seconds"] == pytest.approx(rows[-1]["train_seconds"], abs=1e-2)
    assert resumed["resumed_prep_seconds"] >= 0 and "resumed" not in whole
    assert not (killed / RESUME_FILE).exists()  # a completed run keeps only its final weights
    final_whole = torch.load(tmp_path / "whole" / FINAL_FILE, weights_only=True)["model"]
    final_resumed = torch.load(killed / FINAL_FILE, weights_only=True)["model"]
    assert all(torch.equal(final_whole[k], final_resumed[k]) for k in final_whole)


def test_final_weights_evaluate_again_as_recorded_with_or_without_tta(tmp_path, capsys):
    from ablate.evaluation import main

    summary = execute(make_cfg("+step=step8", *SMOKE, "checkpoint.final=true"), tmp_path)
    assert not (tmp_path / RESUME_FILE).exists()  # checkpoint.every=0: nothing to resume from
    again = evaluate_run(tmp_path)  # the EMA's weights, flip TTA as trained
    assert again["test_acc"] == summary["test_acc"] and again["test_loss"] == pytest.approx(summary["test_loss"])
    plain = evaluate_run(tmp_path, tta="none")
    assert (plain["flip"], again["flip"]) == (False, True) and 0 <= plain["test_acc"] <= 100
    main([str(tmp_path), "--json", "--tta", "multicrop"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["translate"] == 1 and math.isfinite(shown["test_loss"])


def test_eval_without_final_weights_says_how_to_keep_them(tmp_path):
    execute(make_cfg("+step=step4", *SMOKE), tmp_path)
    out = subprocess.run([sys.executable, "-m", "ablate", "eval", str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2 and "checkpoint.final=true" in out.stderr and "Traceback" not in out.stderr


def test_a_checkpoint_of_another_recipe_is_not_resumed(tmp_path, caplog):
    (tmp_path / "run").mkdir()
    torch.save({"counters": {"epoch": 1}, "config_key": "another recipe"}, tmp_path / "run" / RESUME_FILE)
    summary = execute(make_cfg("+step=step4", *SMOKE, "checkpoint.every=1"), tmp_path / "run")
    assert "resumed" not in summary and "saved for another recipe" in caplog.text
    assert [r["epoch"] for r in read_metrics(tmp_path / "run")[0]] == [1, 2]
