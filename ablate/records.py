"""Run records: one directory per run with the resolved config, per-epoch metrics and a summary.

``config.yaml``    the resolved configuration (what ran)
``metrics.jsonl``  one JSON object per epoch, appended and flushed as each epoch ends
``summary.json``   status ('running', 'completed', 'failed'), results, times and provenance,
                   replaced atomically so a reader never sees half a file

A run killed outright (SIGKILL, a lost node) leaves ``status: running``; a sweep started again runs
it afresh. A failed run says why in ``failure`` ('error', 'diverged', 'out_of_memory', 'data', ...)
and ``error``. Each job of a sweep also leaves a one-line outcome in ``<sweep dir>/.ablate_jobs/``,
from which :class:`SweepCallback` prints the sweep's closing summary and sets its exit status.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback

SUMMARY, METRICS, CONFIG = "summary.json", "metrics.jsonl", "config.yaml"
JOBS = ".ablate_jobs"  # <sweep dir>/.ablate_jobs/<job number>.json: what each job of this invocation did

# Keys that do not change what a run computes; they are left out of the config key.
_NOT_IN_KEY = ("progress",)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: all or nothing."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def with_current_defaults(config: dict) -> dict:
    """``config`` completed with the current schema's defaults, so that a record written before a
    field was added compares equal to a new run that leaves the field at its default. A config the
    schema cannot take (from a newer ablate, say) is returned as it is."""
    from omegaconf import OmegaConf

    from ablate.config import Config

    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), config)
        return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]
    except Exception:  # any schema mismatch: compare the record as written
        return config


def config_key(config: dict) -> str:
    """A short hash of what a run computes: equal keys mean the same recipe, scale and seed."""
    kept = {k: v for k, v in with_current_defaults(config).items() if k not in _NOT_IN_KEY}
    return hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def published_seconds(train_seconds: float, eval_seconds: float, prep_seconds: float, timing: str) -> float:
    """A measured time in the convention of the step's published reference (journey-facts 0.3), the
    one rule for a run's total time and for its time to target. The arguments are the run's
    cumulative seconds (``train_seconds`` includes ``prep_seconds``, as the engine records them):

    * ``with_eval`` (Posts 1-4): training loop + per-epoch evaluation, preprocessing excluded
      (ResNet9's 79 s = 74 s DAWNBench time - 2 s preprocessing + 7 s evaluation);
    * ``train_only`` (Post 8): preprocessing (whitening fit included) + training loop, no evaluation.
    """
    if timing == "with_eval":
        return train_seconds - prep_seconds + eval_seconds
    return train_seconds


def read_config(run_dir: Path) -> dict | None:
    """The resolved config a run recorded, or None when it is missing or unreadable."""
    try:
        config = yaml.safe_load((Path(run_dir) / CONFIG).read_text())
        return config if isinstance(config, dict) else None
    except (OSError, yaml.YAMLError):
        return None


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the ablate checkout that ran ("+dirty" when it had uncommitted changes)."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RecordExists(RuntimeError):
    """The run directory already holds a completed run of another recipe."""


class RunRecord:
    """Writes one run's directory as the run goes; nothing finished is ever rewritten."""

    def __init__(self, run_dir: Path, config: dict, choices: dict | None = None) -> None:
        self.dir = Path(run_dir)
        previous = read_summary(self.dir)
        if previous and previous.get("status") == "completed":
            raise RecordExists(f"{self.dir} already holds a completed run (step {previous.get('step')}, "
                               f"seed {previous.get('seed')}); it is kept. Choose another directory "
                               "(hydra.run.dir=... or hydra.sweep.dir=...).")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.started = time.time()
        write_atomic(self.dir / CONFIG, yaml.safe_dump(config, sort_keys=False))
        (self.dir / METRICS).unlink(missing_ok=True)  # a re-run of an unfinished job starts afresh
        self.summary: dict[str, Any] = {
            "status": "running",
            "step": config["step"]["id"],
            "arch": config["arch"]["name"],
            "seed": config["seed"],
            "scale": config["scale"]["name"],
            "precision": config["precision"]["name"],
            "config_key": config_key(config),
            "choices": dict(choices or {}),
            "torch_version": _torch_version(),
            "git_commit": git_commit(),
            "host": socket.gethostname(),
            "started": _iso(self.started),
        }
        self._write_summary()

    def epoch(self, row: dict) -> None:
        """Append one epoch's metrics, flushed to disk before training goes on."""
        with open(self.dir / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def update(self, **fields: Any) -> None:
        self.summary.update(fields)
        self._write_summary()

    def finish(self, status: str, **fields: Any) -> dict:
        self.summary.update(fields, status=status, finished=_iso(time.time()),
                            wall_seconds=round(time.time() - self.started, 3))
        self._write_summary()
        return self.summary

    def _write_summary(self) -> None:
        write_atomic(self.dir / SUMMARY, json.dumps(self.summary, indent=2, default=str) + "\n")


def read_summary(run_dir: Path) -> dict | None:
    """The summary of a run directory, or None when it is missing or unreadable."""
    try:
        return json.loads((Path(run_dir) / SUMMARY).read_text())
    except (OSError, ValueError):
        return None


def _torch_version() -> str:
    import torch

    return torch.__version__


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


# --------------------------------------------------------------------------------------------------
# Sweeps: job outcomes and the closing summary. Jobs may run in other processes or on other machines
# (joblib, submitit), so they report through files in the sweep directory, never through memory.


def write_outcome(sweep_dir: Path, job: int, outcome: dict) -> None:
    """Record what job ``job`` of the current sweep invocation did (completed, skipped or failed)."""
    jobs = Path(sweep_dir) / JOBS
    jobs.mkdir(parents=True, exist_ok=True)
    write_atomic(jobs / f"{job}.json", json.dumps(dict(outcome, job=job), default=str) + "\n")


def clear_outcomes(sweep_dir: Path) -> None:
    """Forget the outcomes of an earlier invocation, so the summary counts only this one's jobs."""
    for path in (Path(sweep_dir) / JOBS).glob("*.json"):
        path.unlink(missing_ok=True)


def read_outcomes(sweep_dir: Path) -> list[dict]:
    outcomes = []
    for path in sorted((Path(sweep_dir) / JOBS).glob("*.json")):
        try:
            outcomes.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            outcomes.append({"job": path.stem, "status": "failed", "failure": "unreadable_outcome",
                             "error": f"unreadable outcome file {path}"})
    return sorted(outcomes, key=lambda o: (len(str(o.get("job"))), str(o.get("job"))))  # 2 before 10


def summarise_sweep(sweep_dir: Path) -> tuple[list[str], list[dict]]:
    """The closing lines of a sweep (what this invocation's jobs did, then each failure) and the
    outcomes of the failed jobs. Records left 'running' by a killed job are counted as incomplete."""
    outcomes = read_outcomes(sweep_dir)
    count = {s: sum(o.get("status") == s for o in outcomes) for s in ("completed", "failed", "skipped")}
    accounted = {str(Path(o["run_dir"]).resolve()) for o in outcomes if o.get("run_dir")}
    incomplete = [p.parent for p in sorted(Path(sweep_dir).glob(f"*/{SUMMARY}"))
                  if (read_summary(p.parent) or {}).get("status") == "running"
                  and str(p.parent.resolve()) not in accounted]
    line = (f"ablate sweep {sweep_dir}: {len(outcomes)} jobs: {count['completed']} completed, "
            f"{count['failed']} failed, {count['skipped']} skipped (already completed)")
    if incomplete:
        line += f"; {len(incomplete)} other run(s) left incomplete (status running: killed?)"
    lines = [line]
    failed = [o for o in outcomes if o.get("status") == "failed"]
    for o in failed:
        error = str(o.get("error", "")).strip().splitlines()
        lines.append(f"  failed: job {o.get('job')} ({o.get('run_dir', '?')}): {o.get('failure', 'error')}: "
                     f"{error[0] if error else ''}")
    return lines, failed


def writable_dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot serve as an output directory (created if need be), or None when it can."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".ablate-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}"
    return None


class SweepCallback(Callback):
    """Registered in ``conf/config.yaml`` (``hydra.callbacks``); runs in the process that started Hydra.

    * an output directory that cannot be written stops the command with a message, not a traceback;
    * a sweep ends with one line, read from the job outcomes on disk, whatever the launcher: how many
      jobs completed, failed and were skipped as already completed; the command exits with status 1
      when any job failed (the other jobs have run all the same).

    ``tolerate`` lists failure kinds a sweep expects (``hydra.callbacks.ablate.tolerate=[diverged]``
    for a study whose point is to find where training diverges): still counted and listed as failed,
    they do not make the exit status non-zero.
    """

    def __init__(self, tolerate: Any = ()) -> None:
        self.tolerate = set(tolerate or ())

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")
        clear_outcomes(Path(str(config.hydra.sweep.dir)))

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        lines, failed = summarise_sweep(sweep_dir)
        print("\n".join(lines), flush=True)
        if any(o.get("failure") not in self.tolerate for o in failed):
            sys.exit(1)

    @staticmethod
    def _check(directory: Any, key: str) -> None:
        problem = writable_dir_problem(Path(str(directory)))
        if problem:
            print(f"ablate: cannot write the output directory {directory} ({problem}); choose another with "
                  f"{key}=...", file=sys.stderr, flush=True)
            sys.exit(2)
