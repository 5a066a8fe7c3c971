"""Sweeps through Hydra's launchers (joblib, submitit), job placement, and failure safety: records
written at once by parallel jobs, killed sweeps resumed, out-of-memory, the closing summary line."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from ablate.compose import compose
import ablate.run as run
import ablate.sweep as sweep_module
from ablate.records import read_summary
from ablate.run import execute, failure_kind
from ablate.sweep import claim_gpu, joblib_jobs, place_job, summarise_sweep
from tests.conftest import REPO, SMOKE, make_cfg

pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install 'ablate[parallel]'")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'ablate[slurm]'")


def _sweep(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ablate.run", "-m", "+step=step4", *SMOKE, *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _summaries(sweep):
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}


def _completed(sweep):
    return {k: s for k, s in _summaries(sweep).items() if s["status"] == "completed"}


def test_joblib_jobs_write_their_records_at_once_and_lose_nothing(tmp_path):
    sweep = tmp_path / "sweep"
    out = _sweep("seed=0,1,2,3", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr[-3000:]
    done = _completed(sweep)
    assert sorted(s["seed"] for s in done.values()) == [0, 1, 2, 3]
    assert len({s["config_key"] for s in done.values()}) == 4
    assert {s["torch_threads"] for s in done.values()} == {max(1, sweep_module.cpu_count() // 2)}
    for name in done:  # every epoch row of every run, no half-written or temporary file left
        rows = (sweep / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["epoch"] for r in rows] == [1, 2]
    assert not list(sweep.rglob("*.tmp"))
    assert "4 jobs: 4 completed, 0 failed, 0 skipped" in out.stdout


def test_submitit_local_sweep_records_a_failure_and_exits_non_zero(tmp_path):
    """Jobs in their own processes (submitit): the failing one is recorded, the other completes, and
    the closing line, read from disk in the launching process, counts both."""
    sweep = tmp_path / "sweep"
    out = _sweep("data.synthetic_size=0,1024", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}")
    assert out.returncode == 1, out.stderr[-3000:]
    summaries = _summaries(sweep)
    assert sorted(s["status"] for s in summaries.values()) == ["completed", "failed"]
    failed = next(s for s in summaries.values() if s["status"] == "failed")
    assert failed["failure"] == "data" and "synthetic_size=0" in failed["error"]
    assert {s["torch_threads"] for s in summaries.values()} == {1}
    assert "2 jobs: 1 completed, 1 failed, 0 skipped" in out.stdout
    assert "failed: job 0" in out.stdout and "Traceback" not in out.stdout + out.stderr


def test_killed_joblib_sweep_resumes_and_runs_every_job_exactly_once(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["seed=0,1,2,3", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}"]
    cmd = [sys.executable, "-m", "ablate.run", "-m", "+step=step4", *SMOKE, *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240

    def running():
        return [k for k, s in _summaries(sweep).items() if s["status"] == "running"]
    while not (len(_completed(sweep)) >= 2 and running()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers die at once, as on a lost node
    proc.wait()
    first, killed = _completed(sweep), running()
    assert 2 <= len(first) < 4 and killed, "the sweep should be killed part way, with a job in flight"

    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    final = _completed(sweep)
    assert sorted(s["seed"] for s in final.values()) == [0, 1, 2, 3]  # each seed exactly once
    for name, summary in first.items():  # finished jobs were not run again ...
        assert final[name]["finished"] == summary["finished"]
    for name in killed:  # ... and the killed ones ran again, in place, from the first epoch
        rows = (sweep / name / "metrics.jsonl").read_text().splitlines()
        assert final[name]["status"] == "completed" and [json.loads(r)["epoch"] for r in rows] == [1, 2]
    n_skipped = len(first)
    assert f"4 jobs: {4 - n_skipped} completed, 0 failed, {n_skipped} skipped" in out.stdout


def test_out_of_memory_is_recorded_with_advice_and_the_sweep_goes_on(tmp_path):
    """train() raises torch.OutOfMemoryError for seed 0 only (patched in the sweep's own process)."""
    sweep = tmp_path / "sweep"
    script = f"""
import sys, torch, ablate.run as r
real = r.train
def train(cfg, **kw):
    if cfg.seed == 0:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return real(cfg, **kw)
r.train = train
sys.argv = ["ablate.run", "-m", "+step=step4", *{SMOKE!r}, "seed=0,1", "hydra.sweep.dir={sweep}"]
r.main()
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    by_seed = {s["seed"]: s for s in _summaries(sweep).values()}
    assert by_seed[1]["status"] == "completed"
    oom = by_seed[0]
    assert oom["status"] == "failed" and oom["failure"] == "out_of_memory"
    assert "OutOfMemoryError" in oom["error"] and "batch size" in oom["hint"]
    assert "ran out of memory" in out.stderr and "batch_size=256" in out.stderr
    assert "Traceback" not in out.stderr
    assert "2 jobs: 1 completed, 1 failed, 0 skipped" in out.stdout and "out_of_memory" in out.stdout


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"), MemoryError(),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried")])
def test_execute_records_out_of_memory(tmp_path, monkeypatch, error):
    def train(*args, **kwargs):
        raise error
    monkeypatch.setattr(run, "train", train)
    with pytest.raises(type(error)):
        execute(make_cfg("+step=step4", *SMOKE), tmp_path)
    summary = read_summary(tmp_path)
    assert summary["status"] == "failed" and summary["failure"] == "out_of_memory" and "scale" in summary["hint"]


def test_failure_kinds():
    from ablate.config import ConfigError
    from ablate.data import DataError
    from ablate.train import Diverged
    assert [failure_kind(e) for e in (ConfigError("x"), DataError("x"), Diverged("x"), ValueError("x"),
                                      KeyboardInterrupt())] == ["invalid_config", "data", "diverged",
                                                                "error", "interrupted"]


# --------------------------------------------------------------------------------------------------
# Placement


def test_joblib_jobs_counts_like_joblib():
    assert [joblib_jobs(n, 8) for n in (2, -1, -2, None, 16)] == [2, 8, 7, 1, 16]


@pytest.mark.parametrize("launcher, threads", [
    ({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 2}, "half"),
    ({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"}, 1),
    ({"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "cpus_per_task": 3}, 3),
    ({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, None),
])
def test_place_job_shares_the_cpu_threads(launcher, threads):
    before = torch.get_num_threads()
    try:
        facts = place_job(OmegaConf.create({"launcher": launcher, "job": {"num": 3}}), OmegaConf.create({"device": "cpu"}))
        expected = max(1, sweep_module.cpu_count() // 2) if threads == "half" else threads
        assert facts.get("torch_threads") == expected and "cuda_index" not in facts
        assert torch.get_num_threads() == (expected or before)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device, pinned", [("auto", True), ("cuda", True), ("cuda:1", False), ("cpu", False)])
def test_place_job_makes_the_claimed_gpu_current(monkeypatch, device, pinned):
    """No GPU here: torch.cuda is faked to show two, and set_device is recorded, not called."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(sweep_module, "claim_gpu", lambda n, preferred: ((preferred + 1) % n, True))
    hydra_cfg = OmegaConf.create({"launcher": {"_target_": "x.BasicLauncher"}, "job": {"num": 4}})
    facts = place_job(hydra_cfg, OmegaConf.create({"device": device}))
    placed = {"cuda_index": 1, "gpu_shared": False, "jobs_per_gpu": 1}
    assert (calls, facts) == (([1], placed) if pinned else ([], {}))


@pytest.mark.parametrize("gpus, n_jobs, shared, per_gpu", [(1, 2, True, 2), (2, 2, False, 1), (2, 3, True, 2)])
def test_parallel_jobs_on_one_gpu_are_recorded_as_shared(monkeypatch, gpus, n_jobs, shared, per_gpu):
    """joblib with more parallel jobs than GPUs trains several jobs on one GPU at once: the record
    says so (gpu_shared, jobs_per_gpu), so the report can keep those seconds out of its times."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(sweep_module, "claim_gpu", lambda n, preferred: (0, True))
    before = torch.get_num_threads()
    try:
        hydra_cfg = OmegaConf.create({"launcher": {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": n_jobs},
                                      "job": {"num": 0}})
        facts = place_job(hydra_cfg, OmegaConf.create({"device": "auto"}))
    finally:
        torch.set_num_threads(before)
    assert (facts["gpu_shared"], facts["jobs_per_gpu"]) == (shared, per_gpu)


def test_each_process_claims_a_gpu_of_its_own(tmp_path, monkeypatch, caplog):
    """flock locks are per open file, so claims in one process stand for claims of separate workers."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    monkeypatch.setattr(sweep_module, "_claimed_gpu", None)
    assert claim_gpu(2, preferred=1, lock_dir=tmp_path) == (1, True)  # job 1 first: its own GPU, 1
    assert claim_gpu(2, preferred=0, lock_dir=tmp_path) == (1, True)  # the same worker keeps it for later jobs
    held = sweep_module._claimed_gpu
    monkeypatch.setattr(sweep_module, "_claimed_gpu", None)  # another worker: GPU 1 (physical 6) is held
    assert claim_gpu(2, preferred=1, lock_dir=tmp_path) == (0, True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-4.lock", "gpu-6.lock"]
    other = sweep_module._claimed_gpu
    monkeypatch.setattr(sweep_module, "_claimed_gpu", None)  # a third worker on two GPUs: shares, and says so
    assert claim_gpu(2, preferred=1, lock_dir=tmp_path) == (1, False) and "shares GPU 1" in caplog.text
    held[1].close()  # a worker that ends (or is killed) frees its GPU
    assert claim_gpu(2, preferred=0, lock_dir=tmp_path) == (1, True)
    sweep_module._claimed_gpu[1].close()
    other[1].close()


# --------------------------------------------------------------------------------------------------
# Configuration


def test_slurm_example_config_renders_the_expected_sbatch_lines(tmp_path, monkeypatch):
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = compose(["hydra/launcher=slurm_example", "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path}",
                   "hydra.job.name=run"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_").endswith("SlurmLauncher")
    # What the plugin's launch() does with these parameters, up to the sbatch file (no cluster here).
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    sbatch = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for line in ("--gpus-per-node=1", "--cpus-per-task=8", "--ntasks-per-node=1", "--partition=gpu",
                 "--time=30", "--mem=32GB"):
        assert f"#SBATCH {line}\n" in sbatch
    assert executor._executor.parameters["array_parallelism"] == 16


def test_sweep_summary_counts_this_invocations_jobs(tmp_path):
    from ablate.records import RunRecord
    from ablate.sweep import clear_outcomes, write_outcome

    cfg = {"step": {"id": "step4"}, "arch": {"name": "resnet9"}, "seed": 0, "scale": {"name": "smoke"},
           "precision": {"name": "fp32"}}
    write_outcome(tmp_path, 0, {"status": "completed", "run_dir": str(tmp_path / "0")})
    clear_outcomes(tmp_path)  # a new invocation forgets the last one's outcomes
    for job, status in enumerate(["completed", "skipped", "failed", "completed"]):
        write_outcome(tmp_path, job + 8, {"status": status, "run_dir": str(tmp_path / f"{job}"),
                                          "failure": "diverged", "error": "Diverged: loss nan\nmore"})
    RunRecord(tmp_path / "old", cfg)  # a record some earlier killed job left running
    lines, failed = summarise_sweep(tmp_path)
    assert [o["job"] for o in failed] == [10]
    assert lines[0] == (f"ablate sweep {tmp_path}: 4 jobs: 2 completed, 1 failed, 1 skipped (already completed); "
                        "1 other run(s) left incomplete (status running: killed?)")
    assert lines[1:] == [f"  failed: job 10 ({tmp_path / '2'}): diverged: Diverged: loss nan"]


def test_callback_exit_status_and_tolerated_failure_kinds(tmp_path, capsys):
    from ablate.sweep import SweepCallback, write_outcome

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    SweepCallback().on_multirun_start(config)
    write_outcome(tmp_path, 0, {"status": "completed", "run_dir": str(tmp_path / "0")})
    write_outcome(tmp_path, 1, {"status": "failed", "failure": "diverged", "run_dir": str(tmp_path / "1")})
    SweepCallback(tolerate=["diverged"]).on_multirun_end(config)  # expected by the study: exit 0
    with pytest.raises(SystemExit) as exit_:
        SweepCallback().on_multirun_end(config)
    assert exit_.value.code == 1
    assert "2 jobs: 1 completed, 1 failed, 0 skipped" in capsys.readouterr().out


def test_a_sweep_dir_from_before_the_restructure_resumes_with_nothing_rerun(tmp_path):
    """tests/data/sweep_before_restructure was written by the commit before the modules moved
    (25d6f3e: `-m +step=step8 scale=smoke data=synthetic progress=false seed=0,1`). The same sweep
    started on today's code finds both runs completed and trains nothing."""
    import shutil

    sweep = tmp_path / "sweep"
    shutil.copytree(REPO / "tests" / "data" / "sweep_before_restructure", sweep)
    # As when the records were written: no ABLATE_DATA (data.root is part of a recipe's key).
    env = {k: v for k, v in os.environ.items() if k not in ("ABLATE_DATA", "ABLATE_CACHE")}
    out = subprocess.run([sys.executable, "-m", "ablate.run", "-m", "+step=step8", "scale=smoke", "data=synthetic",
                          "progress=false", "seed=0,1", f"hydra.sweep.dir={sweep}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 jobs: 0 completed, 0 failed, 2 skipped" in out.stdout + out.stderr
