"""The bench's entry point: parse the command line, record the environment, run the selected
comparisons one after the other and write bench.json and bench.md (``python -m ablate.bench``)."""
from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from ablate.bench.augmentation import bench_augmentation
from ablate.bench.loops import CHILD_FLAG, bench_loops, run_loop_child
from ablate.bench.overhead import bench_engine
from ablate.bench.settings import REPO, Settings, parse_args
from ablate.bench.startup import bench_startup
from ablate.bench.steps import bench_steps
from ablate.bench.tables import SECTIONS, env_table, write_results
from ablate.device import cpu_count, cpu_facts, device_name, keep_cpu_memory, load_average, resolve_device


def ablate_version() -> str:
    """The installed package's version, else the checkout's pyproject.toml version."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("ablate")
    except PackageNotFoundError:  # run from a checkout that was never pip-installed
        try:
            import tomllib
            return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
        except Exception:  # Python 3.10 (no tomllib) or no pyproject.toml
            return "unknown"


def environment(s: Settings, device: torch.device) -> dict[str, Any]:
    """Where the figures were measured; stored with them in bench.json and bench.md."""
    return dict(
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        device=device_name(device),
        torch=torch.__version__,
        cuda=torch.version.cuda if device.type == "cuda" else None,
        python=platform.python_version(),
        ablate=ablate_version(),
        host=platform.node(),
        **cpu_facts(),
        cpu_count=os.cpu_count(),
        cpus_usable=cpu_count(),
        torch_threads=torch.get_num_threads(),
        # Other work on the machine disturbs every figure; the 1-minute load before the bench shows it.
        load_average=load_average(),
        scale=s.scale,
        data=s.data,
        quick=s.quick,
    )


def run_comparisons(s: Settings, device: torch.device) -> Iterator[tuple[str, dict]]:
    """Each selected comparison in turn, as it finishes."""
    runners: dict[str, Callable[[], dict]] = {
        "aug": lambda: bench_augmentation(s, device),
        "step": lambda: bench_steps(s, device),
        "engine": lambda: bench_engine(s, device),
        "page2019": lambda: bench_loops(s, device),
        "startup": lambda: bench_startup(s),
    }
    for name in s.only:
        start = time.perf_counter()
        result = runners[name]()
        result["bench_seconds"] = time.perf_counter() - start
        yield name, result


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the selected comparisons, print a table per comparison, write bench.json and bench.md."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [CHILD_FLAG]:  # a child process of the page2019 comparison
        run_loop_child(argv[1])
        return {}
    s = parse_args(argv)
    threads_before = torch.get_num_threads()
    if s.threads:
        # On a shared CPU, more threads than free cores make OpenMP barriers spin and steps slow down
        # erratically; a fixed thread count gives steadier figures.
        torch.set_num_threads(s.threads)
    try:
        return run_all(s)
    finally:
        torch.set_num_threads(threads_before)  # main() may be called in-process (tests)


def run_all(s: Settings) -> dict:
    """Every selected comparison on the device, each table printed as it finishes; the results, also
    written to ``s.out``."""
    device = resolve_device(s.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the engine does
    # The allocator setting a CPU run makes (process-wide, not undoable), made before anything is
    # measured so that no comparison depends on whether the engine already ran in this process.
    memory = keep_cpu_memory() if device.type == "cpu" else {}
    results: dict[str, Any] = dict(env=dict(environment(s, device), **memory), settings=asdict(s))
    print(env_table(results["env"]), flush=True)
    start = time.perf_counter()
    for name, result in run_comparisons(s, device):
        results[name] = result
        title, render = SECTIONS[name]
        print(f"\n## {title} ({result['bench_seconds']:.0f} s)\n\n{render(result)}", flush=True)
    results["bench_seconds"] = time.perf_counter() - start
    out = Path(s.out)
    write_results(results, out)
    print(f"\nwrote {out / 'bench.json'} and {out / 'bench.md'} ({results['bench_seconds']:.0f} s in all)")
    return results
