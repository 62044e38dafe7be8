"""``summary.md``: the short report for CI logs and PR comments.

Totals per status, per layer a compact oracle x case-group table of the worst status (with the worst
err_ratio), the bad cells grouped by diagnosis (``tables.failure_groups``: per oracle, the convention its
FAIL outputs match, with the convention probe's findings for it), each FAIL/ERROR/CRASH/TIMEOUT with a
one-line reason and its repro command (capped at ``MAX_FAILURES`` lines; results.csv and report.html hold
all), and SKIPs grouped by reason.
Every text from results (names, reasons, statuses, layer headings) goes through ``md_escape``
(``| < > * _ [ ] ` # \\``) and every code span through ``_code``, so no record can break a table or a
heading, leave its code span or inject HTML into a PR comment.
"""
from __future__ import annotations

import re

from nsaconf.reports.load import STATUSES, Results, fmt_metric
from nsaconf.reports.tables import (MatrixCell, diagnosis_headline, failure_groups, finding_line, layer_views,
                                    skip_groups)

MAX_FAILURES = 100
ICON = {"PASS": "✅", "FAIL": "❌", "SKIP": "⏭️", "ERROR": "⚠️", "CRASH": "💥", "TIMEOUT": "⏱️"}
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#])")


def md_escape(text: str) -> str:
    """Backslash-escape Markdown/HTML specials and flatten newlines (CommonMark: any ASCII
    punctuation may be backslash-escaped, and GitHub renders the escaped text literally)."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _code(text: str) -> str:
    """Inline code span of ``text`` on one line: the fence is one backtick longer than the longest run of
    backticks inside (CommonMark), and padded with a space each side when ``text`` has any."""
    text = " ".join(str(text).split())
    runs = re.findall(r"`+", text)
    if not runs:
        return f"`{text}`"
    fence = "`" * (max(map(len, runs)) + 1)
    return f"{fence} {text} {fence}"


def _cell(c: MatrixCell | None) -> str:
    if c is None:
        return "·"
    out = f"{ICON.get(c.worst, '❓')} {md_escape(c.worst)}"
    if c.worst_ratio is not None:
        out += f" {c.ratio_text}"
    if c.worst in ("SKIP",) or c.counts.get(c.worst, 0) != c.total:
        out += f" ({c.counts.get(c.worst, 0)}/{c.total})"
    return out


def render_summary(res: Results) -> str:
    counts = res.counts
    lines = ["# nsaconf conformance summary", ""]
    total = len(res.records)
    verdict_icon = {"PASS": "✅", "FAIL": "❌"}.get(res.verdict, "⚠️")
    lines.append(f"**Verdict: {verdict_icon} {res.verdict}** — {total} cells, "
                 + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES)
                 + "".join(f", {n} {md_escape(s)}" for s, n in sorted(counts.items()) if s not in STATUSES))
    lines.append("")
    oracles = sorted({r.oracle for r in res.records})
    cases = sorted({r.case_id for r in res.records})
    lines.append(f"{len(oracles)} oracles × {len(cases)} cases. "
                 "Matrix cells: worst status, worst err\\_ratio `r` (error / bound, ≤ 1 passes), "
                 "(cells with that status / cells) when not all agree. Columns: dtype · compression mask.")
    if res.malformed:
        lines += ["", f"**{len(res.malformed)} malformed line(s) in results.jsonl were not counted:**"]
        lines += [f"- line {n}: {md_escape(why)}" for n, why in res.malformed[:20]]
        if len(res.malformed) > 20:
            lines.append(f"- … and {len(res.malformed) - 20} more")
    if res.duplicates:
        lines += ["", f"{res.duplicates} duplicate cell record(s) in results.jsonl: the last of each was used."]

    for view in layer_views(res):
        lines += ["", f"## {md_escape(view.title)}", ""]
        if not view.records:
            lines.append(f"No {md_escape(view.title)} oracle produced results in this run.")
            continue
        m = view.by_group
        lines.append("| oracle | " + " | ".join(md_escape(c) for c in m.cols) + " |")
        lines.append("|---|" + "---|" * len(m.cols))
        for row in m.rows:
            lines.append(f"| {md_escape(row)} | " + " | ".join(_cell(m.get(row, c)) for c in m.cols) + " |")

    bad = res.bad
    lines += ["", f"## Failures ({len(bad)})", ""]
    if not bad:
        lines.append("None: no cell FAILed, ERRORed, CRASHed or TIMED OUT.")
    groups = failure_groups(bad, res.probe_records())
    if groups:
        lines += [f"{diagnosis_headline(groups)}; grouped by diagnosis: the convention each FAIL's output matches.", ""]
    shown = 0

    def cell_lines(recs: list) -> None:
        nonlocal shown
        for r in recs:
            if shown >= MAX_FAILURES:
                return
            shown += 1
            ratio = f" (r {fmt_metric('err_ratio', r.err_ratio)})" if r.err_ratio is not None else ""
            lines.append(f"- {ICON.get(r.status, '❓')} **{md_escape(r.status)}** {md_escape(r.oracle)} · "
                         f"{md_escape(r.branch)} · {md_escape(r.case_id)}{ratio}: {md_escape(r.one_line_reason) or '(no reason given)'}  \n"
                         f"  {_code(res.repro(r))}")

    for g in groups:
        worst = max(g.records, key=lambda r: r.severity).status
        n = len(g.records)
        cases = len({r.case_id for r in g.records})
        lines.append(f"### {ICON.get(worst, '❓')} {md_escape(g.oracle)} · {md_escape(g.title)} — {n} cell{'s' if n != 1 else ''} "
                     f"({md_escape(', '.join(g.branches))}), {cases} case{'s' if cases != 1 else ''}")
        lines.append("")
        if g.text:
            lines.append(md_escape(g.text))
        lines += [f"- convention probe: {md_escape(finding_line(f, g.key))}" for f in g.findings]
        lines.append("")
        cell_lines(g.records)
        lines.append("")
    if not groups:
        cell_lines(bad)
    if len(bad) > MAX_FAILURES:
        lines.append(f"- … and {len(bad) - MAX_FAILURES} more (all are in results.csv and report.html)")

    groups = skip_groups(res)
    lines += ["", f"## Skips ({counts.get('SKIP', 0)} cells, by reason)", ""]
    if not groups:
        lines.append("None.")
    else:
        lines += ["| oracle | reason | cells | cases |", "|---|---|---|---|"]
        lines += [f"| {md_escape(g.oracle)} | {md_escape(g.reason)} | {g.cells} | {g.cases} |" for g in groups]
    lines += ["", "Full detail: report.html (open in a browser), results.csv (one row per cell).", ""]
    return "\n".join(lines)
