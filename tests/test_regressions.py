"""The regression corpus: the shipped entries (cases/regressions/<oracle>/<case_id>.json, minimal failing cases
`nsaconf search` found in third-party implementations at pinned versions) replay with the failure they showed;
the reference passes every entry; `--profile regressions`, `--case DIR` and the pytest plugin select them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nsaconf.cases.generator import SHIPPED_CORPUS, corpus_dirs, profile_cases
from nsaconf.cases.model import CaseError, load_cases
from nsaconf.harness.check import resolve_cases
from nsaconf.harness.cli import main
from nsaconf.harness.runner import evaluate
from nsaconf.oracles.base import get_oracle, load_oracle_sources

ENTRIES = sorted(SHIPPED_CORPUS.rglob("*.json"))


def test_the_shipped_corpus_loads_as_the_regressions_profile():
    assert ENTRIES, f"no corpus entry under {SHIPPED_CORPUS}"
    ids = {load_cases(p)[0].id for p in ENTRIES}
    assert {c.id for c in profile_cases("regressions")} >= ids and {c.id for c in resolve_cases("regressions")} >= ids
    assert {c.id for c in load_cases(SHIPPED_CORPUS)} == ids  # a folder is a --case
    assert SHIPPED_CORPUS in corpus_dirs()
    for p in ENTRIES:
        entry = json.loads(p.read_text())
        assert p.parent.name == entry["oracle"] and p.stem == entry["case"]["id"] and entry["failure"], p


@pytest.mark.parametrize("path", ENTRIES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_each_entry_replays_the_failure_it_showed(path):
    load_oracle_sources([])
    entry = json.loads(path.read_text())
    oracle = get_oracle(entry["oracle"])
    if oracle.availability():
        pytest.skip(f"{entry['oracle']} not available here: {oracle.availability()}")
    [case] = load_cases(path)
    cells = {c.branch: c.status for c in evaluate(case, [entry["oracle"]])}
    assert {f["branch"]: cells.get(f["branch"]) for f in entry["failure"]} == {f["branch"]: f["status"] for f in entry["failure"]}


def test_the_reference_passes_the_corpus(tmp_path):
    assert main(["run", "--profile", "regressions", "--oracles", "reference", "--out", str(tmp_path / "r"),
                 "--no-progress", "--no-report"]) == 0


def test_a_corpus_entry_with_an_unknown_key_is_one_error(tmp_path):
    p = tmp_path / "e.json"
    p.write_text(json.dumps({"case": {"seq_len": 8}, "oracle": "x", "bogus": 1}))
    with pytest.raises(CaseError, match="unknown key"):
        load_cases(p)
    p.write_text(json.dumps({"case": {"seq_len": 8}, "oracle": "x", "failure": [], "found": {}}))
    assert load_cases(p)[0].seq_len == 8
