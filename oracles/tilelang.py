"""TileLang ``examples/deepseek_nsa`` adapters: ``tilelang_ref`` (``reference.py naive_nsa``) and
``tilelang_fwd`` (``example_tilelang_nsa_fwd.native_sparse_attention``, the TileLang selection kernel).

The code is loaded from a configured checkout of tile-ai/tilelang (``oracles.config``: env
``NSACONF_TILELANG_EXAMPLES`` or ``[oracles.tilelang] path`` in nsaconf.toml; default
``external/tilelang``), never vendored. Neither implements compression or top-k: both are selection
(+ window for the reference) on *given* block indices (``needs_block_indices``).

Conventions (NSA_IMPLEMENTATIONS.md §4, checked against the code): indices per KV head, int32 for the
kernel; a slot is used iff ``0 <= idx*BS <= t`` (the kernel) / ``0 <= idx`` and key ``<= t`` (the
reference); the example pads with the sentinel ``SEQ_LEN`` (ascending), which both skip; window of
``w`` keys ``[max(0, t-w+1), t]`` (a ``w_plus_1`` case is passed as w+1); raw gates applied inside the
reference (we pass ones/zeros to read each branch); queries must cover all T positions (decode is
translated by front-padding queries with zeros and keeping the last TQ rows).

Importing the fwd example calls ``tilelang.testing.set_random_seed(0)`` (reseeds random, numpy,
torch): the RNG states are saved and restored around the import.
"""
from __future__ import annotations

import importlib.util
import random
import sys
import types
import warnings
from typing import Optional

import torch

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import Inputs
from nsaconf.oracles.base import Oracle, register_oracle
from nsaconf.oracles.compat.common import full_queries, given_indices_full, single_thread, window_keys_count
from nsaconf.oracles.config import checkout_status, how_to_enable

_MODS: dict[str, types.ModuleType] = {}


def _examples_dir():
    path, commit, warn = checkout_status("tilelang")
    return (None if path is None else path / "examples" / "deepseek_nsa"), commit, warn


class _rng_guard:
    """Save and restore the Python, NumPy and torch (CPU + CUDA) RNG states."""

    def __enter__(self):
        self.py = random.getstate()
        try:
            import numpy as np
            self.np = np.random.get_state()
        except ImportError:  # pragma: no cover
            self.np = None
        self.torch = torch.random.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        return self

    def __exit__(self, *exc):
        random.setstate(self.py)
        if self.np is not None:
            import numpy as np
            np.random.set_state(self.np)
        torch.random.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        return False


def _load(name: str, filename: str) -> types.ModuleType:
    if name in _MODS:
        return _MODS[name]
    d, _, _ = _examples_dir()
    if d is None:
        raise ImportError("TileLang examples checkout not configured: " + how_to_enable("tilelang"))
    spec = importlib.util.spec_from_file_location(name, d / filename)
    mod = importlib.util.module_from_spec(spec)
    with _rng_guard(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if filename == "reference.py":
            spec.loader.exec_module(mod)
        else:  # the example does `from reference import naive_nsa`: serve the checkout's reference.py
            prev = sys.modules.get("reference")
            sys.modules["reference"] = _load("nsaconf_tilelang_reference", "reference.py")
            try:
                spec.loader.exec_module(mod)
            finally:
                if prev is None:
                    sys.modules.pop("reference", None)
                else:
                    sys.modules["reference"] = prev
    _MODS[name] = mod
    return mod


def _checkout_availability() -> Optional[str]:
    d, _, _ = _examples_dir()
    if d is None:
        return "TileLang examples checkout not found: " + how_to_enable("tilelang")
    return None


def _versions(extra: dict) -> dict:
    d, commit, warn = _examples_dir()
    v = {"tilelang_examples": str(d) if d else "missing", "tilelang_commit": commit or "unknown", "torch": torch.__version__}
    if warn:
        v["tilelang_commit_warning"] = warn
    v.update(extra)
    return v


@register_oracle
class TilelangRef(Oracle):
    """``reference.py naive_nsa`` (pure torch, CPU or GPU): ``slc_o`` and (w > 0) ``swa_o`` on given indices.

    Called with ``block_counts=None`` (its counts are positional), -1 padding, ``g_slc`` = 1 and
    ``g_swa`` = 0 for ``slc_o``; ``g_slc`` = 0 (indices all block 0, so nothing is NaN) and ``g_swa`` = 1
    for ``swa_o``. Loops over queries in Python: ``supports`` caps the work on CPU."""

    name = "tilelang_ref"
    layer = "reference"
    branches = ("slc_o", "swa_o")
    devices = ("cpu", "cuda")
    needs_block_indices = True
    description = "TileLang examples/deepseek_nsa reference.py naive_nsa (selection + window, given indices; needs checkout)"
    max_work = 2 ** 26
    not_timed_by_default = "loops over queries in Python (10-66 s per call on the GPU cases measured)"

    def availability(self) -> Optional[str]:
        why = _checkout_availability()
        if why:
            return why
        if importlib.util.find_spec("einops") is None:
            return "TileLang reference.py needs einops: pip install einops"
        return None

    def versions(self) -> dict:
        return _versions({})

    def supports(self, case: Case, device: str) -> Optional[str]:
        if case.dtype == "float64":
            return "reference.py naive_nsa casts q/k/v to float32 (.float()): a float64 case would measure float32 rounding; use float32"
        work = case.batch * case.seq_len * case.heads_q * (case.top_n * case.block_size + window_keys_count(case) * (case.window > 0)) \
            * (case.head_dim + case.head_dim_v)
        if device == "cpu" and work > self.max_work:
            return (f"reference.py naive_nsa loops over queries in Python: B*T*HQ*(n*l'+w)*(D+DV) = {work:.2e} > "
                    f"{self.max_work:.2e} (a few seconds on CPU); run larger cases on cuda")
        return None

    def run(self, case: Case, inputs: Inputs, device: str, block_indices: Optional[torch.Tensor] = None):
        mod = _load("nsaconf_tilelang_reference", "reference.py")
        idx = block_indices if block_indices is not None else inputs.block_indices
        if idx is None:
            raise ValueError("tilelang_ref needs block indices")
        q, _, _, _, pad = full_queries(case, inputs)
        idx = given_indices_full(case, idx.to(q.device).long(), pad)
        ones = torch.ones(q.shape[:3], dtype=q.dtype, device=q.device)
        zeros = torch.zeros_like(ones)
        cu = None if case.cu_seqlens is None else torch.tensor(case.cu_seqlens, dtype=torch.long, device=q.device)
        kw = dict(block_counts=None, block_size=case.block_size, scale=case.softmax_scale, cu_seqlens=cu)
        with single_thread(device), torch.no_grad():
            out = {"slc_o": mod.naive_nsa(q, inputs.k, inputs.v, ones, zeros, idx, window_size=0, **kw)}
            if case.window > 0:
                out["swa_o"] = mod.naive_nsa(q, inputs.k, inputs.v, zeros, ones, torch.zeros_like(idx), window_size=window_keys_count(case), **kw)
        return {k: (v[:, pad:] if pad else v) for k, v in out.items()}


@register_oracle
class TilelangFwd(Oracle):
    """``example_tilelang_nsa_fwd.native_sparse_attention`` (TileLang kernel, GPU): ``slc_o`` on given
    indices. int32 indices, -1 padding replaced by the example's ``SEQ_LEN`` sentinel, ``is_causal=True``,
    ``selected_blocks = n``, ``groups = G``. fp16 only, G multiple of 16, D <= 128 and V dim = K dim."""

    name = "tilelang_fwd"
    layer = "kernel"
    branches = ("slc_o",)
    devices = ("cuda",)
    dtypes = ("float16",)
    needs_block_indices = True
    description = "TileLang examples/deepseek_nsa fwd kernel native_sparse_attention (fp16, GPU; needs checkout + tilelang)"

    def availability(self) -> Optional[str]:
        why = _checkout_availability()
        if why:
            return why
        if importlib.util.find_spec("tilelang") is None:
            return "tilelang is not installed: pip install tilelang==0.1.15 (or `pip install -e .[tilelang]`; needs CUDA + nvcc)"
        return None

    def versions(self) -> dict:
        try:
            from importlib.metadata import version
            tl = version("tilelang")
        except Exception:  # noqa: BLE001
            tl = "missing"
        return _versions({"tilelang": tl})

    def supports(self, case: Case, device: str) -> Optional[str]:
        if case.group % 16:
            return f"the TileLang fwd kernel puts the G query heads in the MMA M dim: G must be a multiple of 16 (G={case.group})"
        if case.head_dim > 128:
            return f"the TileLang fwd kernel needs D <= 128 (block_T = min(128, next_pow2(D)), NK == 1), got {case.head_dim}"
        if case.head_dim_v != case.head_dim:
            return f"the TileLang fwd kernel uses one head dim for K and V (DV={case.head_dim_v} != D={case.head_dim})"
        if case.cu_seqlens is not None:
            return "tilelang_fwd: the fixed-length kernel has no varlen; the varlen example is buggy (TileOPs PR #141)"
        return None

    def run(self, case: Case, inputs: Inputs, device: str, block_indices: Optional[torch.Tensor] = None):
        mod = _load("nsaconf_tilelang_fwd", "example_tilelang_nsa_fwd.py")
        idx = block_indices if block_indices is not None else inputs.block_indices
        if idx is None:
            raise ValueError("tilelang_fwd needs block indices")
        T = case.seq_len
        q, _, _, _, pad = full_queries(case, inputs)
        idx = given_indices_full(case, idx.to(q.device).long(), pad)
        idx = torch.where(idx < 0, torch.full_like(idx, T), idx).to(torch.int32).contiguous()
        with _rng_guard():
            o = mod.native_sparse_attention(q.contiguous(), inputs.k.contiguous(), inputs.v.contiguous(), idx,
                                            dim=case.head_dim, is_causal=True, scale=case.softmax_scale,
                                            block_size=case.block_size, groups=case.group, selected_blocks=case.top_n)
        return {"slc_o": o[:, pad:] if pad else o}
