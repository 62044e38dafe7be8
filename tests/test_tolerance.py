"""The tolerance table: defaults, override precedence, bad overrides, the floor, the tight rules."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nsaconf.harness.tolerance import tolerance_table
from nsaconf.harness.tolerance import DEFAULTS, ToleranceError, ToleranceTable


def test_defaults_fa_rule_for_kernels_and_tight_for_reference():
    t = ToleranceTable()
    r = t.rule_for("fla_parallel", "e2e", "o", "bfloat16")
    assert (r.rule, r.k, r.source) == ("fa", 2.0, "default")
    assert t.rule_for("fla_parallel", "e2e", "dq", "bfloat16").k == 3.0
    assert t.rule_for("reference", "reference", "o", "float32").rule == "tight"
    assert t.rule_for("reference", "reference", "o", "bfloat16").rule == "fa"
    assert t.rule_for("fla_parallel", "e2e", "o", "float64").rule == "tight"  # baseline == truth in fp64
    r = t.rule_for("reference", "reference", "o", "float64")
    assert r.bound(0.0, 0.0, 3.0) == pytest.approx(3e-10)


def test_override_precedence():
    t = ToleranceTable()
    t.set("k", 4, "cli")
    t.set("slc_o.k", 5, "cli")
    t.set("fla.k", 6, "cli")
    t.set("fla.slc_o.k", 7, "cli")
    assert t.rule_for("other", "kernel", "o", "bfloat16").k == 4
    assert t.rule_for("other", "kernel", "slc_o", "bfloat16").k == 5
    assert t.rule_for("fla", "kernel", "o", "bfloat16").k == 6
    r = t.rule_for("fla", "kernel", "slc_o", "bfloat16")
    assert r.k == 7 and "fla.slc_o.k" in r.source
    assert any(o["param"] == "k" and o["value"] == 7 for o in t.as_dict()["overrides"])


@pytest.mark.parametrize("text", ["k", "kk=3", "fla.slc_o.bogus=1", "a.b.c.k=1", "k=-1", "k=nan", "k=abc", "fla.nobranch.k=2"])
def test_bad_overrides_raise(text):
    with pytest.raises(ToleranceError):
        ToleranceTable().set_from_string(text)


def test_config_then_cli():
    t = tolerance_table({"tolerance": {"k": 3, "fla": {"o": {"k": 9}}}}, ["fla.o.k=11"])
    assert t.rule_for("x", "kernel", "o", "float16").k == 3
    assert t.rule_for("fla", "kernel", "o", "float16").k == 11


def test_floor_is_the_rounding_noise_of_the_dtype():
    r = ToleranceTable().rule_for("x", "kernel", "o", "bfloat16")
    truth = torch.linspace(-3, 3, 1001, dtype=torch.float64)
    f = r.floor(truth, torch.bfloat16)
    assert f == 2 * (2 ** -7 * 2) / 2  # 2 * half an ulp of bf16 at 3.3
    assert r.floor(truth, torch.float32) < 1e-6 < f
    assert r.floor(torch.tensor([0.0, 1.0], dtype=torch.float64), torch.float32) > 0  # never 0 for tiny tensors
    assert r.floor(torch.tensor([float("-inf")]), torch.float32) == DEFAULTS["floor_add"]


def _bad(capsys, argv) -> str:
    from nsaconf.harness.cli import main

    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("nsaconf: error: "), err
    return err[0]


@pytest.mark.parametrize("key", ["fla.o.floor_add=1e-4", "fla.k=3", "slc.k=3", "fla_naive_typo.slc_o.k=3"])
def test_tol_key_naming_no_oracle_is_an_error(capsys, tmp_path, monkeypatch, key):
    """A key whose ORACLE part is no registered oracle (nor a branch) matches no cell: exit 2, nothing written."""
    monkeypatch.setenv("NSACONF_CONFIG", "")  # restored after the test, whatever main() sets
    name = key.split(".")[0]
    out = tmp_path / "o"
    case = str(Path(__file__).resolve().parents[1] / "examples" / "case.json")
    msg = _bad(capsys, ["run", "--case", case, "--oracles", "reference", "--tol", key, "--out", str(out)])
    assert f"{name!r} is neither an oracle nor a branch" in msg and "fla_naive" in msg
    assert not out.exists()
    assert name in _bad(capsys, ["repro", case, "--oracles", "reference", "--tol", key])
    cfg = tmp_path / "nsaconf.toml"
    cfg.write_text(f'[tolerance]\n"{key.split("=")[0]}" = 3\n')
    assert "(config)" in _bad(capsys, ["run", "--case", case, "--config", str(cfg), "--out", str(out)])


def test_tol_keys_of_registered_oracles_pass_the_check():
    t = tolerance_table({"tolerance": {"fla_naive": {"o": {"floor_add": 1e-4}}}}, ["*.slc_o.k=3", "dq.k_grad=4", "reference.k=1"])
    t.check_oracles(["fla_naive", "reference"])
    with pytest.raises(ToleranceError, match="'fla'"):
        tolerance_table({}, ["fla.o.floor_add=1e-4"]).check_oracles(["fla_naive", "reference"])


@pytest.mark.parametrize("section", [3, "k=2", [1, 2]])
def test_non_table_tolerance_is_a_tolerance_error(section):
    with pytest.raises(ToleranceError, match="table"):
        tolerance_table({"tolerance": section}, [])


def test_bool_tolerance_value_is_an_error():
    with pytest.raises(ToleranceError, match="needs a number"):
        tolerance_table({"tolerance": {"k": True}}, [])
