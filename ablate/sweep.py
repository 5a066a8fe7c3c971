"""Sweeps: where each job runs, which jobs already completed, and what the sweep did.

* The jobs of a sweep (``sweep_jobs``), as Hydra's basic sweeper expands them: ``ablate plan`` lists
  them, and each job's progress line says where it stands (``job_progress``: job 3/15, time left).
* Job placement (``place_job``): a job of a parallel sweep takes its share of the CPU threads and
  claims a GPU of its own when it can, and its record says when a GPU was shared.
* One training per run (``hold_run``): a job holds its run directory's lock and, in a sweep, its
  recipe's lock for its whole life, and asks under them whether the recipe already completed; a run
  held by another live process is ``busy`` and left to it.
* Resume (``find_completed``): a recipe that already completed in the sweep directory, in the same
  precision and layout, is not run again, and the skipped job's empty directory goes
  (``remove_unused_job_dir``).
* Outcomes (``write_outcome``, ``SweepCallback``): each job leaves a one-line outcome in its own sweep
  invocation's ``<sweep dir>/.ablate_jobs/<invocation>/``; the callback prints the closing summary
  of its own jobs and sets the exit status.
* No orphans (``ablate.lifeline``): the callback ties joblib's workers to the launcher as they
  start, so that they end with it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ablate.device import cpu_count, resolve_channels_last, resolve_device, resolve_precision
from ablate.lifeline import LAUNCHER_PID_ENV, tie_joblib_workers
from ablate.progress import duration
from ablate.locks import Busy, Lock, holder, is_held, remove_stale_temps, try_lock
from ablate.records import (SUMMARY, config_key, read_config, read_metrics, read_summary, record_problems,
                            share_readable, to_json, writable_dir_problem, write_atomic)

log = logging.getLogger("ablate")

# <sweep dir>/.ablate_jobs/<invocation>/<job number>.json: what each job of one sweep invocation did.
# The invocation's name reaches its jobs (other processes, other machines) in the environment.
JOBS = ".ablate_jobs"
INVOCATION_ENV = "ABLATE_SWEEP_ID"
RUN_LOCK = ".lock"  # <run dir>/.lock: held by the process training the run
RECIPE_LOCKS = ".ablate_locks"  # <sweep dir>/.ablate_locks/<config key>.lock: one training per recipe


# --------------------------------------------------------------------------------------------------
# Resume


def formats_used(cfg: DictConfig) -> dict:
    """The precision and memory layout this recipe runs in on this machine (``ablate.device``)."""
    device = resolve_device(cfg.device)
    return dict(precision_used=resolve_precision(cfg.precision.name, device, cfg.precision.cpu_half).name,
                channels_last=resolve_channels_last(cfg.precision.channels_last, device))


def _recorded_formats(summary: dict, config: dict) -> dict:
    # Records from before the layout was recorded ran the layout their config named (false or true).
    layout = summary.get("channels_last", bool(config.get("precision", {}).get("channels_last")))
    return dict(precision_used=summary.get("precision_used"), channels_last=layout)


# summary.json path -> (its mtime, the record's key and formats when completed, else None). The key
# of a record is computed once per process, so looking up every job of a sweep stays linear.
_completed_cache: dict[Path, tuple[int, tuple[str, dict] | None]] = {}


def _completed_key(summary_path: Path) -> tuple[str, dict] | None:
    """(config key, formats) of the completed record at ``summary_path``; None when not completed."""
    try:
        stamp = summary_path.stat().st_mtime_ns
    except OSError:
        return None
    cached = _completed_cache.get(summary_path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    summary, config = read_summary(summary_path.parent), read_config(summary_path.parent)
    done = None
    # A directory whose files disagree (a summary of another recipe, metrics of two trainings) is
    # not taken for a completed run of either: the report leaves it out too.
    if (summary and summary.get("status") == "completed" and config
            and not record_problems(summary_path.parent, summary, config, read_metrics(summary_path.parent)[0])):
        # The key is recomputed from the recorded config: records older than a schema field match.
        done = (config_key(config), _recorded_formats(summary, config))
    _completed_cache[summary_path] = (stamp, done)
    return done


def find_completed(key: str, sweep_dir: Path, formats: dict | None = None) -> Path | None:
    """A run directory of ``sweep_dir`` that already completed the recipe with this config key and,
    when ``formats`` is given, ran in that precision and layout (``fp16`` on a CPU may have run as
    fp32 or bf16, and ``channels_last`` left to the device resolves differently on a CPU and a GPU:
    a record of one is never taken for a run of another)."""
    for path in sorted(Path(sweep_dir).glob(f"*/{SUMMARY}")):
        done = _completed_key(path)
        if done is not None and done[0] == key and (formats is None or done[1] == formats):
            return path.parent
    return None


# --------------------------------------------------------------------------------------------------
# One training per run


@contextlib.contextmanager
def hold_run(run_dir: Path, key: str | None = None, sweep_dir: Path | None = None) -> Iterator[Lock]:
    """Hold the run's lock (``<run dir>/.lock``) and, with ``sweep_dir`` and ``key``, the recipe's
    lock in the sweep directory (``.ablate_locks/<config key>.lock``) while the block runs. Raises
    ``Busy`` naming the holder when another live process holds either: the run directory (two jobs of
    one name, say two identical sweeps), or the recipe (two sweeps that number the same recipe and
    seed differently, so that it lands in two directories). The kernel drops both locks when the
    process ends, however it ends. Holding them, the caller asks whether the recipe already completed,
    and temporary files a killed writer left in the run directory are removed on entry."""
    run_dir = Path(run_dir)
    paths = [run_dir / RUN_LOCK]
    if sweep_dir is not None and key:
        paths.append(Path(sweep_dir) / RECIPE_LOCKS / f"{key}.lock")
    with contextlib.ExitStack() as stack:
        held = []
        for path in paths:
            lock = try_lock(path)
            if lock is None:
                what = run_dir if path.parent == run_dir else f"the recipe of {run_dir} (config key {key})"
                raise Busy(f"{what} is being trained by {holder(path)} (lock {path}); it is not trained twice")
            held.append(stack.enter_context(lock))
        remove_stale_temps(run_dir, before=held[0].since)
        yield held[0]


# What Hydra itself puts in a job's directory before the job runs: its composed config, the job's log
# and the run lock hold_run takes. A directory holding nothing else has no record of any run.
HYDRA_ONLY = {".hydra", RUN_LOCK}


def remove_unused_job_dir(run_dir: Path) -> bool:
    """Remove a skipped job's directory when it holds only what Hydra made for it (``HYDRA_ONLY`` and
    its ``*.log``): the recipe completed in another directory (a record named before the directory
    names carried the config key, or numbered otherwise by another sweep), so a resumed sweep leaves
    no empty run directories beside its records. True when removed; never touches a record."""
    run_dir = Path(run_dir)
    try:
        names = {p.name for p in run_dir.iterdir()}
    except OSError:
        return False
    if not names or any(n not in HYDRA_ONLY and not n.endswith(".log") for n in names):
        return False
    try:
        shutil.rmtree(run_dir)  # leaving the directory behind is harmless: the job stays skipped
    except OSError as err:
        log.warning("could not remove the unused job directory %s (%s)", run_dir, err)
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Job placement: which GPU and how many CPU threads a sweep job gets


def joblib_jobs(n_jobs: int | None, cpus: int) -> int:
    """How many jobs joblib runs at once for ``n_jobs`` (-1: one per CPU, -2: all but one, ...)."""
    if n_jobs is None or n_jobs == 0:
        return 1
    return n_jobs if n_jobs > 0 else max(1, cpus + 1 + n_jobs)


def jobs_at_once(launcher: Any) -> int:
    """How many jobs of a sweep run at once on this machine with this ``hydra.launcher``: joblib's
    ``n_jobs``, submitit_local's batch; 1 for the basic launcher (and SLURM, whose jobs have nodes of their own)."""
    target = str(launcher.get("_target_", ""))
    if "joblib" in target:
        return joblib_jobs(launcher.get("n_jobs", -1), cpu_count())
    if target.endswith("LocalLauncher"):
        return int(launcher.get("array_parallelism") or 1)
    return 1


_claimed_gpu: tuple[int, Lock] | None = None  # (index, its lock) held for this process's life


def claim_gpu(n_gpus: int, preferred: int, lock_dir: Path | None = None) -> tuple[int, bool]:
    """A GPU index for this process that no other ablate process on this machine holds.

    Jobs of a parallel sweep do not finish in launch order, so ``job number % GPUs`` alone can put two
    running jobs on one GPU. Instead each process takes an exclusive lock (flock, released by the
    kernel when the process ends, even on SIGKILL) on one GPU, starting from ``preferred``, and keeps
    it for every later job it runs: a reused joblib worker stays on its GPU, with its CUDA context. When
    every GPU is held (more parallel jobs than GPUs) the job shares ``preferred`` and says so.
    Returns the index and whether this process holds it alone (False: shared, or placement by number).
    """
    global _claimed_gpu
    if _claimed_gpu is not None and _claimed_gpu[0] < n_gpus:
        return _claimed_gpu[0], True
    lock_dir = lock_dir or Path(tempfile.gettempdir()) / f"ablate-gpu-locks-{os.getuid()}"
    # Named by the physical GPU where CUDA_VISIBLE_DEVICES says which, so processes that see
    # different subsets of the machine's GPUs still agree on what is taken.
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    for i in range(n_gpus):
        k = (preferred + i) % n_gpus
        try:
            lock = try_lock(lock_dir / f"gpu-{visible[k] if k < len(visible) else k}.lock")
        except OSError as err:  # no lock directory: placement by job number, never a failed job
            log.warning("cannot use GPU lock files in %s (%s); job placed on GPU %d by its number",
                        lock_dir, err, preferred % n_gpus)
            return preferred % n_gpus, False
        if lock is None:
            continue
        _claimed_gpu = (k, lock)
        return k, True
    log.warning("all %d GPUs are held by other ablate processes: this job shares GPU %d, so its seconds "
                "are not an exclusive timing (run fewer parallel jobs, e.g. hydra.launcher.n_jobs=%d)",
                n_gpus, preferred % n_gpus, n_gpus)
    return preferred % n_gpus, False


def place_job(hydra_cfg: DictConfig, cfg: DictConfig) -> dict:
    """Give a sweep job its share of the machine before it touches a device; return what was chosen.

    CPU threads: joblib runs ``n_jobs`` jobs at once, each gets ``cpus // n_jobs`` torch threads;
    submitit gets ``cpus_per_task`` when set (submitit_local without it starts a whole batch of jobs
    at once on this machine: one thread each). The basic launcher runs one job at a time: unchanged.

    GPU: with several GPUs visible and ``device`` left to choose (auto or cuda), the job's process
    claims one (``claim_gpu``) and makes it the current device with ``torch.cuda.set_device``; the
    recipe's ``device`` stays as written, so the resume key of a run does not depend on its GPU.
    (CUDA_VISIBLE_DEVICES is not used: it only acts before CUDA starts in a process, and joblib's
    workers run many jobs each.) Under SLURM each job sees only the GPUs allocated to it.
    """
    facts: dict = {}
    launcher = hydra_cfg.launcher
    target = str(launcher.get("_target_", ""))
    threads, parallel = None, jobs_at_once(launcher)
    if "joblib" in target:
        threads = max(1, cpu_count() // parallel)
    elif "submitit" in target:
        if launcher.get("cpus_per_task"):
            threads = int(launcher.cpus_per_task)
        elif target.endswith("LocalLauncher"):
            threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
        facts["torch_threads"] = threads
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if str(cfg.device) in ("auto", "cuda") and n_gpus and (n_gpus > 1 or parallel > 1):
        index, held = claim_gpu(n_gpus, int(hydra_cfg.job.get("num") or 0))
        torch.cuda.set_device(index)
        # Jobs that train on one GPU at once slow each other down: their seconds are not exclusive
        # timings, and the record says so (the report marks them). One job per GPU is exclusive.
        per_gpu = math.ceil(parallel / n_gpus)
        facts.update(cuda_index=index, gpu_shared=per_gpu > 1 or not held, jobs_per_gpu=per_gpu)
    return facts


# --------------------------------------------------------------------------------------------------
# The jobs of a sweep, and where one job stands among them

JOB_COUNT_ENV = "ABLATE_SWEEP_JOBS"  # how many jobs the sweep invocation has, for each job's progress line
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def sweep_jobs(cfg: DictConfig, config_loader: Any = None) -> list[list[str]] | None:
    """Each job's overrides, in job-number order, of the sweep that ``cfg`` (a config composed in
    MULTIRUN mode, its ``hydra`` node kept) describes: what Hydra's basic sweeper launches, by its own
    parsing and expansion (``hydra.sweeper.params``, then the command line). None for another
    sweeper (Post 5's coordinate descent chooses each job from the results before it), or a config
    without one. ``config_loader``: the running Hydra's unless given."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if OmegaConf.select(cfg, "hydra.sweeper._target_") != BASIC_SWEEPER:
        return None
    config_loader = config_loader or GlobalHydra.instance().config_loader()
    params = [f"{k}={v}" for k, v in (cfg.hydra.sweeper.get("params") or {}).items()]
    arguments = params + list(cfg.hydra.overrides.task)
    overrides = OverridesParser.create(config_loader=config_loader).parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def job_progress(hydra_cfg: DictConfig, sweep_dir: Path) -> tuple[str, str]:
    """(``job 3/15``, ``about 6 min left (2 done)``): the job's place in its sweep invocation and, once
    jobs of it have completed, the time left (their mean duration x the jobs still to finish / the
    jobs that run at once; '' before)."""
    num, total = int(hydra_cfg.job.num), os.environ.get(JOB_COUNT_ENV)
    where = f"job {num + 1}/{total}" if total else f"job {num + 1}"
    invocation = os.environ.get(INVOCATION_ENV)
    outcomes = read_outcomes(sweep_dir, invocation) if total and invocation else []
    durations = [o["seconds"] for o in outcomes if o.get("status") == "completed" and o.get("seconds")]
    if not durations:
        return where, ""
    left = (int(total) - len(outcomes)) * (sum(durations) / len(durations)) / jobs_at_once(hydra_cfg.launcher)
    return where, f"about {duration(left)} left ({len(durations)} done)"


# --------------------------------------------------------------------------------------------------
# Sweeps: job outcomes and the closing summary. Jobs may run in other processes or on other machines
# (joblib, submitit), so they report through files in the sweep directory, never through memory. Each
# invocation of a sweep has a directory of its own, so sweeps sharing a sweep directory (one after
# another, or at once) never clear or overwrite each other's outcomes; the records stay the truth.


def start_invocation(sweep_dir: Path) -> tuple[str, Lock]:
    """A new outcome directory ``<sweep dir>/.ablate_jobs/<name>/`` for one sweep invocation, and the
    lock that marks it as live for the invocation's life. Temporary files that dead invocations left
    (their lock is free) and that are older than this one are removed."""
    jobs = Path(sweep_dir) / JOBS
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"
    lock = try_lock(jobs / name / RUN_LOCK)
    assert lock is not None, "a fresh invocation directory cannot be locked already"
    for other in [jobs, *(d for d in jobs.iterdir() if d.is_dir() and d.name != name)]:
        if other == jobs or not is_held(other / RUN_LOCK):
            remove_stale_temps(other, before=lock.since)
    return name, lock


def write_outcome(sweep_dir: Path, job: int, outcome: dict, invocation: str | None = None) -> None:
    """Record what job ``job`` of a sweep invocation (default: the one named in the environment,
    ``ABLATE_SWEEP_ID``) did: completed, skipped, busy or failed."""
    invocation = invocation or os.environ.get(INVOCATION_ENV)
    if not invocation:
        log.warning("job %s: %s is not set, so its outcome is not counted in a closing line (its record is "
                    "written all the same)", job, INVOCATION_ENV)
        return
    jobs = Path(sweep_dir) / JOBS / invocation
    jobs.mkdir(parents=True, exist_ok=True)
    write_atomic(jobs / f"{job}.json", to_json(dict(outcome, job=job)) + "\n")


def read_outcomes(sweep_dir: Path, invocation: str) -> list[dict]:
    """The outcomes the jobs of one sweep invocation wrote, in job order."""
    outcomes = []
    for path in sorted((Path(sweep_dir) / JOBS / invocation).glob("*.json")):
        try:
            outcomes.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            outcomes.append({"job": path.stem, "status": "failed", "failure": "unreadable_outcome",
                             "error": f"unreadable outcome file {path}"})
    return sorted(outcomes, key=lambda o: (len(str(o.get("job"))), str(o.get("job"))))  # 2 before 10


STATUSES = ("completed", "failed", "skipped", "busy")  # a job's outcome


def summarise_sweep(sweep_dir: Path, invocation: str) -> tuple[list[str], list[dict]]:
    """The closing lines of a sweep invocation (what its own jobs did, then each failure) and the
    outcomes of its failed jobs. Other records left 'running' are counted apart: those whose lock a
    live process holds are in progress elsewhere, the others were killed."""
    outcomes = read_outcomes(sweep_dir, invocation)
    count = {s: sum(o.get("status") == s for o in outcomes) for s in STATUSES}
    accounted = {str(Path(o["run_dir"]).resolve()) for o in outcomes if o.get("run_dir")}
    others = [p.parent for p in sorted(Path(sweep_dir).glob(f"*/{SUMMARY}"))
              if (read_summary(p.parent) or {}).get("status") == "running"
              and str(p.parent.resolve()) not in accounted]
    live = [d for d in others if is_held(d / RUN_LOCK)]
    line = (f"ablate sweep {sweep_dir}: {len(outcomes)} jobs: {count['completed']} completed, "
            f"{count['failed']} failed, {count['skipped']} skipped (already completed), "
            f"{count['busy']} busy (being trained by another live process)")
    if len(others) > len(live):
        line += f"; {len(others) - len(live)} other run(s) left incomplete (status running: killed?)"
    if live:
        line += f"; {len(live)} other run(s) in progress in other processes"
    lines = [line]
    failed = [o for o in outcomes if o.get("status") == "failed"]
    for o in failed:
        error = str(o.get("error", "")).strip().splitlines()
        lines.append(f"  failed: job {o.get('job')} ({o.get('run_dir', '?')}): {o.get('failure', 'error')}: "
                     f"{error[0] if error else ''}")
    return lines, failed


class SweepCallback(Callback):
    """Registered in ``conf/config.yaml`` (``hydra.callbacks``); runs in the process that started Hydra.

    * an output directory that cannot be written stops the command with a message, not a traceback;
    * a sweep invocation gets an outcome directory of its own (``start_invocation``), named to its
      jobs in the environment (``ABLATE_SWEEP_ID``, with the launcher's pid ``ABLATE_SWEEP_PID`` for
      ``ablate.lifeline``); the environment is how the name reaches joblib's and submitit's
      processes and SLURM's jobs (sbatch passes it on by default);
    * joblib's workers are tied to this process as they start (``lifeline.tie_joblib_workers``);
    * a sweep ends with one line, read from its own jobs' outcomes on disk, whatever the launcher: how
      many jobs completed, failed, were skipped as already completed or were busy (trained by another
      live process meanwhile); the command exits with status 1 when any job failed (the other jobs
      have run all the same). Busy jobs are not failures: their runs are being trained elsewhere.

    ``tolerate`` lists failure kinds a sweep expects (``hydra.callbacks.ablate.tolerate=[diverged]``
    for a study whose point is to find where training diverges): still counted and listed as failed,
    they do not make the exit status non-zero.
    """

    def __init__(self, tolerate: Any = ()) -> None:
        self.tolerate = set(tolerate or ())
        self.invocation: str | None = None
        self._lock: Lock | None = None
        self._environ: dict[str, str | None] = {}
        self._untie: Callable[[], None] = lambda: None

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")
        self.invocation, self._lock = start_invocation(Path(str(config.hydra.sweep.dir)))
        self._environ = {k: os.environ.get(k) for k in (INVOCATION_ENV, LAUNCHER_PID_ENV, JOB_COUNT_ENV)}
        os.environ.update({INVOCATION_ENV: self.invocation, LAUNCHER_PID_ENV: str(os.getpid())})
        jobs = sweep_jobs(config)
        if jobs is not None:  # each job's progress line says "job 3/15"
            os.environ[JOB_COUNT_ENV] = str(len(jobs))
        self._untie = tie_joblib_workers()

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        share_readable(sweep_dir / "multirun.yaml")  # Hydra wrote it under the umask
        assert self.invocation is not None, "on_multirun_start names the invocation"
        lines, failed = summarise_sweep(sweep_dir, self.invocation)
        print("\n".join(lines), flush=True)
        for key, value in self._environ.items():  # as before the sweep, for whatever runs next here
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._untie()
        if self._lock is not None:
            self._lock.release()
        if any(o.get("failure") not in self.tolerate for o in failed):
            sys.exit(1)

    @staticmethod
    def _check(directory: Any, key: str) -> None:
        problem = writable_dir_problem(Path(str(directory)))
        if problem:
            print(f"ablate: cannot write the output directory {directory} ({problem}); choose another with "
                  f"{key}=...", file=sys.stderr, flush=True)
            sys.exit(2)
