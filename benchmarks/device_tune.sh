#!/usr/bin/env bash
# One device call (issue 6): the correctness check of the in-house kernels against the fp64 reference and the
# paper benchmark (bench_paper.py --quick), tuning the kernel flags on the first T when TUNE=1 (and the
# compression/window tiles and hints when TUNE_TILES=1).
#   carry: .device/env.sh (+ .device/oracles.tar.xz and external/ after a cutile staging call)
#   env: TS (65536,16384,4096), TUNE (1), TUNE_TILES (0), SETS ("NAME=VALUE ..." flags for both steps),
#        CHECK_PROFILE (gpu), CHECK_ARGS (e.g. --fast), BENCH_TIMEOUT, CHECK_TIMEOUT (seconds; 0 skips that step),
#        CHECK_AFTER (0: check first; 1: benchmark first, then check the flags it ran with, tuned ones included)
set -u
source .device/env.sh
export PYTHONUNBUFFERED=1 PYTHONPATH=.:${PYTHONPATH:-} CUDA_TILE_CACHE_DIR=/tmp/cutile-cache
OUTD=${OUT:-out}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
SETARGS=""
for s in ${SETS:-}; do SETARGS="$SETARGS --set $s"; done
check() {   # $@: extra --set arguments
  [ "${CHECK_TIMEOUT:-150}" = 0 ] && return
  timeout ${CHECK_TIMEOUT:-150} python benchmarks/inhouse_cutile_check.py --profile ${CHECK_PROFILE:-gpu} --workers 14 \
    ${CHECK_ARGS:-} "$@" --out $OUTD/check.jsonl > $OUTD/check.log 2>&1
  echo "check rc=$?"
  grep -v "^PASS" $OUTD/check.log | head -20
}
bench() {
  [ "${BENCH_TIMEOUT:-330}" = 0 ] && return
  TUNEARGS=""
  [ "${TUNE:-1}" = 1 ] && TUNEARGS="--tune"
  [ "${TUNE_TILES:-0}" = 1 ] && TUNEARGS="$TUNEARGS --tune-tiles"
  timeout ${BENCH_TIMEOUT:-330} python benchmarks/bench_paper.py --T ${TS:-65536,16384,4096} --quick $TUNEARGS $SETARGS \
    --out $OUTD > $OUTD/bench.log 2>&1
  echo "bench rc=$?"
  grep -E "TUNED|config:" $OUTD/bench.log
  grep -v "^|" $OUTD/bench.log | grep -E "inhouse_cutile|fla.parallel_nsa  |dense|tilelang|FAIL|Error" | tail -60
}
if [ "${CHECK_AFTER:-0}" = 1 ]; then
  bench
  # the flags the benchmark ran with (its first "config:" line), one --set per flag
  TUNED=()
  for f in $(grep -m1 "config:" $OUTD/bench.log | sed 's/.*config: //'); do TUNED+=(--set "$f"); done
  echo "checking: ${TUNED[*]}"
  check "${TUNED[@]}"
else
  check $SETARGS
  bench
fi
