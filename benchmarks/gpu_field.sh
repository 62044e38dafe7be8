#!/usr/bin/env bash
# The external-kernel field on a CUDA machine: xunhao, xunhao_sel, fsa, fsa_sel, flash_nsa, fla_main.
#   MODE=smoke  nsaconf list + two small cases over the new oracles (minutes)
#   MODE=full   the gpu matrix + the convention probe (benchmarks/gpu_matrix.sh) over the new oracles and
#               fla_parallel, then benchmarks/bench_field.py at T = 4k/16k/64k
# Run from the repository root; the checkouts are found as configured (docs/oracles-and-plugins.md).
set -u
[ -f .device/env.sh ] && source .device/env.sh
export PYTHONUNBUFFERED=1 PYTHONPATH=.:${PYTHONPATH:-}
OUTD=${OUT:-out/gpu-field}; mkdir -p "$OUTD"
NEW=${NEW:-xunhao,xunhao_sel,fsa,fsa_sel,flash_nsa,fla_main}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -m nsaconf list 2>&1 | grep -A2 -E "^($(echo $NEW,fla_parallel,tilelang_fwd | tr , '|')) " | cut -c1-400
if [ "${MODE:-smoke}" = smoke ]; then
  timeout ${SMOKE_TIMEOUT:-400} python -m nsaconf run --case benchmarks/field-smoke.json --device cuda --oracles "reference,fla_parallel,$NEW" \
      --out "$OUTD/smoke" --no-progress --no-probe --no-report --timeout 200 > "$OUTD/smoke.log" 2>&1; echo "smoke rc=$?"
  tail -40 "$OUTD/smoke.log"
  python - "$OUTD/smoke/results.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("status") not in ("PASS", "SKIP"):
        print(r.get("status"), r.get("oracle"), r.get("branch"), r.get("case_id", "")[:60], str(r.get("message") or r.get("detail") or r.get("error") or "")[:600])
PY
else
  ORACLES="${MATRIX_ORACLES:-fla_parallel,$NEW}" OUT="$OUTD" STEPS=${STEPS:-matrix,conventions} bash benchmarks/gpu_matrix.sh
  [ "${BENCH:-1}" = 1 ] && timeout ${BENCH_TIMEOUT:-240} python benchmarks/bench_field.py --T "${BENCH_T:-4096,16384,65536}" \
      --oracles "${BENCH_ORACLES:-xunhao,fsa,flash_nsa,fla_main,fla_parallel,xunhao_sel,fsa_sel,fla_parallel_sel,tilelang_fwd}" --out "$OUTD/bench" 2>&1 | grep -v "^\s*$" | tail -60
fi
