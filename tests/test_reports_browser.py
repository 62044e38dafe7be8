"""report.html in headless Chromium: loads with no console error, no network request, no dialog, and
shows the L0/L1/L2 sections and a FAIL drill-down. A negative control proves the detector can fail.

Needs Debian's ``chromium`` (``apt-get install -y chromium``; ``.ci/run`` installs it). Without it the
tests skip and say so.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Iterator

import pytest

from nsaconf.reports import write_reports
from tests.chromium_cdp import Chromium, find_chromium
from tests.report_fixtures import write_fixture

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (Debian: apt-get install -y chromium; CI's .ci/run installs it)")

PROBE = """JSON.stringify({
  layers: ["L0", "L1", "L2"].map(function (k) { var s = document.getElementById("layer-" + k); return s ? s.querySelector("h2").textContent : null; }),
  fail_drills: document.querySelectorAll("details.drill[data-status=FAIL]").length,
  first_fail_open: !!document.querySelector("details.drill[data-status=FAIL][open]"),
  first_fail_repro: (document.querySelector("details.drill[data-status=FAIL] .repro-cmd") || {}).textContent || null,
  drill_count: (document.getElementById("drill-count") || {}).textContent || null,
  xss_text: document.body.textContent.indexOf(%s) !== -1,
  scripts: document.scripts.length,
  verdict: document.getElementById("verdict").textContent,
  support: !!document.getElementById("support"),
  conventions: !!document.getElementById("conventions"),
  performance: !!document.getElementById("performance"),
  fail_cell_link: !!document.querySelector("td.mx.st-fail a[href^='#cell-']")
})""" % json.dumps("<script>alert(1)</script>")


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    assert CHROMIUM is not None
    with Chromium(CHROMIUM) as b:
        yield b


def test_report_loads_clean_with_sections_and_fail_drilldown(browser: Chromium, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    write_fixture(tmp_path, run_json=True, side_files=True)
    # a performance section from a (fake) owner module, so that the optional section is exercised too
    perf = types.ModuleType("nsaconf.reports.performance")
    perf.render_performance_section = lambda recs: '<table class="grid"><tr><td>1.5 ms</td></tr></table>'
    monkeypatch.setitem(sys.modules, "nsaconf.reports.performance", perf)
    html = write_reports(tmp_path)["html"]
    page = browser.load(html, PROBE)
    assert page.console_errors == []
    assert page.requests == []
    assert page.dialogs == []  # the <script>alert(1)</script> reason stayed text
    got = json.loads(page.evaluated)
    assert got["layers"] == ["L0reference", "L1kernel", "L2end-to-end"]
    assert got["fail_drills"] == 4 and got["first_fail_open"]
    assert got["first_fail_repro"].startswith("nsaconf repro ") and " --oracles " in got["first_fail_repro"]
    assert got["drill_count"] == "8 of 8 shown"  # the inline script ran
    assert got["xss_text"] and got["scripts"] == 1
    assert got["verdict"] == "FAIL"
    assert got["support"] and got["conventions"] and got["performance"] and got["fail_cell_link"]


def test_detector_catches_console_errors_requests_and_dialogs(browser: Chromium, tmp_path: Path) -> None:
    """Negative control: the checks above would fail on a page that misbehaves."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><title>bad</title></head><body>'
                   '<img src="http://127.0.0.1:9/pixel.png">'
                   '<script>console.error("boom"); alert("x"); throw new Error("uncaught one");</script>'
                   "</body></html>")
    page = browser.load(bad, "document.title")
    assert page.evaluated == "bad"
    assert any("boom" in e for e in page.console_errors)
    assert any("uncaught one" in e for e in page.console_errors)
    assert page.requests == ["http://127.0.0.1:9/pixel.png"]
    assert page.dialogs == ["x"]


LAYOUT = """JSON.stringify((function () {
  var de = document.documentElement, conv = document.getElementById("conventions");
  var table = conv.querySelector("table.conv");
  var heads = Array.prototype.slice.call(table.querySelectorAll("thead th"));
  var cells = Array.prototype.slice.call(table.querySelectorAll("th, td"));
  var lineH = parseFloat(getComputedStyle(table.querySelector("th")).fontSize) * 1.6;
  var probe = document.getElementById("conv-fla-swa_o"), svg = probe.querySelector("svg");
  var diffs = Array.prototype.slice.call(svg.querySelectorAll("rect.diff"));
  var first = document.querySelector("details.drill[data-status=FAIL] svg.errmap");
  var links = Array.prototype.slice.call(document.querySelectorAll("#causes a, div.cause p.note a"));
  return {
    scroll_width: de.scrollWidth, client_width: de.clientWidth, inner_width: innerWidth,
    conv_sections: document.querySelectorAll("#conventions").length, conv_h2: conv.querySelectorAll("h2").length,
    conv_table_fits: table.getBoundingClientRect().right <= conv.getBoundingClientRect().right,
    min_cell_width: Math.min.apply(null, cells.map(function (c) { return c.getBoundingClientRect().width; })),
    max_head_lines: Math.max.apply(null, heads.map(function (c) { return c.getBoundingClientRect().height; })) / lineH,
    map_texts: Array.prototype.map.call(svg.querySelectorAll("text"), function (t) { return t.textContent; }),
    legend_items: conv.querySelectorAll(".legend span").length,
    diff_cells: diffs.length,
    diff_min_px: Math.min.apply(null, diffs.map(function (r) { var b = r.getBoundingClientRect(); return Math.min(b.width, b.height); })),
    margin_marks: svg.querySelectorAll("rect.mark").length,
    errmap_texts: first ? Array.prototype.map.call(first.querySelectorAll("text"), function (t) { return t.textContent; }) : null,
    errmap_bins: first ? first.querySelectorAll("rect title").length : 0,
    errmap_fits: first ? first.getBoundingClientRect().right <= first.closest("details").getBoundingClientRect().right : null,
    causes: document.querySelectorAll("div.cause").length,
    dead_links: links.filter(function (a) { return !document.getElementById(a.getAttribute("href").slice(1)); }).length,
    n_links: links.length
  };
})())"""


@pytest.mark.parametrize("width", [1400, 1024])
def test_report_layout_as_a_reader_sees_it(browser: Chromium, tmp_path: Path, width: int) -> None:
    """At 1400 (and 1024) CSS px: no horizontal page scroll; one Conventions heading, a table without
    squeezed columns, heat-maps with axis titles, a legend and the w+1 diagonal drawn at least 4 px wide;
    each FAIL's error map with its axes; failures grouped by diagnosis, every link landing on an element.
    ``NSACONF_SHOTS=DIR`` also writes PNGs of those parts, to look at."""
    import os

    write_fixture(tmp_path / "run", run_json=True, side_files=True, diagnosis=True)
    html = write_reports(tmp_path / "run")["html"]
    shots_dir = os.environ.get("NSACONF_SHOTS")
    shots = {sel: Path(shots_dir) / f"{width}-{name}.png" for sel, name in (
        ("#causes", "causes"), ("#conventions", "conventions"), ("#conv-fla-swa_o", "window-heatmap"),
        ("details.drill[data-status=FAIL] .errmap-box", "error-map"))} if shots_dir else None
    page = browser.load(html, LAYOUT, width=width, screenshots=shots)
    assert page.console_errors == [] and page.requests == [] and page.dialogs == []
    got = json.loads(page.evaluated)
    assert got["inner_width"] == width
    assert got["scroll_width"] <= got["client_width"], got  # no horizontal overflow
    assert got["conv_sections"] == 1 and got["conv_h2"] == 1
    assert got["conv_table_fits"]  # the table wraps a long convention name instead of scrolling sideways
    assert got["min_cell_width"] >= 28, got["min_cell_width"]  # no one-character columns
    assert got["max_head_lines"] <= 1.5, got["max_head_lines"]  # headers on one line
    assert "key position s →" in got["map_texts"] and "query position p ↓" in got["map_texts"]
    assert got["legend_items"] >= 5
    # 128 x 128 cells in 256 px: 2 px a cell, yet the 112 extra cells at s = p - 16 are drawn >= 4 px wide
    assert got["diff_cells"] == 112 and got["diff_min_px"] >= 4, got
    assert got["margin_marks"] > 0
    assert "query position p ↓" in got["errmap_texts"] and "head →" in got["errmap_texts"]
    assert got["errmap_bins"] == 32 * 16 and got["errmap_fits"]
    assert got["causes"] == 4 and got["n_links"] >= 5 and got["dead_links"] == 0
