"""Hostile case files and sizes: every malformed, meaningless or oversized case is one line
``nsaconf: error: ...`` and exit 2 before anything is allocated (or a SKIP cell in a profile run)."""
from __future__ import annotations

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

