"""Entry point: ``python -m ablate.run +step=step4 [group=option ...] [key=value ...]``.

compose (Hydra) -> validate -> train -> record. Bad input stops before any training with a message
that names the value at fault; a run that fails midway is recorded as failed, never lost.

Sweeps (``-m``) run through any Hydra launcher: the basic one (one job after another in this
process), ``hydra/launcher=joblib`` (parallel worker processes on this machine) or
``hydra/launcher=submitit_slurm`` / ``submitit_local``. Each job holds its run's lock for its whole
life (``ablate.sweep.hold_run``), places itself (``place_job``) before it touches a device, gets one
outcome (completed / skipped / busy / failed, with the kind of failure) and never stops the sweep;
``ablate.sweep.SweepCallback`` prints the closing summary.

Exit status: 0 when everything ran (or was already done), 2 for bad input (a Hydra composition or
override error, an invalid value, unusable data, an occupied run directory), 1 for a run that failed
(or a sweep with a failed job).
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import hydra
import hydra._internal.utils as hydra_utils
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ablate.compose import CONF_DIR, quote_numeric_choices, register
from ablate.config import ConfigError
from ablate.validate import validate
from ablate.data import DataError
from ablate.locks import Busy
from ablate.records import RecordExists, RunRecord, config_key, read_summary
from ablate.lifeline import die_with_launcher
from ablate.sweep import find_completed, formats_used, hold_run, place_job, write_outcome
from ablate.train import Diverged, train

log = logging.getLogger("ablate")


COLUMNS = [  # (metrics key, header, format)
    ("epoch", "epoch", "{:>5d}"), ("lr", "lr", "{:>7.4f}"), ("train_loss", "train loss", "{:>10.4f}"),
    ("train_acc", "train acc", "{:>9.2f}"), ("test_loss", "test loss", "{:>9.4f}"),
    ("test_acc", "test acc", "{:>8.2f}"), ("epoch_seconds", "epoch s", "{:>8.2f}"),
    ("train_seconds", "total train s", "{:>13.2f}"),
]


def format_header() -> str:
    return "  ".join(f"{h:>{len(f.format(0) if 'd' in f else f.format(0.0))}}" for _, h, f in COLUMNS)


def format_row(row: dict) -> str:
    return "  ".join(f.format(row[k]) for k, _, f in COLUMNS)


# --------------------------------------------------------------------------------------------------
# Failures: what kind, and what to do about it


OOM_HINT = ("Try a smaller batch size (batch_size=256 or 128) or a smaller scale (scale=cpu, scale=smoke), "
            "or fewer parallel jobs per device.")
_OOM_TYPES = tuple({t for t in (MemoryError, getattr(torch, "OutOfMemoryError", None),
                                getattr(torch.cuda, "OutOfMemoryError", None)) if isinstance(t, type)})
_OOM_TEXT = ("out of memory", "can't allocate memory")  # older CUDA builds; the CPU allocator


def is_out_of_memory(err: BaseException) -> bool:
    """torch.OutOfMemoryError (= torch.cuda.OutOfMemoryError), MemoryError, or an allocator's RuntimeError."""
    return isinstance(err, _OOM_TYPES) or (isinstance(err, RuntimeError) and
                                           any(t in str(err).lower() for t in _OOM_TEXT))


def failure_kind(err: BaseException) -> str:
    """The ``failure`` field of a failed run's summary and of its sweep outcome."""
    if is_out_of_memory(err):
        return "out_of_memory"
    for kind, types in (("invalid_config", ConfigError), ("data", DataError), ("diverged", Diverged),
                        ("record_exists", RecordExists), ("interrupted", KeyboardInterrupt)):
        if isinstance(err, types):
            return kind
    return "error"


def free_device_memory() -> None:
    """Hand cached CUDA memory back between the jobs that share a worker process (joblib reuses them)."""
    if torch.cuda.is_initialized():
        gc.collect()  # a failed job's tensors may sit in reference cycles (exception, frames)
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# One run


def execute(cfg: DictConfig, run_dir: Path, choices: dict | None = None,
            resume_in: Path | None = None, place: Callable[[], dict] | None = None) -> dict:
    """Validate ``cfg``, train it and keep its records in ``run_dir``; return the summary.

    ``choices`` are the config-group options that composed ``cfg`` (kept for the results table).
    The run's lock is held throughout (``hold_run``: ``Busy`` when another live process trains it).
    With ``resume_in`` (a sweep directory), the recipe's lock there is held too, and a recipe that
    already completed there is not run again. ``place`` (a sweep job's placement: GPU index,
    threads) runs once the run is held; what it returns goes into the summary as it is.
    """
    validate(cfg)
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    key = config_key(resolved)
    with hold_run(run_dir, key, resume_in):
        if resume_in is not None and (done := find_completed(key, resume_in, formats_used(cfg))):
            log.info("%s seed %d: already completed in %s, not run again", cfg.step.id, cfg.seed, done)
            return dict(read_summary(done), skipped=True)
        return _train_and_record(cfg, run_dir, resolved, choices, place() if place else {})


def _train_and_record(cfg: DictConfig, run_dir: Path, resolved: dict, choices: dict | None, facts: dict) -> dict:
    record = RunRecord(run_dir, resolved, choices)
    if facts:
        record.update(**facts)
    log.info("%s | arch %s | scale %s | seed %d | run dir %s", cfg.step.id, cfg.arch.name,
             cfg.scale.name, cfg.seed, run_dir)

    def on_start(info: dict) -> None:
        record.update(**info)
        log.info("device %s | precision %s (asked %s) | %s trainable parameters | data %s",
                 info["device"], info["precision_used"], cfg.precision.name, f"{info['params']:,}",
                 info["data_source"])
        if info.get("compile_seconds") is not None:
            log.info("torch.compile took %.1f s (not counted in train time)", info["compile_seconds"])
        log.info(format_header())

    def on_epoch(row: dict) -> None:
        record.epoch(row)
        log.info(format_row(row))

    try:
        results = train(cfg, on_start=on_start, on_epoch=on_epoch)
    except BaseException as err:  # KeyboardInterrupt too: the record must say the run did not finish
        kind = failure_kind(err)
        record.finish("failed", error=f"{type(err).__name__}: {err}", failure=kind,
                      **({"hint": OOM_HINT} if kind == "out_of_memory" else {}))
        raise
    summary = record.finish("completed", **results)
    log.info("%s: test accuracy %.2f%% after %d epochs, %.1f s training + %.1f s evaluation (%s, %s)",
             cfg.step.id, summary["test_acc"], summary["epochs"], summary["train_seconds"],
             summary["eval_seconds"], summary["device"], summary["precision_used"])
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def job(cfg: DictConfig) -> float | None:
    """One job. In a sweep nothing it raises stops the sweep: it is recorded (``summary.json``, and an
    outcome for the sweep's closing line) and the next job runs. A single run exits non-zero instead:
    2 for bad input (config, data, an occupied run directory), 1 for a run that failed."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    if sweeping:  # a worker that joblib started without ablate's initializer is tied here
        die_with_launcher()
    choices = {k: v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra")}
    # What names the job in its outcome; a value whose interpolation fails is validate's to report.
    outcome: dict = dict(run_dir=str(run_dir), **{k: OmegaConf.select(cfg, path, throw_on_resolution_failure=False)
                                                  for k, path in (("step", "step.id"), ("arch", "arch.name"),
                                                                  ("seed", "seed"))})
    try:
        summary = execute(cfg, run_dir, choices, resume_in=run_dir.parent if sweeping else None,
                          place=(lambda: place_job(hydra_cfg, cfg)) if sweeping else None)
        outcome.update(status="skipped" if summary.get("skipped") else "completed",
                       test_acc=summary.get("test_acc"))
        return summary["test_acc"]
    except Busy as err:  # another live process trains this run: it is left to that one
        print(f"ablate: {err}", file=sys.stderr)
        outcome.update(status="busy", error=str(err))
        if not sweeping:
            sys.exit(2)
    except (ConfigError, DataError, RecordExists, Diverged) as err:
        # A message for the user, not a traceback; a diverged run is named with where it is recorded.
        print(f"ablate: {cfg.step.id} seed {cfg.seed} diverged ({err}); the run is recorded as failed in {run_dir}"
              if isinstance(err, Diverged) else f"ablate: {err}", file=sys.stderr)
        outcome.update(status="failed", failure=failure_kind(err), error=str(err))
        if not sweeping:
            sys.exit(1 if isinstance(err, Diverged) else 2)
    except Exception as err:  # recorded as failed by execute; a sweep goes on to its next job
        outcome.update(status="failed", failure=failure_kind(err), error=f"{type(err).__name__}: {err}")
        if is_out_of_memory(err):  # the user's to fix, like bad input: a message, not a traceback
            print(f"ablate: {cfg.step.id} seed {cfg.seed} ran out of memory ({type(err).__name__}); the "
                  f"run is recorded as failed in {run_dir}. {OOM_HINT}", file=sys.stderr)
            if not sweeping:
                sys.exit(1)
        else:
            if not sweeping:
                raise
            log.exception("%s seed %d failed (recorded in %s); the sweep goes on", cfg.step.id, cfg.seed,
                          run_dir)
    finally:
        if sweeping and "status" in outcome:  # not for KeyboardInterrupt: the sweep itself stops
            try:
                write_outcome(Path(str(hydra_cfg.sweep.dir)), hydra_cfg.job.num, outcome)
            except OSError as err:  # the run's own record is written; only the closing line misses it
                log.warning("could not record the outcome of job %s (%s)", hydra_cfg.job.num, err)
        free_device_memory()
    return None


# Bad input that Hydra meets before (or while) composing a job: unknown config groups and options,
# keys not in the schema, values of the wrong type, unparsable overrides and failing interpolations
# (Hydra's and OmegaConf's errors), and what ablate's own sweeper refuses.
BAD_INPUT = (HydraException, OmegaConfBaseException, ConfigError)


def one_line(err: BaseException) -> str:
    """A Hydra or OmegaConf error as one line: its message and its OmegaConf cause, a list inline
    after its heading ("Available options in 'step': step0, step1_1, ..."). Left out: where Hydra
    searched, OmegaConf's object and type details, and Hydra's advice to append with ``+`` (a key
    outside the schema is refused either way)."""
    lines: list[str] = []
    skipping = False
    for part in (err, err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else None):
        for raw in str(part or "").splitlines():
            line = raw.strip().rstrip(".")
            if raw.startswith("\t") and lines:  # an item of the list that the line before heads
                if not skipping:
                    lines[-1] += (" " if lines[-1].endswith(":") else ", ") + line
                continue
            skipping = line.startswith("Config search path")
            if (skipping or not line or line in lines
                    or line.startswith(("object_type=", "reference_type=", "To append to your config"))):
                continue
            lines.append(line)
    if isinstance(err, OverrideParseException) and err.override not in " ".join(lines):
        lines.insert(0, f"cannot parse the override {err.override}")  # Hydra's message leaves it out
    return "; ".join(lines)


@contextlib.contextmanager
def bad_input_exits_2() -> Iterator[None]:
    """Make Hydra's handler of errors (``run_and_report``, which prints them and exits 1) exit 2,
    with a one-line message and no traceback, for bad input (``BAD_INPUT``); anything else it
    handles as before (a traceback, exit 1). Hydra has no setting for its exit status, so its
    handler is wrapped for the life of the command. HYDRA_FULL_ERROR=1 still shows everything."""
    original = hydra_utils.run_and_report

    def run_and_report(func: Callable[[], Any]) -> Any:
        try:
            return func()
        except BAD_INPUT as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"ablate: {one_line(err)}", file=sys.stderr, flush=True)
            sys.exit(2)
        except Exception as err:
            return original(lambda: _reraise(err))

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    finally:
        hydra_utils.run_and_report = original


def _reraise(err: BaseException) -> None:
    raise err


def main() -> None:
    """The command line: put ablate's configs in Hydra's store, quote the numeric choices of
    ``sys.argv``, then let Hydra compose and run ``job`` (once, or once per job of a sweep)."""
    register()
    sys.argv[1:] = quote_numeric_choices(sys.argv[1:])
    with bad_input_exits_2():
        job()


if __name__ == "__main__":
    main()
