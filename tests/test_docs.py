"""The documentation contract: the README stays short, the plugin docs show the shipped example verbatim, and no
README/docs page tells how the project was made (run letters, working sessions)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PLUGIN_DOCS = ROOT / "docs" / "oracles-and-plugins.md"
PLUGIN_EXAMPLE = ROOT / "oracles" / "plugin_example.py"
README_MAX_LINES = 200

# A run or check named by letters: "run AO", "check AK", "runs AK-AO", "Run A (", "run Z3", "runs I-R".
# The letters must stand alone (not the start of a word such as OK, AND, ANY, nor I/O) and be a run name:
# two capitals starting with A, or one capital with an optional digit.
RUN_LETTERS = re.compile(r"\b(?:[Rr]uns?|[Cc]hecks?)\s+(?:A[A-Z]|[A-Z]\d?)(?:\s*[-–]\s*(?:A[A-Z]|[A-Z]\d?))?(?![\w/])")
# the word "session" (any case, plural too)
SESSION = re.compile(r"\bsessions?\b", re.IGNORECASE)
# "twelfth session", "ninth working session", "4th session"
ORDINAL_SESSION = re.compile(
    r"\b(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|thirteenth|"
    r"\d+(?:st|nd|rd|th))\s+(?:working\s+)?sessions?\b", re.IGNORECASE)


def doc_files() -> list[Path]:
    """README.md, CHANGELOG.md and every text file under docs/."""
    files = [README, ROOT / "CHANGELOG.md"]
    files += sorted(p for p in (ROOT / "docs").rglob("*") if p.is_file() and p.suffix in {".md", ".txt", ".html"})
    return [p for p in files if p.exists()]


def python_blocks(markdown: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a markdown text."""
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.MULTILINE | re.DOTALL)


def history_findings(text: str) -> list[str]:
    """Every phrase of ``text`` that tells how the project was made."""
    found = []
    for pattern in (RUN_LETTERS, SESSION, ORDINAL_SESSION):
        found += [m.group(0) for m in pattern.finditer(text)]
    return found


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}); move details to docs/"


def test_plugin_docs_show_the_shipped_example():
    example = PLUGIN_EXAMPLE.read_text(encoding="utf-8")
    blocks = python_blocks(PLUGIN_DOCS.read_text(encoding="utf-8"))
    assert example in blocks, ("docs/oracles-and-plugins.md must show oracles/plugin_example.py verbatim in one "
                               "```python block (copy the file into the block)")


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_speak_of_the_product_only(path):
    bad = [(i, hit) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
           for hit in history_findings(line)]
    assert not bad, f"{path.relative_to(ROOT)} tells how the project was made (git log keeps that): " + \
        ", ".join(f"line {i}: {hit!r}" for i, hit in bad[:10])


@pytest.mark.parametrize("text", ["run AO", "check AK", "runs AK-AO", "Run A (device_tune.sh)", "run Z3.",
                                  "runs I-R", "checks AA, AB", "the twelfth session", "ninth working session",
                                  "4th session", "Session 3"])
def test_history_patterns_catch(text):
    assert history_findings(text), text


@pytest.mark.parametrize("text", ["nsaconf run --profile ci", "the run is OK", "run AND check", "runs ANY oracle",
                                  "a run's results", "we run I/O-bound code", "check ALL cells", "re-run it",
                                  "the runner checks Eq. 9", "run on the H100", "check every branch",
                                  "--resume skips cells", "profession", "obsessional"])
def test_history_patterns_spare_product_text(text):
    assert not history_findings(text), text
