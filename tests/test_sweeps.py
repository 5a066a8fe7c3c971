"""Sweeps through Hydra's launchers (joblib, submitit), job placement, and failure safety: records
written at once by parallel jobs, killed sweeps resumed, out-of-memory, the closing summary line."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def _trainings(run_dir):
    """How many trainings of a run went to the end: ablate.run logs one line each into run.log."""
    log = run_dir / "run.log"
    return len(re.findall(r": test accuracy [\d.]+% after", log.read_text())) if log.is_file() else 0


def test_sigkill_of_a_joblib_sweeps_main_process_leaves_no_worker_and_the_rerun_trains_each_job_once(tmp_path):
    """Only the launcher is killed (not its process group): its workers must not train on without a
    parent (they die with it), and the sweep started again at once trains every job exactly once."""
    from tests.attack import alive, descendants

    sweep = tmp_path / "sweep"
    args = ["seed=0,1,2,3", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}"]
    cmd = [sys.executable, "-m", "ablate.run", "-m", "+step=step4", *SMOKE, *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240

    def running():
        return [k for k, s in _summaries(sweep).items() if s["status"] == "running"]
    workers = set()
    while not (len(_completed(sweep)) >= 2 and running()) and time.time() < deadline and proc.poll() is None:
        workers |= descendants(proc.pid)
        time.sleep(0.1)
    workers |= descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # the launcher alone
    proc.wait()
    first, killed = _completed(sweep), running()
    assert 2 <= len(first) < 4 and killed, "the sweep should be killed part way, with a job in flight"
    time.sleep(3)
    left = [pid for pid in workers if alive(pid)]
    for pid in left:  # do not leave them to the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert workers and not left, f"{len(left)} of {len(workers)} worker processes outlived the launcher by 3 s"

    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    final = _completed(sweep)
    assert sorted(s["seed"] for s in final.values()) == [0, 1, 2, 3]  # each seed exactly once
    for name, summary in final.items():
        assert _trainings(sweep / name) == 1, name
    for name, summary in first.items():  # finished jobs were not run again ...
        assert final[name]["finished"] == summary["finished"]
    for name in killed:  # ... and the killed ones ran again, in place, from the first epoch
        rows = (sweep / name / "metrics.jsonl").read_text().splitlines()
        assert final[name]["status"] == "completed" and [json.loads(r)["epoch"] for r in rows] == [1, 2]
    n_skipped = len(first)
    assert f"4 jobs: {4 - n_skipped} completed, 0 failed, {n_skipped} skipped (already completed), 0 busy" in out.stdout


def test_joblib_workers_are_tied_to_the_launcher_as_they_start():
    """Before any job reaches them (an idle worker outlived a killed launcher forever): the loky
    backend's initializer ties each worker to this process; undone, new workers are not tied."""
    import joblib

    from ablate.lifeline import tie_joblib_workers

    def tied():
        import ablate.lifeline

        return ablate.lifeline._tied
    undo = tie_joblib_workers()
    try:
        assert joblib.Parallel(n_jobs=2, backend="loky")(joblib.delayed(tied)() for _ in range(2)) == [True, True]
    finally:
        undo()
    from joblib.externals.loky import get_reusable_executor
    get_reusable_executor().shutdown(wait=True)  # the next executor starts new workers
    assert joblib.Parallel(n_jobs=2, backend="loky")(joblib.delayed(tied)() for _ in range(2)) == [False, False]
    get_reusable_executor().shutdown(wait=True)


def test_concurrent_sweeps_into_one_directory_train_every_run_once_each_recipe_in_its_own_directory(tmp_path):
    """Three sweeps started together into one directory: the same sweep twice, and another recipe
    (flip TTA) with the same step and seeds. Each run is trained once, in a directory named for its
    recipe, with its own summary; every metrics file holds epochs 1, 2; the closing lines add up."""
    from ablate.records import DIR_KEY_CHARS, config_key, read_config, recipe_key

    sweep = tmp_path / "sweep"
    base = [sys.executable, "-m", "ablate.run", "-m", "+step=step4", *SMOKE, "seed=0,1", f"hydra.sweep.dir={sweep}"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in (base, base, base + ["tta=flip"])]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-2000:] for _, e in outs]
    summaries = _summaries(sweep)
    assert len(summaries) == 4 and all(s["status"] == "completed" for s in summaries.values())
    for name, summary in summaries.items():
        config = read_config(sweep / name)
        assert name.endswith("_" + recipe_key(config)[:DIR_KEY_CHARS])  # the directory names its recipe
        assert summary["config_key"] == config_key(config)  # ... and holds that recipe's results
        assert _trainings(sweep / name) == 1, name
        rows = (sweep / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["epoch"] for r in rows] == [1, 2], name
    assert sorted((s["seed"], read_config(sweep / n)["tta"]["flip"]) for n, s in summaries.items()) == \
        [(0, False), (0, True), (1, False), (1, True)]
    lines = [re.search(r"(\d+) jobs: (\d+) completed, (\d+) failed, (\d+) skipped \(already completed\), "
                       r"(\d+) busy", o).groups() for o, _ in outs]
    counts = [tuple(map(int, line)) for line in lines]
    assert all(n == 2 and failed == 0 and done + skipped + busy == 2 for n, done, failed, skipped, busy in counts)
    assert counts[2][1] == 2  # the other recipe trained both of its runs
    assert counts[0][1] + counts[1][1] == 2  # the identical sweeps trained each of theirs once between them
    assert "Traceback" not in "".join(o + e for o, e in outs)


def test_a_run_held_by_another_process_is_busy_and_not_trained(tmp_path):
    """The run directory's lock, or (in a sweep) the recipe's: either held means another live process
    trains this run, and the job leaves it alone, writing nothing."""
    from ablate.locks import Busy, try_lock
    from ablate.records import config_key

    cfg = make_cfg("+step=step4", *SMOKE)
    held = try_lock(tmp_path / "0" / ".lock")
    with pytest.raises(Busy, match=f"{tmp_path / '0'} is being trained by pid {os.getpid()}"):
        execute(cfg, tmp_path / "0")
    held.release()
    key = config_key(OmegaConf.to_container(cfg, resolve=True))
    held = try_lock(tmp_path / ".ablate_locks" / f"{key}.lock")  # the same recipe, another directory
    with pytest.raises(Busy, match=f"the recipe of {tmp_path / '1'}"):
        execute(cfg, tmp_path / "1", resume_in=tmp_path)
    held.release()
    assert not list(tmp_path.glob("*/summary.json"))


def test_temporary_files_of_killed_writers_are_removed_under_the_locks(tmp_path):
    """A run directory's and a dead invocation's stale *.tmp go when the next holder starts; a live
    invocation's stay (its jobs may be writing them)."""
    from ablate.sweep import start_invocation

    cfg = make_cfg("+step=step4", *SMOKE)
    execute(cfg, tmp_path / "0")
    stale = tmp_path / "0" / ".summary.json.abc123.tmp"
    stale.write_text("{")  # what a job killed inside write_atomic leaves
    os.utime(stale, (time.time() - 60,) * 2)
    assert execute(cfg, tmp_path / "0", resume_in=tmp_path)["skipped"]  # the sweep again: nothing trains ...
    assert not stale.exists()  # ... but the run's lock is taken, and the stale file goes

    dead, dead_lock = start_invocation(tmp_path)
    live, live_lock = start_invocation(tmp_path)
    dead_lock.release()
    temps = [tmp_path / ".ablate_jobs" / name / ".3.json.x.tmp" for name in (dead, live)]
    for t in temps:
        t.write_text("{")
        os.utime(t, (time.time() - 60,) * 2)
    start_invocation(tmp_path)
    assert [t.exists() for t in temps] == [False, True]
    live_lock.release()


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
    held[1].release()  # a worker that ends (or is killed) frees its GPU
    assert claim_gpu(2, preferred=0, lock_dir=tmp_path) == (1, True)
    sweep_module._claimed_gpu[1].release()
    other[1].release()


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


def test_sweep_summary_counts_only_its_own_invocations_jobs(tmp_path):
    """Two invocations in one sweep directory: neither clears nor overwrites the other's outcomes (the
    same job numbers), and each closing line counts its own jobs. Runs left 'running' by others are
    told apart by their lock: held (in progress elsewhere) or free (killed)."""
    from ablate.locks import try_lock
    from ablate.records import RunRecord
    from ablate.sweep import start_invocation, write_outcome

    cfg = {"step": {"id": "step4"}, "arch": {"name": "resnet9"}, "seed": 0, "scale": {"name": "smoke"},
           "precision": {"name": "fp32"}}
    first, first_lock = start_invocation(tmp_path)
    for job in range(3):
        write_outcome(tmp_path, job, {"status": "completed", "run_dir": str(tmp_path / f"a{job}")}, first)
    second, _ = start_invocation(tmp_path)  # started while the first is live
    for job, status in enumerate(["completed", "skipped", "failed", "busy"]):
        write_outcome(tmp_path, job, {"status": status, "run_dir": str(tmp_path / f"{job}"),
                                      "failure": "diverged", "error": "Diverged: loss nan\nmore"}, second)
    RunRecord(tmp_path / "old", cfg)  # a record some earlier killed job left running
    RunRecord(tmp_path / "live", cfg)  # ... and one that a live process is training
    live = try_lock(tmp_path / "live" / ".lock")
    lines, failed = summarise_sweep(tmp_path, second)
    assert [o["job"] for o in failed] == [2]
    assert lines[0] == (f"ablate sweep {tmp_path}: 4 jobs: 1 completed, 1 failed, 1 skipped (already completed), "
                        "1 busy (being trained by another live process); 1 other run(s) left incomplete "
                        "(status running: killed?); 1 other run(s) in progress in other processes")
    assert lines[1:] == [f"  failed: job 2 ({tmp_path / '2'}): diverged: Diverged: loss nan"]
    assert summarise_sweep(tmp_path, first)[0][0].startswith(f"ablate sweep {tmp_path}: 3 jobs: 3 completed, 0 failed")
    live.release()
    first_lock.release()


def test_callback_exit_status_and_tolerated_failure_kinds(tmp_path, capsys):
    from ablate.sweep import INVOCATION_ENV, SweepCallback, write_outcome

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    callback = SweepCallback(tolerate=["diverged"])
    before = os.environ.get(INVOCATION_ENV)
    callback.on_multirun_start(config)
    assert os.environ[INVOCATION_ENV] == callback.invocation  # how the jobs find their outcome directory
    write_outcome(tmp_path, 0, {"status": "completed", "run_dir": str(tmp_path / "0")})
    write_outcome(tmp_path, 1, {"status": "failed", "failure": "diverged", "run_dir": str(tmp_path / "1")})
    callback.on_multirun_end(config)  # expected by the study: exit 0
    assert os.environ.get(INVOCATION_ENV) == before  # the environment is left as it was
    callback.tolerate = set()
    with pytest.raises(SystemExit) as exit_:
        callback.on_multirun_end(config)
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
    # And as the recipe was then: fp16 on a CPU ran as fp32, the default before precision.cpu_half=auto.
    out = subprocess.run([sys.executable, "-m", "ablate.run", "-m", "+step=step8", "scale=smoke", "data=synthetic",
                          "progress=false", "seed=0,1", "precision.cpu_half=fp32", f"hydra.sweep.dir={sweep}"],
                         cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 jobs: 0 completed, 0 failed, 2 skipped" in out.stdout + out.stderr
    # The jobs' own directories (named with the config key today) held nothing but Hydra's files: gone.
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".")) == [
        "0_step8_resnet9_smoke_s0", "1_step8_resnet9_smoke_s1", "multirun.yaml"]


def test_only_a_job_directory_without_records_is_removed(tmp_path):
    """A skipped job's directory goes when it holds Hydra's files alone; one with anything else
    (a record, a checkpoint, a file the user put there) stays as it is."""
    from ablate.sweep import remove_unused_job_dir

    def job_dir(name: str, *extra: str) -> Path:
        d = tmp_path / name
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "config.yaml").write_text("seed: 0\n")
        (d / "run.log").write_text("step8 seed 0: already completed in ..., not run again\n")
        (d / ".lock").write_text("")
        for f in extra:
            (d / f).write_text("{}")
        return d

    assert remove_unused_job_dir(job_dir("stub")) and not (tmp_path / "stub").exists()
    for kept in ("summary.json", "metrics.jsonl", "checkpoint.pt", "notes.txt"):
        d = job_dir(f"with_{kept}", kept)
        assert not remove_unused_job_dir(d) and (d / kept).is_file() and (d / ".hydra" / "config.yaml").is_file()
    assert not remove_unused_job_dir(tmp_path / "missing")
