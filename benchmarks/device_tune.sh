#!/usr/bin/env bash
# One device call (issue 6): tune the in-house kernels on the paper case at T=64k (in-house timings
# only), check the tuned configuration against the fp64 reference on the gpu profile, then the paper
# benchmark at 4k/16k/64k in one run with the tuned flags.
#   carry: .device/env.sh (+ .device/oracles.tar.xz and external/ after a cutile staging call)
#   env: TUNE_T (65536), TS (4096,16384,65536), TUNE_TIMEOUT, CHECK_TIMEOUT, BENCH_TIMEOUT (seconds)
set -u
source .device/env.sh
export PYTHONUNBUFFERED=1 PYTHONPATH=.:${PYTHONPATH:-} CUDA_TILE_CACHE_DIR=/tmp/cutile-cache
OUTD=${OUT:-out}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout ${TUNE_TIMEOUT:-260} python benchmarks/bench_paper.py --T ${TUNE_T:-65536} --quick --tune --skip fla,tilelang,dense \
  --out $OUTD/tune > $OUTD/tune.log 2>&1
grep -E "TUNED|config:|FAIL" $OUTD/tune.log
SETS=$(grep "config:" $OUTD/tune.log | tail -1 | sed 's/.*config: //' | tr ' ' '\n' | sed 's/^/--set /' | tr '\n' ' ')
echo "$SETS" > $OUTD/tuned_flags.txt
echo "flags: $SETS"
if [ "${CHECK_TIMEOUT:-0}" != 0 ]; then
  timeout $CHECK_TIMEOUT python benchmarks/inhouse_cutile_check.py --profile gpu --workers 12 $SETS \
    --out $OUTD/check.jsonl > $OUTD/check.log 2>&1
  grep -v "^PASS" $OUTD/check.log | head -20
fi
timeout ${BENCH_TIMEOUT:-320} python benchmarks/bench_paper.py --T ${TS:-4096,16384,65536} --quick $SETS --out $OUTD \
  > $OUTD/bench.log 2>&1
grep -v "^|" $OUTD/bench.log | grep -E "config|inhouse_cutile  |fla.parallel_nsa  |dense|union|probe|selection \(|FAIL" | tail -60
