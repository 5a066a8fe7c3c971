"""Run records: one directory per run with the resolved config, per-epoch metrics and a summary.

``config.yaml``    the resolved configuration (what ran)
``metrics.jsonl``  one JSON object per epoch, appended and flushed as each epoch ends
``summary.json``   status ('running', 'completed', 'failed'), results, times and provenance,
                   replaced atomically so a reader never sees half a file

A run killed outright (SIGKILL, a lost node) leaves ``status: running``; a sweep started again runs
it afresh. JSON is strict (``to_json``): a value that is not a finite number is written as null.
``record_problems`` says when a directory's files do not belong to one training of one recipe. A failed run says why in ``failure`` ('error', 'diverged', 'out_of_memory', 'data', ...)
and ``error``. Sweeps (job outcomes, the closing summary, resume lookups) are ``ablate.sweep``'s.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterator

import yaml

from ablate.locks import TMP_SUFFIX

SUMMARY, METRICS, CONFIG = "summary.json", "metrics.jsonl", "config.yaml"
FILE_MODE = 0o644  # records, configs and caches: as readable as the data they describe

# Keys that do not change what a run computes; they are left out of the config key. The data cache's
# location (ABLATE_CACHE) differs between machines and CI clones that compute the same run; a tracker
# only watches a run, and a run resumed from a checkpoint ends as an uninterrupted one. (Fields added
# to the schema later than a record are filled with their defaults first, ``with_current_defaults``.)
_NOT_IN_KEY = ("progress", "data.cache_dir", "tracking", "checkpoint")
# The rules of earlier commits, under which committed summaries recorded their key: before 0c28bbc
# only ``progress`` was left out (see ``recorded_keys``).
_EARLIER_NOT_IN_KEY = (("progress",),)
DIR_KEY_CHARS = 8  # the recipe key in a sweep subdirectory's name (conf/config.yaml)


@contextlib.contextmanager
def atomic_file(path: Path, binary: bool = False) -> Iterator[IO]:
    """A file that appears at ``path`` whole or not at all: written to a temporary file beside it
    (``.<name>.<random>.tmp``), synced, made ``FILE_MODE`` and renamed over ``path``. A writer killed
    midway leaves only the temporary file, which the next holder of the directory's lock removes
    (``ablate.locks.remove_stale_temps``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp makes it private (0600)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def share_readable(*paths: Path) -> None:
    """Make the files among ``paths`` (and the files inside those that are directories) ``FILE_MODE``,
    whatever the umask they were written under: Hydra's own files of a run (.hydra/, the log) and a
    sweep (multirun.yaml), which Hydra writes with the process's umask."""
    for path in map(Path, paths):
        for file in (sorted(path.rglob("*")) if path.is_dir() else [path]):
            with contextlib.suppress(OSError):  # gone, or not ours: only readability is lost
                if file.is_file():
                    os.chmod(file, FILE_MODE)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` all or nothing (``atomic_file``)."""
    with atomic_file(path) as f:
        f.write(text)


def finite(value: Any) -> Any:
    """``value`` with every float that is not finite (NaN, inf) replaced by None, in nested dicts
    and lists: an unknown number is null in JSON, which strict parsers read (a bare NaN they refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def to_json(value: Any, **kwargs: Any) -> str:
    """Strict JSON of ``value`` (``finite``, then ``allow_nan=False``); other objects as their str."""
    return json.dumps(finite(value), allow_nan=False, default=str, **kwargs)


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


def _digest(config: dict, not_in_key: tuple[str, ...]) -> str:
    kept = copy.deepcopy(config)  # never edit the caller's config
    for dotted in not_in_key:
        *parents, leaf = dotted.split(".")
        node = kept
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_key(config: dict) -> str:
    """A short hash of what a run computes: equal keys mean the same recipe, scale and seed."""
    return _digest(with_current_defaults(config), _NOT_IN_KEY)


def recipe_key(config: dict) -> str:
    """The config key without the seed: runs that differ only by seed share a recipe."""
    return config_key(dict(config, seed=0))  # every seed keyed alike


def recorded_keys(config: dict) -> set[str]:
    """Every key a summary written for this config may carry: today's ``config_key``, and the hash
    of the config exactly as written under today's and each earlier rule of what stays out of the
    key (a record written before a schema field or a rule was added hashed what it had then)."""
    return {config_key(config)} | {_digest(config, rule) for rule in (_NOT_IN_KEY, *_EARLIER_NOT_IN_KEY)}


def formats_ran(precision_used: Any, channels_last: Any) -> str:
    """The arithmetic and layout a record says ran, as tables and labels print them ("bf16 channels_last");
    a field the record lacks is left out."""
    layout = {True: "channels_last", False: "NCHW"}.get(channels_last, "")
    return " ".join(x for x in (str(precision_used) if precision_used else "", layout) if x)


def record_problems(run_dir: Path, summary: dict, config: dict | None, metrics: list[dict]) -> list[str]:
    """Why a run directory does not hold one training of one recipe, one message per problem naming
    the file at fault; empty when it does:

    * ``summary.json`` carries a config key that ``config.yaml`` does not have (``recorded_keys``):
      two recipes wrote into one directory and the results would be filed under the wrong one;
    * ``metrics.jsonl`` does not hold epochs 1..N in order: two trainings appended to it.

    Records too old to carry a key, and a missing config (reported by its reader), are not judged."""
    run_dir = Path(run_dir)
    problems = []
    key = summary.get("config_key")
    if key and config and key not in recorded_keys(config):
        problems.append(f"{run_dir / SUMMARY}: written for config key {key}, but {run_dir / CONFIG} has key "
                        f"{config_key(config)} (two recipes shared this directory); the run is left out")
    epochs = [row.get("epoch") for row in metrics]
    if epochs != list(range(1, len(epochs) + 1)):
        shown = epochs if len(epochs) <= 20 else epochs[:10] + ["..."] + epochs[-5:]
        problems.append(f"{run_dir / METRICS}: epochs {shown} are not 1..{len(epochs)} in order (more than one "
                        "training wrote it); the run is left out")
    return problems


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
    """Writes one run's directory as the run goes; nothing finished is ever rewritten. The caller
    holds the run's lock (``ablate.sweep.hold_run``), so no other process writes here meanwhile.

    ``resume`` (the counters of the checkpoint a run goes on from, ``ablate.checkpoint``) keeps the
    metrics rows of the epochs before it, so that metrics.jsonl still holds epochs 1..N, and the
    summary's ``resumed`` lists each resumption: from which epoch, and the train and evaluation seconds
    measured before it (in the totals, which count the preprocessing once)."""

    def __init__(self, run_dir: Path, config: dict, choices: dict | None = None, resume: dict | None = None) -> None:
        self.dir = Path(run_dir)
        self.previous = read_summary(self.dir) or {}  # an unfinished run's, when it is run again
        if self.previous.get("status") == "completed":
            raise RecordExists(f"{self.dir} already holds a completed run (step {self.previous.get('step')}, "
                               f"seed {self.previous.get('seed')}); it is kept. Choose another directory "
                               "(hydra.run.dir=... or hydra.sweep.dir=...).")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.started = time.time()
        write_atomic(self.dir / CONFIG, yaml.safe_dump(config, sort_keys=False))
        kept = read_metrics(self.dir)[0][:resume["epoch"]] if resume else []
        # A re-run of an unfinished job starts afresh, in a file of its own: the old one is unlinked
        # and the new one stays open, so a writer that still held the old one can only reach that.
        (self.dir / METRICS).unlink(missing_ok=True)
        self._metrics = os.fdopen(os.open(self.dir / METRICS, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE), "a")
        os.fchmod(self._metrics.fileno(), FILE_MODE)  # whatever the umask
        for row in kept:
            self.epoch(row)
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
        if resume:
            self.summary["resumed"] = [*self.previous.get("resumed", []), dict(
                from_epoch=resume["epoch"], train_seconds_before=round(resume["train_seconds"], 3),
                eval_seconds_before=round(resume["eval_seconds"], 3), interrupted_run_started=self.previous.get("started"))]
        self._write_summary()

    def epoch(self, row: dict) -> None:
        """Append one epoch's metrics, flushed to disk before training goes on."""
        self._metrics.write(to_json(row) + "\n")
        self._metrics.flush()
        os.fsync(self._metrics.fileno())

    def update(self, **fields: Any) -> None:
        self.summary.update(fields)
        self._write_summary()

    def finish(self, status: str, **fields: Any) -> dict:
        self.summary.update(fields, status=status, finished=_iso(time.time()),
                            wall_seconds=round(time.time() - self.started, 3))
        self._write_summary()
        self._metrics.close()
        return self.summary

    def _write_summary(self) -> None:
        write_atomic(self.dir / SUMMARY, to_json(self.summary, indent=2) + "\n")


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
