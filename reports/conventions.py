"""The "Conventions" report section: receptive-field heatmaps per (oracle, branch).

Input: the records of ``harness.probe.leak_check_records`` / ``nsaconf masks --json`` (``matrix`` and
``expected_matrix`` as lists of '0'/'1' row strings, ``dont_care`` likewise or null). Output: an HTML
fragment with a summary table and, per record, two inline-SVG heatmaps: the observed M coloured by its
diff against the expected (or claimed, or nearest) convention, and that convention's mask.
Pure Python (no torch), so the report renders anywhere.
"""
from __future__ import annotations

import html
from typing import Optional

COLOURS = {".": "#ffffff", "#": "#1f4e79", "+": "#d62728", "-": "#ff9f1c", "~": "#b8b8b8"}
LEGEND = (("#", "dependency, expected"), (".", "no dependency, expected"), ("+", "extra dependency"),
          ("-", "missing dependency"), ("~", "ignored (through the oracle's own top-k)"))
FINDING_STYLE = {"ok": "color:#2a7d2a", "leak": "color:#b00000;font-weight:bold", "mismatch": "color:#b05a00;font-weight:bold",
                 "unknown": "color:#b05a00", "skipped": "color:#777", "error": "color:#b00000"}
HEATMAP_PX = 256


def diff_chars(matrix: list[str], expected: Optional[list[str]], dont_care: Optional[list[str]] = None) -> list[str]:
    """Row strings of ``.`` agree-no-dep, ``#`` agree-dep, ``+`` extra, ``-`` missing, ``~`` ignored."""
    rows = []
    for i, row in enumerate(matrix):
        exp = expected[i] if expected else "0" * len(row)
        dc = dont_care[i] if dont_care else "0" * len(row)
        rows.append("".join(("~" if o == "1" else ".") if d == "1" else
                            ("#" if o == "1" and e == "1" else "+" if o == "1" else "-" if e == "1" else ".")
                            for o, e, d in zip(row, exp, dc)))
    return rows


def mask_chars(matrix: list[str]) -> list[str]:
    return [row.replace("1", "#").replace("0", ".") for row in matrix]


def downsample(rows: list[str], width: int = 64) -> tuple[list[str], int]:
    """Shrink a char matrix by an integer factor so that it is at most ``width`` wide; a cell shows the
    most severe char of its block (``+`` > ``-`` > ``~`` > ``#`` > ``.``). Returns rows and the factor."""
    n = max(len(rows), max((len(r) for r in rows), default=0))
    f = max(1, -(-n // width))
    if f == 1:
        return rows, 1
    rank = {c: i for i, c in enumerate("+-~#.")}
    out = []
    for i in range(0, len(rows), f):
        block = rows[i:i + f]
        line = []
        for j in range(0, len(block[0]), f):
            cells = "".join(r[j:j + f] for r in block)
            line.append(min(cells, key=lambda c: rank.get(c, 9)))
        out.append("".join(line))
    return out, f


def svg_heatmap(rows: list[str], title: str, px: int = HEATMAP_PX) -> str:
    """Inline SVG of a char matrix (run-length rectangles per row), with the diagonal p = s drawn."""
    n = len(rows)
    m = max((len(r) for r in rows), default=0)
    if not n or not m:
        return "<svg width='0' height='0'></svg>"
    cell = max(1.0, px / max(n, m))
    w, h = cell * m, cell * n
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{w:.0f}' height='{h:.0f}' viewBox='0 0 {w:.2f} {h:.2f}' "
             f"shape-rendering='crispEdges' role='img'><title>{html.escape(title)}</title>",
             f"<rect width='{w:.2f}' height='{h:.2f}' fill='{COLOURS['.']}' stroke='#999' stroke-width='0.5'/>"]
    for i, row in enumerate(rows):
        j = 0
        while j < len(row):
            c = row[j]
            k = j
            while k < len(row) and row[k] == c:
                k += 1
            if c != ".":
                parts.append(f"<rect x='{j * cell:.2f}' y='{i * cell:.2f}' width='{(k - j) * cell:.2f}' height='{cell:.2f}' "
                             f"fill='{COLOURS.get(c, '#000')}'/>")
            j = k
    parts.append(f"<line x1='0' y1='0' x2='{min(w, h):.2f}' y2='{min(w, h):.2f}' stroke='#2ca02c' stroke-width='0.6' "
                 "stroke-dasharray='2,2'/>")
    parts.append("</svg>")
    return "".join(parts)


def _fmt(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.2g}"
    if isinstance(x, (list, tuple)):
        return "(" + ", ".join(str(v) for v in x) + ")"
    return str(x)


def render_conventions_section(records: list[dict]) -> str:
    """HTML fragment (``<section id="conventions">``) for report.html."""
    e = html.escape
    out = ["<section id='conventions'><h2>Conventions</h2>",
           "<p>Receptive-field probe: <code>M[p, s]</code> = the output at query position p changes when key and "
           "value at position s are perturbed (black box, batched perturbations, threshold from the oracle's own "
           "noise). Classified against every canonical convention; any dependence on <code>s &gt; p</code> is a "
           "causality leak.</p>"]
    if not records:
        out.append("<p>No convention probe was run.</p></section>")
        return "".join(out)
    out.append("<table class='conventions'><thead><tr><th>oracle</th><th>branch</th><th>convention</th>"
               "<th>expected / claimed</th><th>finding</th><th>leaks (first p,s)</th><th>differing cells</th>"
               "<th>threshold</th><th>calls</th><th>T / l' / w</th></tr></thead><tbody>")
    for r in records:
        style = FINDING_STYLE.get(r.get("finding") or "", "")
        exp = r.get("expected_convention") or (f"claims {r['claimed_convention']}" if r.get("claimed_convention") else "–")
        finding = r.get("finding") or "–"
        if r.get("skipped"):
            finding = f"{r.get('finding') or 'skipped'}: {r['skipped']}"
        leaks = "–" if r.get("leaks") is None else f"{r['leaks']}" + (f" {_fmt(r.get('first_leak'))}" if r.get("first_leak") else "")
        conv = r.get("convention") or "–"
        if conv == "unknown" and r.get("nearest"):
            conv = f"unknown (nearest {r['nearest']})"
        out.append(f"<tr><td>{e(str(r.get('oracle')))}</td><td>{e(str(r.get('branch')))}</td><td>{e(conv)}</td>"
                   f"<td>{e(exp)}</td><td style='{style}'>{e(finding)}</td><td>{e(leaks)}</td>"
                   f"<td>{e(_fmt(r.get('differing_cells')))}</td><td>{e(_fmt(r.get('threshold')))}</td>"
                   f"<td>{e(_fmt(r.get('calls')))}</td>"
                   f"<td>{e(_fmt(r.get('seq_len')))} / {e(_fmt(r.get('block_size')))} / {e(_fmt(r.get('window')))}</td></tr>")
    out.append("</tbody></table>")
    legend = " ".join(f"<span style='display:inline-block;width:10px;height:10px;border:1px solid #999;"
                      f"background:{COLOURS[c]}'></span> {e(t)}" for c, t in LEGEND)
    out.append(f"<p class='legend'>{legend}; dashed: diagonal p = s (right of it is the future).</p>")
    out.append("<div class='heatmaps' style='display:flex;flex-wrap:wrap;gap:18px'>")
    for r in records:
        if not r.get("matrix"):
            continue
        ref = r.get("diff_against") or "none"
        title = f"{r['oracle']} {r['branch']}: observed M vs {ref}"
        diff = diff_chars(r["matrix"], r.get("expected_matrix"), r.get("dont_care"))
        figs = [f"<figure style='margin:0'>{svg_heatmap(diff, title)}<figcaption>observed "
                f"(<b>{e(str(r.get('convention')))}</b>)</figcaption></figure>"]
        if r.get("expected_matrix"):
            figs.append(f"<figure style='margin:0'>{svg_heatmap(mask_chars(r['expected_matrix']), ref)}"
                        f"<figcaption>{e(ref)}</figcaption></figure>")
        out.append(f"<div class='probe'><h4>{e(str(r['oracle']))} · {e(str(r['branch']))} · {e(str(r.get('finding')))}</h4>"
                   f"<div style='display:flex;gap:8px'>{''.join(figs)}</div></div>")
    out.append("</div></section>")
    return "".join(out)


def render_standalone(records: list[dict], title: str = "nsaconf masks") -> str:
    """A complete HTML page around the section (for ``nsaconf masks --html``)."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:20px} table{border-collapse:collapse} "
            "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px} figcaption{font-size:12px}</style>"
            f"</head><body><h1>{html.escape(title)}</h1>{render_conventions_section(records)}</body></html>\n")


# ------------------------------------------------------------------------------------ text and markdown
def legend_text(chars: str = ".#+-~", code: bool = False) -> str:
    """The ASCII diff's legend on one line: each of ``chars`` and its meaning (``code``: as markdown code spans)."""
    meaning = dict(LEGEND)
    return "; ".join(f"{f'`{c}`' if code else c} {meaning[c]}" for c in chars)


def format_text(rec: dict, width: int = 64, diff: bool = True, legend: bool = True) -> str:
    """Human summary of one record with the ASCII diff (and its legend)."""
    head = f"{rec['oracle']:<14} {rec['branch']:<6}"
    if rec.get("skipped"):
        return f"{head} {'ERROR' if rec.get('finding') == 'error' else 'SKIP'}: {rec['skipped']}"
    conv = rec["convention"]
    if conv == "unknown":
        conv += f" (nearest {rec['nearest']}, {rec['differing_cells']} cells differ)"
    exp = rec.get("expected_convention") or (f"claims {rec['claimed_convention']}" if rec.get("claimed_convention") else "-")
    leak = f"{rec['leaks']} cells with s > p, first (p,s)={tuple(rec['first_leak'])}" if rec["leaks"] else "no leak"
    lines = [f"{head} {conv}  [expected: {exp}]  {rec['finding'].upper()}  {leak}",
             f"{'':21}T={rec['seq_len']} l={rec['cmp_block']} d={rec['cmp_stride']} l'={rec['block_size']} w={rec['window']} "
             f"{rec['dtype']} {rec['block_indices']}; threshold {rec['threshold']:.2g} (noise {rec['noise']:.2g}, "
             f"min signal {rec['min_signal'] if rec['min_signal'] is None else format(rec['min_signal'], '.2g')}); {rec['calls']} calls"]
    if rec.get("gated"):
        lines.append(f"{'':21}parts: {rec['gated']}")
    if rec.get("differences"):
        shown = ", ".join(f"{k}({p},{s})" for p, s, k in rec["differences"][:8])
        lines.append(f"{'':21}differs from {rec['diff_against']} in {rec['differing_vs_reference']} cells: "
                     f"{shown}{' ...' if len(rec['differences']) > 8 else ''}")
    if not diff:
        return "\n".join(lines)
    rows, f = downsample(diff_chars(rec["matrix"], rec.get("expected_matrix"), rec.get("dont_care")), width)
    scale = "" if f == 1 else f", 1 char = {f}x{f} cells"
    lines.append(f"{'':21}M vs {rec['diff_against']} (rows p, columns s{scale}):")
    if legend:
        lines.append(f"{'':21}{legend_text()}")
    for i, row in enumerate(rows):
        lines.append(f"  {i * f:>4} {row}")
    return "\n".join(lines)


def format_markdown(records: list[dict], here: dict, width: int = 64, title: str = "Convention probe") -> str:
    """Markdown report: a summary table and the ASCII diffs. ``here`` (``device``, ``device_name``,
    ``torch``) names where records without their own provenance were measured."""
    seen = sorted({(r.get("device", here["device"]), r.get("device_name", ""), r.get("torch", "")) for r in records
                   if r.get("device_name")})
    if not seen:  # records without provenance: this process's device
        seen = [(here["device"], here["device_name"], here["torch"])]
    where = "; ".join(f"`nsaconf masks --device {d}` on {n}, torch {t}" for d, n, t in seen)
    out = [f"# {title}", "", f"{where}.", "",
           "| oracle | branch | convention | expected / claimed | finding | leaks (first p,s) | differing cells | threshold | calls | dtype |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("skipped"):
            out.append(f"| {r['oracle']} | {r['branch']} | – | – | {r['finding']}: {r['skipped']} | – | – | – | – | – |")
            continue
        exp = r.get("expected_convention") or (f"claims {r['claimed_convention']}" if r.get("claimed_convention") else "–")
        conv = r["convention"] + (f" (nearest {r['nearest']})" if r["convention"] == "unknown" else "")
        leak = f"{r['leaks']} {tuple(r['first_leak'])}" if r["leaks"] else "0"
        out.append(f"| {r['oracle']} | {r['branch']} | {conv} | {exp} | {r['finding']} | {leak} | {r['differing_cells']} | "
                   f"{r['threshold']:.2g} | {r['calls']} | {r['dtype']} |")
    out += ["", "## ASCII diffs", "", legend_text(code=True) + ".", ""]
    for r in records:
        if not r.get("skipped"):
            out += ["```", format_text(r, width, legend=False), "```", ""]
    return "\n".join(out)


def format_module_text(rec: dict, width: int = 64, diff: bool = True) -> str:
    """``nsaconf masks --module``: one module's receptive field (``matrix`` rows of '0'/'1'), its causality and,
    with ``diff``, the ASCII map of M against the causal mask (every s <= p)."""
    T = len(rec["matrix"])
    if rec["leaks"]:
        verdict = f"LEAK: {rec['leaks']} cells with s > p, first (p,s)={tuple(rec['first_leak'])}"
    else:
        verdict = "CAUSAL: no output position depends on a later token"
    lines = [f"module {rec['module']}  [B, {rec['seq_len']}, {rec['dim']}] {rec['dtype']} on {rec['device']}  {verdict}",
             f"{'':2}depends on {rec['dependencies']} of {T * (T + 1) // 2} cells s <= p; threshold {rec['threshold']:.2g} "
             f"(noise {rec['noise']:.2g}); {rec['calls']} calls"]
    if not diff:
        return "\n".join(lines)
    causal = ["1" * (p + 1) + "0" * (T - p - 1) for p in range(T)]
    rows, f = downsample(diff_chars(rec["matrix"], causal), width)
    scale = "" if f == 1 else f", 1 char = {f}x{f} cells"
    lines += [f"{'':2}M vs causal (every s <= p; rows p, columns s{scale}):", f"{'':2}{legend_text('.#+-')}"]
    lines += [f"  {i * f:>4} {row}" for i, row in enumerate(rows)]
    return "\n".join(lines)
