"""The "Performance" section of report.html, rendered from ``DIR/bench.jsonl`` records
(``harness.bench.BenchRecord`` as dicts): per case, ms per oracle, ratio to the fastest oracle
computing the same branches, and % of the roofline floor (``100 * floor_ms / ms``)."""
from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path
from typing import Iterable


def load_bench(path: str | Path) -> list[dict]:
    """Records of a ``bench.jsonl`` file (empty list if it does not exist)."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _fmt(x: float, nd: int = 3) -> str:
    return f"{x:.{nd}f}"


def render_performance_section(records: Iterable[dict]) -> str:
    """HTML fragment (``<section id="performance">``); an empty record list renders a one-line note."""
    recs = list(records)
    esc = html.escape
    if not recs:
        return '<section id="performance"><h2>Performance</h2><p>No timings (run <code>nsaconf bench</code>).</p></section>'
    first = recs[0]
    ceil = first.get("ceilings", {})
    head = (f"<p>Device: {esc(str(first.get('device', '?')))}; ceilings measured in the same run: bf16 matmul "
            f"{esc(str(ceil.get('matmul_tflops', '?')))} TFLOP/s, device-to-device copy {esc(str(ceil.get('copy_gbps', '?')))} GB/s. "
            "Median of CUDA-event timings after warm-up, inputs rotated past L2. "
            "<em>ratio</em> = ms / fastest ms among oracles computing the same branches of the case; "
            "<em>% of floor</em> = 100 &times; max(FLOPs / matmul rate, bytes / copy rate) / ms.</p>")
    by_case: dict[str, list[dict]] = defaultdict(list)
    for r in recs:
        by_case[r["case"]].append(r)
    rows = []
    for case, rs in by_case.items():
        for r in sorted(rs, key=lambda r: (r.get("group", ""), r["ms"])):
            best = r.get("ratio_to_fastest", 1.0) <= 1.0 + 1e-9
            rows.append(
                "<tr>" + "".join(f"<td>{c}</td>" for c in (
                    f"<code>{esc(case)}</code>", esc(r["oracle"]), esc(r.get("layer", "")),
                    esc(",".join(r.get("branches", []))), ("<b>" if best else "") + _fmt(r["ms"]) + ("</b>" if best else ""),
                    _fmt(r.get("ratio_to_fastest", 1.0), 2) + "&times;", _fmt(r.get("flops", 0) / 1e12, 3),
                    _fmt(r.get("bytes", 0) / 1e9, 3), _fmt(r.get("floor_ms", 0)), _fmt(r.get("pct_of_floor", 0), 1) + " %",
                    esc(r.get("note", "")))) + "</tr>")
    table = ("<table class='perf'><thead><tr><th>case</th><th>oracle</th><th>layer</th><th>branches</th><th>ms</th>"
             "<th>ratio</th><th>TFLOP</th><th>GB</th><th>floor ms</th><th>% of floor</th><th>note</th></tr></thead><tbody>"
             + "".join(rows) + "</tbody></table>")
    return f'<section id="performance"><h2>Performance</h2>{head}{table}</section>'


def write_performance(out_dir: str | Path) -> Path:
    """``out_dir/performance.html`` from ``out_dir/bench.jsonl`` (the section report.html also shows)."""
    out = Path(out_dir) / "performance.html"
    out.write_text(render_performance_section(load_bench(Path(out_dir) / "bench.jsonl")), encoding="utf-8")
    return out
