"""Run records: one directory per run with the resolved config, per-epoch metrics and a summary.

``config.yaml``    the resolved configuration (what ran)
``metrics.jsonl``  one JSON object per epoch, appended and flushed as each epoch ends
``summary.json``   status ('running', 'completed', 'failed'), results, times and provenance,
                   replaced atomically so a reader never sees half a file
"""
from __future__ import annotations

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
