#!/usr/bin/env bash
# The journey-cpu replay: every distinct step at scale=cpu (seed 0), steps 4 and 8 also at seed 1,
# into experiments/journey-cpu/runs. Resumable: started again, it skips every completed run.
#
# Run it from a snapshot of the code (a git worktree at a fixed commit), so that edits to conf/ or
# ablate/ in the working copy cannot leak into later jobs, with one torch thread:
#   git worktree add --detach ../replay HEAD
#   cd ../replay && nohup bash experiments/journey-cpu/replay.sh "$PWD/../main/experiments/journey-cpu/runs" &
set -euo pipefail
RUNS="${1:-$(cd "$(dirname "$0")" && pwd)/runs}"
PY="${PYTHON:-python}"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export ABLATE_DATA="${ABLATE_DATA:-$(cd "$(dirname "$0")/../../.." && pwd)/shared/data/cifar10-jpeg}"
# fp32 on every CPU: what fp16 runs as on a CPU depends on the machine (bf16 where it is native), and
# the replay's records come from whichever machine a session lands on; pinned, they stay one recipe.
# A checkpoint every epoch: a stop (a session's end) costs at most the epoch in flight, not a whole
# hour-long Post 1-3 run; checkpoints stay out of the config key and leave the results unchanged.
common=(scale=cpu progress=false precision.cpu_half=fp32 checkpoint.every=1 "hydra.sweep.dir=$RUNS")
# Steps 8 and 4 first (two seeds each), then the rest of the journey in its order.
"$PY" -m ablate.run -m +step=step8 seed=0,1 "${common[@]}" || true
"$PY" -m ablate.run -m +step=step4 seed=0,1 "${common[@]}" || true
"$PY" -m ablate.run -m +experiment=journey seed=0 "${common[@]}"
