"""Reports of a conformance run, rebuilt from ``DIR/results.jsonl`` alone.

``write_reports(dir)`` writes ``summary.md`` (CI logs, PR comments), ``results.csv`` (one row per cell,
flattened metrics) and ``report.html`` (one self-contained page). Rebuilding from the same
results.jsonl gives byte-identical files: records are sorted, nothing of the rebuild (time, host, path)
is written. Only cheap dependencies (pandas, jinja2) are imported.
"""
from __future__ import annotations

from pathlib import Path

from nsaconf.reports.load import ReportError, load, results_frame

__all__ = ["write_reports", "results_frame", "ReportError", "OUTPUT_FILES"]

OUTPUT_FILES = {"summary": "summary.md", "csv": "results.csv", "html": "report.html"}


def write_reports(out_dir: str | Path) -> dict[str, Path]:
    """Write summary.md, results.csv and report.html next to ``out_dir/results.jsonl``.

    Returns ``{"summary": path, "csv": path, "html": path}``. Raises ``ReportError`` (one line) when
    results.jsonl cannot be read.
    """
    from nsaconf.reports.html import render_html
    from nsaconf.reports.load import write_csv
    from nsaconf.reports.markdown import render_summary

    res = load(out_dir)
    d = res.out_dir
    paths = {k: d / v for k, v in OUTPUT_FILES.items()}
    paths["summary"].write_text(render_summary(res), encoding="utf-8")
    write_csv(res.records, paths["csv"])
    paths["html"].write_text(render_html(res), encoding="utf-8")
    return paths
