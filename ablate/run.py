"""Entry point: ``python -m ablate.run +step=step4 [group=option ...] [key=value ...]``.

compose (Hydra) -> validate -> train -> record. Bad input stops before any training with a message
that names the value at fault; a run that fails midway is recorded as failed, never lost.
"""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ablate.config import ArchConfig, ConfigError, register_configs, validate
from ablate.data import DataError
from ablate.models import REGISTRY
from ablate.records import RecordExists, RunRecord, config_key, read_config, read_summary
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


def find_completed(key: str, sweep_dir: Path) -> Path | None:
    """A run directory of ``sweep_dir`` that already completed the recipe with this config key."""
    for path in sorted(Path(sweep_dir).glob("*/summary.json")):
        summary, config = read_summary(path.parent), read_config(path.parent)
        # The key is recomputed from the recorded config: records older than a schema field match.
        if summary and summary.get("status") == "completed" and config and config_key(config) == key:
            return path.parent
    return None


def execute(cfg: DictConfig, run_dir: Path, choices: dict | None = None,
            resume_in: Path | None = None) -> dict:
    """Validate ``cfg``, train it and keep its records in ``run_dir``; return the summary.

    ``choices`` are the config-group options that composed ``cfg`` (kept for the results table).
    With ``resume_in`` (a sweep directory), a recipe that already completed there is not run again.
    """
    validate(cfg)
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    if resume_in is not None and (done := find_completed(config_key(resolved), resume_in)):
        log.info("%s seed %d: already completed in %s, not run again", cfg.step.id, cfg.seed, done)
        return dict(read_summary(done), skipped=True)
    record = RunRecord(run_dir, resolved, choices)
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
        record.finish("failed", error=f"{type(err).__name__}: {err}")
        raise
    summary = record.finish("completed", **results)
    log.info("%s: test accuracy %.2f%% after %d epochs, %.1f s training + %.1f s evaluation (%s, %s)",
             cfg.step.id, summary["test_acc"], summary["epochs"], summary["train_seconds"],
             summary["eval_seconds"], summary["device"], summary["precision_used"])
    return summary


register_all()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    choices = {k: v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra")}
    try:
        summary = execute(cfg, run_dir, choices, resume_in=run_dir.parent if sweeping else None)
    except (ConfigError, DataError, RecordExists, Diverged) as err:
        print(f"ablate: {err}", file=sys.stderr)  # a message for the user, not a traceback
        if sweeping:
            return None
        sys.exit(1 if isinstance(err, Diverged) else 2)
    except Exception:  # recorded as failed by execute; a sweep goes on to its next job
        if not sweeping:
            raise
        log.exception("%s seed %d failed (recorded in %s); the sweep goes on", cfg.step.id, cfg.seed, run_dir)
        return None
    return summary["test_acc"]


if __name__ == "__main__":
    sys.argv[1:] = quote_numeric_choices(sys.argv[1:])
    main()
