"""pytest integration: cases as pytest items, one per case x oracle, so that ``pytest --junitxml`` gives
CI a standard report.

    pytest tests/test_nsa_conformance.py                                   # smoke profile, reference and dense
    pytest tests/test_nsa_conformance.py --nsaconf-plugin my_oracle.py --nsaconf-oracles mine
    pytest tests/test_nsa_conformance.py --nsaconf-case my_cases.json --nsaconf-oracles all
    pytest tests/test_nsa_conformance.py --nsaconf-device cuda --nsaconf-profile gpu   # items marked gpu

Loaded by the ``pytest11`` entry point ``nsaconf`` wherever nsaconf is installed (``-p no:nsaconf`` turns it
off; ``-p nsaconf.harness.pytest_plugin`` loads it where entry points are disabled). It is inert for a test
that does not request the ``nsaconf_cell`` fixture: nothing is collected, marked or imported (no torch).
A test that requests it calls ``.check()``: FAIL/ERROR/CRASH/TIMEOUT cells fail the item (each bad branch,
its reason and the ``nsaconf repro`` line), an item whose cells are all SKIP is skipped with the reason.
Markers of its items: ``gpu`` (skipped, with the reason, when CUDA is absent) and ``slow`` (profiles full,
paper, gpu).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from nsaconf.cases.vocabulary import BAD_STATUSES

DEFAULT_ORACLES = "reference,dense"
SLOW_PROFILES = ("full", "paper", "gpu")
FIXTURE = "nsaconf_cell"


def pytest_addoption(parser) -> None:
    g = parser.getgroup("nsaconf", "NSA conformance matrix (tests requesting the nsaconf_cell fixture)")
    g.addoption("--nsaconf-profile", default=None,
                help="case profile: smoke, ci, full, paper, gpu, regressions (the regression corpus) (default smoke when "
                "no --nsaconf-case)")
    g.addoption("--nsaconf-case", action="append", default=[], metavar="FILE",
                help="case JSON file, or a folder of them such as a regression corpus (repeatable)")
    g.addoption("--nsaconf-oracles", default=DEFAULT_ORACLES,
                help=f"comma-separated oracles, or 'all' for every oracle on the device (default {DEFAULT_ORACLES})")
    g.addoption("--nsaconf-device", default="cpu", help="cpu or cuda")
    g.addoption("--nsaconf-seed", type=int, default=None, help="profile seed (and the seed of --nsaconf-case files)")
    g.addoption("--nsaconf-plugin", action="append", default=[], metavar="FILE", help="oracle plugin file (repeatable)")
    g.addoption("--nsaconf-tol", action="append", default=[], metavar="KEY=VALUE",
                help="tolerance override KEY=VALUE (repeatable)")


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
    """Skip this plugin's ``gpu`` items without CUDA (other tests are left alone; torch is imported only then)."""
    ours = [i for i in items if FIXTURE in getattr(i, "fixturenames", ()) and i.get_closest_marker("gpu") is not None]
    if not ours or _cuda():
        return
    skip = pytest.mark.skip(reason="marked gpu: no CUDA device on this machine (torch.cuda.is_available() is False)")
    for item in ours:
        item.add_marker(skip)


@dataclass(frozen=True)
class NsaCell:
    """One pytest item: a case judged against one oracle (every branch)."""

    case: object
    oracle: str
    device: str
    plugins: tuple
    tol: tuple
    cache: dict

    def check(self) -> None:
        from nsaconf.harness.check import failure_text, repro_command
        from nsaconf.harness.runner import evaluate
        from nsaconf.harness.tolerance import tolerance_table
        from nsaconf.oracles.config import load_config

        table = tolerance_table(load_config(), list(self.tol))
        cells = evaluate(self.case, [self.oracle], device=self.device, table=table, plugins=list(self.plugins),
                         truth_cache=self.cache)
        if len(self.cache) > 4:  # items are ordered by case: keep only recent truths
            for k in list(self.cache)[:-4]:
                del self.cache[k]
        bad = [c for c in cells if c.status in BAD_STATUSES]
        if bad:
            repro = "repro: " + repro_command(self.case.id, self.oracle, self.device, self.plugins, self.tol)
            pytest.fail("\n".join(failure_text(c) for c in bad) + f"\n{repro}", pytrace=False)
        if cells and all(c.status == "SKIP" for c in cells):
            pytest.skip("; ".join(sorted({c.reason for c in cells})))


_TRUTHS: dict = {}


def _oracle_names(config) -> list[str]:
    from nsaconf.oracles.base import get_oracle, load_oracle_sources, registry

    load_oracle_sources(config.getoption("--nsaconf-plugin"))
    spec = config.getoption("--nsaconf-oracles")
    device = config.getoption("--nsaconf-device")
    if spec == "all":
        return [n for n, cls in sorted(registry().items()) if device in cls.devices]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for n in names:
        get_oracle(n)  # OracleError naming the unknown oracle
    return names


def _cases(config) -> list:
    from nsaconf.harness.check import resolve_cases

    profile, files = config.getoption("--nsaconf-profile"), config.getoption("--nsaconf-case")
    return resolve_cases(([profile or "smoke"] if profile or not files else []) + [str(f) for f in files],
                         seed=config.getoption("--nsaconf-seed"))


def pytest_generate_tests(metafunc) -> None:
    if FIXTURE not in metafunc.fixturenames:
        return
    from nsaconf.cases.model import CaseError
    from nsaconf.oracles.base import OracleError

    cfg = metafunc.config
    profile = cfg.getoption("--nsaconf-profile")
    device = cfg.getoption("--nsaconf-device")
    try:
        cases, names = _cases(cfg), _oracle_names(cfg)
    except (CaseError, OracleError) as e:
        raise pytest.UsageError(f"nsaconf: {e}") from None
    marks = ([pytest.mark.gpu] if device == "cuda" else []) + ([pytest.mark.slow] if profile in SLOW_PROFILES else [])
    params = [pytest.param((case, name), id=f"{name}:{case.id}", marks=marks) for case in cases for name in names]
    metafunc.parametrize(FIXTURE, params, indirect=True)


@pytest.fixture
def nsaconf_cell(request) -> NsaCell:
    case, oracle = request.param
    cfg = request.config
    return NsaCell(case=case, oracle=oracle, device=cfg.getoption("--nsaconf-device"),
                   plugins=tuple(cfg.getoption("--nsaconf-plugin")), tol=tuple(cfg.getoption("--nsaconf-tol")), cache=_TRUTHS)
