"""pytest integration: a profile as pytest items, one per case x oracle, so that
``pytest --junitxml`` gives CI a standard report.

    pytest tests/test_matrix.py                                   # smoke profile, in-house oracles
    pytest tests/test_matrix.py --nsaconf-profile ci --nsaconf-oracles all --junitxml=out/junit.xml
    pytest tests/test_matrix.py --nsaconf-device cuda --nsaconf-profile gpu   # items marked gpu

Loaded by ``tests/conftest.py`` (``pytest_plugins``); in your own repository use ``pytest -p nsaconf.harness.pytest_plugin``.
A test requests the ``nsaconf_cell`` fixture and calls ``.check()``: FAIL/ERROR/CRASH/TIMEOUT cells
fail the item (with every bad branch and its reason), an item whose cells are all SKIP is skipped with
the reason. Markers: ``gpu`` (skipped, with the reason, when CUDA is absent) and ``slow`` (profiles
full, paper, gpu).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest

from nsaconf.cases.vocabulary import BAD_STATUSES

DEFAULT_ORACLES = "reference,dense"
SLOW_PROFILES = ("full", "paper", "gpu")


def pytest_addoption(parser) -> None:
    g = parser.getgroup("nsaconf", "NSA conformance matrix")
    g.addoption("--nsaconf-profile", default="smoke", help="case profile: smoke (default), ci, full, paper, gpu")
    g.addoption("--nsaconf-oracles", default=DEFAULT_ORACLES,
                help=f"comma-separated oracles, or 'all' for every oracle on the device (default {DEFAULT_ORACLES})")
    g.addoption("--nsaconf-device", default="cpu", help="cpu or cuda")
    g.addoption("--nsaconf-seed", type=int, default=0, help="profile seed")
    g.addoption("--nsaconf-plugin", action="append", default=[], help="oracle plugin file (repeatable)")
    g.addoption("--nsaconf-tol", action="append", default=[], help="tolerance override KEY=VALUE (repeatable)")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def pytest_collection_modifyitems(config, items) -> None:
    if _cuda():
        return
    skip = pytest.mark.skip(reason="marked gpu: no CUDA device on this machine (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@dataclass
class NsaCell:
    """One pytest item: a case judged against one oracle (every branch)."""

    case: object
    oracle: str
    device: str
    plugins: list
    tol: list
    cache: dict

    def check(self) -> None:
        from nsaconf.harness.runner import evaluate
        from nsaconf.harness.tolerance import tolerance_table
        from nsaconf.oracles.config import load_config

        table = tolerance_table(load_config(), self.tol)
        cells = evaluate(self.case, [self.oracle], device=self.device, table=table, plugins=self.plugins,
                         truth_cache=self.cache)
        if len(self.cache) > 4:  # items are ordered by case: keep only recent truths
            for k in list(self.cache)[:-4]:
                del self.cache[k]
        bad = [c for c in cells if c.status in BAD_STATUSES]
        if bad:
            pytest.fail("\n".join(f"{c.status} {c.oracle}.{c.branch}: {c.reason} (metrics: "
                                  f"err={c.metrics.get('max_abs_err')}, bound={c.metrics.get('bound')}, "
                                  f"worst={c.metrics.get('worst_index')})" for c in bad), pytrace=False)
        if cells and all(c.status == "SKIP" for c in cells):
            pytest.skip("; ".join(sorted({c.reason for c in cells})))


_TRUTHS: dict = {}


def _oracle_names(config) -> list[str]:
    from nsaconf.oracles.base import load_oracle_sources, registry

    load_oracle_sources(config.getoption("--nsaconf-plugin"))
    spec = config.getoption("--nsaconf-oracles")
    device = config.getoption("--nsaconf-device")
    if spec == "all":
        return [n for n, cls in sorted(registry().items()) if device in cls.devices]
    return [n.strip() for n in spec.split(",") if n.strip()]


def pytest_generate_tests(metafunc) -> None:
    if "nsaconf_cell" not in metafunc.fixturenames:
        return
    from nsaconf.cases.generator import profile_cases

    cfg = metafunc.config
    profile = cfg.getoption("--nsaconf-profile")
    device = cfg.getoption("--nsaconf-device")
    marks = ([pytest.mark.gpu] if device == "cuda" else []) + ([pytest.mark.slow] if profile in SLOW_PROFILES else [])
    params = [pytest.param((case, name), id=f"{name}:{case.id}", marks=marks)
              for case in profile_cases(profile, cfg.getoption("--nsaconf-seed")) for name in _oracle_names(cfg)]
    metafunc.parametrize("nsaconf_cell", params, indirect=True)


@pytest.fixture
def nsaconf_cell(request) -> Optional[NsaCell]:
    case, oracle = request.param
    cfg = request.config
    return NsaCell(case=case, oracle=oracle, device=cfg.getoption("--nsaconf-device"),
                   plugins=list(cfg.getoption("--nsaconf-plugin")), tol=list(cfg.getoption("--nsaconf-tol")), cache=_TRUTHS)
