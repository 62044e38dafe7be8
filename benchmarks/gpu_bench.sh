#!/usr/bin/env bash
# Timings of every GPU oracle beside its verdicts: `nsaconf run` (judged against the fp64 truth) and `nsaconf bench`
# (CUDA-event timings, median of 20, each beside its roofline floor) on benchmarks/bench-cases.json (the paper
# configuration at T=4k, and a G=16, D=192 case), then `nsaconf report`: DIR/report.html gets the Performance
# section (ms, ratio to the fastest, % of the floor).
#   usage: bash benchmarks/gpu_bench.sh        (from the repository root, on a CUDA machine) -> $OUT/run/
#   env: OUT (out/gpu-bench), ORACLES (judged), BENCH_ORACLES (timed; the fp64 reference is the truth, not timed),
#        CASES, RUN_TIMEOUT, BENCH_TIMEOUT (seconds). On the project's GPU machines: carry .device/oracles.tar.xz
#        .device/env.sh external (stage .device/cutile.tar.xz in the call before).
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
