"""Comparison ``startup``: wall time from launching ``python -m ablate.run +step=step8 scale=smoke`` to
its first training step, and the subprocess's total wall time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ablate.bench.settings import ENGINE_STEP, REPO, Settings, common_overrides


def bench_startup(s: Settings) -> dict[str, Any]:
    """Launch a smoke-scale step-8 run as a user would and time it to its first optimiser step."""
    with tempfile.TemporaryDirectory(prefix="ablate-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        overrides = [f"+step={ENGINE_STEP}", f"hydra.run.dir={run_dir}",
                     *[o for o in common_overrides(s) if not o.startswith("scale=")], "scale=smoke"]
        cmd = [sys.executable, "-m", "ablate.run", *overrides]
        launched = time.time()  # wall clock: compared with the run's first_step_at, also wall clock
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(s.threads)} if s.threads else {}))
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        finished = time.time()
        if proc.returncode != 0:
            raise RuntimeError(f"start-up run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("first_step_at") is None:
        raise RuntimeError("the run's summary.json has no first_step_at")
    return dict(command="python -m ablate.run " + " ".join(o for o in overrides if not o.startswith("hydra.run.dir")),
                startup_seconds=summary["first_step_at"] - launched, wall_seconds=finished - launched,
                train_seconds=summary.get("train_seconds"), eval_seconds=summary.get("eval_seconds"),
                device=summary.get("device"), precision_used=summary.get("precision_used"))
