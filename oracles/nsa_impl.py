"""tilde-research/nsa-impl @623e2c5 adapter (``nsa_impl``): ``nsa.nsa_func`` end to end plus its branches.

Loaded from a configured checkout (``oracles.config``: env ``NSACONF_NSA_IMPL`` or ``[oracles.nsa_impl]
path`` in nsaconf.toml; default ``external/nsa-impl``). Never the MaxWED567 fork (a malware lure).
The repo has no package: ``nsa/`` is put on ``sys.path`` while ``nsa.py`` (flat imports of
``compression``/``selection``) is executed, then removed.

**Compatibility layer** (everything else is nsa-impl's own code):

* ``flash_attn`` absent -> ``oracles.compat.flash_attn_shim`` is installed as ``flash_attn``;
* FLA >= 0.5.2 changed ``parallel_nsa_topk``: it now needs ``TK`` and an LSE ``[B,TQ,HQ]``, while
  nsa-impl passes no ``TK`` and flex's ``[B,HQ,M]`` LSE (a TypeError / shape assert). The name
  ``parallel_nsa_topk`` inside nsa-impl's module is rebound to a wrapper that adds ``TK = M`` (nsa_func
  assumes M == N) and transposes nsa-impl's *own* LSE to ``[B,M,HQ]``: the top-k still uses the LSE
  of nsa-impl's compression (its bug propagates), only the calling convention is adapted.
* ``compression_attention``, ``parallel_nsa_topk``, ``selection_attention`` and ``flash_attn_func``
  are wrapped to record their outputs during one ``nsa_func`` call: ``cmp_o``/``cmp_lse``,
  ``topk_idx``, ``slc_o``, ``swa_o``.

Conventions: compression mask ``q_idx <= (kv_idx+1)*BS - 1``, i.e. **anti-causal** (current and future
blocks; tilde-research/nsa-release#3): on ``end_inclusive`` cases ``cmp_*`` must FAIL -- that is the
harness working. ``w = 0`` gives *full causal* attention in nsa-impl's window branch: canonical w = 0
means no window, so ``g_swa = 0`` is passed. A ``w_plus_1`` window is passed as w+1 keys. Its
compression ignores ``scale`` (flex default 1/sqrt(D)). Mask uses ``N//BS`` blocks, pooling
``ceil(N/BS)``: T must be a multiple of BS.
"""
from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from typing import Optional

import torch

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import Inputs
from nsaconf.cases.vocabulary import FORWARD_BRANCHES
from nsaconf.oracles.base import Oracle, register_oracle
from nsaconf.oracles.compat import flash_attn_shim
from nsaconf.oracles.compat.common import is_pow2, next_pow2, window_keys_count
from nsaconf.oracles.config import checkout_status, how_to_enable

_MOD: Optional[types.ModuleType] = None


class _Recorder:
    def __init__(self):
        self.data: dict[str, torch.Tensor] = {}


def _load() -> types.ModuleType:
    global _MOD
    if _MOD is not None:
        return _MOD
    path, _, _ = checkout_status("nsa_impl")
    if path is None:
        raise ImportError("nsa-impl checkout not configured: " + how_to_enable("nsa_impl"))
    flash_attn_shim.install()
    src = path / "nsa"
    saved = {n: sys.modules.pop(n, None) for n in ("compression", "selection")}
    sys.path.insert(0, str(src))
    try:
        spec = importlib.util.spec_from_file_location("nsaconf_nsa_impl", src / "nsa.py")
        mod = importlib.util.module_from_spec(spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(src))
        for n, m in saved.items():
            sys.modules.pop(n, None)
            if m is not None:
                sys.modules[n] = m
    rec = _Recorder()
    orig_cmp, orig_topk, orig_sel, orig_fa = (mod.compression_attention, mod.parallel_nsa_topk,
                                              mod.selection_attention, mod.flash_attn_func)

    def compression_attention(q, k_cmp, v_cmp, block_mask):
        o, lse = orig_cmp(q, k_cmp, v_cmp, block_mask)
        rec.data["cmp_o"], rec.data["cmp_lse"] = o, lse  # lse [B, HQ, M] natural log (flex)
        return o, lse

    def parallel_nsa_topk(q, k, lse, block_counts, block_size=64, scale=None, cu_seqlens=None, **kw):
        # compat: FLA >= 0.5.2 wants TK and a [B, TQ, HQ] LSE
        if lse is not None and lse.dim() == 3 and lse.shape[1] == q.shape[2] and lse.shape[2] == q.shape[1]:
            lse = lse.transpose(1, 2).contiguous().float()
        idx = orig_topk(q=q, k=k, TK=q.shape[1], lse=lse, block_counts=block_counts, block_size=block_size,
                        scale=scale, cu_seqlens=cu_seqlens)
        rec.data["topk_idx"] = idx
        return idx

    def selection_attention(*a, **kw):
        o = orig_sel(*a, **kw)
        rec.data["slc_o"] = o
        return o

    def flash_attn_func(*a, **kw):
        o = orig_fa(*a, **kw)
        rec.data["swa_o"] = o
        return o

    mod.compression_attention = compression_attention
    mod.parallel_nsa_topk = parallel_nsa_topk
    mod.selection_attention = selection_attention
    mod.flash_attn_func = flash_attn_func
    mod._nsaconf_recorder = rec
    _MOD = mod
    return mod


@register_oracle
class NsaImpl(Oracle):
    """nsa-impl ``nsa_func`` (flex compression, FLA Triton top-k + selection, flash-attn window): ``o`` and
    each branch, through the compatibility layer described in the module docstring."""

    name = "nsa_impl"
    layer = "e2e"
    branches = FORWARD_BRANCHES
    devices = ("cuda",)
    dtypes = ("float16", "bfloat16")
    description = "tilde-research/nsa-impl@623e2c5 nsa_func (+ branches) via FLA 0.6 compat layer; anti-causal compression (expected FAIL)"

    def availability(self) -> Optional[str]:
        path, _, _ = checkout_status("nsa_impl")
        if path is None:
            return "nsa-impl checkout not found: " + how_to_enable("nsa_impl")
        if importlib.util.find_spec("fla") is None:
            return "nsa-impl needs FLA: pip install fla-core==0.6.0"
        if importlib.util.find_spec("triton") is None:
            return "nsa-impl is GPU-only (Triton, flex_attention compile): needs triton and a CUDA GPU"
        return None

    def versions(self) -> dict:
        path, commit, warn = checkout_status("nsa_impl")
        v = {"nsa_impl_checkout": str(path) if path else "missing", "nsa_impl_commit": commit or "unknown",
             "torch": torch.__version__, "flash_attn": flash_attn_shim.description()}
        try:
            from importlib.metadata import version
            v["fla-core"] = version("fla-core")
        except Exception:  # noqa: BLE001
            pass
        if warn:
            v["nsa_impl_commit_warning"] = warn
        return v

    def supports(self, case: Case, device: str) -> Optional[str]:
        if not (case.cmp_block == case.cmp_stride == case.block_size):
            return f"nsa-impl uses one block_size for l, d and l' (got l={case.cmp_block}, d={case.cmp_stride}, l'={case.block_size})"
        if case.cmp_mask not in ("end_inclusive", "anti_causal"):
            return (f"nsa-impl implements one compression mask (meant as end_inclusive, actually anti_causal); "
                    f"case has {case.cmp_mask}")
        if case.forced_blocks != "initial_local":
            return f"nsa-impl's top-k is FLA 0.6 parallel_nsa_topk (forced blocks initial_local), case has {case.forced_blocks}"
        if not (is_pow2(case.group) and case.group >= 16):
            return f"nsa-impl's FLA kernels need G = HQ/H a power of 2 >= 16 (G={case.group})"
        if case.seq_len % case.block_size:
            return f"nsa-impl needs T a multiple of block_size (mask uses N//BS blocks, pooling ceil): T={case.seq_len}, BS={case.block_size}"
        if case.q_len != case.seq_len:
            return "nsa_func has no query offset: it needs TQ == T (no decode)"
        if case.cu_seqlens is not None:
            return "nsa_func has no varlen (cu_seqlens) path"
        if case.head_dim_v != case.head_dim:
            return f"nsa_func asserts v has the head dim of q (DV={case.head_dim_v} != D={case.head_dim})"
        if case.head_dim > 256:
            return f"FLA Triton / flash-attn need D <= 256, got {case.head_dim}"
        if case.block_size < 16 or not is_pow2(case.block_size):
            return f"nsa-impl / FLA kernels need block_size a power of 2 >= 16, got {case.block_size}"
        if not is_pow2(case.top_n):
            return f"FLA's Triton top-k selects next_pow2(n) = {next_pow2(case.top_n)} blocks for n = {case.top_n} (n must be a power of 2)"
        if case.block_size < 2 * next_pow2(case.top_n):
            return f"FLA parallel_nsa_topk asserts block_size >= 2*next_pow2(n) ({case.block_size} < {2 * next_pow2(case.top_n)})"
        if case.block_indices != "topk":
            return "nsa_func computes its own top-k; given (random) block indices cannot be passed"
        return None

    def run(self, case: Case, inputs: Inputs, device: str, block_indices: Optional[torch.Tensor] = None):
        mod = _load()
        rec = mod._nsaconf_recorder
        rec.data.clear()
        w = window_keys_count(case) if case.window > 0 else 0
        g_swa = inputs.g_swa if w else torch.zeros_like(inputs.g_swa)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            o = mod.nsa_func(inputs.q.contiguous(), inputs.k.contiguous(), inputs.v.contiguous(), inputs.g_cmp, inputs.g_slc,
                             g_swa, block_count=case.top_n, block_size=case.block_size, window_size=w, scale=case.softmax_scale)
        d = dict(rec.data)
        out = {"cmp_o": d["cmp_o"], "cmp_lse": d["cmp_lse"].transpose(1, 2).float(), "topk_idx": d["topk_idx"].long(),
               "slc_o": d["slc_o"], "o": o}
        if w:
            out["swa_o"] = d["swa_o"]
        return out
