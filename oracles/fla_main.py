"""FLA ``fla.ops.nsa`` from a checkout of fla-org/flash-linear-attention main (``fla_main``), beside the
pinned fla-core wheel adapters (``oracles.fla``).

Loaded from a configured checkout (``oracles.config``: env ``NSACONF_FLA_MAIN`` or ``[oracles.fla_main]
path`` in nsaconf.toml; default ``external/flash-linear-attention``) pinned to bc3b101 (2026-08-22, the
newest commit of main this project could fetch; its ``fla/__init__.py`` says 0.5.2). Only
``fla/ops/nsa/{parallel,compression}.py``, ``fla/ops/utils/pooling.py`` and what they import are loaded;
``fla/__init__.py`` and ``fla/ops/__init__.py`` (every FLA op and layer) are skipped, and an installed
``fla`` (fla-core) is set aside during the import and restored after it (``compat.checkout_import``,
``isolate=True``), so both can run in one process.

Everything else -- the calls, the translation (empty-row LSE 0 -> -inf, next_pow2(n) -1 padded indices,
the window through ``window_size=(w-1, 0)`` of flash-attn / the shim, queries shorter than keys through
``TK = T``), the gradients -- is ``oracles.fla.FlaParallel``'s. Diff of ``fla/ops/nsa`` against the 0.6.0
wheel: the wheel is newer (int64 program ids, value-split LSE stores, a ``BQ`` tile in the compression
backward); bc3b101 has ``@torch.compile`` on ``ParallelNSAFunction``. The forced-block rule (block 0 + the
current and the previous block, commit f64a3f96) is in both.
"""
from __future__ import annotations

import importlib.util
import os
import re
import warnings
from typing import Optional

from nsaconf.cases.model import Case
from nsaconf.oracles.base import register_oracle
from nsaconf.oracles.compat import flash_attn_shim
from nsaconf.oracles.compat.checkout_import import checkout_versions, import_from_checkout
from nsaconf.oracles.config import CHECKOUTS, checkout_status, how_to_enable
from nsaconf.oracles.fla import FlaParallel

_MODS: dict[str, tuple] = {}
_LABEL = "fla-org/flash-linear-attention main"


def checkout_version(path) -> str:
    """``__version__`` of the checkout's ``fla/__init__.py`` (read as text, not executed)."""
    m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', (path / "fla" / "__init__.py").read_text(), re.M)
    return m.group(1) if m else "unknown"


def _load():
    if "fla" in _MODS:
        return _MODS["fla"]
    path, _, _ = checkout_status("fla_main")
    if path is None:
        raise ImportError(f"{_LABEL} checkout not configured: " + how_to_enable("fla_main"))
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    flash_attn_shim.install()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        par, cmp, pool = import_from_checkout(path, ["fla.ops.nsa.parallel", "fla.ops.nsa.compression", "fla.ops.utils.pooling"],
                                              stubs=["fla", "fla.ops"], isolate=True,
                                              stub_attrs={"fla": {"__version__": checkout_version(path)}})
    if getattr(par, "flash_attn_func", None) is None:
        par.flash_attn_func = flash_attn_shim.flash_attn_func
        par.flash_attn_varlen_func = flash_attn_shim.flash_attn_varlen_func
    _MODS["fla"] = (par, cmp.parallel_nsa_compression, pool.mean_pooling)
    return _MODS["fla"]


@register_oracle
class FlaMain(FlaParallel):
    """FLA main's Triton ``parallel_nsa`` and its parts, exactly as ``fla_parallel`` calls fla-core's."""

    name = "fla_main"
    description = f"FLA main@{CHECKOUTS['fla_main'].commit[:7]} (checkout) Triton parallel_nsa (compression + top-k + selection), window via flash-attn/shim"

    def modules(self):
        return _load()

    def availability(self) -> Optional[str]:
        path, _, _ = checkout_status("fla_main")
        if path is None:
            return f"{_LABEL} checkout not found: " + how_to_enable("fla_main")
        if importlib.util.find_spec("triton") is None:
            return "FLA's Triton kernels need triton and a CUDA GPU (pip install triton; run with --device cuda)"
        return None

    def versions(self) -> dict:
        path, _, _ = checkout_status("fla_main")
        return checkout_versions("fla_main", {"fla_main_version": checkout_version(path) if path else "missing"})

    def branch_supports(self, case: Case, branch: str) -> Optional[str]:
        why = super().branch_supports(case, branch)
        return why.replace("FLA 0.6.0", "FLA (0.6.0; main not run there)") if why else None
