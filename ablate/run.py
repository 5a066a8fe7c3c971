"""Entry point: ``python -m ablate.run +step=step4 [group=option ...] [key=value ...]``.

compose (Hydra) -> validate -> train -> record. Bad input stops before any training with a message
that names the value at fault; a run that fails midway is recorded as failed, never lost.

Sweeps (``-m``) run through any Hydra launcher: the basic one (one job after another in this
process), ``hydra/launcher=joblib`` (parallel worker processes on this machine) or
``hydra/launcher=submitit_slurm`` / ``submitit_local``. Each job places itself (``place_job``) before
it touches a device, gets one outcome (completed / skipped / failed, with the kind of failure) and
never stops the sweep; ``ablate.records.SweepCallback`` prints the closing summary.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ablate.config import ArchConfig, ConfigError, register_configs, validate
from ablate.data import DataError
from ablate.device import cpu_count, resolve_channels_last, resolve_device, resolve_precision
from ablate.models import REGISTRY
from ablate.records import RecordExists, RunRecord, config_key, read_config, read_summary, write_outcome
from ablate.studies import register_sweeper
from ablate.train import Diverged, train

log = logging.getLogger("ablate")

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

COLUMNS = [  # (metrics key, header, format)
    ("epoch", "epoch", "{:>5d}"), ("lr", "lr", "{:>7.4f}"), ("train_loss", "train loss", "{:>10.4f}"),
    ("train_acc", "train acc", "{:>9.2f}"), ("test_loss", "test loss", "{:>9.4f}"),
    ("test_acc", "test acc", "{:>8.2f}"), ("epoch_seconds", "epoch s", "{:>8.2f}"),
    ("train_seconds", "total train s", "{:>13.2f}"),
]


NUMERIC_GROUPS = ("batch_size",)
_NUMERIC_CHOICE = re.compile(r"^(\+{0,2}(%s))=(\d+(,\d+)*)$" % "|".join(NUMERIC_GROUPS))


def quote_numeric_choices(overrides: list[str]) -> list[str]:
    """``batch_size=512`` -> ``batch_size='512'``: Hydra parses 512 as an int and refuses an int as a
    config-group choice, so the options named by numbers are quoted for it (sweeps too)."""
    def quote(arg: str) -> str:
        m = _NUMERIC_CHOICE.match(arg)
        return f"{m.group(1)}=" + ",".join(f"'{v}'" for v in m.group(3).split(",")) if m else arg
    return [quote(a) for a in overrides]


def register_all() -> None:
    """The schema, one ``arch`` option per registered network (the registry is the source), and the
    Post 5 coordinate-descent sweeper (``hydra/sweeper=coordinate_descent``)."""
    register_configs()
    register_sweeper()
    store = ConfigStore.instance()
    for name in REGISTRY:
        store.store(group="arch", name=name, node=ArchConfig(name=name))


def format_header() -> str:
    return "  ".join(f"{h:>{len(f.format(0) if 'd' in f else f.format(0.0))}}" for _, h, f in COLUMNS)


def format_row(row: dict) -> str:
    return "  ".join(f.format(row[k]) for k, _, f in COLUMNS)


def formats_used(cfg: DictConfig) -> dict:
    """The precision and memory layout this recipe runs in on this machine (``ablate.device``)."""
    device = resolve_device(cfg.device)
    return dict(precision_used=resolve_precision(cfg.precision.name, device, cfg.precision.cpu_half).name,
                channels_last=resolve_channels_last(cfg.precision.channels_last, device))


def _recorded_formats(summary: dict, config: dict) -> dict:
    # Records from before the layout was recorded ran the layout their config named (false or true).
    layout = summary.get("channels_last", bool(config.get("precision", {}).get("channels_last")))
    return dict(precision_used=summary.get("precision_used"), channels_last=layout)


def find_completed(key: str, sweep_dir: Path, formats: dict | None = None) -> Path | None:
    """A run directory of ``sweep_dir`` that already completed the recipe with this config key and,
    when ``formats`` is given, ran in that precision and layout (``fp16`` on a CPU may have run as
    fp32 or bf16, and ``channels_last`` left to the device resolves differently on a CPU and a GPU:
    a record of one is never taken for a run of another)."""
    for path in sorted(Path(sweep_dir).glob("*/summary.json")):
        summary, config = read_summary(path.parent), read_config(path.parent)
        # The key is recomputed from the recorded config: records older than a schema field match.
        if summary and summary.get("status") == "completed" and config and config_key(config) == key \
                and (formats is None or _recorded_formats(summary, config) == formats):
            return path.parent
    return None


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
# Job placement: which GPU and how many CPU threads a sweep job gets


def joblib_jobs(n_jobs: int | None, cpus: int) -> int:
    """How many jobs joblib runs at once for ``n_jobs`` (-1: one per CPU, -2: all but one, ...)."""
    if n_jobs is None or n_jobs == 0:
        return 1
    return n_jobs if n_jobs > 0 else max(1, cpus + 1 + n_jobs)


_claimed_gpu: tuple[int, object] | None = None  # (index, locked file) held for this process's life


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
    try:
        import fcntl
    except ImportError:  # not on a POSIX system: job number modulo the GPU count
        return preferred % n_gpus, False
    lock_dir = lock_dir or Path(tempfile.gettempdir()) / f"ablate-gpu-locks-{os.getuid()}"
    # Named by the physical GPU where CUDA_VISIBLE_DEVICES says which, so processes that see
    # different subsets of the machine's GPUs still agree on what is taken.
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    for i in range(n_gpus):
        k = (preferred + i) % n_gpus
        try:
            lock_dir.mkdir(parents=True, exist_ok=True)
            handle = open(lock_dir / f"gpu-{visible[k] if k < len(visible) else k}.lock", "a")
        except OSError as err:  # no lock directory: placement by job number, never a failed job
            log.warning("cannot use GPU lock files in %s (%s); job placed on GPU %d by its number",
                        lock_dir, err, preferred % n_gpus)
            return preferred % n_gpus, False
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _claimed_gpu = (k, handle)
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
    threads, parallel = None, 1
    if "joblib" in target:
        parallel = joblib_jobs(launcher.get("n_jobs", -1), cpu_count())
        threads = max(1, cpu_count() // parallel)
    elif "submitit" in target:
        if launcher.get("cpus_per_task"):
            threads = int(launcher.cpus_per_task)
        elif target.endswith("LocalLauncher"):
            threads = 1
        if target.endswith("LocalLauncher"):  # every job of the batch on this machine (SLURM: own GPUs)
            parallel = int(launcher.get("array_parallelism") or 1)
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
# One run


def execute(cfg: DictConfig, run_dir: Path, choices: dict | None = None,
            resume_in: Path | None = None, facts: dict | None = None) -> dict:
    """Validate ``cfg``, train it and keep its records in ``run_dir``; return the summary.

    ``choices`` are the config-group options that composed ``cfg`` (kept for the results table).
    With ``resume_in`` (a sweep directory), a recipe that already completed there is not run again.
    ``facts`` (how the job was placed: GPU index, threads) go into the summary as they are.
    """
    validate(cfg)
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    if resume_in is not None and (done := find_completed(config_key(resolved), resume_in, formats_used(cfg))):
        log.info("%s seed %d: already completed in %s, not run again", cfg.step.id, cfg.seed, done)
        return dict(read_summary(done), skipped=True)
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


register_all()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One job. In a sweep nothing it raises stops the sweep: it is recorded (``summary.json``, and an
    outcome for the sweep's closing line) and the next job runs. A single run exits non-zero instead:
    2 for bad input (config, data, an occupied run directory), 1 for a run that failed."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    choices = {k: v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra")}
    outcome: dict = dict(run_dir=str(run_dir), step=cfg.step.id, arch=cfg.arch.name, seed=cfg.seed)
    try:
        facts = place_job(hydra_cfg, cfg) if sweeping else {}
        summary = execute(cfg, run_dir, choices, resume_in=run_dir.parent if sweeping else None, facts=facts)
        outcome.update(status="skipped" if summary.get("skipped") else "completed",
                       test_acc=summary.get("test_acc"))
        return summary["test_acc"]
    except (ConfigError, DataError, RecordExists, Diverged) as err:
        print(f"ablate: {err}", file=sys.stderr)  # a message for the user, not a traceback
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


if __name__ == "__main__":
    sys.argv[1:] = quote_numeric_choices(sys.argv[1:])
    main()
