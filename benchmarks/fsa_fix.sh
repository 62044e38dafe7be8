#!/usr/bin/env bash
# FSA's own selection kernel with the one-character fix of fsa/ops/FSA_topk_sparse_attention.py:209 (a trailing
# comma makes the LSE pointer a tuple, which Triton 3.6 rejects: every fsa_sel cell is that CompilationError).
# The fix is applied to a temporary copy of the configured checkout; the checkout itself is not changed.
#   1. the report FSA#11 ("decode with one query crashes": FSATopkSparseAttention with Nq = 1, Nk = 512, the
#      report's own tensors) at the pinned commit and with the fix, each in its own process
#   2. `nsaconf run` of fsa_sel and fsa with NSACONF_FSA at the fixed copy: the `gpu` profile (fsa_sel), the smoke
#      and decode case files (fsa, whose module uses this kernel for G <= 8)
#   usage: bash benchmarks/fsa_fix.sh     (repository root, CUDA machine; env OUT, TIME_LIMIT (240))
set -u
[ -f .device/env.sh ] && source .device/env.sh
export PYTHONUNBUFFERED=1 PYTHONPATH=.:${PYTHONPATH:-}
OUTD=${OUT:-out/fsa-fix}; mkdir -p "$OUTD"
SRC=$(python -c "from nsaconf.oracles.config import checkout_status; print(checkout_status('fsa')[0] or '')")
[ -n "$SRC" ] || { echo "fsa checkout not configured"; exit 2; }
FIX=$(mktemp -d)/Flash-Sparse-Attention; cp -r "$SRC" "$FIX"
F=fsa/ops/FSA_topk_sparse_attention.py
sed -i '209s/(lse_ptr + pid_q_j \* stride_lse_n,)/(lse_ptr + pid_q_j * stride_lse_n)/' "$FIX/$F"
diff "$SRC/$F" "$FIX/$F"
repro() {  # FSA#11's tensors: Nq = 1 query, Nk = 512 keys, block 64, topk_idx = block 0 then -1
  python - "$1" <<'PY'
import sys, torch
from pathlib import Path
from nsaconf.oracles.compat.checkout_import import import_from_checkout
(m,) = import_from_checkout(Path(sys.argv[1]), ["fsa.ops.FSA_topk_sparse_attention"], stubs=["fsa", "fsa.ops"])
torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
for Nq in (512, 1):
    Nk, Hq, Hkv, d, bs = 512, 4, 4, 128, 64
    q, k, v = (torch.randn(n, h, d, device=dev, dtype=dt) for n, h in ((Nq, Hq), (Nk, Hkv), (Nk, Hkv)))
    cu_q, cu_k = (torch.tensor([0, n], device=dev, dtype=torch.int32) for n in (Nq, Nk))
    nb = (Nk + bs - 1) // bs
    idx = torch.full((Hkv, Nq, nb), -1, dtype=torch.int32, device=dev)
    cur = (Nq - 1) // bs
    idx[:, 0, :cur + 1] = torch.arange(cur + 1, device=dev, dtype=torch.int32)
    try:
        o = m.FSATopkSparseAttention.apply(q, k, v, idx, bs, cu_q, cu_k, Nq, Nk, 1.0 / d ** 0.5)
        torch.cuda.synchronize()
        print(f"FSA#11 Nq={Nq}: ran, o {tuple(o.shape)}, finite {bool(torch.isfinite(o).all())}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"FSA#11 Nq={Nq}: {type(e).__name__}: {str(e).splitlines()[-1][:300] if str(e) else ''}", flush=True)
        break
PY
}
echo "== pinned checkout"; repro "$SRC" 2>&1 | tail -3
echo "== with the fix"; repro "$FIX" 2>&1 | tail -3
export NSACONF_FSA="$FIX"
timeout ${TIME_LIMIT:-240} python -m nsaconf run --profile gpu --device cuda --oracles fsa_sel --out "$OUTD/gpu" --no-progress \
    --no-probe --timeout 120 > "$OUTD/gpu.log" 2>&1; echo "gpu profile fsa_sel rc=$?"; tail -4 "$OUTD/gpu.log"
timeout 150 python -m nsaconf run --case benchmarks/field-smoke.json --case benchmarks/field-decode.json --device cuda \
    --oracles fsa,fsa_sel --out "$OUTD/files" --no-progress --no-probe --timeout 100 > "$OUTD/files.log" 2>&1
echo "case files fsa,fsa_sel rc=$?"; grep -E "^(FAIL|ERROR|CRASH|TIMEOUT)" "$OUTD/files.log" | cut -c1-300 | head; tail -4 "$OUTD/files.log"
