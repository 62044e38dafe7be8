"""The picture of a FAIL's ``error_map`` (``harness.error_map``): an inline-SVG heat-map of err/bound per
(position bin, head), rows = positions downward, columns = heads, with axis labels, a legend and a
one-line reading ("over the bound: p 16 … 99, all 16 heads"). Pure Python, every text escaped; a map
that is malformed renders as a short note, never as an exception.
"""
from __future__ import annotations

import html
import math
from typing import Any, Optional

#: (upper bound of the class, colour, legend text); err/bound above the last finite bound -> the last class
CLASSES = ((0.5, "#f3faf4", "≤ 0.5"), (1.0, "#b7e2b1", "0.5 – 1 (within)"), (10.0, "#fdd49e", "1 – 10"),
           (100.0, "#fc8d59", "10 – 100"), (1e4, "#d7301f", "100 – 10⁴"), (math.inf, "#7f0000", "> 10⁴"))
NONFINITE = ("#6a3d9a", "NaN / Inf output")
NO_ROW = ("#e1e4e8", "no row")


def _num(v: Any) -> Optional[float]:
    """A value of the map as a float (strict-JSON "inf"/"nan" strings included), None when absent."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip().lower() in ("inf", "+inf", "infinity", "nan", "-inf"):
        return math.inf  # a non-finite err/bound: non-finite output where the truth is finite
    return None


def colour(v: Optional[float]) -> str:
    if v is None:
        return NO_ROW[0]
    if math.isnan(v) or math.isinf(v):
        return NONFINITE[0]
    for top, c, _ in CLASSES:
        if v <= top:
            return c
    return CLASSES[-1][1]


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "no row"
    if math.isinf(v) or math.isnan(v):
        return "NaN/Inf"
    return f"{v:.3g}"


def parse(emap: Any) -> Optional[dict[str, Any]]:
    """The map in a checked form (values as floats or None), or None when it is not a map."""
    if not isinstance(emap, dict):
        return None
    rows, edges = emap.get("values"), emap.get("row_edges")
    if not (isinstance(rows, list) and rows and all(isinstance(r, list) and r for r in rows)):
        return None
    if not (isinstance(edges, list) and len(edges) == len(rows) + 1 and all(isinstance(e, int) for e in edges)):
        return None
    ncol = max(len(r) for r in rows)
    col_edges = emap.get("col_edges")
    if not (isinstance(col_edges, list) and len(col_edges) == ncol + 1 and all(isinstance(e, int) for e in col_edges)):
        col_edges = list(range(ncol + 1))
    values = [[_num(v) for v in r] + [None] * (ncol - len(r)) for r in rows]
    return {"rows": str(emap.get("rows") or "position"), "cols": str(emap.get("cols") or "head"),
            "row_edges": edges, "col_edges": col_edges, "values": values}


def _span(edges: list[int], i: int, j: int) -> str:
    """Positions of bins i..j (inclusive) as text."""
    lo, hi = edges[i], edges[j + 1] - 1
    return f"{lo}" if lo == hi else f"{lo} … {hi}"


def _cols_text(m: dict[str, Any], cols: list[int]) -> str:
    ce = m["col_edges"]
    n_heads = ce[-1] - ce[0]
    if len(cols) == len(ce) - 1:
        return f"all {n_heads} {m['cols']}s"
    parts = [_span(ce, c, c) for c in cols]
    shown = ", ".join(parts[:8]) + (" …" if len(parts) > 8 else "")
    return f"{m['cols']}{'s' if len(parts) > 1 or ce[cols[0] + 1] - ce[cols[0]] > 1 else ''} {shown}"


def reading(emap: Any) -> str:
    """One line: which positions and heads are over the bound, e.g. ``over the bound: query position p
    16 … 99, all 16 heads; within it: p 0 … 15``."""
    m = parse(emap)
    if m is None:
        return "no error map"
    vals, edges = m["values"], m["row_edges"]
    over_rows = [i for i, r in enumerate(vals) if any(v is not None and v > 1 for v in r)]
    if not over_rows:
        return "no bin is over the bound (the cell failed on another check)"
    over_cols = sorted({j for r in vals for j, v in enumerate(r) if v is not None and v > 1})
    name = m["rows"]
    sym = name.split()[-1] if name.split() else "p"
    runs: list[tuple[int, int]] = []
    for i in over_rows:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    where = ", ".join(_span(edges, a, b) for a, b in runs[:6]) + (" …" if len(runs) > 6 else "")
    text = f"over the bound: {name} {where}; {_cols_text(m, over_cols)}"
    clean = [i for i, r in enumerate(vals) if i not in over_rows and any(v is not None for v in r)]
    if clean and clean[-1] < over_rows[0]:
        text += f"; within it before {sym} = {edges[over_rows[0]]}"
    nonfinite = sum(1 for r in vals for v in r if v is not None and math.isinf(v))
    if nonfinite:
        text += f"; NaN/Inf in {nonfinite} bin(s)"
    return text


def svg(emap: Any, title: str = "") -> str:
    """Inline SVG heat-map with axes (rows: positions downward, columns: heads) and a hover title per bin."""
    m = parse(emap)
    if m is None:
        return "<p class='note'>(no error map recorded)</p>"
    e = html.escape
    vals, edges, ce = m["values"], m["row_edges"], m["col_edges"]
    nr, nc = len(vals), len(vals[0])
    cw = max(9.0, min(18.0, 240.0 / nc))
    ch = max(6.0, min(24.0, 224.0 / nr))  # at least ~120 px tall: room for the rotated row title
    left, top = 58.0, 34.0
    w, h = left + cw * nc + 6, top + ch * nr + 6
    out = [f"<svg class='errmap' width='{w:.0f}' height='{h:.0f}' "
           f"viewBox='0 0 {w:.1f} {h:.1f}' shape-rendering='crispEdges' role='img' font-size='10' "
           f"font-family='system-ui, sans-serif'><title>{e(title or 'error map')}</title>"]
    # axis titles: columns on top, rows along the left edge (rotated)
    out.append(f"<text x='{left + cw * nc / 2:.1f}' y='10' text-anchor='middle' fill='#444'>{e(m['cols'])} →</text>")
    out.append(f"<text transform='translate(11 {top + ch * nr / 2:.1f}) rotate(-90)' text-anchor='middle' "
               f"fill='#444'>{e(m['rows'])} ↓</text>")
    # column ticks: every column when they fit, else every k-th
    kc = max(1, math.ceil(14.0 / cw)) if nc > 1 else 1
    for j in range(0, nc, kc):
        lab = str(ce[j]) if ce[j + 1] - ce[j] == 1 else f"{ce[j]}"
        out.append(f"<text x='{left + cw * (j + 0.5):.1f}' y='{top - 5:.1f}' text-anchor='middle' fill='#555' "
                   f"font-size='9'>{e(lab)}</text>")
    # row ticks: the first position of a bin, every k-th bin, and the end
    kr = max(1, math.ceil(11.0 / ch))
    for i in range(0, nr, kr):
        out.append(f"<text x='{left - 4:.1f}' y='{top + ch * i + 3.5:.1f}' text-anchor='end' fill='#555' "
                   f"font-size='9'>{edges[i]}</text>")
        out.append(f"<line x1='{left - 2:.1f}' x2='{left:.1f}' y1='{top + ch * i:.1f}' y2='{top + ch * i:.1f}' stroke='#888'/>")
    out.append(f"<text x='{left - 4:.1f}' y='{top + ch * nr + 3.5:.1f}' text-anchor='end' fill='#999' "
               f"font-size='9'>{edges[-1]}</text>")
    for i, row in enumerate(vals):
        pos = _span(edges, i, i)
        for j, v in enumerate(row):
            head = _span(ce, j, j)
            tip = f"{m['rows']} {pos}, {m['cols']} {head}: err/bound {_fmt(v)}"
            out.append(f"<rect x='{left + cw * j:.1f}' y='{top + ch * i:.1f}' width='{cw:.1f}' height='{ch:.1f}' "
                       f"fill='{colour(v)}'><title>{e(tip)}</title></rect>")
    out.append(f"<rect x='{left:.1f}' y='{top:.1f}' width='{cw * nc:.1f}' height='{ch * nr:.1f}' fill='none' "
               "stroke='#888' stroke-width='0.8'/>")
    out.append("</svg>")
    return "".join(out)


def legend() -> str:
    """The colour classes of err/bound, as one HTML line."""
    items = [(c, t) for _, c, t in CLASSES] + [NONFINITE, NO_ROW]
    sw = "".join(f"<span class='sw'><i style='background:{c}'></i>{html.escape(t)}</span>" for c, t in items)
    return f"<div class='errmap-legend'><b>err / bound</b> {sw}</div>"


def strip(emap: Any) -> str:
    """A one-line sparkline of the map for a failure's summary line: one cell per position bin (the
    maximum over heads), first and last position at its ends, e.g. ``p 0 ▮▮▮▮▮▮ 99``."""
    m = parse(emap)
    if m is None:
        return ""
    e = html.escape
    edges, vals = m["row_edges"], m["values"]
    worst = [max((v for v in row if v is not None), default=None) for row in vals]
    cw = max(3.0, min(8.0, 128.0 / len(worst)))
    w = cw * len(worst)
    sym = m["rows"].split()[-1] if m["rows"].split() else "p"
    rects = "".join(f"<rect x='{i * cw:.1f}' width='{cw:.1f}' height='10' fill='{colour(v)}'/>" for i, v in enumerate(worst))
    return (f"<span class='strip' title='{e(m['rows'])}: err/bound per bin, the worst head'>{e(sym)} {edges[0]} "
            f"<svg width='{w:.0f}' height='10' viewBox='0 0 {w:.1f} 10' shape-rendering='crispEdges'>{rects}"
            f"<rect width='{w:.1f}' height='10' fill='none' stroke='#999' stroke-width='0.6'/></svg> {edges[-1] - 1}</span>")
