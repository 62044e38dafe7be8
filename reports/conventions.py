"""The "Conventions" report section: receptive-field heatmaps per (oracle, branch).

Input: the records of ``harness.probe.leak_check_records`` / ``nsaconf masks --json`` (``matrix`` and
``expected_matrix`` as lists of '0'/'1' row strings, ``dont_care`` likewise or null). Output: an HTML
fragment with a summary table and, per record, two inline-SVG heatmaps with axes (query position p
down, key position s across): the observed M coloured by its diff against the expected (or claimed, or
nearest) convention, and that convention's mask. Differing cells are drawn enlarged over a halo and
flagged in the margins, and said in words (``48 extra at s = p − 16``), so that a window of w+1 keys
is seen at a glance. Each record's maps carry the id ``anchor(oracle, branch)``.
Pure Python (no torch), so the report renders anywhere.
"""
from __future__ import annotations

import html
import math
import re
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


def anchor(oracle: object, branch: object) -> str:
    """The HTML id of one probe record's heat-maps (the Failures section links to it)."""
    return "conv-" + re.sub(r"[^A-Za-z0-9_.-]", "_", f"{oracle}-{branch}")


def difference_pattern(rows: list[str]) -> str:
    """The differing cells of a diff (``diff_chars``) in words: per kind (``+`` extra, ``-`` missing) the
    count and, when they lie on a few diagonals, where: e.g. ``48 extra at s = p − 16 (p 16 … 63)``."""
    parts = []
    for kind, word in (("+", "extra"), ("-", "missing")):
        cells = [(p, s) for p, row in enumerate(rows) for s, c in enumerate(row) if c == kind]
        if not cells:
            continue
        offsets = sorted({p - s for p, s in cells})
        ps = sorted({p for p, _ in cells})
        span = f"p {ps[0]}" if ps[0] == ps[-1] else f"p {ps[0]} … {ps[-1]}"
        if len(offsets) <= 2:
            where = " and ".join("s = p" if d == 0 else f"s = p − {d}" if d > 0 else f"s = p + {-d}" for d in offsets)
            parts.append(f"{len(cells)} {word} at {where} ({span})")
        else:
            parts.append(f"{len(cells)} {word} ({span})")
    return "; ".join(parts)


def _ticks(n: int, step_hint: Optional[int]) -> list[int]:
    """Tick positions 0..n: multiples of the block size when that gives 2..8 ticks, else of a power of two."""
    step = step_hint if step_hint and 2 <= n // step_hint <= 8 else max(1, 2 ** math.ceil(math.log2(max(1, n / 6))))
    return list(range(0, n + 1, step))


def svg_heatmap(rows: list[str], title: str, px: int = HEATMAP_PX, tick: Optional[int] = None,
                axes: bool = True) -> str:
    """Inline SVG of a char matrix (run-length rectangles per row) with the diagonal p = s, axis titles
    (query position p downward, key position s rightward), ticks at multiples of ``tick``, and the
    differing cells (``+``/``-``) drawn over a halo so that a single diagonal of them (a window of w+1
    keys where w was asked) stands out; red/orange marks in the margins flag the rows and columns that
    hold a difference."""
    n = len(rows)
    m = max((len(r) for r in rows), default=0)
    if not n or not m:
        return "<svg width='0' height='0'></svg>"
    cell = max(1.0, px / max(n, m))
    w, h = cell * m, cell * n
    left, top, pad = (46.0, 30.0, 8.0) if axes else (0.0, 0.0, 0.0)
    W, H = left + w + pad, top + h + pad
    parts = [f"<svg width='{W:.0f}' height='{H:.0f}' viewBox='0 0 {W:.2f} {H:.2f}' "
             f"shape-rendering='crispEdges' role='img' font-family='system-ui, sans-serif' font-size='10'>"
             f"<title>{html.escape(title)}</title>",
             f"<g transform='translate({left:.2f} {top:.2f})'>",
             f"<rect width='{w:.2f}' height='{h:.2f}' fill='{COLOURS['.']}' stroke='#999' stroke-width='0.5'/>"]
    diffs: list[tuple[int, int, int, str]] = []
    for i, row in enumerate(rows):
        j = 0
        while j < len(row):
            c = row[j]
            k = j
            while k < len(row) and row[k] == c:
                k += 1
            if c in "+-":
                diffs.append((i, j, k, c))
            elif c != ".":
                parts.append(f"<rect x='{j * cell:.2f}' y='{i * cell:.2f}' width='{(k - j) * cell:.2f}' height='{cell:.2f}' "
                             f"fill='{COLOURS.get(c, '#000')}'/>")
            j = k
    parts.append(f"<line x1='0' y1='0' x2='{min(w, h):.2f}' y2='{min(w, h):.2f}' stroke='#2ca02c' stroke-width='0.6' "
                 "stroke-dasharray='2,2'/>")
    if diffs:  # halo (white) then the cell, each at least ~4 px wide
        grow = max(0.0, (4.0 - cell) / 2) + 1.0
        for pass_ in ("halo", "cell"):
            for i, j, k, c in diffs:
                g = grow if pass_ == "halo" else max(0.0, grow - 1.0)
                fill, cls = ("#ffffff", "halo") if pass_ == "halo" else (COLOURS[c], "diff")
                parts.append(f"<rect class='{cls}' x='{j * cell - g:.2f}' y='{i * cell - g:.2f}' "
                             f"width='{(k - j) * cell + 2 * g:.2f}' height='{cell + 2 * g:.2f}' fill='{fill}'/>")
    if axes:
        step = _ticks(max(n, m), tick)
        for t in step:
            if t <= m:
                parts.append(f"<line x1='{t * cell:.2f}' x2='{t * cell:.2f}' y1='-3' y2='0' stroke='#777'/>"
                             f"<text x='{t * cell:.2f}' y='-5' text-anchor='middle' fill='#555' font-size='9'>{t}</text>")
            if t <= n:
                parts.append(f"<line x1='-3' x2='0' y1='{t * cell:.2f}' y2='{t * cell:.2f}' stroke='#777'/>"
                             f"<text x='-5' y='{t * cell + 3:.2f}' text-anchor='end' fill='#555' font-size='9'>{t}</text>")
        # margins: which rows (left) and columns (bottom) hold a difference
        for i, j, k, c in diffs:
            parts.append(f"<rect class='mark' x='{17 - left:.2f}' y='{i * cell:.2f}' width='5' height='{max(cell, 1.0):.2f}' "
                         f"fill='{COLOURS[c]}'/><rect class='mark' x='{j * cell:.2f}' y='{h + 2:.2f}' "
                         f"width='{max((k - j) * cell, 1.0):.2f}' height='5' fill='{COLOURS[c]}'/>")
        parts.append("</g>")
        parts.append(f"<text x='{left + w / 2:.2f}' y='10' text-anchor='middle' fill='#444'>key position s →</text>")
        parts.append(f"<text transform='translate(9 {top + h / 2:.2f}) rotate(-90)' text-anchor='middle' fill='#444'>"
                     "query position p ↓</text>")
    else:
        parts.append("</g>")
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


#: the section's own styles (the same in report.html and ``nsaconf masks --html``)
SECTION_CSS = (
    ".conventions-body table.conv{border-collapse:collapse;margin:6px 0 10px}"
    ".conventions-body table.conv th,.conventions-body table.conv td{border:1px solid #d1d9e0;padding:3px 8px;"
    "text-align:left;white-space:nowrap;vertical-align:top;font-size:13px}"
    ".conventions-body table.conv th{background:#f6f8fa;font-weight:600}"
    ".conventions-body table.conv td.wrap{white-space:normal;min-width:9em;max-width:26em;overflow-wrap:anywhere}"
    ".conventions-body table.conv td.small{font-size:12px;color:#59636e;font-variant-numeric:tabular-nums;"
    "white-space:normal;min-width:8em}"
    ".conventions-body table.conv td.name{white-space:normal;min-width:8em}"
    ".conventions-body .legend{display:flex;flex-wrap:wrap;gap:4px 16px;font-size:12.5px;color:#59636e;margin:6px 0}"
    ".conventions-body .legend i{display:inline-block;width:11px;height:11px;border:1px solid #999;margin-right:4px;"
    "vertical-align:-1px}"
    ".conventions-body .heatmaps{display:flex;flex-wrap:wrap;gap:14px 28px;margin:8px 0}"
    ".conventions-body .probe{border:1px solid #d1d9e0;border-radius:6px;padding:6px 10px;max-width:100%}"
    ".conventions-body .probe:target{outline:3px solid #0969da}"
    ".conventions-body .probe h4{margin:2px 0 6px;font-size:14px}"
    ".conventions-body .probe .pair{display:flex;flex-wrap:wrap;gap:10px}"
    ".conventions-body figure{margin:0;width:min-content}.conventions-body figcaption{font-size:12px;color:#59636e;text-align:center}"
    ".conventions-body .diffline{font-size:12.5px;margin:4px 0 0;max-width:560px}"
    ".conventions-body details.ok-maps>summary{cursor:pointer;color:#0550ae;margin:8px 0}"
)


def _cell(text: str) -> str:
    """A table cell of a convention name, escaped; a long one (``ambiguous(a|b|c)``) may wrap, at ``|`` or
    ``/`` first."""
    if len(text) <= 24:
        return f"<td>{html.escape(text)}</td>"
    return "<td class='wrap'>" + html.escape(text).replace("|", "|<wbr>").replace("/", "/<wbr>") + "</td>"


def _probe_case(r: dict) -> str:
    """The probe's case and effort, escaped: ``T 64 · l' 16 · w 16<br>3 calls · threshold 1.6e-12``."""
    e = html.escape
    if r.get("seq_len") is None:
        return "–"
    return (f"T {e(_fmt(r.get('seq_len')))} · l&#39; {e(_fmt(r.get('block_size')))} · w {e(_fmt(r.get('window')))}"
            f"<br>{e(_fmt(r.get('calls')))} calls · threshold {e(_fmt(r.get('threshold')))}")


def _probe_block(r: dict) -> str:
    e = html.escape
    ref = r.get("diff_against") or "none"
    title = f"{r['oracle']} {r['branch']}: observed M vs {ref}"
    diff = diff_chars(r["matrix"], r.get("expected_matrix"), r.get("dont_care"))
    tick = r.get("block_size") if isinstance(r.get("block_size"), int) else None
    figs = [f"<figure>{svg_heatmap(diff, title, tick=tick)}<figcaption>observed: "
            f"<b>{e(str(r.get('convention')))}</b>, drawn against {e(ref)}</figcaption></figure>"]
    if r.get("expected_matrix"):
        figs.append(f"<figure>{svg_heatmap(mask_chars(r['expected_matrix']), ref, tick=tick)}"
                    f"<figcaption>{e(ref)} (the mask it should have)</figcaption></figure>")
    pattern = difference_pattern(diff)
    line = (f"<p class='diffline'>Differs from {e(ref)} in: {e(pattern)}.</p>" if pattern
            else f"<p class='diffline'>Same cells as {e(ref)}.</p>")
    style = FINDING_STYLE.get(r.get("finding") or "", "")
    return (f"<div class='probe' id='{e(anchor(r.get('oracle'), r.get('branch')))}'><h4>{e(str(r['oracle']))} · "
            f"{e(str(r['branch']))} · <span style='{style}'>{e(str(r.get('finding')))}</span></h4>"
            f"<div class='pair'>{''.join(figs)}</div>{line}</div>")


def render_conventions_section(records: list[dict]) -> str:
    """HTML fragment (``<div class="conventions-body">``, no heading: the page gives it one) for report.html:
    the findings table, the legend, the heat-maps of every finding that is not ``ok`` and, folded, those
    that are."""
    e = html.escape
    out = [f"<div class='conventions-body'><style>{SECTION_CSS}</style>",
           "<p>Receptive-field probe: <code>M[p, s]</code> = the output at query position p changes when key and "
           "value at position s are perturbed (black box, batched perturbations, threshold from the oracle's own "
           "noise). Classified against every canonical convention; any dependence on <code>s &gt; p</code> is a "
           "causality leak.</p>"]
    if not records:
        out.append("<p>No convention probe was run.</p></div>")
        return "".join(out)
    out.append("<table class='conv'><thead><tr><th>oracle · branch</th><th>finding</th><th>observed</th>"
               "<th>expected / claimed</th><th>differs from expected</th><th>leaks (s &gt; p)</th>"
               "<th>probe case</th></tr></thead><tbody>")
    for r in records:
        style = FINDING_STYLE.get(r.get("finding") or "", "")
        exp = r.get("expected_convention") or (f"claims {r['claimed_convention']}" if r.get("claimed_convention") else "–")
        finding = r.get("finding") or "–"
        if r.get("skipped"):
            finding = f"{r.get('finding') or 'skipped'}: {r['skipped']}"
        leaks = "–" if r.get("leaks") is None else f"{r['leaks']}" + (f", first {_fmt(r.get('first_leak'))}" if r.get("first_leak") else "")
        conv = r.get("convention") or "–"
        if conv == "unknown" and r.get("nearest"):
            conv = f"unknown (nearest {r['nearest']})"
        name = f"{r.get('oracle')} · {r.get('branch')}"
        if r.get("matrix"):
            name_html = f"<a href='#{e(anchor(r.get('oracle'), r.get('branch')))}'>{e(name)}</a>"
            pattern = difference_pattern(diff_chars(r["matrix"], r.get("expected_matrix"), r.get("dont_care")))
            differs = pattern or "none"
        else:
            name_html, differs = e(name), _fmt(r.get("differing_vs_reference"))
        wrap = " class='wrap'" if len(finding) > 12 else ""
        out.append(f"<tr><td class='name'>{name_html}</td><td{wrap} style='{style}'>{e(finding)}</td>{_cell(conv)}"
                   f"{_cell(exp)}<td class='wrap'>{e(differs)}</td><td>{e(leaks)}</td>"
                   f"<td class='small'>{_probe_case(r)}</td></tr>")
    out.append("</tbody></table>")
    legend = "".join(f"<span><i style='background:{COLOURS[c]}'></i>{e(t)}</span>" for c, t in LEGEND)
    out.append(f"<div class='legend'>{legend}<span>dashed green: the diagonal p = s (right of it is the future); "
               "marks left of and below a map: the rows and columns that differ</span></div>")
    drawn = [r for r in records if r.get("matrix")]
    notable = [r for r in drawn if r.get("finding") != "ok"]
    fine = [r for r in drawn if r.get("finding") == "ok"]
    if notable:
        out.append("<div class='heatmaps'>" + "".join(_probe_block(r) for r in notable) + "</div>")
    if fine:
        out.append(f"<details class='ok-maps'{'' if notable else ' open'}><summary>{len(fine)} probe(s) that match "
                   "their expected convention: heat-maps</summary><div class='heatmaps'>"
                   + "".join(_probe_block(r) for r in fine) + "</div></details>")
    out.append("</div>")
    return "".join(out)


def render_standalone(records: list[dict], title: str = "nsaconf masks") -> str:
    """A complete HTML page around the section (for ``nsaconf masks --html``)."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:20px} code{font-size:12.5px}</style>"
            f"</head><body><h1>{html.escape(title)}</h1><section id='conventions'><h2>Conventions</h2>"
            f"{render_conventions_section(records)}</section></body></html>\n")


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
