"""``make demo``: the Post 4 recipe (step 4) at the largest scale this machine can finish.

Full scale on a GPU (about 80 s on a V100); the ``cpu`` scale otherwise (widths x 1/4, the recipe
otherwise as published; about half an hour on 2 cores). Extra arguments pass through to ablate.run.
"""
from __future__ import annotations

import subprocess
import sys

import torch


def main() -> int:
    scale = "full" if torch.cuda.is_available() else "cpu"
    where = f"GPU {torch.cuda.get_device_name()}" if scale == "full" else "no GPU found"
    note = "the published recipe" if scale == "full" else "widths x 1/4, everything else as published"
    print(f"ablate demo: {where}, running step 4 at scale={scale} ({note})", flush=True)
    cmd = [sys.executable, "-m", "ablate.run", "+step=step4", f"scale={scale}", *sys.argv[1:]]
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
