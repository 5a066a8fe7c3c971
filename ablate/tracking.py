"""Experiment tracking through the libraries people already use: ``tracking=mlflow`` or
``tracking=tensorboard`` (``tracking=none``, the default, tracks nothing).

Either tracker logs the composed config (flattened) as parameters, every epoch's metrics with the
epoch as the step, the summary, and the run's records as artifacts (MLflow) or text (TensorBoard).
A run is named by its recipe label (how it differs from its step, ``ablate.report.labels``), its
scale and seed, and tagged with its step, recipe, scale, seed and device, so that MLflow's compare
view and TensorBoard's run selector show an ablation at a glance. A sweep is one MLflow experiment
(one TensorBoard log directory), one run per job.

Where: ``tracking.uri``, else (MLflow) ``$MLFLOW_TRACKING_URI``, else a local store under the run
root, which is the sweep directory for a sweep and a single run's parent directory:
``<root>/mlruns`` (``mlflow ui --backend-store-uri <root>/mlruns``) or ``<root>/tensorboard``
(``tensorboard --logdir <root>/tensorboard``). No server is needed.

Tracking never breaks a run: a tracker that fails (a bad URI, a full disk, a lost server) is
reported once, and the run and its records go on without it (``Guarded``). The trackers are
imported only when asked for; ``validate`` says which extra to install when one is missing.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from ablate.report.labels import flatten

log = logging.getLogger("ablate")

PACKAGES = {"mlflow": "mlflow", "tensorboard": "tensorboard"}  # tracking.kind -> the package it needs
RECORD_FILES = ("config.yaml", "metrics.jsonl", "summary.json")


def numbers(row: dict) -> dict[str, float]:
    """The finite numbers of a (nested) metrics row or summary, flattened: what a tracker can plot."""
    return {k: float(v) for k, v in flatten(row).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


@dataclass
class RunInfo:
    """What a tracker needs to know about a run when it starts."""

    name: str  # the recipe label, scale and seed: 'step4_6 · arch=residual_l2 · smoke · s0'
    tags: dict[str, str]
    params: dict[str, Any]  # the composed config, flattened
    root: Path  # the run root: the sweep directory, or a single run's parent
    experiment: str
    run_dir: Path
    first_epoch: int = 1  # a resumed run logs from the epoch after its checkpoint
    previous: dict = field(default_factory=dict)  # what the tracker recorded for the interrupted run


class MlflowTracker:
    """One MLflow run per ablate run, through ``MlflowClient`` (no fluent global state, so that the
    jobs a joblib worker runs one after another never share a run). A resumed run goes on in the MLflow
    run of the interrupted one."""

    def __init__(self, uri: Optional[str], experiment: Optional[str]) -> None:
        self.uri, self.experiment = uri, experiment
        self.client: Any = None
        self.run_id: Optional[str] = None

    def start(self, run: RunInfo) -> dict:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = self.uri or os.environ.get("MLFLOW_TRACKING_URI") or (run.root / "mlruns").absolute().as_uri()
        allow_file_store(uri)
        self.client = MlflowClient(tracking_uri=uri)
        previous = run.previous.get("mlflow_run_id")
        if previous and self._continue(previous):
            return dict(mlflow_run_id=previous, mlflow_tracking_uri=uri)
        created = self.client.create_run(self._experiment_id(self.experiment or run.experiment), run_name=run.name,
                                         tags=run.tags)
        self.run_id = created.info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, _param(v)) for k, v in run.params.items()])
        return dict(mlflow_run_id=self.run_id, mlflow_tracking_uri=uri)

    def _continue(self, run_id: str) -> bool:
        try:
            self.client.update_run(run_id, status="RUNNING")
        except Exception:  # deleted, or in another store: a new run
            return False
        self.run_id = run_id
        return True

    def _experiment_id(self, name: str) -> str:
        """The experiment's id, created if need be (parallel jobs of one sweep may race to create it)."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def epoch(self, row: dict) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, int(row["epoch"]))
                                                    for k, v in numbers(row).items()])

    def finish(self, summary: dict, run_dir: Path) -> None:
        from mlflow.entities import Metric, RunTag

        stamp = int(time.time() * 1000)
        texts = {f"summary.{k}": str(v) for k, v in summary.items() if isinstance(v, (str, bool))}
        self.client.log_batch(self.run_id, metrics=[Metric(f"summary.{k}", v, stamp, 0)
                                                    for k, v in numbers(summary).items()],
                              tags=[RunTag(k, v) for k, v in texts.items()])
        for name in RECORD_FILES:
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name), artifact_path="record")
        self.client.set_terminated(self.run_id, "FINISHED" if summary.get("status") == "completed" else "FAILED")


class TensorBoardTracker:
    """One TensorBoard run directory per ablate run (``<log dir>/<run name>``), through PyTorch's
    ``SummaryWriter``: scalars per epoch, the config and tags as text, and the flattened config beside
    the final results in the HPARAMS dashboard. A resumed run purges what the interrupted one wrote
    after its checkpoint."""

    def __init__(self, uri: Optional[str]) -> None:
        self.uri = uri
        self.writer: Any = None
        self.params: dict[str, Any] = {}

    def start(self, run: RunInfo) -> dict:
        from torch.utils.tensorboard import SummaryWriter

        logdir = Path(self.uri) if self.uri else run.root / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(logdir / run.name.replace("/", "∕")), purge_step=run.first_epoch)
        self.params = {k: _hparam(v) for k, v in run.params.items()}
        self.writer.add_text("tags", _markdown_table(run.tags), run.first_epoch)
        self.writer.add_text("config", _indented(yaml.safe_dump(run.params, sort_keys=False)), run.first_epoch)
        return dict(tensorboard_dir=str(logdir / run.name))

    def epoch(self, row: dict) -> None:
        for key, value in numbers(row).items():
            self.writer.add_scalar(key, value, int(row["epoch"]))
        self.writer.flush()

    def finish(self, summary: dict, run_dir: Path) -> None:
        final = {f"final/{k}": v for k, v in numbers(summary).items()
                 if k in ("test_acc", "test_loss", "train_loss", "train_seconds", "eval_seconds")}
        self.writer.add_hparams(self.params, final, run_name=".")  # ".": beside the run's own scalars
        self.writer.add_text("summary", _markdown_table({k: str(v) for k, v in summary.items()}))
        self.writer.close()


class NoTracker:
    def start(self, run: RunInfo) -> dict:
        return {}

    def epoch(self, row: dict) -> None:
        pass

    def finish(self, summary: dict, run_dir: Path) -> None:
        pass


TRACKERS: dict[str, Callable[[Any], Any]] = {
    "none": lambda cfg: NoTracker(),
    "mlflow": lambda cfg: MlflowTracker(cfg.uri, cfg.experiment),
    "tensorboard": lambda cfg: TensorBoardTracker(cfg.uri),
}


class Guarded:
    """A tracker whose failures never reach the run: the first one is reported (a warning naming the
    tracker and the error) and the tracker is dropped for the rest of the run."""

    def __init__(self, tracker: Any, kind: str) -> None:
        self.tracker, self.kind, self.failed = tracker, kind, False

    def _call(self, method: str, *args: Any) -> Any:
        if self.failed:
            return None
        try:
            return getattr(self.tracker, method)(*args)
        except Exception as err:  # any library error, OSError, a lost server: the run goes on
            self.failed = True
            log.warning("tracking=%s failed (%s: %s); the run and its records go on without it", self.kind,
                        type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            return None

    def start(self, run: RunInfo) -> dict:
        return self._call("start", run) or {}

    def epoch(self, row: dict) -> None:
        self._call("epoch", row)

    def finish(self, summary: dict, run_dir: Path) -> None:
        self._call("finish", summary, run_dir)


def make_tracker(cfg: Any) -> Guarded:
    """The tracker ``tracking.kind`` names, guarded."""
    return Guarded(TRACKERS[cfg.kind](cfg), cfg.kind)


def missing_package(kind: str) -> Optional[str]:
    """Why ``tracking=<kind>`` cannot run here (its library is not installed), or None."""
    package = PACKAGES.get(kind)
    if package and importlib.util.find_spec(package) is None:
        return f"tracking={kind} needs the {package} package: pip install -e '.[{kind}]'"
    return None


def allow_file_store(uri: str) -> None:
    """Let MLflow 3 open a local ``mlruns/`` store. It refuses its file store (now in maintenance mode)
    unless ``MLFLOW_ALLOW_FILE_STORE=true``; the file store is kept as the default nonetheless because
    it needs no server and no database, and parallel jobs of a sweep write their runs to it without
    contending for one file. A setting of one's own (true or false) is left as it is."""
    if "://" not in uri or uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _param(value: Any) -> str:
    return str(value)[:6000]  # MLflow's limit on a parameter's value


def _hparam(value: Any) -> Any:
    """A value as TensorBoard's hparams take it: a number, a string or a bool (None and lists as text)."""
    return value if isinstance(value, (int, float, str, bool)) else str(value)


def _markdown_table(values: dict[str, str]) -> str:
    return "| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in values.items())


def _indented(text: str) -> str:
    """Text shown as it is by TensorBoard's Markdown (a code block)."""
    return "\n".join("    " + line for line in text.splitlines())
