"""Run records: one directory per run with the resolved config, per-epoch metrics and a summary.

``config.yaml``    the resolved configuration (what ran)
``metrics.jsonl``  one JSON object per epoch, appended and flushed as each epoch ends
``summary.json``   status ('running', 'completed', 'failed'), results, times and provenance,
                   replaced atomically so a reader never sees half a file

A run killed outright (SIGKILL, a lost node) leaves ``status: running``; a sweep started again runs
it afresh. A failed run says why in ``failure`` ('error', 'diverged', 'out_of_memory', 'data', ...)
and ``error``. Sweeps (job outcomes, the closing summary, resume lookups) are ``ablate.sweep``'s.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

SUMMARY, METRICS, CONFIG = "summary.json", "metrics.jsonl", "config.yaml"

# Keys that do not change what a run computes; they are left out of the config key. The data cache's
# location (ABLATE_CACHE) differs between machines and CI clones that compute the same run.
_NOT_IN_KEY = ("progress", "data.cache_dir")


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
    kept = copy.deepcopy(with_current_defaults(config))  # never edit the caller's config
    for dotted in _NOT_IN_KEY:
        *parents, leaf = dotted.split(".")
        node = kept
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


TIMINGS = ("with_eval", "train_only", "train_tta")  # step.ref.timing: the published conventions (published_seconds)


def published_seconds(train_seconds: float, eval_seconds: float, prep_seconds: float, timing: str,
                      final_eval_seconds: float = 0.0) -> float:
    """A measured time in the convention of the step's published reference (docs/references.md 0.3), the
    one rule for a run's total time and for its time to target. The arguments are the run's
    cumulative seconds (``train_seconds`` includes ``prep_seconds``, as the engine records them):

    * ``with_eval`` (Posts 1-4): training loop + per-epoch evaluation, preprocessing excluded
      (ResNet9's 79 s = 74 s DAWNBench time - 2 s preprocessing + 7 s evaluation);
    * ``train_only`` (Post 8): preprocessing (whitening fit included) + training loop, no evaluation;
    * ``train_tta`` (airbench, sota-facts 2.4): as train_only, plus the final evaluation pass (the
      6-view TTA) whose seconds are ``final_eval_seconds``; the per-epoch logging evaluation excluded.
    """
    if timing == "with_eval":
        return train_seconds - prep_seconds + eval_seconds
    if timing == "train_tta":
        return train_seconds + final_eval_seconds
    return train_seconds


def read_config(run_dir: Path) -> dict | None:
    """The resolved config a run recorded, or None when it is missing or unreadable."""
    try:
        config = yaml.safe_load((Path(run_dir) / CONFIG).read_text())
        return config if isinstance(config, dict) else None
    except (OSError, yaml.YAMLError):
        return None


def read_metrics(run_dir: Path) -> tuple[list[dict], bool]:
    """The epoch rows of a run's metrics.jsonl, and whether a torn line (a killed run's last write)
    was dropped."""
    rows, torn = [], False
    path = Path(run_dir) / METRICS
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
                rows.append(row)
            except ValueError:
                torn = True
    return rows, torn


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
