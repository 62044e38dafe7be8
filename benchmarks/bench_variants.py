"""Time in-house configurations (module flags of ``oracles.inhouse_cutile.forward``) side by side at the paper
configuration, with the dense SDPA and FLA ``parallel_nsa`` baselines of the same run (issue 6).

    source .device/env.sh
    PYTHONPATH=. python benchmarks/bench_variants.py --T 65536,16384 --out $OUT \\
        --variant 'cmp 2-CTA: CMP_TILE=(128, 64); CMP_HINTS={"num_ctas": 2}'

``--variant 'LABEL: NAME=VALUE; NAME=VALUE'`` (values are Python literals, ``;`` between flags) adds one
configuration; the default configuration is always timed first. For each configuration and T: the full
forward, the forward without window and its parts (``--parts``: mean pooling, compression o+LSE, compression + importance, the selection over
14 given blocks, sliding window, window + forced local blocks + gates, the selection over 16 given blocks + gates as
the forward without window runs it, and once per T the selection probes of ``selection_probes.py``; ``--hide-launch``
also times the forward without window with the host's launch gaps hidden, a diagnostic). Same inputs, timing and records as ``bench_paper.py``
(``OUT/bench.jsonl``, readable by ``bench_table.py``); prints a markdown table at the end.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench_paper import (DENSE_NOTE, FLA_NOTE, dense_sdpa_fns, device_ceilings, finish,  # noqa: E402
                         fla_parallel_nsa_fns, gpu_inputs, paper_case)  # (benchmarks/ is sys.path[0])
from nsaconf.harness import bench as hb  # noqa: E402


PARTS = ("pool", "cmp", "cmp_imp", "window", "selection", "window_forced", "selection16", "probes")
HIDDEN_GROUP = "fwd w/o window, host launch gaps hidden (diagnostic)"


def parse_variant(text: str) -> tuple[str, dict]:
    """``'LABEL: NAME=VALUE; NAME=VALUE'`` -> (label, flags); ValueError names the bad part."""
    from nsaconf.oracles.inhouse_cutile import forward as F
    label, sep, body = text.partition(":")
    if not sep or not label.strip():
        raise ValueError(f"--variant {text!r}: expected 'LABEL: NAME=VALUE; ...'")
    return label.strip(), F.parse_flags([item.strip() for item in body.split(";") if item.strip()])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", default="65536,16384")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "out/bench-variants"))
    ap.add_argument("--variant", action="append", default=[], metavar="'LABEL: NAME=VALUE; ...'")
    ap.add_argument("--skip", default="", help="comma list of: fla,dense,parts")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of the parts to time (of {','.join(PARTS)})")
    ap.add_argument("--hide-launch", action="store_true",
                    help="also time the forward w/o window (each variant, and FLA) with host launch gaps hidden "
                         "(harness.bench.time_fn(hide_launch=True)): a diagnostic of launch overhead")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    parts = set(filter(None, args.parts.split(",")))
    if parts - set(PARTS):
        print(f"bench_variants: error: --parts: unknown {sorted(parts - set(PARTS))} (known: {', '.join(PARTS)})",
              file=sys.stderr)
        return 2
    if "parts" in skip:
        parts = set()
    from nsaconf.oracles.inhouse_cutile import forward as F
    try:
        variants = [("default", {})] + [parse_variant(v) for v in args.variant]
    except ValueError as e:
        print(f"bench_variants: error: {e}", file=sys.stderr)
        return 2
    ceil, vers = device_ceilings()
    records: list[hb.BenchRecord] = []

    def run(case, name, branches, fns, group, cost=None, note="", hide_launch=False):
        try:
            ms = hb.time_fn(fns[0], reps=args.reps, warmup=args.warmup, rotate=fns, hide_launch=hide_launch)
        except Exception as e:  # noqa: BLE001  (one failing configuration must not lose the others)
            print(f"FAIL {name} T={case.seq_len}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            traceback.print_exc(limit=3)
            return None
        rec = hb.make_record(case, name, "kernel" if group.startswith("part") else "e2e", branches, ms, args.reps,
                             cost or hb.cost_of(case, branches), ceil, vers, note, group)
        records.append(rec)
        print(f"T={case.seq_len:6d} {name:60s} {ms:9.3f} ms  [{group}]", flush=True)
        return ms

    for T in [int(t) for t in args.T.split(",")]:
        case, case_nw = paper_case(T), paper_case(T, window=0)
        base = gpu_inputs(case, seed=T)
        xs = [base] + [hb.clone_inputs(base) for _ in range(hb.input_copies(case, base) - 1)]
        scale = case.softmax_scale
        kc0, vc0 = F.mean_pool(base.k, base.v, 64, 64)
        if parts & {"selection", "selection16", "probes"}:     # the in-house top-n blocks (14: as selection_partial
            imp0 = F.compression(base.q, kc0, vc0, T, 64, 64, "end_inclusive", scale, want_importance=True)[2]
            idx16 = F.top_n(imp0, torch.arange(T, device="cuda"), 16, 64, "initial_local").to(torch.int32)
            idx14 = idx16[..., :14].contiguous()                 # gets them in the full forward)
            del imp0
        if "probes" in parts:   # the selection's loads with less arithmetic (selection_probes.py), 16 blocks
            from selection_probes import run_probe  # benchmarks/ is sys.path[0]
            for with_mma, idx_once, qpp, what in ((False, None, None, "loads only"),
                                                  (True, None, None, "loads + 2 MMA, no softmax"),
                                                  (False, False, 1, "loads only, indices per step, 1 query per program")):
                run(case_nw, f"probe: selection over 16 blocks, {what}", ("slc_o",),
                    [lambda x=x, a=(with_mma, idx_once, qpp): run_probe(x.q, x.k, x.v, idx16, 64, a[0], idx_once=a[1],
                                                                         qpp=a[2]) for x in xs],
                    "parts: selection probes (16 given blocks)", note="probe kernel, not a result")
        for label, flags in variants:
            with F.flags(**flags):
                note = " ".join(f"{k}={v!r}" for k, v in flags.items())
                name = f"inhouse_cutile [{label}]"
                run(case, name, ("o",), [lambda x=x: F.nsa_forward(case, x, branches=("o",)) for x in xs],
                    "full fwd (cmp+topk+slc+swa+gates)", note=note)
                run(case_nw, name, ("o",), [lambda x=x: F.nsa_forward(case_nw, x, branches=("o",)) for x in xs],
                    "fwd w/o window (cmp+topk+slc+gates)", cost=hb.cost_of(case_nw, ("o",)), note=note)
                if args.hide_launch:
                    run(case_nw, name, ("o",), [lambda x=x: F.nsa_forward(case_nw, x, branches=("o",)) for x in xs],
                        HIDDEN_GROUP, cost=hb.cost_of(case_nw, ("o",)), note=note, hide_launch=True)
                if "pool" in parts:
                    run(case, f"mean pooling [{label}]", ("cmp_o",), [lambda x=x: F.mean_pool(x.k, x.v, 64, 64) for x in xs],
                        "parts: mean pooling", note=note)
                if "cmp" in parts:
                    run(case, f"cmp (o+lse) [{label}]", ("cmp_o", "cmp_lse"),
                        [lambda x=x: F.compression(x.q, kc0, vc0, T, 64, 64, "end_inclusive", scale) for x in xs],
                        "parts: compression o+LSE", note=note)
                if "cmp_imp" in parts:
                    run(case, f"cmp+importance [{label}]", ("cmp_o", "cmp_lse"),
                        [lambda x=x: F.compression(x.q, kc0, vc0, T, 64, 64, "end_inclusive", scale,
                                                   want_importance=True, importance_fill=None) for x in xs],
                        "parts: compression + importance", cost=hb.cost_of(case, ("topk_idx",)), note=note)
                if "window" in parts:
                    run(case, f"window [{label}]", ("swa_o",),
                        [lambda x=x: F.sliding_window(x.q, x.k, x.v, 512, "w", scale) for x in xs],
                        "parts: window w=512", note=note)
                if "selection" in parts:
                    run(case_nw, f"selection_partial, 14 blocks [{label}]", ("slc_o",),
                        [lambda x=x: F.selection_partial(x.q, x.k, x.v, idx14, 64, scale) for x in xs],
                        "parts: selection over 14 given blocks (+ base-2 LSE)", note=note)
                if "selection16" in parts:   # what the forward without window runs after its top-n (DEFAULT_SELECTION)
                    run(case_nw, f"selection ({F.DEFAULT_SELECTION}) + gates, 16 blocks [{label}]", ("o",),
                        [lambda x=x: F.SELECTION_IMPL[F.DEFAULT_SELECTION](
                            x.q, x.k, x.v, idx16, 64, scale, want_slc=False, gated=(x.q, None, x.g_cmp, x.g_slc, x.g_swa))
                         for x in xs],
                        "parts: selection over 16 given blocks + gates", cost=hb.cost_of(case_nw, ("slc_o",)),
                        note=note)
                if "window_forced" not in parts:
                    continue
                nlocal = F.window_forced_plan(case, 16, 0)
                if nlocal is None:
                    print(f"T={T} [{label}]: window_forced_plan gives None, window_forced not timed", flush=True)
                    continue
                o_s = torch.randn_like(base.q)
                lse_s = torch.randn(base.q.shape[:3], device="cuda", dtype=torch.float32)
                run(case, f"window_forced [{label}]", ("swa_o",),
                    [lambda x=x: F.window_forced(x.q, x.k, x.v, o_s, lse_s, x.q, (x.g_cmp, x.g_slc, x.g_swa), nlocal, 64,
                                                 case.window, case.window_keys, scale) for x in xs],
                    "parts: window + forced local blocks + gates", note=note)
                del o_s, lse_s
        del kc0, vc0
        if "fla" not in skip:
            try:
                from nsaconf.oracles.fla import _triton_modules
                par, _, _ = _triton_modules()
                run(case_nw, "fla.parallel_nsa", ("o",), fla_parallel_nsa_fns(par, xs, scale),
                    "fwd w/o window (cmp+topk+slc+gates)", cost=hb.cost_of(case_nw, ("o",)), note=FLA_NOTE)
                if args.hide_launch:
                    run(case_nw, "fla.parallel_nsa", ("o",), fla_parallel_nsa_fns(par, xs, scale), HIDDEN_GROUP,
                        cost=hb.cost_of(case_nw, ("o",)), note=FLA_NOTE, hide_launch=True)
            except Exception as e:  # noqa: BLE001
                print(f"FLA unavailable: {type(e).__name__}: {e}", flush=True)
        if "dense" not in skip:
            run(case, "dense causal SDPA (GQA)", ("o",), dense_sdpa_fns(xs), "dense causal",
                cost=hb.dense_causal_cost(case), note=DENSE_NOTE)
        del xs, base
        torch.cuda.empty_cache()
    finish(records, args.out, "| T | group | what | ms |", lambda r: f"| {r.group} | {r.oracle} | {r.ms:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
