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
