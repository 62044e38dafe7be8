#!/usr/bin/env bash
# GPU search: `nsaconf search` over GPU oracles, each failure shrunk to a minimal case (docs/results/search.md).
#   usage: bash benchmarks/gpu_search.sh        (from the repository root, on a CUDA machine)
#   env: OUT (out/gpu-search), ORACLES (nsa_impl), DEVICE (cuda; cpu = dry run), TIME (480: seconds for all the
#        oracles together, shrinking included; a 10-minute device call fits it), SEED (0), MAX_SEQ_LEN (256),
#        MAX_HEADS (32), CHECKS (empty; e.g. all: the checks that need no truth are search properties too),
#        PLUGINS (space-separated plugin files).
#        On the project's GPU machines: carry .device/oracles.tar.xz .device/env.sh external (as gpu_matrix.sh).
#   output: $OUT/search.log (progress, the minimal case of each oracle, its repro line), $OUT/search.json
#           (draws until the first failure, shrink steps, the minimal case's sizes), $OUT/results.jsonl + reports,
#           $OUT/corpus/<oracle>/<case_id>.json (the corpus entries: copy them to cases/regressions/ to keep them)
set -u
[ -f .device/env.sh ] && source .device/env.sh
export PYTHONUNBUFFERED=1 PYTHONPATH=.:${PYTHONPATH:-}
OUTD=${OUT:-out/gpu-search}
DEVICE=${DEVICE:-cuda}
ORACLES=${ORACLES:-nsa_impl}
mkdir -p "$OUTD"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUTD/gpu.txt"
python -m nsaconf list 2>/dev/null | grep -E "^($(echo "$ORACLES" | tr , '|')) " | tee "$OUTD/oracles.txt"
EXTRA=""; [ -n "${CHECKS:-}" ] && EXTRA="--checks $CHECKS"
for p in ${PLUGINS:-}; do EXTRA="$EXTRA --plugin $p"; done
t0=$(date +%s)
python -m nsaconf search --oracles "$ORACLES" --device "$DEVICE" --time "${TIME:-480}" --seed "${SEED:-0}" \
    --max-seq-len "${MAX_SEQ_LEN:-256}" --max-heads "${MAX_HEADS:-32}" --out "$OUTD" --corpus "$OUTD/corpus" \
    --timeout 120 $EXTRA > "$OUTD/search.log" 2>&1
rc=$?
echo "nsaconf search exit $rc in $(( $(date +%s) - t0 )) s (0 nothing found, 1 a failure found, 2 usage)"
grep -vE "tried, [0-9]+ failure" "$OUTD/search.log" | cut -c1-400 | tail -40
[ -f "$OUTD/search.json" ] && python - "$OUTD/search.json" <<'PY'
import json, sys
info = json.load(open(sys.argv[1]))
print("versions:", {k: v for k, v in info["versions"].items()})
for s in info["oracle_searches"]:
    for f in s["findings"] or [{}]:
        print(s["oracle"], "judged", s["judged"], f"{s['seconds']:.0f}s", f.get("status"), "first at draw", f.get("draws_to_first"),
              "shrink steps", f.get("shrink_steps"), "->", f.get("sizes"))
PY
