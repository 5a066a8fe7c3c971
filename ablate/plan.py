"""``ablate plan <the overrides of a sweep>`` (``python -m ablate.plan``): what a sweep would run,
without running it.

The jobs are expanded as Hydra's basic sweeper expands them (``ablate.sweep.sweep_jobs``) and each
is composed as its launcher would compose it, so the plan names the same jobs, in the same order,
as ``ablate run -m <the same overrides>``. For each: its recipe label (how it differs from its step,
as the report labels it), its seed, its status in the target sweep directory and an estimate of its
duration. Status follows the sweep's own resume rule (``ablate.sweep.find_completed``): ``done`` (it
would be skipped), ``running`` (another live process trains it now), ``failed before`` or ``to run``.
The estimate is the median wall time of the completed records of the same recipe there (other
seeds), else, marked ``~``, of the same step and scale. Nothing is trained and nothing is written.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from ablate.compose import compose, hydra_ready
from ablate.config import ConfigError
from ablate.locks import is_held
from ablate.progress import duration
from ablate.records import SUMMARY, config_key, read_config, read_summary, recipe_key
from ablate.report.labels import recipe_changes, recipe_label
from ablate.sweep import RUN_LOCK, find_completed, formats_used, jobs_at_once, sweep_jobs
from ablate.validate import validate

STATUSES = ("done", "running", "failed before", "to run")


@dataclass
class Record:
    """A run record of the sweep directory, as the plan needs it."""

    key: str
    recipe: str
    step: str
    scale: str
    status: str  # the summary's: completed, failed, running
    held: bool  # a live process holds its lock
    seconds: Optional[float]  # wall seconds of a completed run


def sweep_records(sweep_dir: Path) -> list[Record]:
    records = []
    for path in sorted(Path(sweep_dir).glob(f"*/{SUMMARY}")):
        summary, config = read_summary(path.parent), read_config(path.parent)
        if summary and config:
            records.append(Record(config_key(config), recipe_key(config), str(summary.get("step")),
                                  str(summary.get("scale")), str(summary.get("status")),
                                  is_held(path.parent / RUN_LOCK), summary.get("wall_seconds")))
    return records


@dataclass
class Job:
    num: int
    label: str
    seed: int
    subdir: str
    status: str
    estimate: Optional[float]  # seconds
    like: str  # what the estimate comes from: 'recipe' (other seeds), 'step' (same step and scale), ''


def status_of(cfg: DictConfig, key: str, sweep_dir: Path, records: list[Record]) -> str:
    """The job's status under the sweep's resume rule: completed in this precision and layout = done."""
    if find_completed(key, sweep_dir, formats_used(cfg)) is not None:
        return "done"
    mine = [r for r in records if r.key == key]
    if any(r.status == "running" and r.held for r in mine):
        return "running"
    return "failed before" if any(r.status == "failed" for r in mine) else "to run"


def estimate(recipe: str, step: str, scale: str, records: list[Record]) -> tuple[Optional[float], str]:
    """The median wall seconds of completed records of the same recipe, else of the same step and scale."""
    done = [r for r in records if r.status == "completed" and isinstance(r.seconds, (int, float))]
    for like, matching in (("recipe", [r for r in done if r.recipe == recipe]),
                           ("step", [r for r in done if (r.step, r.scale) == (step, scale)])):
        if matching:
            return statistics.median(r.seconds for r in matching), like
    return None, ""


def job_config(master: DictConfig, overrides: list[str], num: int, loader: Any) -> DictConfig:
    """Job ``num``'s config, composed as Hydra's basic launcher composes it (``hydra`` node included,
    set as the current HydraConfig so that the sweep's subdirectory pattern resolves)."""
    cfg = loader.load_sweep_config(master, overrides)
    with open_dict(cfg):
        cfg.hydra.job.id = cfg.hydra.job.num = num
    HydraConfig.instance().set_config(cfg)
    return cfg


def plan(overrides: Sequence[str]) -> tuple[Path, DictConfig, Optional[list[Job]]]:
    """The sweep directory, the sweep's config and its jobs (None when its sweeper chooses them as it goes)."""
    with hydra_ready() as loader:
        master = compose(list(overrides), return_hydra_config=True, run_mode=RunMode.MULTIRUN)
        sweep_dir = Path(str(master.hydra.sweep.dir))
        expanded = sweep_jobs(master, loader)
        if expanded is None:
            return sweep_dir, master, None
        records = sweep_records(sweep_dir)
        jobs = [describe(job_config(master, list(job_overrides), num, loader), num, sweep_dir, records)
                for num, job_overrides in enumerate(expanded)]
    return sweep_dir, master, jobs


def describe(cfg: DictConfig, num: int, sweep_dir: Path, records: list[Record]) -> Job:
    """Job ``num`` of the plan, from its composed config (its ``hydra`` node included, then dropped):
    checked as the job would check it, labelled as the report labels it."""
    subdir, choices = str(cfg.hydra.sweep.subdir), dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    validate(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    step = cfg.step.id
    seconds, like = estimate(recipe_key(resolved), step, cfg.scale.name, records)
    return Job(num, recipe_label(step, recipe_changes(step, resolved, choices)), cfg.seed, subdir,
               status_of(cfg, config_key(resolved), sweep_dir, records), seconds, like)


def format_plan(sweep_dir: Path, jobs: list[Job], at_once: int = 1) -> str:
    """One line per job, then a closing count line with the estimated time of what is left to run."""
    width = max(len(j.label) for j in jobs)
    lines = [f"ablate plan: {len(jobs)} jobs of the sweep into {sweep_dir} (nothing is trained)",
             f"  {'job':>4}  {'status':<13}  {'estimate':>9}  {'seed':>4}  {'recipe':<{width}}  directory"]
    for j in jobs:
        shown = "" if j.estimate is None else ("~" if j.like == "step" else "") + duration(j.estimate)
        lines.append(f"  {j.num:>4}  {j.status:<13}  {shown:>9}  {j.seed:>4}  {j.label:<{width}}  {j.subdir}")
    counts = {s: sum(j.status == s for j in jobs) for s in STATUSES}
    line = f"{len(jobs)} jobs: {counts['done']} done, {counts['to run']} to run"
    line += "".join(f", {counts[s]} {s}" for s in ("failed before", "running") if counts[s])
    left = [j for j in jobs if j.status in ("to run", "failed before")]
    known = [j.estimate for j in left if j.estimate is not None]
    if known:
        total = sum(known) / at_once
        line += (f"; about {duration(total)} to run {len(known)} of them"
                 + (f" ({at_once} at once)" if at_once > 1 else "")
                 + (f", {len(left) - len(known)} without an estimate" if len(known) < len(left) else "")
                 + " (~: from other recipes of the same step and scale)" * any(j.like == "step" for j in left))
    elif left:
        line += "; no estimate yet (no completed record of these recipes or steps in the sweep directory)"
    return "\n".join(lines + [line])


def main(argv: Optional[Sequence[str]] = None) -> None:
    from ablate.run import BAD_INPUT, int_choice_message, one_line

    parser = argparse.ArgumentParser(
        prog="ablate plan", description="List the jobs a sweep would run, without training anything: each job's "
        "recipe label, seed, status in the sweep directory (done, running, failed before, to run) and an estimated "
        "duration from the completed records there; then a count line.",
        epilog="Example: ablate plan -m +experiment=arch15 scale=smoke hydra.sweep.dir=runs/arch15-smoke")
    parser.add_argument("-m", "--multirun", action="store_true", help="accepted as in the sweep's own command line")
    parser.add_argument("overrides", nargs="*", help="the sweep's overrides, exactly as `ablate run -m` takes them")
    args = parser.parse_args(argv)
    try:
        sweep_dir, master, jobs = plan(args.overrides)
    except Exception as err:  # bad input exits 2 with one line, as `ablate run` does; anything else is a bug
        message = one_line(err) if isinstance(err, (*BAD_INPUT, ConfigError)) else int_choice_message(err, args.overrides)
        if message is None:
            raise
        print(f"ablate plan: {message}", file=sys.stderr)
        sys.exit(2)
    if jobs is None:
        print(f"ablate plan: the sweeper of this sweep ({master.hydra.sweeper._target_}) chooses each job from the "
              "results of the jobs before it, so its jobs cannot be listed before it runs")
        return
    print(format_plan(sweep_dir, jobs, jobs_at_once(master.hydra.launcher)))


if __name__ == "__main__":
    main()
