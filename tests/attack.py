"""The attack of issue 16, repeated against the command line at smoke scale, with its counts.

    python -m tests.attack [--trials 10] [--seed 0] [--dir DIR] [--parts kill,concurrent,bad-input]
    python -m tests.attack bad-input --json DIR      # the bad-input cases only, as JSON (tests use it)

* **kill**: ``--trials`` joblib sweeps (4 jobs, ``n_jobs=2``), the main process SIGKILLed at a random
  moment; the process tree is checked a few seconds later, then the sweep is started again at once.
* **concurrent**: sweeps started together into one directory: the same sweep twice, two recipes
  that share step and seeds, the same recipes numbered differently, and two diverging sweeps.
* **bad-input**: about 20 command lines that must exit 2 (or 1 for a failed run) with a one-line
  message naming the culprit and no traceback.

Every sweep directory is then audited from its files alone. The counts, each of which must be 0:
runs lost, trained twice, filed under the wrong recipe, corrupt files, temporary files left,
orphans, tracebacks, wrong closing lines, missed divergences, wrong exit codes, culprits not named.
The script exits 1 when any count is not 0. Run it pinned to one core, e.g.
``OMP_NUM_THREADS=1 taskset -c 1 python -m tests.attack``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["scale=smoke", "data=synthetic", "progress=false"]  # as tests/conftest.py
STEP = ["+step=step4", *SMOKE]
ORPHAN_GRACE = 5.0  # seconds a worker may outlive its killed launcher
COMPLETION = re.compile(r": test accuracy [\d.]+% after \d+ epochs")  # ablate.run logs it once per training
CLOSING = re.compile(r"ablate sweep .*?: (\d+) jobs: (\d+) completed, (\d+) failed, (\d+) skipped \(already "
                     r"completed\), (\d+) busy")


@dataclasses.dataclass
class Counts:
    runs_lost: int = 0
    trained_twice: int = 0
    wrong_recipe: int = 0
    corrupt_files: int = 0
    temp_files: int = 0
    orphans: int = 0
    tracebacks: int = 0
    closing_lines_wrong: int = 0
    divergence_missed: int = 0
    wrong_exit_codes: int = 0
    culprit_not_named: int = 0
    notes: list = dataclasses.field(default_factory=list)

    def add(self, other: "Counts") -> None:
        for f in dataclasses.fields(self):
            if f.name == "notes":
                self.notes += other.notes
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def numbers(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "notes"}


# --------------------------------------------------------------------------------------------------
# Reading a sweep directory


def _strict_json(text: str) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def expected_keys(jobs: list[list[str]]) -> dict[str, str]:
    """config key -> the overrides of the job that computes it."""
    from omegaconf import OmegaConf

    from ablate.compose import compose
    from ablate.records import config_key

    return {config_key(OmegaConf.to_container(compose(job), resolve=True)): " ".join(job) for job in jobs}


def audit(sweep_dir: Path, expected: dict[str, str], diverging: bool = False) -> Counts:
    """Judge a sweep directory from its files: every expected recipe completed once, in a directory
    named for it, with files that parse strictly and agree with each other."""
    import yaml

    from ablate.records import DIR_KEY_CHARS, recipe_key, record_problems

    counts = Counts()
    completions: dict[str, int] = {}
    valid: dict[str, int] = {}
    for run in sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (run / "summary.json").is_file():
            continue  # a job skipped or busy here: its run lives in another directory
        try:
            summary = _strict_json((run / "summary.json").read_text())
            config = yaml.safe_load((run / "config.yaml").read_text())
            rows = [_strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        except (OSError, ValueError, yaml.YAMLError) as err:
            counts.corrupt_files += 1
            counts.notes.append(f"corrupt: {run}: {err}")
            continue
        problems = record_problems(run, summary, config, rows)
        for problem in problems:
            if "metrics.jsonl" in problem.split(":")[0]:
                counts.corrupt_files += 1
            else:
                counts.wrong_recipe += 1
            counts.notes.append(problem)
        if not run.name.endswith("_" + recipe_key(config)[:DIR_KEY_CHARS]):
            counts.wrong_recipe += 1
            counts.notes.append(f"wrong recipe: {run.name} holds recipe {recipe_key(config)[:DIR_KEY_CHARS]}")
        key = summary.get("config_key")
        log = (run / "run.log").read_text() if (run / "run.log").is_file() else ""
        completions[key] = completions.get(key, 0) + len(COMPLETION.findall(log))
        if summary.get("status") == "completed" and not problems:
            valid[key] = valid.get(key, 0) + 1
        if diverging and (summary.get("status") != "failed" or summary.get("failure") != "diverged"):
            counts.divergence_missed += 1
            counts.notes.append(f"divergence missed: {run} is {summary.get('status')}")
    for key, job in expected.items():
        if not valid.get(key):
            counts.runs_lost += 1
            counts.notes.append(f"lost: {job} (key {key}) has no valid completed record in {sweep_dir}")
    for key, n in completions.items():
        if n > 1:
            counts.trained_twice += 1
            counts.notes.append(f"trained twice: key {key} trained to the end {n} times in {sweep_dir}")
    for outcome in Path(sweep_dir).glob(".ablate_jobs/*/*.json"):
        try:
            _strict_json(outcome.read_text())
        except (OSError, ValueError) as err:
            counts.corrupt_files += 1
            counts.notes.append(f"corrupt: {outcome}: {err}")
    temps = list(Path(sweep_dir).rglob("*.tmp"))
    counts.temp_files += len(temps)
    counts.notes += [f"temporary file left: {t}" for t in temps]
    return counts


def closing_line(output: str) -> tuple[int, int, int, int, int] | None:
    """(jobs, completed, failed, skipped, busy) of a sweep's closing line."""
    m = CLOSING.search(output)
    return tuple(int(g) for g in m.groups()) if m else None  # type: ignore[return-value]


def _tracebacks(output: str, what: str, counts: Counts) -> None:
    if "Traceback" in output:
        counts.tracebacks += 1
        counts.notes.append(f"traceback in {what}: ...{output[output.index('Traceback'):][:300]}")


# --------------------------------------------------------------------------------------------------
# Processes


def _ppids() -> dict[int, int]:
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            table[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    return table


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for child, parent in _ppids().items():
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a dead child nobody reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABLATE_SWEEP")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def sweep_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ablate.run", "-m", *args]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "w")
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill_orphans(pids: set[int]) -> int:
    """SIGKILL the processes of ``pids`` that are still alive (ours: left by a killed sweep); how many."""
    survivors = [p for p in pids if alive(p)]
    for p in survivors:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    return len(survivors)


# --------------------------------------------------------------------------------------------------
# The attack's parts


def _statuses(sweep: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    for path in sweep.glob("*/summary.json"):
        try:
            status = json.loads(path.read_text()).get("status", "?")
        except (OSError, ValueError):
            status = "unreadable"
        found[status] = found.get(status, 0) + 1
    return found


def kill_trials(base: Path, trials: int, rng: random.Random, seeds: str = "0,1,2,3") -> Counts:
    """SIGKILL the main process of a joblib sweep at a random moment of its life (uniform over the
    duration of one whole sweep, measured first on this machine); a few seconds later no worker may
    be left; the sweep started again at once must complete every run, each trained once."""
    counts = Counts()
    base.mkdir(parents=True, exist_ok=True)
    jobs = [[*STEP, f"seed={s}"] for s in seeds.split(",")]
    expected = expected_keys(jobs)
    t0 = time.time()
    whole = subprocess.run(sweep_command(*STEP, f"seed={seeds}", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                                         f"hydra.sweep.dir={base / 'whole'}"), cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=900)
    latest = time.time() - t0
    _tracebacks(whole.stdout + whole.stderr, "the whole sweep", counts)
    counts.add(audit(base / "whole", expected))
    print(f"  one whole sweep: {latest:.1f} s, exit {whole.returncode}; kills fall in 1..{latest:.0f} s", flush=True)
    for trial in range(trials):
        sweep = base / f"kill{trial}"
        args = [*STEP, f"seed={seeds}", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}"]
        proc = start(sweep_command(*args), base / f"kill{trial}.killed.log")
        at = rng.uniform(1.0, latest)
        deadline = time.time() + at
        tree: set[int] = set()
        while time.time() < deadline and proc.poll() is None:
            tree |= descendants(proc.pid)  # the workers as they come
            time.sleep(0.1)
        tree |= descendants(proc.pid)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # the main process only: its workers are on their own
        proc.wait()
        at_kill = _statuses(sweep) if sweep.is_dir() else {}
        time.sleep(ORPHAN_GRACE)
        orphans = kill_orphans(tree)
        counts.orphans += orphans
        if orphans:
            counts.notes.append(f"trial {trial}: {orphans} process(es) outlived the launcher by {ORPHAN_GRACE:g} s")
        _tracebacks((base / f"kill{trial}.killed.log").read_text(), f"killed sweep {trial}", counts)
        again = subprocess.run(sweep_command(*args), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
        output = again.stdout + again.stderr
        (base / f"kill{trial}.rerun.log").write_text(output)
        _tracebacks(output, f"re-run {trial}", counts)
        line = closing_line(output)
        if again.returncode != 0 or line is None or line[0] != len(jobs) or line[2] or line[4] \
                or line[1] + line[3] != len(jobs):
            counts.closing_lines_wrong += 1
            counts.notes.append(f"trial {trial} (killed at {at:.1f} s): re-run exit {again.returncode}, line {line}")
        counts.add(audit(sweep, expected))
        print(f"  kill trial {trial}: killed at {at:.1f} s (runs then: {at_kill or 'none'}), {len(tree)} processes, "
              f"{orphans} orphans; re-run {line}", flush=True)
    return counts


def concurrent_cases(base: Path) -> Counts:
    """Sweeps started together into one directory; every run trained once, in its own directory."""
    counts = Counts()
    base.mkdir(parents=True, exist_ok=True)
    cases: list[tuple[str, list[list[str]], bool]] = [
        ("identical", [[*STEP, "seed=0,1,2"], [*STEP, "seed=0,1,2"]], False),
        ("two_recipes", [[*STEP, "seed=0,1,2"], [*STEP, "tta=flip", "seed=0,1,2"]], False),
        ("renumbered", [[*STEP, "seed=0,1,2"], [*STEP, "seed=2,1,0"]], False),
        ("diverging", [[*STEP, "schedule.peak=1e6", "seed=0,1,2"], [*STEP, "schedule.peak=1e6", "seed=3,4,5"]], True),
    ]
    for name, sweeps, diverging in cases:
        sweep_dir = base / name
        procs = [start(sweep_command(*args, f"hydra.sweep.dir={sweep_dir}"), base / f"{name}.{i}.log")
                 for i, args in enumerate(sweeps)]
        for p in procs:
            p.wait(timeout=900)
        outputs = [(base / f"{name}.{i}.log").read_text() for i in range(len(sweeps))]
        lines = [closing_line(o) for o in outputs]
        for i, output in enumerate(outputs):
            _tracebacks(output, f"{name} sweep {i}", counts)
        jobs = [[a for a in args if not a.startswith("seed=")] + [f"seed={s}"]
                for args in sweeps for s in next(a for a in args if a.startswith("seed="))[5:].split(",")]
        expected = {} if diverging else expected_keys(jobs)
        wrong = any(line is None or line[0] != 3 for line in lines)
        if not wrong and diverging:  # each line counts its own three failures
            wrong = any(line[1:] != (0, 3, 0, 0) for line in lines) or any(p.returncode != 1 for p in procs)
        elif not wrong:
            trained = sum(line[1] for line in lines)
            wrong = trained != len(expected) or any(line[2] for line in lines) \
                or any(p.returncode != 0 for p in procs)
        if wrong:
            counts.closing_lines_wrong += 1
            counts.notes.append(f"{name}: closing lines {lines}, exit {[p.returncode for p in procs]}")
        counts.add(audit(sweep_dir, expected, diverging=diverging))
        print(f"  concurrent {name}: closing lines {lines}", flush=True)
    return counts


# --------------------------------------------------------------------------------------------------
# Bad input: one forked copy of this process per case, so the imports are paid once


@dataclasses.dataclass
class Case:
    name: str
    args: list[str]  # "{tmp}" stands for the case's own temporary directory
    expected: list[str]  # what the message must say (the culprit)
    code: int = 2
    module: str = "ablate.run"


def bad_input_cases() -> list[Case]:
    import torch

    run = ["+step=step4", *SMOKE, "hydra.run.dir={tmp}/run"]
    no_gpu = not torch.cuda.is_available()
    return [
        Case("unknown_step", ["+step=nosuch", *SMOKE, "hydra.run.dir={tmp}/run"],
             ["Could not find 'step/nosuch'", "Available options in 'step'"]),
        Case("unknown_arch", [*run, "arch=nosuch"], ["Could not find 'arch/nosuch'", "Available options in 'arch'"]),
        Case("unknown_option", [*run, "batch='0'"], ["Could not find 'batch/0'", "Available options in 'batch'"]),
        Case("numbered_option_unquoted", [*run, "batch=512"], ["batch=512: an option named by a number needs quotes "
                                                               "(batch='512')", "batch_size=<n>"]),
        Case("batch_size_zero", [*run, "batch_size=0"], ["batch_size=0 must be > 0"]),
        Case("batch_size_not_a_number", [*run, "batch_size=oops"], ["batch_size", "oops"]),
        Case("unknown_key", [*run, "nosuchkey=1"], ["Key 'nosuchkey' not in 'Config'"]),
        Case("appended_unknown_key", [*run, "+foo=1"], ["foo is not a key of the configuration"]),
        Case("appended_misspelt_key", [*run, "+optim.momentumm=0.5"],
             ["optim.momentumm is not a key", "did you mean optim.momentum?"]),
        Case("wrong_type_float", [*run, "arch.width_mult=wide"], ["Value 'wide'", "arch.width_mult"]),
        Case("wrong_type_int", [*run, "seed=1.5"], ["Value '1.5'", "seed"]),
        Case("seed_float_huge", [*run, "seed=1.2e29"], ["seed=1.2e29"]),
        Case("seed_too_large", [*run, f"seed={2 ** 63}"], [f"seed={2 ** 63} must be in 0 <= seed < 2^63"]),
        Case("seed_negative", [*run, "seed=-1"], ["seed=-1 must be in 0 <= seed < 2^63"]),
        Case("nesterov_without_momentum", [*run, "optim.momentum=0"], ["optim.nesterov=true needs optim.momentum > 0"]),
        Case("device_unparsable", [*run, "device=banana"], ["device='banana' is not a device"]),
        Case("device_without_gpu", [*run, "device=cuda" if no_gpu else "device=cuda:99"],
             ["device='cuda'" if no_gpu else "device='cuda:99'", "use device=auto or device=cpu" if no_gpu else "indices"]),
        Case("failing_interpolation", [*run, "data.root=${oc.env:ABLATE_NO_SUCH_VARIABLE}"],
             ["data.root=${oc.env:ABLATE_NO_SUCH_VARIABLE}: cannot be resolved", "ABLATE_NO_SUCH_VARIABLE"]),
        Case("override_syntax", [*run, "schedule.lr=[0,0.4"], ["schedule.lr=[0,0.4", "override_grammar"]),
        Case("impossible_values", [*run, "norm.splits=5", "arch.width_mult=0"],
             ["norm.splits=5 does not divide batch_size=512", "arch.width_mult=0.0 must be > 0"]),
        Case("sweep_unknown_step", ["-m", "+step=nosuch", *SMOKE, "hydra.sweep.dir={tmp}/sweep"],
             ["Could not find 'step/nosuch'"]),
        Case("sweep_appended_unknown_key", ["-m", *STEP, "+foo=1", "hydra.sweep.dir={tmp}/sweep"],
             ["foo is not a key of the configuration"], code=1),  # a sweep with a failed job exits 1
        Case("run_dir_under_a_file", ["+step=step4", *SMOKE, "hydra.run.dir={tmp}/file/run"],
             ["cannot write the output directory {tmp}/file/run"]),
        Case("diverged_run", [*run, "schedule.peak=1e6"], ["step4 seed 0 diverged", "loss is"], code=1),
        Case("report_out_under_a_file", ["{tmp}", "--out", "{tmp}/file/report"], ["cannot write the report to {tmp}/file/report"],
             module="ablate.report"),
        Case("report_target_nan", ["{tmp}", "--target", "nan"], ["--target: 'nan' is not a percentage"], module="ablate.report"),
        Case("report_runs_missing", ["{tmp}/nowhere"], ["{tmp}/nowhere is not a directory"], module="ablate.report"),
    ]


def _mains() -> dict[str, Callable[[], None]]:
    import ablate.report
    import ablate.run

    return {"ablate.run": ablate.run.main, "ablate.report": lambda: ablate.report.main()}


def run_forked(main: Callable[[], None], argv: list[str], timeout: float = 600) -> tuple[int, str]:
    """Run ``main`` as ``python -m <module> <argv>`` would, in a fork of this process; its exit code
    and output (stdout and stderr together)."""
    with tempfile.TemporaryFile() as out:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                sys.argv = argv
                main()
                code = 0
            except SystemExit as exit_:
                if exit_.code is None or isinstance(exit_.code, int):
                    code = exit_.code or 0
                else:  # SystemExit("message"): Python prints it and exits 1
                    print(exit_.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.time() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.time() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = 1 << 8
                break
            time.sleep(0.05)
        out.seek(0)
        return os.waitstatus_to_exitcode(status), out.read().decode(errors="replace")


def run_bad_input(base: Path) -> list[dict]:
    """Every bad-input case, each in its own temporary directory: name, exit code, output."""
    mains = _mains()
    results = []
    for case in bad_input_cases():
        tmp = base / case.name
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "file").write_text("")  # for the cases that write under a file
        args = [a.replace("{tmp}", str(tmp)) for a in case.args]
        code, output = run_forked(mains[case.module], [case.module, *args])
        results.append(dict(name=case.name, code=code, output=output, tmp=str(tmp),
                            expected=[e.replace("{tmp}", str(tmp)) for e in case.expected], want=case.code))
    return results


def judge_bad_input(results: list[dict]) -> Counts:
    counts = Counts()
    for r in results:
        _tracebacks(r["output"], f"bad input {r['name']}", counts)
        if r["code"] != r["want"]:
            counts.wrong_exit_codes += 1
            counts.notes.append(f"bad input {r['name']}: exit {r['code']}, not {r['want']}: {r['output'][-300:]}")
        missing = [e for e in r["expected"] if e not in r["output"]]
        if missing:
            counts.culprit_not_named += 1
            counts.notes.append(f"bad input {r['name']}: the message lacks {missing}: {r['output'][-300:]}")
    return counts


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.attack", description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", default="all", choices=["all", "bad-input"])
    parser.add_argument("--json", type=Path, help="bad-input: write the results as JSON into this directory")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="of the random kill moments")
    parser.add_argument("--dir", type=Path, help="where the sweeps go (default: a new temporary directory)")
    parser.add_argument("--parts", default="kill,concurrent,bad-input")
    args = parser.parse_args(argv)
    if args.command == "bad-input":
        base = args.json or Path(tempfile.mkdtemp(prefix="ablate-bad-input-"))
        results = run_bad_input(base)
        (base / "results.json").write_text(json.dumps(results, indent=1))
        print(base / "results.json")
        return 0
    base = args.dir or Path(tempfile.mkdtemp(prefix="ablate-attack-"))
    base.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    total, by_part = Counts(), {}
    t0 = time.time()
    if "bad-input" in parts:
        print("bad input:", flush=True)
        by_part["bad-input"] = judge_bad_input(run_bad_input(base / "bad-input"))
    if "concurrent" in parts:
        print("concurrent sweeps:", flush=True)
        by_part["concurrent"] = concurrent_cases(base / "concurrent")
    if "kill" in parts:
        print(f"kill trials ({args.trials}):", flush=True)
        by_part["kill"] = kill_trials(base / "kill", args.trials, random.Random(args.seed))
    for counts in by_part.values():
        total.add(counts)
    names = list(total.numbers())
    print(f"\nattack in {base} ({time.time() - t0:.0f} s)\n")
    print("| count | " + " | ".join(by_part) + " | total |")
    print("|---|" + "---|" * (len(by_part) + 1))
    for name in names:
        print(f"| {name.replace('_', ' ')} | " + " | ".join(str(c.numbers()[name]) for c in by_part.values())
              + f" | {total.numbers()[name]} |")
    for note in total.notes:
        print(f"* {note}")
    return 0 if not any(total.numbers().values()) else 1


if __name__ == "__main__":
    sys.exit(main())
