"""``nsaconf search``: the space follows supports(), every planted bug is found and shrunk to a small case, the
CLI prints the minimal case and its repro line, writes the corpus and the Hypothesis database (a re-run starts
from the failure), and the corpus replays (a fixed bug's entry passes)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from nsaconf.cases import vocabulary as V
from nsaconf.cases.model import Case, load_cases
from nsaconf.harness.cli import main
from nsaconf.harness.search import SearchConfig, convention_fields, search, search_space, signature
from nsaconf.oracles.base import get_oracle, load_oracle_sources

PLUGINS = Path(__file__).parent / "plugins"
PLANTED = [str(PLUGINS / f) for f in ("planted_bugs.py", "grad_bugs.py", "probe_planted.py")]

#: oracle -> the smallest T at which its bug can show (a callable of the minimal case: "l" is one compressed block)
NEEDS = {
    "bug_window": lambda c: 2,                 # w + 1 keys differ from w once a query has 2 keys
    "bug_scale": lambda c: c.cmp_block,        # cmp_lse needs one visible compressed block: T >= l
    "bug_kvmap": lambda c: 1,                  # HQ = 4, H = 2 at any T
    "bug_grad_dq_scale": lambda c: 1, "bug_grad_dv": lambda c: 1, "bug_grad_cotangent": lambda c: 1,
    "bug_grad_missing": lambda c: 1,
    "probe_bug_window_short": lambda c: 2,     # w - 1 keys: w = 2 at T = 2 (w = 1 has no window at all: ERROR)
    "probe_bug_window_long": lambda c: 2,
    "probe_bug_block_causal": lambda c: 1,     # the current block is visible from its first position
    "probe_bug_claims_causal": lambda c: 1,
    "probe_bug_slc_whole_block": lambda c: 2,  # a selected block with a key after the query
}


@pytest.fixture(scope="module", autouse=True)
def _plugins():
    load_oracle_sources(PLANTED + [str(PLUGINS / "fixable.py")])


def test_every_convention_field_is_drawn_from_the_vocabulary():
    fields = convention_fields()
    strings = [f.name for f in dataclasses.fields(Case) if isinstance(getattr(Case(), f.name), str) and f.name != "dtype"]
    assert sorted(fields) == sorted(strings) and {"cmp_mask", "window_keys", "forced_blocks", "block_indices"} <= set(fields)
    assert set(fields["cmp_mask"]) == set(V.CMP_MASKS) and fields["cmp_mask"][0] == Case().cmp_mask
    for name, values in fields.items():
        assert values[0] == getattr(Case(), name), name  # the default first: what the shrinker moves to


def test_the_space_follows_supports():
    paper_only = search_space(get_oracle("probe_bug_window_long"), "cpu")
    assert paper_only.conventions["cmp_mask"] == ("end_inclusive",) and paper_only.conventions["window_keys"] == ("w",)
    assert set(paper_only.conventions["forced_blocks"]) == set(V.FORCED_BLOCKS) and paper_only.varlen and paper_only.decode
    whole = search_space(get_oracle("probe_bug_slc_whole_block"), "cpu")
    assert not whole.varlen and not whole.decode
    assert set(paper_only.conventions["gates"]) == set(V.GATES)  # gates change no swa_o
    claims = search_space(get_oracle("probe_bug_claims_causal"), "cpu")  # o: gates and group importance change it
    assert claims.conventions["gates"] == ("raw",) and claims.conventions["group_importance"] == ("sum_probs",)
    everything = search_space(get_oracle("reference"), "cpu")
    assert all(set(everything.conventions[k]) == set(v) for k, v in convention_fields().items())
    free = search_space(get_oracle("bug_window"), "cpu")
    assert free.groups[0] == 1 and free.blocks[0] == (4, 4, 4) and free.dtypes[0] == "float32" and len(free.dtypes) == 4


def test_fla_space_is_restricted_by_its_support_rules():
    fla = get_oracle("fla_naive")
    if fla.availability():
        pytest.skip(f"fla_naive not available: {fla.availability()}")
    s = search_space(fla, "cpu")
    assert set(s.groups) <= {16, 32} and "float64" not in s.dtypes and all(l == d == ls for l, d, ls in s.blocks)
    assert s.conventions["cmp_mask"] == ("end_inclusive",) and s.conventions["forced_blocks"] == ("initial_local",)


def test_signature_prefers_truth_cells():
    from nsaconf.harness.results import CellResult

    mk = lambda b, s: CellResult(case_id="c", case={}, oracle="o", layer="e2e", branch=b, dtype="float32",  # noqa: E731
                                 device="cpu", status=s)
    assert signature([mk("o", "PASS")]) is None
    assert signature([mk("o", "ERROR"), mk("cmp_o", "FAIL"), mk("determinism", "FAIL")]) == ("FAIL", "")
    assert signature([mk("o", "PASS"), mk("causality", "FAIL")]) == ("FAIL", "causality")


@pytest.mark.parametrize("plugin", PLANTED, ids=lambda p: Path(p).stem)
def test_every_planted_bug_is_found_and_shrunk(plugin, tmp_path):
    """Each planted oracle: a failure, shrunk to T <= the T its bug needs + 2 selection blocks, B = 1, and at most
    the heads it needs (kvmap: HQ = 4, H = 2; every other bug: one head). In process, T <= 16 and HQ <= 8 drawn,
    60 s each at most."""
    from nsaconf.oracles.base import registry

    src = Path(plugin).read_text()
    names = [n for n in NEEDS if f'name = "{n}"' in src]
    assert names and all(n in registry() for n in names)
    res = search(SearchConfig(oracles=names, out=tmp_path, plugins=[plugin], seconds=60.0 * len(names), isolate=False,
                              max_seq_len=16, max_heads=8, echo=lambda s: None))
    for r in res:
        fails = [f for f in r.findings if f.sig[0] in V.BAD_STATUSES]
        assert fails, f"{r.oracle}: nothing found in {r.judged} cases"
        for f in fails:
            c = f.case
            assert c.seq_len <= NEEDS[r.oracle](c) + 2 * c.block_size, (r.oracle, f.sig, c.id)
            assert c.batch == 1 and c.heads_q <= (4 if r.oracle == "bug_kvmap" else 1), (r.oracle, c.id)
            assert f.cells and all(cell.status == f.sig[0] for cell in f.cells if cell.branch not in V.CHECKS)
    assert (tmp_path / V.RESULTS_FILE).stat().st_size > 0


def test_cli_search_prints_the_minimal_case_writes_corpus_and_database(tmp_path, capsys, monkeypatch):
    """The CLI (worker isolation): minimal case JSON, repro line, corpus entry; a re-run replays the database's
    failure as its first draw; the corpus replays with `run --case DIR`, and the fixed oracle passes it."""
    out, corpus = tmp_path / "out", tmp_path / "corpus"
    argv = ["search", "--oracles", "bug_fixable_window", "--plugin", str(PLUGINS / "fixable.py"), "--time", "120",
            "--out", str(out), "--corpus", str(corpus), "--max-seq-len", "16", "--no-report"]
    assert main(argv) == 1
    text = capsys.readouterr().out
    [entry_path] = list((corpus / "bug_fixable_window").glob("*.json"))
    entry = json.loads(entry_path.read_text())
    [case] = load_cases(entry_path)
    assert case.seq_len <= 2 + 2 * case.block_size and case.heads_q == 1 and case.window >= 1
    assert entry["oracle"] == "bug_fixable_window" and entry["failure"][0]["status"] == "FAIL"
    assert entry["failure"][0]["branch"] == "swa_o" and entry["found"]["draws_to_first"] >= 1
    assert case.to_json() in text and f"nsaconf repro {entry_path} --oracles bug_fixable_window" in text
    info = json.loads((out / "search.json").read_text())
    [osr] = info["oracle_searches"]
    assert osr["findings"][0]["case_id"] == case.id and (out / "hypothesis").is_dir()
    # a re-run starts from the failure in the database: found at the first draw
    assert main(argv) == 1
    capsys.readouterr()
    again = json.loads((out / "search.json").read_text())["oracle_searches"][0]["findings"][0]
    assert again["draws_to_first"] == 1 and again["case_id"] == case.id
    # the corpus replays: FAIL while the bug is there, PASS once fixed
    run = ["run", "--case", str(corpus), "--oracles", "bug_fixable_window", "--plugin", str(PLUGINS / "fixable.py"),
           "--no-report", "--no-progress"]
    assert main(run + ["--out", str(tmp_path / "r1")]) == 1
    monkeypatch.setenv("NSACONF_TEST_FIXED", "1")
    assert main(run + ["--out", str(tmp_path / "r2")]) == 0
    recs = [json.loads(line) for line in (tmp_path / "r2" / V.RESULTS_FILE).read_text().splitlines()]
    assert [(r["case_id"], r["status"]) for r in recs] == [(case.id, "PASS")]


def test_search_usage_errors_are_one_line(capsys):
    for argv, word in ((["search"], "--oracles"), (["search", "--oracles", "nope"], "unknown oracle"),
                       (["search", "--oracles", "reference", "--checks", "bogus"], "unknown check"),
                       (["search", "--oracles", "reference", "--time", "0"], "--time"),
                       (["search", "--oracles", "reference", "--examples", "0"], "--examples")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("nsaconf: error: ") and word in err[0], (argv, err)


def test_missing_hypothesis_is_one_line(capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_hypothesis(name, *a, **kw):
        if name == "hypothesis" or name.startswith("hypothesis."):
            raise ImportError("No module named 'hypothesis'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_hypothesis)
    assert main(["search", "--oracles", "reference"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nsaconf: error: nsaconf search needs the hypothesis package") and "nsaconf[search]" in err
