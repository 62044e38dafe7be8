#!/usr/bin/env bash
# One device call for the in-house cuTile work (issue 6): correctness table, engine run, timings.
#   carry: .device/cutile.tar.xz .device/env.sh   (.device/oracles.tar.xz in a second, back-to-back call)
#   usage: bash benchmarks/device_cutile.sh "<check args>" "<engine profile>" "<bench args>"   ("" skips a step)
set -u
source .device/env.sh
export PYTHONUNBUFFERED=1 PYTHONPATH=.:${PYTHONPATH:-} CUDA_TILE_CACHE_DIR=/tmp/cutile-cache
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
python -c "import torch, cuda.tile; print('torch', torch.__version__, 'cuda.tile', cuda.tile.__version__)"
OUTD=${OUT:-out}
if [ -n "${1:-}" ]; then
  timeout ${CHECK_TIMEOUT:-400} python benchmarks/inhouse_cutile_check.py $1 --out $OUTD/check.jsonl > $OUTD/check.log 2>&1
  grep -v "^PASS" $OUTD/check.log | head -40
fi
if [ -n "${2:-}" ]; then
  timeout ${RUN_TIMEOUT:-200} python -m nsaconf run --profile $2 --device cuda --oracles ${ORACLES:-inhouse_cutile,inhouse_cutile_kernels} \
     --out /tmp/nsarun --no-probe --no-progress > $OUTD/run.log 2>&1; echo "engine rc=$?"
  tail -25 $OUTD/run.log; cp /tmp/nsarun/summary.md $OUTD/run_summary.md 2>/dev/null; cp /tmp/nsarun/results.jsonl $OUTD/run_results.jsonl 2>/dev/null
fi
if [ -n "${3:-}" ]; then
  timeout ${BENCH_TIMEOUT:-300} python benchmarks/bench_paper.py $3 --out $OUTD > $OUTD/bench.log 2>&1
  grep -v "^|" $OUTD/bench.log | tail -45
fi
