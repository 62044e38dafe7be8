"""nsaconf: which Native Sparse Attention an implementation computes, whether it is right, and why not.

The public Python API (``import nsaconf`` loads neither torch nor any oracle; each name is imported on
first use)::

    import nsaconf

    case = nsaconf.Case(seq_len=256, heads_q=16, heads_kv=1, top_n=4, window=64)
    cells = nsaconf.evaluate(case, ["reference", "dense"])          # list[CellResult]
    result = nsaconf.check(my_nsa)     # a plain callable (case, inputs) -> {branch: tensor}, smoke profile
    summary = nsaconf.run([case], ["reference"], out="out/mine")    # out/mine/results.jsonl
    nsaconf.write_reports("out/mine")                                # summary.md, results.csv, report.html

    @nsaconf.register_oracle
    class Mine(nsaconf.Oracle): ...

``run`` starts worker processes (multiprocessing spawn): call it under ``if __name__ == "__main__":``.

The product is four layers, each a subpackage, dependencies pointing one way::

    nsaconf.cases    the case model, the mask conventions, the case generator, the shared vocabulary
    nsaconf.oracles  the Oracle protocol and registry, the fp64 reference, the adapters, in-house kernels
    nsaconf.harness  runner, comparator, tolerance, convention probe, worker processes, CLI
    nsaconf.reports  summary.md, results.csv, report.html from results.jsonl (no torch)

In the source tree the four layers are the folders ``cases/``, ``oracles/``, ``harness/`` and
``reports/`` beside this one; an installed wheel holds them inside ``nsaconf/``.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from nsaconf._version import __version__

# Source tree (a checkout, or an editable install of it): the layer folders sit beside this package.
_SOURCE_ROOT = Path(__file__).resolve().parent.parent
if not (Path(__file__).resolve().parent / "cases").is_dir() and (_SOURCE_ROOT / "cases" / "vocabulary.py").is_file():
    __path__.append(str(_SOURCE_ROOT))  # type: ignore[name-defined]  # noqa: F821 (the package's own __path__)

#: public name -> module that defines it
_EXPORTS = {
    "Case": "nsaconf.cases.model", "CaseError": "nsaconf.cases.model",
    "load_cases": "nsaconf.cases.model", "dump_cases": "nsaconf.cases.model",
    "profile_cases": "nsaconf.cases.generator", "PROFILES": "nsaconf.cases.generator",
    "Inputs": "nsaconf.cases.tensors", "materialize": "nsaconf.cases.tensors",
    "Oracle": "nsaconf.oracles.base", "OracleError": "nsaconf.oracles.base",
    "register_oracle": "nsaconf.oracles.base", "get_oracle": "nsaconf.oracles.base",
    "registry": "nsaconf.oracles.base", "load_plugin": "nsaconf.oracles.base",
    "nsa_reference": "nsaconf.oracles.reference",
    "ToleranceTable": "nsaconf.harness.tolerance",
    "run": "nsaconf.harness.runner", "evaluate": "nsaconf.harness.runner",
    "RunConfig": "nsaconf.harness.runner", "RunSummary": "nsaconf.harness.runner",
    "CellResult": "nsaconf.harness.results", "load_results": "nsaconf.harness.results",
    "probe_oracle": "nsaconf.harness.probe",
    "check": "nsaconf.harness.check", "assert_conforms": "nsaconf.harness.check", "CheckResult": "nsaconf.harness.check",
    "write_reports": "nsaconf.reports", "results_frame": "nsaconf.reports",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nsaconf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
