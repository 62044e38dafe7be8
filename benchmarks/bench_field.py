"""Forward timings of the external NSA oracles at the NSA paper's speed configuration, beside dense causal SDPA.

    python benchmarks/bench_field.py --T 4096,16384,65536 --oracles xunhao,fsa,flash_nsa,fla_main,fla_parallel --out OUT

Cases: B=1, HQ=64, H=4 (G=16), D=DV=128, n=16, w=512, bf16, with l=d=l'=64 (every oracle) and with the
paper's l=32, d=16, l'=64 (the oracles that take l != d). Each oracle's ``run`` is timed end to end inside
``forward_only()`` (every branch it returns, its own top-n, the translation to canonical layouts included):
``nsaconf.harness.bench.time_fn`` (CUDA events, warm-up, median of --reps, input copies rotated past L2).
Inputs are drawn on the GPU (q, k, v ~ N(0,1), gates in (0,1)). Selection kernels on given indices
(``needs_block_indices``: ``xunhao_sel``, ``fsa_sel``, ``fla_parallel_sel``, ``tilelang_fwd``) get random valid
ascending indices (n per query and kv head among the blocks that start at or before it, -1 last), in fp16
where the kernel takes fp16 only. Writes OUT/field.jsonl and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cases(T: int):
    from nsaconf.cases.model import Case
    base = dict(batch=1, seq_len=T, heads_q=64, heads_kv=4, head_dim=128, top_n=16, window=512, dtype="bfloat16", seed=7)
    return {"l=d=l'=64": Case(block_size=64, **base), "l=32,d=16,l'=64": Case(block_size=64, cmp_block=32, cmp_stride=16, **base)}


def draw(case, with_indices: bool):
    """Canonical inputs of ``case`` drawn on the GPU; random valid block indices when ``with_indices``."""
    import torch
    from nsaconf.cases.tensors import Inputs
    dt = getattr(torch, case.dtype)
    g = torch.Generator(device="cuda").manual_seed(case.seed)
    B, T, HQ, H, D = case.batch, case.seq_len, case.heads_q, case.heads_kv, case.head_dim
    r = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=dt)  # noqa: E731
    gate = lambda: torch.rand(B, T, HQ, generator=g, device="cuda").to(dt)  # noqa: E731
    idx = None
    if with_indices:
        nb = -(-T // case.block_size)
        score = torch.rand(B, T, H, nb, generator=g, device="cuda")
        cur = (torch.arange(T, device="cuda") // case.block_size)[None, :, None, None]
        score = score.masked_fill(torch.arange(nb, device="cuda") > cur, -1.0)
        top = score.topk(min(case.top_n, nb), -1)
        idx = top.indices.masked_fill(top.values < 0, nb + 1).sort(-1).values
        idx = idx.masked_fill(idx > nb, -1).long()
    return Inputs(q=r(B, T, HQ, D), k=r(B, T, H, D), v=r(B, T, H, case.head_dim_v), g_cmp=gate(), g_slc=gate(), g_swa=gate(),
                  block_indices=idx)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", default="4096,16384,65536")
    ap.add_argument("--oracles", default="xunhao,fsa,flash_nsa,fla_main,fla_parallel,xunhao_sel,fsa_sel,fla_parallel_sel,tilelang_fwd")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "out/bench-field"))
    args = ap.parse_args(argv)
    import torch
    from nsaconf.harness import bench as hb
    from nsaconf.oracles.base import forward_only, get_oracle
    from benchmarks.bench_paper import dense_sdpa_fns
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recs = []
    dev = torch.cuda.get_device_name()

    def record(T, cfg, name, ms, note=""):
        r = {"T": T, "config": cfg, "oracle": name, "ms": ms, "note": note, "card": dev}
        recs.append(r)
        print(json.dumps(r), flush=True)

    for T in [int(t) for t in args.T.split(",")]:
        for cfg, case in cases(T).items():
            x = draw(case, False)
            for name in args.oracles.split(","):
                o = get_oracle(name)
                c, xi, kw = case, x, {}
                if o.needs_block_indices:
                    c = case.replace(block_indices="random", dtype="bfloat16" if "bfloat16" in o.dtypes else "float16")
                    xi = draw(c, True)
                    kw = {"block_indices": xi.block_indices}
                why = o.check_support(c, "cuda")
                if why:
                    record(T, cfg, name, None, f"SKIP: {why}")
                    continue
                try:
                    with forward_only():
                        ms = hb.time_fn(lambda: o.run(c, xi, "cuda", **kw), reps=args.reps, warmup=args.warmup)
                    record(T, cfg, name, ms, "given random indices, " + c.dtype if kw else "")
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    record(T, cfg, name, None, f"ERROR: {type(e).__name__}: {str(e)[:200]}")
                torch.cuda.empty_cache()
            if cfg.startswith("l=d"):
                record(T, cfg, "dense causal SDPA (GQA)", hb.time_fn(dense_sdpa_fns([x])[0], reps=args.reps, warmup=args.warmup),
                       "flash/cuDNN SDPA, [B,H,T,D] pre-transposed")
            del x
            torch.cuda.empty_cache()
    (out / "field.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    print(f"\n| T | config | oracle | ms |\n|---|---|---|---|")
    for r in recs:
        print(f"| {r['T']} | {r['config']} | {r['oracle']} | {'%.3f' % r['ms'] if r['ms'] is not None else r['note'][:90]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
