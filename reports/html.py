"""``report.html``: one self-contained page (inline CSS, JS and SVG; nothing fetched from the network).

Rendered with jinja2 and autoescape ON: every string that comes from results is HTML-escaped. The only
unescaped HTML is what ``reports.conventions.render_conventions_section``,
``reports.performance.render_performance_section`` and ``reports.error_map`` (a FAIL's error picture)
return (those modules own their escaping); the first two are imported lazily, and when one is missing or
raises, the section says so visibly. Failures are grouped by diagnosis (``tables.failure_groups``) when
the records carry one, each cause linked to its convention-probe finding.
"""
from __future__ import annotations

import importlib
import json
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import jinja2
from markupsafe import Markup

from nsaconf.reports.load import (METRIC_ORDER, STATUSES, CellRecord, Results, fmt_metric, metric_rank,
                          read_jsonl)
from nsaconf.reports import error_map
from nsaconf.reports.tables import (FailureGroup, configured_tolerance, diagnosis_headline, environment, failure_groups,
                            finding_line, generic_table, layer_views, run_tolerance_table, skip_groups, support_matrix, tolerance_rows)

TEMPLATE_DIR = Path(__file__).parent / "templates"
STATUS_HELP = {
    "PASS": "error within the bound (err_ratio = err / bound ≤ 1)",
    "FAIL": "error above the bound, NaN/Inf where the truth is finite, or a trivial (zero) output",
    "SKIP": "not run: the oracle does not support this case here (reason given)",
    "ERROR": "the oracle raised an exception",
    "CRASH": "the worker process died (segfault, CUDA fault); it was restarted",
    "TIMEOUT": "the cell ran past the per-cell timeout; the worker was restarted",
}
# case fields shown first in a drill-down (the rest follow in Case order)
#: drill-downs that draw their error map (the first of each cause is drawn too); later ones give its reading
MAX_ERROR_MAPS = 100
CASE_HEAD = ("dtype", "batch", "seq_len", "q_len", "heads_q", "heads_kv", "head_dim", "head_dim_v",
             "cmp_block", "cmp_stride", "block_size", "top_n", "window", "cmp_mask", "window_keys")


@dataclass
class Drill:
    """One FAIL/ERROR/CRASH/TIMEOUT drill-down entry."""

    anchor: str
    rec: CellRecord
    repro: str
    metrics: list[tuple[str, str]]
    tolerance: list[tuple[str, str]]
    case: list[tuple[str, str]]
    open: bool
    errmap_svg: Markup = Markup("")  # the error_map picture (reports.error_map escapes its text)
    errmap_reading: str = ""
    errmap_strip: Markup = Markup("")  # the map's one-line sparkline for the summary line
    diag_text: str = ""
    diag_variants: list[tuple[str, str]] = field(default_factory=list)  # (name, r) of the matching conventions
    diag_nearest: str = ""


@dataclass
class GroupView:
    """One cause in the Failures section: its cells' drill-downs and links to the probe findings."""

    anchor: str
    group: FailureGroup
    drills: list[Drill]
    findings: list[tuple[str, str]]  # (href, text)


@dataclass
class SideSection:
    """Conventions / Performance: rendered HTML from the owning module, or a visible note why not."""

    present: bool
    html: Markup
    note: str


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters["num"] = lambda v, name="": fmt_metric(name, v)
    return env


def _drills(res: Results) -> tuple[list[Drill], dict[tuple, str]]:
    drills, anchors = [], {}
    for i, r in enumerate(res.bad):
        anchor = f"cell-{i + 1}"
        anchors[r.key] = anchor
        metrics = [(k, fmt_metric(k, r.metrics[k])) for k in sorted(r.metrics, key=metric_rank)]
        tol = [(k, fmt_metric(k, v) if not isinstance(v, str) else v) for k, v in r.tolerance.items()]
        keys = [k for k in CASE_HEAD if k in r.case] + [k for k in r.case if k not in CASE_HEAD]
        case = [(k, "null" if r.case[k] is None else fmt_metric(k, r.case[k])) for k in keys]
        d = Drill(anchor, r, res.repro(r), metrics, tol, case, open=i == 0)
        if r.error_map is not None:
            d.errmap_reading = error_map.reading(r.error_map)
            d.errmap_strip = Markup(error_map.strip(r.error_map))
            if i < MAX_ERROR_MAPS:
                _draw_map(d)
        if r.diagnosis is not None:
            dg = r.diagnosis
            d.diag_text = str(dg.get("text") or dg.get("key") or "")
            d.diag_variants = [(str(v.get("name")), fmt_metric("r", v.get("ratio"))) for v in dg.get("variants") or []
                               if isinstance(v, dict)]
            near = dg.get("nearest")
            if isinstance(near, dict) and near.get("name") is not None:
                d.diag_nearest = f"{near.get('name')} (r {fmt_metric('r', near.get('ratio'))})"
        drills.append(d)
    return drills, anchors


def _draw_map(d: Drill) -> None:
    r = d.rec
    if r.error_map is not None and not d.errmap_svg:
        title = f"{r.oracle} {r.branch}: err/bound by {r.error_map.get('rows', 'position')} and head"
        d.errmap_svg = Markup(error_map.svg(r.error_map, title))


def _conv_anchor(oracle: object, branch: object) -> str:
    """The id of a probe record's heat-maps in the Conventions section (its module's ``anchor``)."""
    try:
        from nsaconf.reports.conventions import anchor
        return str(anchor(oracle, branch))
    except Exception:  # noqa: BLE001 - a broken conventions module shows its note; the link still points at the section
        return "conventions"


def _groups(res: Results, drills: list[Drill]) -> list[GroupView]:
    """The failures grouped by diagnosis (empty when no record has one), each joined to its probe findings."""
    path = res.out_dir / "conventions.jsonl"
    conv = read_jsonl(path)[0] if path.is_file() else []
    by_key = {d.rec.key: d for d in drills}
    views = []
    for i, g in enumerate(failure_groups([d.rec for d in drills], conv)):
        links = []
        for c in g.findings:
            text = f"{c.get('oracle')} · {finding_line(c, g.key)}"  # the words of summary.md and the console
            href = "#" + (_conv_anchor(c.get("oracle"), c.get("branch")) if c.get("matrix") else "conventions")
            links.append((href, text))
        members = [by_key[r.key] for r in g.records]
        _draw_map(members[0])  # every cause shows at least one picture
        if i == 0:  # the first failure shown open is the first of the first cause
            for d in drills:
                d.open = d is members[0]
        views.append(GroupView(f"cause-{i + 1}", g, members, links))
    return views


def _side(res: Results, filename: str, module: str, func: str, what: str) -> SideSection:
    """Render DIR/<filename> with reports.<module>.<func>(records) if both exist."""
    path = res.out_dir / filename
    if not path.is_file():
        return SideSection(False, Markup(""), f"No {what} data in this run ({filename} is absent).")
    records, bad = read_jsonl(path)
    extra = f" ({bad} unreadable line(s) in {filename} were ignored)" if bad else ""
    try:
        mod = importlib.import_module(f"nsaconf.reports.{module}")
        fn = getattr(mod, func)
    except (ImportError, AttributeError) as e:
        return SideSection(True, Markup(""),
                           f"{filename} holds {len(records)} record(s), but reports/{module}.py:{func} "
                           f"is not available to render them ({type(e).__name__}: {e}).{extra}")
    try:
        html = fn(records)
    except Exception as e:  # noqa: BLE001 - a broken section must not take the whole report down
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        return SideSection(True, Markup(""),
                           f"reports/{module}.py:{func} failed on {len(records)} record(s) of {filename}: {last}{extra}")
    return SideSection(True, Markup(str(html)), extra.strip(" ()"))


def _status_bar(counts: Counter, total: int, width: int = 600) -> list[dict[str, Any]]:
    """Segments of the header's stacked SVG bar (x and width in px, rounded; every non-zero status visible)."""
    order = ["PASS", "SKIP", "FAIL", "ERROR", "CRASH", "TIMEOUT"] + sorted(s for s in counts if s not in STATUSES)
    segs, x = [], 0.0
    present = [s for s in order if counts.get(s)]
    for s in present:
        w = max(3.0, width * counts[s] / total) if total else 0.0
        segs.append({"status": s, "x": round(x, 2), "w": round(w, 2), "n": counts[s]})
        x += w
    scale = width / x if x > width else 1.0
    for seg in segs:
        seg["x"], seg["w"] = round(seg["x"] * scale, 2), round(seg["w"] * scale, 2)
    return segs


def render_html(res: Results) -> str:
    drills, anchors = _drills(res)
    groups = _groups(res, drills)
    counts = res.counts
    total = len(res.records)
    run_tol = run_tolerance_table(res)
    run_tol_conf = configured_tolerance(run_tol)
    run_tol_table = generic_table(run_tol) if run_tol is not None and run_tol_conf is None else None
    run_tol_json = (json.dumps(run_tol, indent=1, sort_keys=True, default=str)
                    if run_tol is not None and run_tol_conf is None and run_tol_table is None else "")
    statuses = list(STATUSES) + sorted(s for s in counts if s not in STATUSES)
    info = res.run_info or {}
    run_line = " · ".join(f"{k} {info[k]}" for k in ("profile", "device", "started")
                          if isinstance(info.get(k), (str, int, float)) and info.get(k) != "")
    ctx = dict(
        res=res, total=total, run_line=run_line, command=str(info.get("command") or ""), counts=counts, statuses=statuses, status_help=STATUS_HELP,
        verdict=res.verdict, bar=_status_bar(counts, total),
        n_oracles=len({r.oracle for r in res.records}), n_cases=len({r.case_id for r in res.records}),
        layers=layer_views(res, anchors), drills=drills, groups=groups,
        headline=diagnosis_headline([g.group for g in groups]) if groups else "",
        errmap_legend=Markup(error_map.legend()), max_error_maps=MAX_ERROR_MAPS,
        skips=skip_groups(res), support=support_matrix(res),
        env=environment(res), env_from_run=bool(res.run_info),
        run_tol_conf=run_tol_conf, run_tol_table=run_tol_table, run_tol_json=run_tol_json, tol_rows=tolerance_rows(res),
        conventions=_side(res, "conventions.jsonl", "conventions", "render_conventions_section",
                          "convention-probe"),
        performance=_side(res, "bench.jsonl", "performance", "render_performance_section", "benchmark"),
        metric_order=METRIC_ORDER,
    )
    return _env().get_template("report.html.j2").render(**ctx)
