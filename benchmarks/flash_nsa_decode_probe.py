"""The flash_nsa adapter's inference paths (``flash_nsa.inference``: decode, TQ = 1, and ``nsa_prefill``'s chunked
prefill, 1 < TQ < T) against the float64 reference, every branch of every case, in one call: a case that raises
prints its traceback and the next one runs.

    NSACONF_FLASH_NSA=<checkout> python benchmarks/flash_nsa_decode_probe.py [--cases FILE ...]

Default cases: ``field-decode.json`` (TQ = 1) and ``field-chunked.json`` (1 < TQ < T).

Needs a CUDA GPU (Hopper + triton >= 3.4 for its TMA kernels, else its Ampere ops) and the flash_nsa checkout.
Per case: the adapter's support verdict, then per branch the max abs difference to ``nsa_reference``
(float64, CPU) over the entries finite in both, whether the -inf entries agree (``cmp_lse`` of rows that see
no compressed block), and for ``topk_idx`` how many (batch, query, kv head) rows select the reference's block set.
The tolerance verdict: ``nsaconf run --case benchmarks/field-decode.json --case benchmarks/field-chunked.json
--oracles flash_nsa --device cuda``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = Path(__file__).resolve().parent


def compare(branch: str, got, want, rows=None) -> str:
    """One line: the max abs difference (finite entries; also over ``rows [B,TQ,HQ]``, those whose top-k
    matches, when some differ), -inf agreement, or the top-k set agreement."""
    import torch
    from nsaconf.cases.tensors import canonical_order
    got, want = got.detach().cpu(), want.detach().cpu()
    if tuple(got.shape) != tuple(want.shape):
        return f"SHAPE {tuple(got.shape)} != reference {tuple(want.shape)}"
    if branch == "topk_idx":
        same = (canonical_order(got.long()) == canonical_order(want.long())).all(-1)
        return f"rows with the reference's block set: {int(same.sum())}/{same.numel()}"
    got, want = got.double(), want.double()
    fin = torch.isfinite(want) & torch.isfinite(got)
    diff = (got - want).abs()[fin].max().item() if fin.any() else 0.0
    inf_ok = torch.equal(torch.isneginf(got), torch.isneginf(want))
    nan = int(torch.isnan(got).sum())
    line = (f"max|d| {diff:.3e}  (max|ref| {want[fin].abs().max().item() if fin.any() else 0.0:.3g})"
            f"  -inf {'agree' if inf_ok else 'DISAGREE'}" + (f"  NaN {nan}" if nan else ""))
    if rows is not None and not rows.all() and branch in ("slc_o", "o"):
        keep = fin & rows[..., None].cpu()
        line += f"  rows with the same top-k: {(got - want).abs()[keep].max().item() if keep.any() else 0.0:.3e}"
    return line


def probe(case, device: str) -> None:
    import torch
    from nsaconf.cases.tensors import materialize
    from nsaconf.oracles.base import get_oracle
    from nsaconf.oracles.reference import nsa_reference
    oracle = get_oracle("flash_nsa")
    print(f"== {case.id}")
    why = oracle.supports(case, "cuda")
    print(f"   supports: {why or 'yes'}")
    if why:
        return
    x = materialize(case, device)
    t0 = time.perf_counter()
    out = oracle.run(case, x, device)
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"   run: {time.perf_counter() - t0:.2f} s (first call compiles)")
    ref = nsa_reference(case, x.to("cpu"), dtype=torch.float64)
    rows = None
    if "topk_idx" in out and case.block_indices != "random":  # random: slc_o reads the case's own indices
        from nsaconf.cases.tensors import canonical_order
        same = (canonical_order(out["topk_idx"].cpu().long()) == canonical_order(ref["topk_idx"].long())).all(-1)
        rows = same.repeat_interleave(case.group, dim=2)  # [B, TQ, HQ]: query head h reads kv head h // G
    for b in ("cmp_o", "cmp_lse", "topk_idx", "slc_o", "swa_o", "o"):
        if b not in ref and b not in out:
            continue
        if b not in out:
            print(f"   {b:8s} not returned ({oracle.branch_supports(case, b) or 'no reason'})")
        elif b not in ref:
            print(f"   {b:8s} returned, the reference has none")
        else:
            print(f"   {b:8s} {compare(b, out[b], ref[b], rows)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=[str(HERE / "field-decode.json"), str(HERE / "field-chunked.json")],
                    help="JSON case files (nsaconf.load_cases)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    from nsaconf.cases.model import load_cases
    from nsaconf.oracles.base import get_oracle
    oracle = get_oracle("flash_nsa")
    print("availability:", oracle.availability() or "ok")
    print("versions:", oracle.versions())
    failed = 0
    for case in [c for f in args.cases for c in load_cases(f)]:
        try:
            probe(case, args.device)
        except Exception:  # noqa: BLE001 - every case runs; the traceback tells what broke
            failed += 1
            traceback.print_exc(file=sys.stdout)
    print(f"{failed} case(s) raised")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
