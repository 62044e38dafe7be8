"""Checkout configuration: env var > nsaconf.toml > default, commit check, how-to text."""
from pathlib import Path

import pytest

from nsaconf.oracles import config
from nsaconf.oracles.base import get_oracle


def _fake_checkout(root: Path, key: str, commit: str | None) -> Path:
    co = config.CHECKOUTS[key]
    f = root / co.marker
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text("# marker\n")
    if commit:
        (root / "COMMIT").write_text(commit + "\n")
    return root


def test_env_var_wins(tmp_path, monkeypatch):
    p = _fake_checkout(tmp_path / "tl", "tilelang", config.CHECKOUTS["tilelang"].commit)
    monkeypatch.setenv("NSACONF_TILELANG_EXAMPLES", str(p))
    path, src = config.checkout_path("tilelang")
    assert path == p.resolve() and src == "$NSACONF_TILELANG_EXAMPLES"
    _, commit, warn = config.checkout_status("tilelang")
    assert commit == config.CHECKOUTS["tilelang"].commit and warn is None


def test_toml_relative_path_and_commit_mismatch(tmp_path, monkeypatch):
    monkeypatch.delenv("NSACONF_NSA_IMPL", raising=False)
    _fake_checkout(tmp_path / "ni", "nsa_impl", "deadbeef" * 5)
    cfg = tmp_path / "nsaconf.toml"
    cfg.write_text('[oracles.nsa_impl]\npath = "ni"\n')
    monkeypatch.setenv("NSACONF_CONFIG", str(cfg))
    path, src = config.checkout_path("nsa_impl")
    assert path == (tmp_path / "ni").resolve() and "nsaconf.toml" in src
    _, commit, warn = config.checkout_status("nsa_impl")
    assert commit == "deadbeef" * 5
    assert warn and "pinned 623e2c5a30a6" in warn


def test_missing_checkout_explains_how(tmp_path, monkeypatch):
    monkeypatch.setenv("NSACONF_TILELANG_EXAMPLES", str(tmp_path / "nowhere"))
    path, why = config.checkout_path("tilelang")
    assert path is None and "nowhere" in why
    msg = get_oracle("tilelang_ref").availability()
    assert msg and "https://github.com/tile-ai/tilelang" in msg and "NSACONF_TILELANG_EXAMPLES" in msg
    assert "a35008a42531" in msg and "[oracles.tilelang]" in msg
    monkeypatch.setenv("NSACONF_NSA_IMPL", str(tmp_path / "nowhere"))
    msg = get_oracle("nsa_impl").availability()
    assert msg and "tilde-research/nsa-impl" in msg and "NSACONF_NSA_IMPL" in msg


@pytest.mark.parametrize("name", ["fla_naive", "fla_parallel", "fla_parallel_sel", "tilelang_ref", "tilelang_fwd",
                                  "nsa_impl", "flash_window", "flex"])
def test_every_adapter_declares_versions_and_reasons(name):
    o = get_oracle(name)
    v = o.versions()
    assert isinstance(v, dict) and v
    why = o.availability()
    assert why is None or (isinstance(why, str) and len(why) > 20 and "\n" not in why)
