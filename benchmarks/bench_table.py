"""Markdown tables from a ``bench.jsonl`` written by ``benchmarks/bench_paper.py`` (issue 6 targets).

    python benchmarks/bench_table.py DIR/bench.jsonl
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str) -> int:
    recs = [json.loads(line) for line in open(path) if line.strip()]
    by_t: dict[str, list[dict]] = defaultdict(list)
    for r in recs:
        t = next(p for p in r["case"].split("-") if p.startswith("T") and p[1:].isdigit())
        by_t[t].append(r)
    first = recs[0]
    print(f"Card: {first['device']}; ceilings measured in the run: bf16 matmul {first['ceilings']['matmul_tflops']} "
          f"TFLOP/s, D2D copy {first['ceilings']['copy_gbps']} GB/s. Versions: {first['versions']}\n")
    print("| T | group | implementation | ms | ratio to fastest in group | % of roofline floor |")
    print("|---|---|---|---|---|---|")
    for t, rs in by_t.items():
        for r in sorted(rs, key=lambda r: (r["group"], r["ms"])):
            print(f"| {t[1:]} | {r['group'].split('|', 1)[-1]} | {r['oracle']} | {r['ms']:.3f} | {r['ratio_to_fastest']:.2f} | "
                  f"{r['pct_of_floor']:.1f} |")
    print("\n| T | in-house full fwd / FLA parallel_nsa (w/o window both) | dense SDPA / in-house full fwd | "
          "in-house selection / TileLang selection (fp16) |\n|---|---|---|---|")
    for t, rs in by_t.items():
        get = lambda name, group: next((r["ms"] for r in rs if r["oracle"] == name and r["group"].split("|", 1)[-1] == group), None)  # noqa: E731
        nw = get("inhouse_cutile", "fwd w/o window (cmp+topk+slc+gates)")
        fla = get("fla.parallel_nsa", "fwd w/o window (cmp+topk+slc+gates)")
        full = get("inhouse_cutile", "full fwd (cmp+topk+slc+swa+gates)")
        dense = get("dense causal SDPA (GQA)", "dense causal")
        sel = next((r["ms"] for r in rs if r["oracle"].startswith("inhouse_cutile.selection (chunked") and r["group"].endswith("selection (fp16)")), None)
        tl = get("tilelang_fwd (selection, fp16)", "selection (fp16)")
        f = lambda a, b: f"{a / b:.2f}x ({a:.2f} / {b:.2f} ms)" if a and b else "n/a"  # noqa: E731
        print(f"| {t[1:]} | speed-up {f(fla, nw)} | speed-up {f(dense, full)} | time ratio {f(sel, tl)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
