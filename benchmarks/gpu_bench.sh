#!/usr/bin/env bash
# nsaconf's own performance layer on the GPU (issue 6): `nsaconf run` (verdicts) and `nsaconf bench`
# (CUDA-event timings) of every GPU oracle on benchmarks/bench-cases.json, then `nsaconf report`:
# DIR/report.html gets the Performance section (ms, ratio to the fastest, % of the roofline floor).
#   carry: .device/oracles.tar.xz .device/env.sh external  (stage .device/cutile.tar.xz in the call before)
#   env: OUT, ORACLES (run), BENCH_ORACLES (timed; the fp64 reference is the truth, not timed), CASES,
#        RUN_TIMEOUT, BENCH_TIMEOUT (seconds)
set -u
[ -f .device/env.sh ] && source .device/env.sh
export PYTHONUNBUFFERED=1 PYTHONPATH=.:${PYTHONPATH:-} CUDA_TILE_CACHE_DIR=/tmp/cutile-cache
OUTD=${OUT:-out/gpu-bench}; mkdir -p "$OUTD"
BENCH_ORACLES=${BENCH_ORACLES:-fla_parallel,fla_parallel_sel,nsa_impl,tilelang_fwd,flash_window,flex,inhouse_cutile,inhouse_cutile_kernels}
ORACLES=${ORACLES:-reference,$BENCH_ORACLES}
CASES=${CASES:-benchmarks/bench-cases.json}
timeout ${RUN_TIMEOUT:-200} python -m nsaconf run --case "$CASES" --device cuda --oracles "$ORACLES" --out "$OUTD/run" \
  --no-probe --no-report --no-progress > "$OUTD/run.log" 2>&1; echo "run rc=$?"
timeout ${BENCH_TIMEOUT:-250} python -m nsaconf bench --case "$CASES" --oracles "$BENCH_ORACLES" --reps 20 \
  --out "$OUTD/run" > "$OUTD/bench.log" 2>&1; echo "bench rc=$?"
python -m nsaconf report "$OUTD/run"; echo "report rc=$?"
tail -4 "$OUTD/run.log"; grep -vE "^\s*$" "$OUTD/bench.log" | tail -30
