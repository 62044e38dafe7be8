"""CI outputs of a run, from ``DIR/results.jsonl`` alone (no torch): JUnit XML and the ``--require`` check.

JUnit: one ``<testsuite>`` per oracle, one ``<testcase classname="ORACLE" name="CASE_ID.BRANCH">`` per cell
(``time``: the seconds of the oracle's call on the case, which its branches share).
FAIL is a ``<failure>``, ERROR/CRASH/TIMEOUT (and a status nsaconf does not know) an ``<error>``, each with
the one-line reason as ``message`` and the full reason and the ``nsaconf repro`` line as text; SKIP is
``<skipped message="REASON">``. Malformed lines of results.jsonl are ``<error>`` cases of the suite
``results.jsonl``. Characters XML 1.0 cannot hold are written as ``\\xNN``. Rebuilding from the same
results.jsonl gives the same bytes.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional

from nsaconf.reports.load import CellRecord, ReportError, Results, load, one_line

#: characters XML 1.0 does not allow, even escaped
_NOT_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _text(s: object) -> str:
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", str(s))


def _testcase(suite: ET.Element, res: Results, r: CellRecord) -> str:
    """Append ``r`` as a testcase; returns its JUnit outcome (passed, failure, error, skipped)."""
    tc = ET.SubElement(suite, "testcase", classname=_text(r.oracle), name=_text(f"{r.case_id}.{r.branch}"),
                       time=f"{r.seconds or 0.0:.3f}")
    if r.status == "PASS":
        return "passed"
    if r.status == "SKIP":
        ET.SubElement(tc, "skipped", message=_text(one_line(r.reason)))
        return "skipped"
    kind = "failure" if r.status == "FAIL" else "error"
    el = ET.SubElement(tc, kind, type=_text(r.status), message=_text(f"{r.status}: {one_line(r.reason)}"))
    el.text = _text(f"{r.reason or ''}\nrepro: {res.repro(r)}")
    return kind


def _suite(parent: ET.Element, name: str) -> ET.Element:
    return ET.SubElement(parent, "testsuite", name=_text(name))


def _close(suite: ET.Element, outcomes: Counter, seconds: float) -> None:
    suite.set("tests", str(sum(outcomes.values())))
    for kind, attr in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
        suite.set(attr, str(outcomes[kind]))
    suite.set("time", f"{seconds:.3f}")


def render_junit(res: Results) -> str:
    """The JUnit XML document of a run's cells."""
    root = ET.Element("testsuites", name="nsaconf")
    total: Counter = Counter()
    all_secs = 0.0
    for oracle in dict.fromkeys(r.oracle for r in res.records):
        suite, outcomes = _suite(root, oracle), Counter()
        recs = [r for r in res.records if r.oracle == oracle]
        for r in recs:
            outcomes[_testcase(suite, res, r)] += 1
        per_call: dict = {}  # the branches of one case share the oracle's call and its seconds
        for r in recs:
            per_call[(r.case_id, r.dtype, r.device)] = max(per_call.get((r.case_id, r.dtype, r.device), 0.0), r.seconds or 0.0)
        secs = sum(per_call.values())
        _close(suite, outcomes, secs)
        total += outcomes
        all_secs += secs
    if res.malformed:
        suite = _suite(root, "results.jsonl")
        for line, why in res.malformed:
            tc = ET.SubElement(suite, "testcase", classname="results.jsonl", name=f"line {line}", time="0.000")
            ET.SubElement(tc, "error", type="MALFORMED", message=_text(why)).text = _text(f"results.jsonl line {line}: {why}")
        outcomes = Counter(error=len(res.malformed))
        _close(suite, outcomes, 0.0)
        total += outcomes
    _close(root, total, all_secs)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def unmet_requirements(res: Results, required: Iterable[str]) -> list[str]:
    """Per required oracle that ran no cell, or whose every cell is SKIP: ``"NAME: why"`` (empty: all met)."""
    out = []
    for name in dict.fromkeys(required):
        recs = [r for r in res.records if r.oracle == name]
        if not recs:
            out.append(f"{name}: ran no cell (not one of this run's oracles: see --oracles and --device)")
        elif all(r.status == "SKIP" for r in recs):
            reasons = Counter(one_line(r.reason) for r in recs)
            shown = "; ".join(f"{why} ({n})" for why, n in reasons.most_common(3))
            more = f"; and {len(reasons) - 3} other reasons" if len(reasons) > 3 else ""
            out.append(f"{name}: all {len(recs)} cells SKIPped: {shown}{more}")
    return out


def ci_outputs(out_dir: str | Path, junit: Optional[str], required: Iterable[str]) -> list[str]:
    """``nsaconf run --junit FILE --require ORACLE,...``: write the JUnit XML (when ``junit``) and return
    the unmet requirements. ``ReportError`` (one line) when results.jsonl or FILE cannot be read/written."""
    res = load(out_dir)
    if junit:
        try:
            Path(junit).write_text(render_junit(res), encoding="utf-8")
        except OSError as e:
            raise ReportError(f"cannot write --junit {junit!r}: {e.strerror or e}") from None
    return unmet_requirements(res, required)
