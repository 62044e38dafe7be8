"""Aggregations shared by the Markdown and HTML writers: status matrices, skip groups, tolerance and
environment tables. Pure functions of the sorted records, so every writer sees the same numbers.

Matrix cell = worst status of its cells (``load.SEVERITY``), per-status counts and the worst
``err_ratio`` (err / bound; <= 1 passes) over the cells that have one.
"""
from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from nsaconf.reports.load import (LAYER_KEYS, LAYER_TITLES, SEVERITY, STATUSES, UNKNOWN_SEVERITY, CellRecord, Results, branch_rank,
                          fmt_metric, group_rank, layer_rank, one_line)

#: PASS cells whose worst err_ratio exceeds this are flagged "near the bound" (lighter colour)
NEAR_BOUND = 0.5


@dataclass
class MatrixCell:
    """Aggregate of the result cells that fall into one (row, column) of a matrix."""

    counts: Counter = field(default_factory=Counter)
    worst: str = ""
    worst_severity: int = -1
    worst_ratio: Optional[float] = None
    first_bad_anchor: str = ""

    def add(self, r: CellRecord, anchor: str = "") -> None:
        self.counts[r.status] += 1
        if r.severity > self.worst_severity:
            self.worst, self.worst_severity = r.status, r.severity
        ratio = r.err_ratio
        if ratio is not None and (self.worst_ratio is None or _ratio_gt(ratio, self.worst_ratio)):
            self.worst_ratio = ratio
        if r.is_bad and anchor and not self.first_bad_anchor:
            self.first_bad_anchor = anchor

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def css(self) -> str:
        """CSS class: the worst status, ``pass-near`` when a PASS is within 2x of its bound."""
        if self.worst == "PASS" and self.worst_ratio is not None and _ratio_gt(self.worst_ratio, NEAR_BOUND):
            return "st-pass-near"
        return "st-" + (self.worst.lower() if self.worst in STATUSES else "unknown")

    @property
    def ratio_text(self) -> str:
        return "" if self.worst_ratio is None else "r " + fmt_metric("err_ratio", self.worst_ratio)

    @property
    def short_counts(self) -> str:
        """``12`` when all cells share the worst status, else e.g. ``6 pass · 5 skip`` (worst first)."""
        if self.counts.get(self.worst, 0) == self.total:
            return str(self.total)
        order = sorted(self.counts, key=lambda s: (-SEVERITY.get(s, UNKNOWN_SEVERITY), s))
        return " · ".join(f"{self.counts[s]} {s.lower()}" for s in order)

    @property
    def counts_text(self) -> str:
        """e.g. ``12 PASS, 2 SKIP`` in STATUSES order (unknown statuses last)."""
        order = list(STATUSES) + sorted(s for s in self.counts if s not in STATUSES)
        return ", ".join(f"{self.counts[s]} {s}" for s in order if self.counts.get(s))


def _ratio_gt(a: float, b: float) -> bool:
    """a > b where NaN counts as the largest value (a NaN ratio must surface, not hide)."""
    if math.isnan(a):
        return not math.isnan(b)
    if math.isnan(b):
        return False
    return a > b


@dataclass
class Matrix:
    rows: list[str]
    cols: list[str]
    cells: dict[tuple[str, str], MatrixCell]

    def get(self, row: str, col: str) -> Optional[MatrixCell]:
        return self.cells.get((row, col))


def build_matrix(records: list[CellRecord], col: Callable[[CellRecord], str],
                 col_rank: Callable[[str], Any], anchors: Optional[dict] = None) -> Matrix:
    """Rows = oracles (sorted), columns = ``col(record)`` sorted by ``col_rank``."""
    cells: dict[tuple[str, str], MatrixCell] = defaultdict(MatrixCell)
    for r in records:
        cells[(r.oracle, col(r))].add(r, (anchors or {}).get(r.key, ""))
    rows = sorted({k[0] for k in cells})
    cols = sorted({k[1] for k in cells}, key=col_rank)
    return Matrix(rows, cols, dict(cells))


@dataclass
class LayerView:
    layer: str
    key: str  # L0 / L1 / L2 (or the raw layer name for unknown layers)
    title: str
    records: list[CellRecord]
    by_group: Matrix
    by_branch: Matrix
    counts: Counter


def layer_views(res: Results, anchors: Optional[dict] = None) -> list[LayerView]:
    """L0, L1, L2 always (possibly empty), then any unknown layer names found in the records."""
    by_layer: dict[str, list[CellRecord]] = defaultdict(list)
    for r in res.records:
        by_layer[r.layer].append(r)
    names = list(LAYER_KEYS) + sorted((k for k in by_layer if k not in LAYER_KEYS), key=layer_rank)
    views = []
    for name in names:
        recs = by_layer.get(name, [])
        views.append(LayerView(
            layer=name, key=LAYER_KEYS.get(name, name), title=LAYER_TITLES.get(name, f"layer {name!r} (unknown)"),
            records=recs,
            by_group=build_matrix(recs, lambda r: r.group, group_rank, anchors),
            by_branch=build_matrix(recs, lambda r: r.branch or "?", branch_rank, anchors),
            counts=Counter(r.status for r in recs)))
    return views


@dataclass
class SkipGroup:
    """All SKIP cells of one oracle that share one reason."""

    oracle: str
    layer: str
    reason: str
    cells: int
    cases: int
    groups: list[str]
    example_case: str


def skip_groups(res: Results) -> list[SkipGroup]:
    """SKIPs grouped by (oracle, one-line reason); most cells first."""
    acc: dict[tuple[str, str], list[CellRecord]] = defaultdict(list)
    for r in res.records:
        if r.status == "SKIP":
            acc[(r.oracle, r.one_line_reason or "(no reason given)")].append(r)
    out = [SkipGroup(oracle=o, layer=rs[0].layer, reason=why, cells=len(rs),
                     cases=len({r.case_id for r in rs}),
                     groups=sorted({r.group for r in rs}, key=group_rank), example_case=rs[0].case_id)
           for (o, why), rs in acc.items()]
    return sorted(out, key=lambda g: (layer_rank(g.layer), g.oracle, -g.cells, g.reason))


def support_matrix(res: Results) -> Matrix:
    """Oracle x case-group over *all* cells; the HTML shows ran/skipped counts per cell."""
    return build_matrix(res.records, lambda r: r.group, group_rank)


# -------------------------------------------------------------------------------------- tolerance
@dataclass
class ToleranceRow:
    layer: str
    dtype: str
    rule: str
    floor: str
    source: str
    oracles: str
    branches: str
    cells: int


def _rule_text(t: dict) -> str:
    if t.get("text"):
        return str(t["text"])
    rule = str(t.get("rule", ""))
    return f"{rule} k={fmt_metric('k', t['k'])}" if t.get("k") is not None else rule


def tolerance_rows(res: Results) -> list[ToleranceRow]:
    """Distinct tolerances used, from the records: one row per (layer, dtype, rule text, source) with the
    oracles and branches that used it; ``floor`` is a range when it depends on the truth's magnitude."""
    acc: dict[tuple, list[CellRecord]] = defaultdict(list)
    for r in res.records:
        t = r.tolerance
        if t:
            acc[(r.layer, r.dtype_short, _rule_text(t), str(t.get("source", "")))].append(r)
    rows = []
    for (layer, dt, rule, source), recs in acc.items():
        nums = sorted(f for f in (_num(r.tolerance.get("floor")) for r in recs) if f is not None)
        if not nums:
            floor = "—"
        elif nums[0] == nums[-1]:
            floor = fmt_metric("floor", nums[0])
        else:
            floor = f"{fmt_metric('floor', nums[0])} … {fmt_metric('floor', nums[-1])}"
        rows.append(ToleranceRow(layer, dt, rule, floor, source,
                                 oracles=", ".join(sorted({r.oracle for r in recs})),
                                 branches=", ".join(sorted({r.branch for r in recs}, key=branch_rank)),
                                 cells=len(recs)))
    return sorted(rows, key=lambda t: (layer_rank(t.layer), group_rank(t.dtype), t.rule, t.source))


def _num(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return None
    return float(v)


@dataclass
class ConfiguredTolerance:
    """run.json's tolerance table in the engine's form ``{defaults, doc, overrides}``."""

    defaults: list[tuple[str, str, str]]  # (parameter, value, meaning)
    overrides: list[list[str]]  # oracle, branch, param, value, source
    override_header: list[str]


def configured_tolerance(obj: Any) -> Optional[ConfiguredTolerance]:
    if not (isinstance(obj, dict) and isinstance(obj.get("defaults"), dict)):
        return None
    doc = obj.get("doc") if isinstance(obj.get("doc"), dict) else {}
    defaults = [(str(k), _text(v), str(doc.get(k, ""))) for k, v in obj["defaults"].items()]
    ov = obj.get("overrides") or []
    header, rows = ["oracle", "branch", "param", "value", "source"], []
    if isinstance(ov, list) and ov:
        table = generic_table(ov)
        if table:
            header, rows = table
    return ConfiguredTolerance(defaults, rows, header)


def generic_table(obj: Any) -> Optional[tuple[list[str], list[list[str]]]]:
    """(header, rows) for a list of flat dicts or a dict of dicts (run.json's tolerance table), else None."""
    items: list[tuple[Optional[str], dict]] = []
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        items = [(None, x) for x in obj]
    elif isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values()):
        items = [(str(k), v) for k, v in obj.items()]
    else:
        return None
    cols: list[str] = []
    for _, d in items:
        cols += [k for k in d if k not in cols]
    header = (["key"] if items[0][0] is not None else []) + cols
    rows = [([k] if k is not None else []) + [_text(d.get(c)) for c in cols] for k, d in items]
    return header, rows


def _text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (int, float, bool, list, tuple)):
        return fmt_metric("", v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


# -------------------------------------------------------------------------------------- environment
ENV_FIRST = ("command", "argv", "profile", "device", "devices", "oracles", "n_cases", "case_files", "plugins",
             "seed", "timeout_s", "out", "started", "finished")


def environment(res: Results) -> list[tuple[str, str]]:
    """(name, value) pairs: run.json's fields when present (its tolerance table is shown elsewhere),
    else what the records carry (devices, library versions; a key with several values lists each with
    its cell count)."""
    info = res.run_info or {}
    pairs: list[tuple[str, str]] = []
    skip = {"tolerance", "tolerances", "tolerance_table"}
    keys = [k for k in ENV_FIRST if k in info] + sorted(k for k in info if k not in ENV_FIRST and k not in skip)
    for k in keys:
        v = info[k]
        if isinstance(v, dict):
            pairs += [(f"{k}: {kk}" if k not in ("versions", "environment") else str(kk), _text(vv))
                      for kk, vv in v.items()]
        elif isinstance(v, list):
            pairs.append((k, ", ".join(_text(x) for x in v) if v else "none"))
        else:
            pairs.append((k, "none" if v is None else _text(v)))
    vals: dict[str, Counter] = defaultdict(Counter)
    for r in res.records:
        for k, v in r.versions.items():
            vals[str(k)][_text(v)] += 1
    if pairs:  # add what only the records know (an oracle's own library versions)
        known = set(info["versions"]) if isinstance(info.get("versions"), dict) else set()
        return pairs + [(f"{k} (from records)", _multi(vals[k])) for k in sorted(vals) if k not in known]
    # no run.json: everything from the records
    devices = Counter(r.device or "?" for r in res.records)
    pairs.append(("device", _multi(devices)))
    pairs += [(k, _multi(vals[k])) for k in sorted(vals)]
    stamps = sorted(r.timestamp for r in res.records if r.timestamp)
    if stamps:
        pairs.append(("results written", stamps[0] if stamps[0] == stamps[-1] else f"{stamps[0]} … {stamps[-1]}"))
    return pairs


def _multi(c: Counter) -> str:
    if len(c) == 1:
        return next(iter(c))
    return "; ".join(f"{v} ({n} cells)" for v, n in sorted(c.items()))


def run_tolerance_table(res: Results) -> Any:
    """The tolerance table as the engine recorded it in run.json (None when absent)."""
    info = res.run_info or {}
    for k in ("tolerance", "tolerances", "tolerance_table"):
        if k in info:
            return info[k]
    return None


def failure_line(r: CellRecord) -> str:
    """``FAIL oracle branch case_id: reason`` without markup (used by both writers)."""
    return f"{r.status} {r.oracle} {r.branch} {r.case_id}: {one_line(r.reason)}"


# -------------------------------------------------------------------------------------- diagnosis groups
@dataclass
class FailureGroup:
    """The bad cells of one oracle that share one diagnosis (``diagnosis.key``; "" = nothing matched,
    None = not diagnosed), with the convention-probe findings of that oracle that explain them."""

    oracle: str
    key: Optional[str]
    title: str
    text: str
    records: list[CellRecord]
    findings: list[dict]  # conventions.jsonl records joined to the group (see ``join_findings``)

    @property
    def counts(self) -> Counter:
        return Counter(r.status for r in self.records)

    @property
    def branches(self) -> list[str]:
        return sorted({r.branch for r in self.records}, key=branch_rank)


def diagnosis_key(r: CellRecord) -> Optional[str]:
    """The record's diagnosis key ("" when nothing matched), None when it carries no diagnosis."""
    d = r.diagnosis
    if not isinstance(d, dict):
        return None
    return str(d.get("key") or "")


def _group_title(key: Optional[str], d: Optional[dict]) -> tuple[str, str]:
    if key is None:
        return "not diagnosed", "no differential diagnosis in the record (an ERROR, CRASH or TIMEOUT, or a run without it)"
    text = str(d.get("text") or "") if d else ""
    if key:
        return key, text
    near = d.get("nearest") if d else None
    if isinstance(near, dict) and near.get("name"):
        return "no alternative convention matches", text or f"nearest: {near.get('name')} (r {fmt_metric('r', near.get('ratio'))})"
    return "no alternative convention matches", text


def join_findings(oracle: str, branches: list[str], conventions: list[dict]) -> list[dict]:
    """The convention-probe records of ``oracle`` that bear on failures of ``branches``: those that are not
    ``ok`` on one of the branches (or on ``o``, the union), else any of the oracle's that are not ``ok``,
    else the ``ok`` records of the branches (the probe saw nothing there)."""
    mine = [c for c in conventions if str(c.get("oracle")) == oracle]
    wanted = set(branches) | {"o"}
    bad = [c for c in mine if c.get("finding") not in ("ok", None) and not c.get("skipped")]
    return ([c for c in bad if str(c.get("branch")) in wanted] or bad
            or [c for c in mine if str(c.get("branch")) in branches])


def failure_groups(bad: list[CellRecord], conventions: Optional[list[dict]] = None) -> list[FailureGroup]:
    """``bad`` (in report order) grouped by (oracle, diagnosis key): diagnosed causes first, most cells
    first; empty when no record carries a diagnosis (the report then lists the failures as they come)."""
    if not any(diagnosis_key(r) is not None for r in bad):
        return []
    acc: dict[tuple[str, Optional[str]], list[CellRecord]] = defaultdict(list)
    for r in bad:
        acc[(r.oracle, diagnosis_key(r))].append(r)
    groups = []
    for (oracle, key), recs in acc.items():
        title, text = _group_title(key, recs[0].diagnosis)
        groups.append(FailureGroup(oracle, key, title, text, recs,
                                   join_findings(oracle, sorted({r.branch for r in recs}), conventions or [])))
    order = {None: 2, "": 1}
    return sorted(groups, key=lambda g: (order.get(g.key, 0), -len(g.records), g.oracle, g.key or ""))


def finding_line(rec: dict, key: Optional[str] = None) -> str:
    """A probe record joined to a failure group in one line, e.g. ``swa_o: w_plus_1 where w is expected
    (mismatch), agrees`` (``agrees``: the measured convention is one the group's diagnosis ``key`` names)."""
    exp = rec.get("expected_convention") or rec.get("claimed_convention")
    conv = str(rec.get("convention") or "?")
    if conv == "unknown" and rec.get("nearest"):
        conv = f"unknown (nearest {rec['nearest']})"
    values = {part.split("=", 1)[1] for part in (key or "").split(" + ") if "=" in part}
    agrees = ", agrees" if rec.get("convention") in values else ""
    return f"{rec.get('branch')}: {conv}" + (f" where {exp} is expected" if exp else "") + f" ({rec.get('finding')}){agrees}"


def diagnosis_headline(groups: list[FailureGroup]) -> str:
    """``8 FAILs, 2 causes (cmp_mask=end_exclusive, window_keys=w_plus_1)``: the distinct conventions the
    diagnoses name, per oracle (named when one oracle has them all, at most 6); + ``, 10 unexplained``: FAILs
    that match no convention or were not diagnosed; + the counts of the other bad statuses."""
    cells = [r for g in groups for r in g.records]
    fails = sum(r.status == "FAIL" for r in cells)
    causes = list(dict.fromkeys((g.oracle, name) for g in groups if g.key for name in g.key.split(" + ")))
    unexplained = sum(r.status == "FAIL" for g in groups if not g.key for r in g.records)
    n = len(causes)
    named = f" ({', '.join(name for _, name in causes)})" if 0 < n <= 6 and len({o for o, _ in causes}) == 1 else ""
    parts = [f"{fails} FAIL{'s' if fails != 1 else ''}, {n} cause{'s' if n != 1 else ''}{named}"]
    if unexplained:
        parts.append(f"{unexplained} unexplained")
    others = Counter(r.status for r in cells if r.status != "FAIL")
    return ", ".join(parts + [f"{n} {s}" for s, n in sorted(others.items())])
