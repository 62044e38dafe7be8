#!/usr/bin/env bash
# GPU conformance matrix (issue 4): the `gpu` profile over every GPU oracle, split into SHARDS parallel
# `nsaconf run --shard K/N` processes (first-call compiles -- FLA autotune, TileLang, cuTile, flex --
# are CPU-bound and dominate; shards overlap them), merged with `nsaconf merge` into $OUT/matrix.
#   carry: .device/oracles.tar.xz .device/env.sh external   (cuTile: stage .device/cutile.tar.xz in the
#          call before, see ../shared/tools/device-env.sh)
#   usage: bash benchmarks/gpu_matrix.sh   (override: DEVICE=cpu (dry run) SHARDS=4 ORACLES=a,b CASES=file TIME_LIMIT=500)
# Each shard stops at TIME_LIMIT seconds; cells recorded so far are kept (results.jsonl is flushed per
# cell) and the merged report says which cases ran. Rerun with RESUME=DIR (a previous $OUT/shards
# carried up) to finish the rest.
set -u
[ -f .device/env.sh ] && source .device/env.sh
export PYTHONUNBUFFERED=1 PYTHONPATH=.:${PYTHONPATH:-} CUDA_TILE_CACHE_DIR=/tmp/cutile-cache
OUTD=${OUT:-out/gpu-matrix}; mkdir -p "$OUTD/shards"
SHARDS=${SHARDS:-3}   # each shard has a worker process (CUDA context) per oracle: 4 exhausted the 80 GB card
# fla_naive and tilelang_ref loop over queries in Python (tens of seconds per GPU case); they run in the CPU `ci` profile
ORACLES=${ORACLES:-reference,fla_parallel,fla_parallel_sel,nsa_impl,tilelang_fwd,flash_window,flex,inhouse_cutile,inhouse_cutile_kernels}
CASES=${CASES:-external/gpu-cases.json}
[ -f "$CASES" ] || python -c "from cases.generator import profile_cases; from cases.model import dump_cases; dump_cases(profile_cases('gpu'), '$CASES')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -m nsaconf list 2>/dev/null | grep -E "^[a-z_]+ " | awk '{print $1, $3}' | tr '\n' ';'; echo
t0=$(date +%s)
for k in $(seq 0 $((SHARDS - 1))); do
  d="$OUTD/shards/s$k"; extra=""
  if [ -n "${RESUME:-}" ] && [ -f "${RESUME}/s$k/results.jsonl" ]; then mkdir -p "$d"; cp "${RESUME}/s$k/results.jsonl" "$d/"; extra="--resume"; fi
  timeout ${TIME_LIMIT:-500} python -m nsaconf run --case "$CASES" --shard "$k/$SHARDS" --device ${DEVICE:-cuda} --oracles "$ORACLES" \
      --out "$d" --no-progress --no-probe --no-report --timeout ${CELL_TIMEOUT:-150} $extra > "$OUTD/shards/s$k.log" 2>&1 &
done
wait
echo "shards done in $(( $(date +%s) - t0 )) s"
for k in $(seq 0 $((SHARDS - 1))); do echo "s$k: $(wc -l < "$OUTD/shards/s$k/results.jsonl") cells; $(tail -1 "$OUTD/shards/s$k.log")"; done
python -m nsaconf merge "$OUTD/matrix" "$OUTD"/shards/s*/
grep -E "^\*\*Verdict|cases|^(ERROR|CRASH|TIMEOUT)" "$OUTD/matrix/summary.md" | head -20
grep -hE "^(ERROR|CRASH|TIMEOUT)" "$OUTD"/shards/s*.log | cut -c1-300 | head -30
