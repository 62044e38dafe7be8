"""Relaxed-System-Lab Flash-Sparse-Attention (FSA) @1da34f3 adapters: ``fsa`` (its ops composed as its
``FlashSparseAttention`` module composes them) and ``fsa_sel`` (FSA's own selection kernel on given indices).

Loaded from a configured checkout (``oracles.config``: env ``NSACONF_FSA`` or ``[oracles.fsa] path`` in
nsaconf.toml; default ``external/Flash-Sparse-Attention``), never vendored. Imported files:
``nsa_ref/ops/{weighted_pool,compressed_attention,topk_sparse_attention}.py`` (FSA's copy of the XunhaoLai
ops) and ``fsa/ops/FSA_topk_sparse_attention.py``; package ``__init__`` files are skipped.

The module's path, reproduced: compression + top-k by ``nsa_ref``'s ``compressed_attention`` with
``parallel_topk_compute=False`` (the per-kv-head loop FSA uses); selection by ``FSA_topk_sparse_attention``
when ``G = HQ/H <= 8``, else by ``nsa_ref``'s ``topk_sparse_attention`` (FSA's own fall-back); window
``flash_attn_varlen_func(causal=True, window_size=(W, -1))`` (W + 1 keys) through the shim. The
translation (varlen packing, base-2 LSE, -1 padded ``[Hkv, ΣT, k]`` indices, the window parameter) is the
XunhaoLai adapter's (``oracles.xunhao``).

**Decode** (TQ = 1, ``fsa_preview``, what ``FlashSparseAttentionDecode.forward`` does after its
projections): the compressed cache is ``avgpool_compress`` of each sequence (the module's linear
compression is learned; the case's is the mean); ``_compressed_attention_decode(q, k_cmp, v_cmp, l, d, l', n,
cu_q, cu_cmp, 1, max_cmp_len, scale, 1, 2, query_start_index=T-1)`` gives ``cmp_o`` and the top-k (no LSE);
``_topk_sparse_attention_decode(q, k, v, topk, l', cu_q, cu_k, 1, T)`` gives ``slc_o``; the window is
``flash_attn_varlen_func(causal=False, window_size=(W, -1))`` (queries aligned to the last key); the gated
sum as in prefill. The arguments are the module's, including ``max_seqlen_k`` = the compressed length
and the query's index 0 inside its one-token sequence, which the kernels use as its position. No backward.

**Gates.** FSA's module computes one sigmoid gate triple per token shared by all heads
(``Linear(hidden, 3)`` + ``Sigmoid``, fsa/module/fsa.py:59). The combine itself is a plain weighted sum:
the adapter applies the case's per-head gates (a ``Linear(hidden, 3·HQ)`` in the same place), which
includes the shared case (equal gates across heads).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import Inputs
from nsaconf.cases.vocabulary import FORWARD_BRANCHES, GRAD_BRANCHES
from nsaconf.oracles.base import Oracle, register_oracle
from nsaconf.oracles.compat import flash_attn_shim
from nsaconf.oracles.compat.checkout_import import checkout_versions, import_from_checkout
from nsaconf.oracles.config import CHECKOUTS, checkout_status, how_to_enable
from nsaconf.oracles.xunhao import (checkout_availability, common_support, compress_kv, cu_seqlens_int32, gated_sum,
                                    idx_from_canonical, idx_to_canonical, pack, run_module, run_sel, sel_support, window_param)

_MODS: dict[str, dict] = {}
#: FSA's module uses its own selection kernel up to this GQA ratio, nsa_ref's above (fsa/module/fsa.py:139)
FSA_KERNEL_MAX_G = 8


def _load() -> dict:
    if "fsa" in _MODS:
        return _MODS["fsa"]
    path, _, _ = checkout_status("fsa")
    if path is None:
        raise ImportError("Flash-Sparse-Attention checkout not configured: " + how_to_enable("fsa"))
    flash_attn_shim.install()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pool, cmp, sel, fsa = import_from_checkout(
            path, ["nsa_ref.ops.weighted_pool", "nsa_ref.ops.compressed_attention", "nsa_ref.ops.topk_sparse_attention",
                   "fsa.ops.FSA_topk_sparse_attention"], stubs=["nsa_ref", "nsa_ref.ops", "fsa", "fsa.ops"])
    ops = {"avgpool_compress": pool.avgpool_compress, "CompressedAttention": cmp.CompressedAttention,
           "compressed_attention": cmp.compressed_attention, "topk_sparse_attention": sel.topk_sparse_attention,
           "FSA_topk_sparse_attention": fsa.FSA_topk_sparse_attention, "topk_kw": {"parallel_topk_compute": False}}
    _MODS["fsa"] = ops
    return ops


def _load_decode() -> dict:
    """``fsa_preview/ops`` (the decode module's ops) beside the prefill ops."""
    ops = _load()
    if "compressed_attention_decode" not in ops:
        path, _, _ = checkout_status("fsa")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cdec, sdec = import_from_checkout(path, ["fsa_preview.ops.compressed_attention_decode",
                                                     "fsa_preview.ops.selected_attention_decode"],
                                              stubs=["fsa_preview", "fsa_preview.ops"])
        ops.update(compressed_attention_decode=cdec._compressed_attention_decode,
                   topk_sparse_attention_decode=sdec._topk_sparse_attention_decode)
    return ops


def fsa_decode(ops: dict, case: Case, x: Inputs) -> dict:
    """TQ = 1 as ``FlashSparseAttentionDecode.forward`` composes its ops (module docstring): q ``[B, HQ, D]``
    with ``cu_q = [0, 1, ..., B]``, packed K/V ``[B*T, H, D]``; returns ``cmp_o``, ``topk_idx``, ``slc_o``,
    ``swa_o``, ``o`` as ``[B, 1, ...]``."""
    dev = x.q.device
    B, T = case.batch, case.seq_len
    l, d, ls, n, scale = case.cmp_block, case.cmp_stride, case.block_size, case.top_n, case.softmax_scale
    cu_k = cu_seqlens_int32(case, dev)
    cu_q = torch.arange(B + 1, dtype=torch.int32, device=dev)
    kp, vp = pack(case, x.k).contiguous(), pack(case, x.v).contiguous()
    k_cmp, v_cmp, cu_cmp = compress_kv(ops, kp, vp, cu_k, l, d)
    mx_cmp = max(int((cu_cmp[1:] - cu_cmp[:-1]).max().item()), 1)
    q1 = x.q[:, 0].contiguous()
    cmp_o, topk = ops["compressed_attention_decode"](q1, k_cmp, v_cmp, l, d, ls, n, cu_q, cu_cmp.to(torch.int32), 1, mx_cmp,
                                                     scale, 1, 2, query_start_index=T - 1)
    given = x.block_indices if case.block_indices == "random" else None
    sel = topk if given is None else idx_from_canonical(case, given)
    slc_o = ops["topk_sparse_attention_decode"](q1, kp, vp, sel.to(torch.int32).contiguous(), ls, cu_q, cu_k, 1, T, scale)
    out = {"cmp_o": cmp_o[:, None], "topk_idx": idx_to_canonical(case, topk), "slc_o": slc_o[:, None]}
    if case.window > 0:
        swa = flash_attn_shim.flash_attn_varlen_func(q1, kp, vp, cu_q, cu_k, 1, T, causal=False,
                                                     window_size=(window_param(case), -1), softmax_scale=scale)
        out["swa_o"] = swa[:, None]
    out["o"] = gated_sum(case, out, x.g_cmp, x.g_slc, x.g_swa)
    return out


def _module_sel(ops, case: Case):
    """The selection the module uses for the case's G (FSA kernel for G <= 8)."""
    fn = ops["FSA_topk_sparse_attention"] if case.group <= FSA_KERNEL_MAX_G else ops["topk_sparse_attention"]
    return lambda q, k, v, idx, ls, cu, scale: fn(q, k, v, idx, ls, cu, scale)


def _fsa_sel(ops):
    return lambda q, k, v, idx, ls, cu, scale: ops["FSA_topk_sparse_attention"](q, k, v, idx, ls, cu, scale)


_AVAIL = "Relaxed-System-Lab Flash-Sparse-Attention"


@register_oracle
class Fsa(Oracle):
    """FSA's module path: nsa_ref compression + top-k (per-kv-head loop), FSA selection kernel for G <= 8
    (nsa_ref's above), flash-attn window, the gated sum with per-head gates (module docstring)."""

    name = "fsa"
    layer = "e2e"
    branches = FORWARD_BRANCHES + GRAD_BRANCHES
    devices = ("cuda",)
    dtypes = ("float16", "bfloat16")
    fixed_conventions = {"cmp_mask": "end_inclusive", "window_keys": "w_plus_1"}
    supported_conventions = {"gates": ("raw", "sigmoid")}  # the gated sum / combine is the adapter's
    description = (f"Flash-Sparse-Attention@{CHECKOUTS['fsa'].commit[:7]} module path (nsa_ref compression + top-k, "
                   f"FSA selection kernel for G <= {FSA_KERNEL_MAX_G}), window via flash-attn/shim")

    def availability(self) -> Optional[str]:
        return checkout_availability("fsa", _AVAIL)

    def versions(self) -> dict:
        return checkout_versions("fsa")

    def supports(self, case: Case, device: str) -> Optional[str]:
        why = common_support(case, "FSA", decode=True)
        if why:
            return why
        if case.group > 16:
            return f"FSA's module supports GQA ratios 1..16 (FSA kernel for <= {FSA_KERNEL_MAX_G}), G = {case.group}"
        if case.q_len == 1 < case.seq_len and case.batch > 1:
            return ("FSA's decode asserts one query in all (q_len == 1, fsa_preview/ops/compressed_attention_decode.py:36): "
                    f"one sequence per call, B = {case.batch}")
        return None

    def branch_supports(self, case: Case, branch: str) -> Optional[str]:
        if case.q_len < case.seq_len and branch == "cmp_lse":
            return "FSA's _compressed_attention_decode returns no LSE"
        if case.q_len < case.seq_len and branch in GRAD_BRANCHES:
            return "FSA's decode module (fsa_preview) has no backward (inference only)"
        return None

    def run(self, case: Case, inputs: Inputs, device: str, block_indices: Optional[torch.Tensor] = None):
        if case.q_len < case.seq_len:
            ops = _load_decode()
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                return fsa_decode(ops, case, inputs)
        ops = _load()
        return run_module(ops, case, inputs, _module_sel(ops, case))


@register_oracle
class FsaSel(Oracle):
    """FSA's ``FSA_topk_sparse_attention`` alone on given block indices (``slc_o``), any G (the module
    uses it for G <= 8)."""

    name = "fsa_sel"
    layer = "kernel"
    branches = ("slc_o",)
    devices = ("cuda",)
    dtypes = ("float16", "bfloat16")
    needs_block_indices = True
    description = f"Flash-Sparse-Attention@{CHECKOUTS['fsa'].commit[:7]} FSA_topk_sparse_attention on given block indices"

    def availability(self) -> Optional[str]:
        return checkout_availability("fsa", _AVAIL)

    def versions(self) -> dict:
        return checkout_versions("fsa")

    def supports(self, case: Case, device: str) -> Optional[str]:
        return sel_support(case, "FSA")

    def run(self, case: Case, inputs: Inputs, device: str, block_indices: Optional[torch.Tensor] = None):
        ops = _load()
        return {"slc_o": run_sel(case, inputs, block_indices, _fsa_sel(ops))}
