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
import re
import sys
import time
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

from ablate.checkpoint import Checkpoints
from ablate.compose import CONF_DIR, register
from ablate.config import ConfigError
from ablate.validate import validate
from ablate.data import DataError
from ablate.device import device_name, resolve_device
from ablate.locks import Busy
from ablate.progress import on_terminal, timestamp
from ablate.records import RecordExists, RunRecord, config_key, read_summary, recipe_key, share_readable
from ablate.lifeline import die_with_launcher
from ablate import help as _help  # noqa: F401 (registers ${ablate.help:...} for --help)
from ablate.report.labels import recipe_changes, recipe_label
from ablate.sweep import (find_completed, formats_used, hold_run, job_progress, place_job, remove_unused_job_dir,
                          write_outcome)
from ablate.tracking import RunInfo, flatten, make_tracker
from ablate.train import Diverged, train

log = logging.getLogger("ablate")


COLUMNS = [  # (metrics key, header, format)
    ("epoch", "epoch", "{:>5d}"), ("lr", "lr", "{:>7.4f}"), ("train_loss", "train loss", "{:>10.4f}"),
    ("train_acc", "train acc", "{:>9.2f}"), ("test_loss", "test loss", "{:>9.4f}"),
    ("test_acc", "test acc", "{:>8.2f}"), ("epoch_seconds", "epoch s", "{:>8.2f}"),
    ("train_seconds", "total train s", "{:>13.2f}"),
]


def format_header(stamped: bool = False) -> str:
    """The epoch table's header; ``stamped``: with a time column (off a terminal, ``progress.on_terminal``)."""
    cells = [f"{h:>{len(f.format(0) if 'd' in f else f.format(0.0))}}" for _, h, f in COLUMNS]
    return "  ".join((["time    "] if stamped else []) + cells)


def format_row(row: dict, stamped: bool = False) -> str:
    return "  ".join(([timestamp()] if stamped else []) + [f.format(row[k]) for k, _, f in COLUMNS])


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
            resume_in: Path | None = None, place: Callable[[], dict] | None = None,
            position: tuple[str, str] = ("", "")) -> dict:
    """Validate ``cfg``, train it and keep its records in ``run_dir``; return the summary.

    ``choices`` are the config-group options that composed ``cfg`` (kept for the results table).
    The run's lock is held throughout (``hold_run``: ``Busy`` when another live process trains it).
    With ``resume_in`` (a sweep directory), the recipe's lock there is held too, and a recipe that
    already completed there is not run again. ``place`` (a sweep job's placement: GPU index,
    threads) runs once the run is held; what it returns goes into the summary as it is. ``position``
    (a sweep job's place and the sweep's time left, ``sweep.job_progress``) goes into its first log line. An unfinished run of the same
    recipe in ``run_dir`` with a checkpoint goes on from it (``ablate.checkpoint``).
    """
    validate(cfg)
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    key = config_key(resolved)
    with hold_run(run_dir, key, resume_in):
        if resume_in is not None and (done := find_completed(key, resume_in, formats_used(cfg))):
            log.info("%s seed %d: already completed in %s, not run again", cfg.step.id, cfg.seed, done)
            return dict(read_summary(done), skipped=True)
        root = resume_in if resume_in is not None else Path(run_dir).absolute().parent
        return _train_and_record(cfg, run_dir, resolved, choices, place() if place else {}, root, position)


def run_info(cfg: DictConfig, resolved: dict, choices: dict | None, run_dir: Path, root: Path) -> RunInfo:
    """How trackers name and tag the run: its recipe label (how it differs from its step, as the report
    labels it), scale and seed; the composed config flattened as its parameters."""
    changes = recipe_changes(cfg.step.id, resolved, choices)
    label = recipe_label(cfg.step.id, changes)
    tags = dict(step=cfg.step.id, recipe=" ".join(changes) or "as the step", label=label, arch=cfg.arch.name,
                scale=cfg.scale.name, seed=str(cfg.seed), device=device_name(resolve_device(cfg.device)),
                config_key=config_key(resolved), recipe_key=recipe_key(resolved), run_dir=str(run_dir))
    return RunInfo(name=f"{label} · {cfg.scale.name} · s{cfg.seed}", tags=tags, params=flatten(resolved),
                   root=Path(root), experiment=cfg.tracking.experiment or Path(root).name, run_dir=Path(run_dir))


def announce(cfg: DictConfig, label: str, position: tuple[str, str], checkpoints: Checkpoints, run_dir: Path) -> None:
    """The run's first log lines: where it stands (in a sweep: ``job 3/15 · step4_6 · arch=residual_l2 ·
    seed 0 · about 6 min left (2 done)``) and, with checkpoints, whether it resumes or how it would."""
    where, left = position
    log.info("%s | scale %s | run dir %s", " · ".join(p for p in (where, label, f"seed {cfg.seed}", left) if p),
             cfg.scale.name, run_dir)
    if checkpoints.state:
        log.info("resuming from the checkpoint after epoch %d (%s)", checkpoints.resume_epoch, run_dir)
    elif cfg.checkpoint.every and not where:  # a sweep job resumes by the sweep's own command
        log.info("a checkpoint every %d epochs: if interrupted, the same command with hydra.run.dir=%s goes on "
                 "from the last one", cfg.checkpoint.every, run_dir)


def _train_and_record(cfg: DictConfig, run_dir: Path, resolved: dict, choices: dict | None, facts: dict,
                      root: Path, position: tuple[str, str]) -> dict:
    checkpoints = Checkpoints(run_dir, cfg.checkpoint, config_key(resolved))
    record = RunRecord(run_dir, resolved, choices, resume=checkpoints.state and checkpoints.state["counters"])
    if facts:
        record.update(**facts)
    info = run_info(cfg, resolved, choices, run_dir, root)
    announce(cfg, info.tags["label"], position, checkpoints, run_dir)
    tracker = make_tracker(cfg.tracking)
    # A resumed run goes on in its tracker's run of before, from the epoch after its checkpoint.
    info.first_epoch, info.previous = checkpoints.resume_epoch + 1, record.previous.get("tracking") or {}
    if tracked := tracker.start(info):
        record.update(tracking=tracked)
    stamped = not on_terminal()  # off a terminal no bar shows time passing: each row says when it ended

    def on_start(info: dict) -> None:
        record.update(**info)
        log.info("device %s | precision %s (asked %s) | %s trainable parameters | data %s",
                 info["device"], info["precision_used"], cfg.precision.name, f"{info['params']:,}",
                 info["data_source"])
        if info.get("compile_seconds") is not None:
            log.info("torch.compile took %.1f s (not counted in train time)", info["compile_seconds"])
        log.info(format_header(stamped))

    def on_epoch(row: dict) -> None:
        record.epoch(row)
        tracker.epoch(row)
        log.info(format_row(row, stamped))

    try:
        results = train(cfg, on_start=on_start, on_epoch=on_epoch, checkpoints=checkpoints)
    except BaseException as err:  # KeyboardInterrupt too: the record must say the run did not finish
        kind = failure_kind(err)
        tracker.finish(record.finish("failed", error=f"{type(err).__name__}: {err}", failure=kind,
                                     **({"hint": OOM_HINT} if kind == "out_of_memory" else {})), Path(run_dir))
        raise
    summary = record.finish("completed", **results)
    tracker.finish(summary, Path(run_dir))
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
    # Hydra wrote these under the process's umask; records are readable by all (records.FILE_MODE).
    share_readable(run_dir / ".hydra", *run_dir.glob("*.log"), *([Path(str(hydra_cfg.sweep.dir)) / "multirun.yaml"] if sweeping else []))
    if sweeping:  # a worker that joblib started without ablate's initializer is tied here
        die_with_launcher()
    choices = {k: v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra")}
    # What names the job in its outcome; a value whose interpolation fails is validate's to report.
    outcome: dict = dict(run_dir=str(run_dir), **{k: OmegaConf.select(cfg, path, throw_on_resolution_failure=False)
                                                  for k, path in (("step", "step.id"), ("arch", "arch.name"),
                                                                  ("seed", "seed"))})
    started = time.monotonic()
    try:
        summary = execute(cfg, run_dir, choices, resume_in=run_dir.parent if sweeping else None,
                          place=(lambda: place_job(hydra_cfg, cfg)) if sweeping else None,
                          position=job_progress(hydra_cfg, Path(str(hydra_cfg.sweep.dir))) if sweeping else ("", ""))
        outcome.update(status="skipped" if summary.get("skipped") else "completed",
                       test_acc=summary.get("test_acc"), seconds=round(time.monotonic() - started, 1))
        if summary.get("skipped") and sweeping:  # the record lives elsewhere: no empty directory beside it
            remove_unused_job_dir(run_dir)
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


# Hydra parses `batch=512` as an int and refuses an int as a config-group choice, with a ValueError
# that names neither the override nor the fix (not one of its own errors, so not in BAD_INPUT).
INT_CHOICE_ERROR = "Config group override must be a string or a list"


def int_choice_message(err: BaseException, args: list[str]) -> str | None:
    """For Hydra's refusal of a number as a group's option: which overrides did it and what to write
    instead (``batch_size=512``, the value, or ``batch='512'``, the named option); None for any other error."""
    if not (isinstance(err, ValueError) and INT_CHOICE_ERROR in str(err)):
        return None
    culprits = [a for a in args if re.fullmatch(r"\+{0,2}([\w/]+)=\d+(,\d+)*", a)
                and (CONF_DIR / a.lstrip("+").split("=")[0]).is_dir()]
    group, value = (culprits[0].split("=", 1) if culprits else ("group", "512"))
    return (f"{' '.join(culprits) or 'a group=<number> override'}: an option named by a number needs quotes "
            f"({group}='{value.split(',')[0]}'), and any batch size is a value: batch_size=<n>")


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
            if (message := int_choice_message(err, sys.argv[1:])) is None:
                return original(lambda: _reraise(err))
            print(f"ablate: {message}", file=sys.stderr, flush=True)
            sys.exit(2)

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    finally:
        hydra_utils.run_and_report = original


def _reraise(err: BaseException) -> None:
    raise err


MULTIRUN_FLAGS, CFG_FLAGS = ("-m", "--multirun"), ("-c", "--cfg")


def main(argv: list[str] | None = None) -> None:
    """The command line (``argv``, default ``sys.argv[1:]``): put ablate's configs in Hydra's store, then
    let Hydra compose and run ``job`` (once, or once per job of a sweep). Hydra cannot show the config
    of a sweep (``-m --cfg job`` stops in a traceback there): that is ``ablate plan``'s to list, and
    the message says so."""
    register()
    if argv is not None:  # Hydra reads the command line from sys.argv
        sys.argv = [sys.argv[0], *argv]
    args = sys.argv[1:]
    if any(a in MULTIRUN_FLAGS for a in args) and (plan := _without_cfg_flag(args)) != args:
        print("ablate: --cfg shows the config of one run, not of a sweep (-m); to list the jobs of a sweep, "
              f"what each would run and whether it already ran: ablate plan {' '.join(plan)}", file=sys.stderr)
        sys.exit(2)
    with bad_input_exits_2():
        job()


def _without_cfg_flag(args: list[str]) -> list[str]:
    """``args`` without Hydra's ``--cfg <job|hydra|all>`` (or ``-c``, ``--cfg=...``)."""
    kept, skip = [], False
    for arg in args:
        if not skip and not arg.startswith("--cfg=") and arg not in CFG_FLAGS:
            kept.append(arg)
        skip = arg in CFG_FLAGS
    return kept


if __name__ == "__main__":
    main()
