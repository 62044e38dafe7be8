#!/usr/bin/env bash
# One device call (issue 6): the paper benchmark at T = 64k, 16k, 4k in one run, tuning the in-house
# kernel flags on the first T (bench_paper.py --tune), then the correctness check of the tuned flags
# against the fp64 reference on the gpu profile.
#   carry: .device/env.sh (+ .device/oracles.tar.xz and external/ after a cutile staging call)
#   env: TS (65536,16384,4096), BENCH_TIMEOUT, CHECK_TIMEOUT (seconds; 0 skips the check)
set -u
source .device/env.sh
export PYTHONUNBUFFERED=1 PYTHONPATH=.:${PYTHONPATH:-} CUDA_TILE_CACHE_DIR=/tmp/cutile-cache
OUTD=${OUT:-out}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout ${BENCH_TIMEOUT:-330} python benchmarks/bench_paper.py --T ${TS:-65536,16384,4096} --quick --tune --out $OUTD \
  > $OUTD/bench.log 2>&1
echo "bench rc=$?"
grep -E "TUNED|config:" $OUTD/bench.log
SETS=$(grep "config:" $OUTD/bench.log | head -1 | sed 's/.*config: //' | tr ' ' '\n' | sed 's/^/--set /' | tr '\n' ' ')
echo "$SETS" > $OUTD/tuned_flags.txt
if [ "${CHECK_TIMEOUT:-150}" != 0 ]; then
  timeout ${CHECK_TIMEOUT:-150} python benchmarks/inhouse_cutile_check.py --profile gpu --workers 12 $SETS \
    --out $OUTD/check.jsonl > $OUTD/check.log 2>&1
  grep -v "^PASS" $OUTD/check.log | head -20
fi
grep -v "^|" $OUTD/bench.log | grep -E "inhouse_cutile  |inhouse_cutile \(|fla.parallel_nsa  |dense|union|probe|selection \(|FAIL" | tail -50
