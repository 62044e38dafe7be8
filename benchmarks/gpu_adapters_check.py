"""GPU smoke check of every external adapter against the float64 reference (run on the H100).

For each case and each oracle that can run on cuda, prints per branch the max-abs error vs
``nsa_reference`` in float64 (on the GPU) next to the *baseline* error (the reference computed in the
case dtype), the ratio, and whether the oracle raised. ``topk_idx`` reports the fraction of query rows
whose selected set differs; ``cmp_lse`` is compared on rows with a visible block, plus whether the
empty rows (-inf) agree. Writes ``$OUT/gpu_adapters_check.{json,md}`` (or ``--out``).

Device command (from the repo root, carrying .device/oracles.tar.xz, .device/env.sh and external)::

    source .device/env.sh && PYTHONUNBUFFERED=1 PYTHONPATH=.:$PYTHONPATH python3 benchmarks/gpu_adapters_check.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nsaconf.cases.model import Case  # noqa: E402
from nsaconf.cases.tensors import materialize  # noqa: E402
from nsaconf.oracles.base import get_oracle  # noqa: E402
from nsaconf.oracles.reference import nsa_reference  # noqa: E402

ORACLES = ("fla_parallel", "fla_parallel_sel", "fla_naive", "tilelang_fwd", "tilelang_ref", "nsa_impl", "flash_window", "flex")

CASES = [
    # G16, T multiple of BS: every GPU adapter runs
    Case(dtype="float16", seq_len=256, heads_q=16, heads_kv=1, head_dim=64, block_size=32, top_n=4, window=32, seed=1),
    # bf16, G32, B2, T not a multiple of BS, w+1 window
    Case(dtype="bfloat16", batch=2, seq_len=200, heads_q=64, heads_kv=2, head_dim=64, block_size=32, top_n=8, window=40,
         window_keys="w_plus_1", seed=2),
    # decode: TQ < T, D 128, BS 64, n 8
    Case(dtype="float16", seq_len=512, q_len=64, heads_q=16, heads_kv=1, head_dim=128, block_size=64, top_n=8, window=128, seed=3),
    # varlen
    Case(dtype="float16", seq_len=256, cu_seqlens=(0, 100, 256), heads_q=16, heads_kv=1, head_dim=64, block_size=32, top_n=4,
         window=32, seed=4),
    # random given indices, G64, D192/DV128
    Case(dtype="bfloat16", seq_len=384, heads_q=64, heads_kv=1, head_dim=192, head_dim_v=128, block_size=64, top_n=4, window=64,
         block_indices="random", seed=5),
    # fp16 paper-like G16 T1024 n16 BS64 (tilelang fwd, fla, nsa_impl)
    Case(dtype="float16", seq_len=1024, heads_q=32, heads_kv=2, head_dim=128, block_size=64, top_n=16, window=128, seed=6),
]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().nan_to_num(float("inf")).max()) if a.numel() else 0.0


def compare(branch: str, got: torch.Tensor, truth: torch.Tensor, base: torch.Tensor) -> dict:
    got = got.to(truth.device)
    if got.shape != truth.shape and branch != "topk_idx":
        return {"error": f"shape {tuple(got.shape)} != {tuple(truth.shape)}"}
    if branch == "topk_idx":
        def canon(x):
            x = x.long()
            x = torch.where(x < 0, torch.full_like(x, 1 << 40), x)
            x = x.sort(-1).values
            n = truth.shape[-1]
            if x.shape[-1] < n:
                x = torch.cat([x, x.new_full(x.shape[:-1] + (n - x.shape[-1],), 1 << 40)], -1)
            return x[..., :n] if (x[..., n:] == (1 << 40)).all() else x
        g, t = canon(got), canon(truth)
        if g.shape != t.shape:
            return {"error": f"topk width {got.shape[-1]} has extra real blocks vs {truth.shape[-1]}"}
        return {"mismatch_rows": float((g != t).any(-1).float().mean())}
    if branch == "cmp_lse":
        fin = torch.isfinite(truth)
        return {"max_abs": _err(got[fin], truth[fin]), "baseline": _err(base[fin], truth[fin]),
                "empty_rows_agree": bool((torch.isneginf(got) == ~fin).all()), "nan": bool(torch.isnan(got).any())}
    return {"max_abs": _err(got, truth), "baseline": _err(base, truth), "nan": bool(torch.isnan(got).any())}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out/gpu_adapters_check"))
    ap.add_argument("--oracles", default=",".join(ORACLES))
    ap.add_argument("--cases", default="", help="comma-separated case numbers (default all)")
    ap.add_argument("--profile", default="", help="take the cases from this cases.generator profile instead")
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu only to dry-run the script")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = args.device
    info = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(info), flush=True)
    names = args.oracles.split(",")
    oracles = {n: get_oracle(n) for n in names}
    versions = {}
    for n, o in oracles.items():
        try:
            versions[n] = o.versions() if hasattr(o, "versions") else {}
        except Exception as e:  # noqa: BLE001
            versions[n] = {"error": repr(e)}
        print(f"versions {n}: {versions[n]}  availability: {o.availability()}", flush=True)
    cases = CASES
    if args.profile:
        from nsaconf.cases.generator import GENERATORS
        cases = GENERATORS[args.profile](0)
    sel = [int(x) for x in args.cases.split(",") if x] or list(range(len(cases)))
    rows = []
    for ci in sel:
        case = cases[ci]
        x = materialize(case, dev)
        truth = nsa_reference(case, x, dtype=torch.float64)
        given = x.block_indices if case.block_indices == "random" else truth["topk_idx"]
        base = nsa_reference(case, x, dtype=None, block_indices=given)  # baseline selection on the truth's blocks
        print(f"\n== case {ci}: {case.id}", flush=True)
        for n, o in oracles.items():
            why = o.check_support(case, dev)
            if why:
                print(f"  SKIP {n}: {why}", flush=True)
                rows.append({"case": case.id, "oracle": n, "status": "skip", "reason": why})
                continue
            t0 = time.time()
            try:
                res = o.run(case, x, dev, block_indices=given if o.needs_block_indices else None)
                if dev == "cuda":
                    torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001
                tb = traceback.format_exc().strip().splitlines()[-6:]
                print(f"  RAISE {n} ({time.time() - t0:.1f}s): {type(e).__name__}: {e}\n    " + "\n    ".join(tb), flush=True)
                rows.append({"case": case.id, "oracle": n, "status": "raised", "error": f"{type(e).__name__}: {e}"})
                continue
            dt = time.time() - t0
            for b, t in res.items():
                if b not in truth:
                    continue
                r = compare(b, t, truth[b], base[b])
                rows.append({"case": case.id, "oracle": n, "status": "ran", "branch": b, "seconds": round(dt, 2), **r})
                print(f"  {n:17s} {b:9s} " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
                      flush=True)
            missing = [b for b in o.branches if b in truth and b not in res]
            print(f"  {n:17s} ran in {dt:.1f}s" + (f"; no {missing}" if missing else ""), flush=True)
        (out / "gpu_adapters_check.json").write_text(json.dumps({"info": info, "versions": versions, "rows": rows}, indent=1))
    lines = [f"# GPU adapters check\n\n{info['device']}, torch {info['torch']}, {info['date']}\n",
             "| case | oracle | branch | max_abs | baseline | ratio | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ran":
            lines.append(f"| {r['case']} | {r['oracle']} | | | | | {r['status']}: {r.get('reason') or r.get('error')} |")
            continue
        if "mismatch_rows" in r:
            lines.append(f"| {r['case']} | {r['oracle']} | {r['branch']} | | | | mismatched rows {r['mismatch_rows']:.3g} |")
            continue
        ma, ba = r.get("max_abs"), r.get("baseline")
        ratio = (ma / ba) if (ma is not None and ba) else float("nan")
        note = ("empty rows agree" if r.get("empty_rows_agree") else "empty rows DIFFER") if "empty_rows_agree" in r else ""
        if r.get("nan"):
            note += " NaN"
        lines.append(f"| {r['case']} | {r['oracle']} | {r['branch']} | {ma:.3g} | {ba:.3g} | {ratio:.3g} | {note} |")
    (out / "gpu_adapters_check.md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {out}/gpu_adapters_check.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
