"""``make demo``: the final recipe (step 8, the 26 s one) on this machine, drawn beside the committed journey.

Full scale on a GPU (about 30 s of training on a V100); the ``cpu`` scale otherwise (every width x 1/4,
the recipe otherwise as published). The run goes to ``runs/demo/<time>/run``; then one report pools it
with the committed CPU-scale replay (``experiments/journey-cpu/runs``), so the new run appears in the
timeline and the tables beside the journey (in its own panel when it ran on another device or
scale), and the paths of the timeline and the table are printed. Extra arguments pass through to
``ablate.run`` (``make demo ARGS="seed=1"`` or ``python -m ablate.demo seed=1``).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
JOURNEY = REPO / "experiments" / "journey-cpu" / "runs"
STEP = "step8"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="ablate demo", description=f"Train the final recipe ({STEP}, the 26 s one) on this machine: at full scale "
        "on a GPU, at scale=cpu (widths x 1/4) otherwise; then report it beside the committed CPU-scale journey "
        f"({JOURNEY.relative_to(REPO)}) and print where the timeline and the report are.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed on to `ablate run`, e.g. seed=1 scale=smoke")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv).overrides
    asked = [a.split("=", 1)[1] for a in args if a.startswith("scale=")]
    scale = asked[-1] if asked else "full" if torch.cuda.is_available() else "cpu"
    where = f"GPU {torch.cuda.get_device_name()}" if scale == "full" else "no GPU found"
    note = "the published recipe" if scale == "full" else "widths x 1/4, everything else as published"
    out = Path("runs") / "demo" / time.strftime("%Y-%m-%d_%H-%M-%S")
    print(f"ablate demo: {where}, running {STEP} at scale={scale} ({note}) into {out / 'run'}", flush=True)
    started = time.time()
    cmd = [sys.executable, "-m", "ablate.run", f"+step={STEP}", f"scale={scale}", f"hydra.run.dir={out / 'run'}",
           *[a for a in args if not a.startswith("scale=")]]
    code = subprocess.call(cmd)
    if code != 0:
        return code
    from ablate.report import write_report

    roots = [out / "run"] + ([JOURNEY] if JOURNEY.is_dir() else [])
    files = write_report(roots, out / "report")
    beside = f"beside the committed journey ({JOURNEY})" if len(roots) > 1 else "(no committed journey found)"
    print(f"\nablate demo: done in {time.time() - started:.0f} s. Your run {beside}:")
    for name in ("timeline.png", "report", "html"):
        if name in files:
            print(f"  {files[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
