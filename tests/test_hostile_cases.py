"""Hostile case files and sizes: every malformed, meaningless or oversized case is one line
``nsaconf: error: ...`` and exit 2 before anything is allocated (or a SKIP cell in a profile run)."""
from __future__ import annotations

import json

import pytest

from nsaconf.cases.model import Case, CaseError, load_cases
from nsaconf.harness.cli import main


def _bad(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("nsaconf: error: "), err
    return err[0]


def _write(tmp_path, content, name="case.json"):
    p = tmp_path / name
    (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
    return p


# ------------------------------------------------------------------------------------------ defect 5: validation
@pytest.mark.parametrize("text, words", [
    ('{"scale": Infinity}', "'scale'"),
    ('{"scale": 1e300}', "'scale'"),
    ('{"scale": 1e-30}', "'scale'"),
    ('{"scale": true}', "'scale'"),
    ('{"scale": "0.1"}', "'scale'"),
    ('{"seed": 1180591620717411303424}', "'seed'"),
    ('{"seed": 9223372036854775808}', "'seed'"),
    ('{"window": 99999999999999999999999}', "'window'"),
    ('{"seq_len": 90, "cu_seqlens": [0, 37.9, 90]}', "'cu_seqlens'"),
    ('{"seq_len": 90, "cu_seqlens": [0, 37.0, 90]}', "'cu_seqlens'"),
    ('{"seq_len": 90, "cu_seqlens": [0, "37", 90]}', "'cu_seqlens'"),
    ('{"seq_len": 90, "cu_seqlens": [0, true, 90]}', "'cu_seqlens'"),
    ('{"cases": [{"seq_len": 64}], "bogus": 1}', "'bogus'"),
    ('{"cases": {"seq_len": 64}}', "'cases' must be a list"),
    ('{"seed": ' + "1" * 5000 + "}", "too many digits"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_meaningless_or_malformed_case_is_one_line(capsys, tmp_path, text, words):
    f = _write(tmp_path, text)
    with pytest.raises(CaseError) as e:
        load_cases(f)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert words in _bad(capsys, ["run", "--case", str(f), "--oracles", "reference", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # nothing half-written


@pytest.mark.parametrize("content, words", [
    (bytes(range(128, 256)) * 4, "not UTF-8"),
    ('{"seed": 1}'.encode("utf-16"), "UTF-16"),
    ('{"seed": 1}'.encode("utf-16-le"), "NUL bytes"),
])
def test_binary_or_utf16_file_is_one_line(capsys, tmp_path, content, words):
    f = _write(tmp_path, content)
    assert words in _bad(capsys, ["run", "--case", str(f), "--out", str(tmp_path / "o")])


def test_valid_cases_still_load(tmp_path):
    """Integer scales, a UTF-8 byte-order mark, JSON Lines and ``{"cases": [...]}`` keep working."""
    f = _write(tmp_path, '\ufeff{"cases": [{"scale": 1, "seed": 9223372036854775807}, '
                         '{"seq_len": 90, "cu_seqlens": [0, 37, 90]}]}')
    a, b = load_cases(f)
    assert a.scale == 1.0 and isinstance(a.scale, float) and a.id.endswith("-sc1-s9223372036854775807")
    assert b.cu_seqlens == (0, 37, 90)
    lines = _write(tmp_path, '{"seed": 1}\n{"seed": 2}\n', "c.jsonl")
    assert [c.seed for c in load_cases(lines)] == [1, 2]
    assert Case(scale=100).softmax_scale == 100.0 and Case(scale=1e-4).scale == 1e-4


def test_seed_range_is_what_the_tensors_need():
    """The largest seed materializes (the cotangent's offset seed included)."""
    from nsaconf.cases.tensors import materialize, output_cotangent

    case = Case(seq_len=8, heads_q=2, head_dim=4, block_size=4, top_n=3, seed=2**63 - 1)
    assert materialize(case).q.isfinite().all() and output_cotangent(case).isfinite().all()
    with pytest.raises(CaseError, match="'seed'"):
        Case(seed=2**63)



# ------------------------------------------------------------------------------------------ defect 6: sizes
@pytest.mark.parametrize("fields, words", [
    ({"seq_len": 10**9}, "--max-memory"),
    ({"head_dim": 10**6}, "--max-memory"),
    ({"batch": 10**6}, "--max-memory"),
    ({"heads_q": 10**7}, "--max-memory"),
    ({"top_n": 10**6}, "--max-memory"),
    ({"seq_len": 65536, "cmp_block": 8, "cmp_stride": 8, "block_size": 8, "head_dim": 8, "heads_q": 2}, "--max-work"),
    ({"cmp_block": 10**6, "cmp_stride": 1}, "--max-work"),
])
def test_oversized_case_is_refused_before_anything_is_allocated(capsys, tmp_path, monkeypatch, fields, words):
    import resource
    import time

    monkeypatch.setenv("NSACONF_CONFIG", "")  # restored after the test, whatever main() sets
    f = _write(tmp_path, json.dumps(fields))
    out = tmp_path / "o"
    main(["list"])  # imports warm
    capsys.readouterr()
    rss0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    msg = _bad(capsys, ["run", "--case", str(f), "--oracles", "reference", "--out", str(out), "--no-progress"])
    assert time.perf_counter() - t0 < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 100_000  # KiB: nothing allocated
    assert words in msg and "float64 truth" in msg and not out.exists()
    assert words in _bad(capsys, ["repro", str(f), "--oracles", "reference"])


def test_profile_case_over_the_limit_is_a_skip_cell(capsys, tmp_path, monkeypatch):
    """In a profile run a case over --max-memory is a SKIP cell for every branch of every oracle, with the reason,
    the others run; --resume does not repeat them."""
    from nsaconf.cases.generator import profile_cases
    from nsaconf.harness.results import iter_records
    from nsaconf.oracles.base import get_oracle
    from nsaconf.oracles.resources import truth_bytes

    monkeypatch.setenv("NSACONF_CONFIG", "")  # restored after the test, whatever main() sets
    small = [c.id for c in profile_cases("smoke") if truth_bytes(c) <= 5 * 10**6]
    assert 0 < len(small) < 6
    argv = ["run", "--profile", "smoke", "--oracles", "reference,dense", "--max-memory", "5MB", "--out", str(tmp_path),
            "--no-progress", "--no-probe", "--no-report"]
    assert main(argv) == 0
    recs = list(iter_records(tmp_path))
    big = {r["case_id"] for r in recs if "over --max-memory 5 MB" in r["reason"]}
    assert big == {c.id for c in profile_cases("smoke")} - set(small)
    branches = {o: get_oracle(o).branches for o in ("reference", "dense")}
    for cid in big:
        cells = [(r["oracle"], r["branch"], r["status"]) for r in recs if r["case_id"] == cid]
        assert sorted(cells) == sorted((o, b, "SKIP") for o, bs in branches.items() for b in bs)
    assert {r["case_id"] for r in recs if r["status"] == "PASS"} == set(small)
    assert main(argv + ["--resume"]) == 0
    assert len(list(iter_records(tmp_path))) == len(recs)
    assert "SKIP=" in capsys.readouterr().out


def test_limits_from_the_option_or_the_config(capsys, tmp_path, monkeypatch):
    from nsaconf.oracles.resources import parse_bytes

    monkeypatch.setenv("NSACONF_CONFIG", "")  # restored after the test, whatever main() sets
    assert [parse_bytes(t) for t in ("8GB", "512MB", "2GiB", "1000", "1.5kb")] == [8 * 10**9, 512 * 10**6, 2 * 2**30, 1000, 1500]
    case = str(_write(tmp_path, '{"seq_len": 64}'))
    out = str(tmp_path / "o")
    for bad in ("8XB", "-1GB", "0", "nan", "inf"):
        assert "--max-memory" in _bad(capsys, ["run", "--case", case, "--max-memory", bad, "--out", out])
    assert "--max-work" in _bad(capsys, ["run", "--case", case, "--max-work", "inf", "--out", out])
    assert "over --max-memory 1 KB" in _bad(capsys, ["run", "--case", case, "--max-memory", "1KB", "--out", out])
    cfg = _write(tmp_path, '[limits]\nmax_memory = "1KB"\n', "nsaconf.toml")
    assert "over --max-memory 1 KB" in _bad(capsys, ["run", "--case", case, "--config", str(cfg), "--out", out])
    cfg.write_text('[limits]\nmax_work = 10\n')
    assert "over --max-work 10" in _bad(capsys, ["run", "--case", case, "--config", str(cfg), "--out", out])
    cfg.write_text('[limits]\nmax_memory = "lots"\n')
    assert "[limits] max_memory" in _bad(capsys, ["run", "--case", case, "--config", str(cfg), "--out", out])
    assert not (tmp_path / "o").exists()


def test_truth_bytes_matches_the_measured_peak(tmp_path):
    """The estimate against the peak RSS of the float64 reference in a fresh process (inputs dominate one case,
    the chunk temporaries of a large top-n the other)."""
    import subprocess
    import sys

    from nsaconf.oracles.resources import truth_bytes

    code = ("import json, resource, sys\n"
            "from nsaconf.cases.model import Case\n"
            "from nsaconf.cases.tensors import materialize\n"
            "from nsaconf.oracles.reference import nsa_reference\n"
            "small = Case(seq_len=64, heads_q=4, head_dim=8, top_n=4)\n"
            "nsa_reference(small, materialize(small), return_importance=True)\n"
            "rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
            "base = int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()  # resident now\n"
            "case = Case(**json.loads(sys.argv[1]))\n"
            "nsa_reference(case, materialize(case), return_importance=True)\n"
            "print(rss() - base)\n")
    for fields in ({"seq_len": 64, "heads_q": 2, "head_dim": 100_000, "dtype": "float64"},
                   {"seq_len": 8, "heads_q": 2, "head_dim": 32, "block_size": 8, "top_n": 100_000}):
        p = subprocess.run([sys.executable, "-c", code, json.dumps(fields)], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        measured, est = int(p.stdout.split()[-1]), truth_bytes(Case(**fields))
        assert est > 2 * 10**8 and 0.75 <= measured / est <= 1.35, (fields, measured, est)


# ------------------------------------------------------------------------------------------ defect 7: config
@pytest.mark.parametrize("text, words", [
    ("tolerance = 3\n", "'tolerance' must be a table"),
    ("oracles = 3\n", "'oracles' must be a table"),
    ("[oracles]\nnsa_impl = 5\n", "'oracles.nsa_impl' must be a table"),
    ("[tolerence]\nk = 3\n", "unknown top-level key(s) ['tolerence']"),
    ("[tolerance]\nk = true\n", "needs a number"),
    ("[limits]\nmax_mem = 3\n", "unknown [limits] key(s)"),
    (b"\xff\xfe[\x00t\x00]\x00", "not UTF-8"),
    ("a = " + "[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply"),
])
def test_malformed_config_is_one_line(capsys, tmp_path, monkeypatch, text, words):
    monkeypatch.setenv("NSACONF_CONFIG", "")  # restored after the test, whatever main() sets
    cfg = _write(tmp_path, text, "nsaconf.toml")
    case = str(_write(tmp_path, '{"seq_len": 64}'))
    assert words in _bad(capsys, ["run", "--case", case, "--oracles", "reference", "--config", str(cfg),
                                  "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
