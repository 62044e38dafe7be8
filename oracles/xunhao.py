"""XunhaoLai/native-sparse-attention-triton @9bea856 adapters: ``xunhao`` (its ops composed as its
``NativeSparseAttention`` module composes them) and ``xunhao_sel`` (its selection kernel on given indices).

Loaded from a configured checkout (``oracles.config``: env ``NSACONF_XUNHAO`` or ``[oracles.xunhao] path``
in nsaconf.toml; default ``external/native-sparse-attention-triton``), never vendored. Only the three
Triton op files are imported (``native_sparse_attention/ops/triton/{weighted_pool,compressed_attention,
topk_sparse_attention}.py``); the package ``__init__`` files are skipped (``compat.checkout_import``).

**Translation** (everything the module does outside these ops, done here):

* layout: the API is varlen only. ``[B,T,H,D]`` becomes packed ``[B*T,H,D]`` with ``cu_seqlens =
  [0, T, 2T, ...]`` (int32); a ``cu_seqlens`` case is passed as is. Outputs are unpacked.
* compression: ``avgpool_compress`` (the mean over ``l`` keys with stride ``d``; only whole blocks, which
  are the only ones an ``end_inclusive`` query can see) for K and V.
* ``cmp_o``/``cmp_lse``: ``CompressedAttention.apply`` (the autograd function ``compressed_attention``
  wraps); its LSE is base 2 (``log2 sum 2^(s·log2 e)``): natural = base-2 · ln 2; rows that see no block
  are o = 0, LSE = -inf (canonical).
* ``topk_idx``: ``compressed_attention(..., init_blocks=1, local_blocks=2)``: ``[Hkv, ΣT, k]`` int32,
  ascending, future blocks -1 (at the end), ``k = min(n, ceil(T_max / l'))`` columns: padded to ``n`` with
  -1 and permuted to ``[B,T,H,n]``.
* ``slc_o``: ``topk_sparse_attention`` on those indices (or on the case's random indices, which are
  ascending with -1 last, its required format).
* ``swa_o``: the module calls ``flash_attn_varlen_func(causal=True, window_size=(W, -1))``, W + 1 keys:
  through ``compat.flash_attn_shim`` with ``W = w`` for a ``w_plus_1`` case and ``W = w - 1`` for a ``w``
  case (the module's own parameter set so that its window is the case's).
* ``o``: the module's gated sum ``g_cmp·cmp + g_slc·slc + g_swa·swa``; its gates are sigmoid outputs of a
  per-head linear layer: raw gates (``gates="raw"``) are used as given, ``gates="sigmoid"`` gets the sigmoid.
* gradients (``dq`` ... ``dg_swa``): autograd through the same composition (its Triton backward kernels
  for compression and selection, avgpool's backward, the shim's window).

Conventions (read from the code, NSA_IMPLEMENTATIONS.md §7): compression ``end_inclusive``; forced blocks
block 0 + the current and the previous block (``initial_local``, counted inside ``n``); importance = sum over
the group of the compression probabilities, overlap-weighted (Eq. 9 ``+m-n``); selection ``s <= t``.
Limits (asserted by the code): fp16/bf16; ``l`` in {16, 32, 64, 128}, ``l % d == 0``; ``l'`` in {32, 64, 128,
256}; DV = D; TQ = T (the prefill ops) or TQ = 1 (``nsa_decode``: ``compressed_attention_decode``, which
asserts ``l' % l == 0`` and returns no LSE, and ``topk_sparse_attention_decode``; no backward).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from nsaconf.cases.conventions import GATE_RULES
from nsaconf.cases.model import Case
from nsaconf.cases.tensors import GRAD_INPUTS, Inputs, grad_branches, output_cotangent
from nsaconf.cases.vocabulary import FORWARD_BRANCHES, GRAD_BRANCHES
from nsaconf.oracles.base import Oracle, gradients_wanted, register_oracle
from nsaconf.oracles.compat import flash_attn_shim
from nsaconf.oracles.compat.checkout_import import checkout_versions, import_from_checkout
from nsaconf.oracles.config import CHECKOUTS, checkout_status, how_to_enable

XUNHAO_OPS = "native_sparse_attention.ops.triton"
_MODS: dict[str, dict] = {}


# ------------------------------------------------------------------------------------------- translation
def pack(case: Case, x: torch.Tensor) -> torch.Tensor:
    """``[B,T,...]`` -> packed ``[B*T,...]`` (a ``cu_seqlens`` case has B = 1: ``x[0]``)."""
    return x.reshape((-1,) + tuple(x.shape[2:]))


def unpack(case: Case, x: torch.Tensor) -> torch.Tensor:
    """Packed ``[B*T,...]`` -> ``[B,T,...]``."""
    return x.reshape((case.batch, -1) + tuple(x.shape[1:]))


def cu_seqlens_int32(case: Case, device) -> torch.Tensor:
    """The varlen ``cu_seqlens`` (int32): the case's own, else ``[0, T, 2T, ..., B*T]``."""
    cu = case.cu_seqlens if case.cu_seqlens is not None else tuple(b * case.seq_len for b in range(case.batch + 1))
    return torch.tensor(cu, dtype=torch.int32, device=device)


def max_seqlen(case: Case) -> int:
    return max(e - s for s, e in case.sequences)


def idx_to_canonical(case: Case, idx: torch.Tensor, sentinel_from: Optional[int] = None) -> torch.Tensor:
    """``[Hkv, ΣT, k]`` block ids -> canonical ``[B,T,H,n]`` int64: ids ``>= sentinel_from`` (a padding
    sentinel) and negative ids become -1; fewer than ``n`` columns are padded with -1, more are an error."""
    idx = idx.long()
    if sentinel_from is not None:
        idx = idx.masked_fill(idx >= sentinel_from, -1)
    idx = idx.masked_fill(idx < 0, -1)
    k = idx.shape[-1]
    if k > case.top_n:
        raise ValueError(f"implementation returned {k} block ids per query, case has n = {case.top_n}")
    if k < case.top_n:
        idx = torch.cat([idx, idx.new_full(idx.shape[:-1] + (case.top_n - k,), -1)], -1)
    return unpack(case, idx.permute(1, 0, 2).contiguous())


def idx_from_canonical(case: Case, idx: torch.Tensor) -> torch.Tensor:
    """Canonical ``[B,T,H,n]`` -> ``[Hkv, ΣT, n]`` int32 (the varlen kernels' layout), ascending with -1 last."""
    big = torch.iinfo(torch.int64).max
    idx = idx.long()
    idx = idx.masked_fill(idx < 0, big).sort(-1).values
    idx = idx.masked_fill(idx == big, -1)
    return pack(case, idx).permute(1, 0, 2).to(torch.int32).contiguous()


def window_param(case: Case) -> int:
    """``W`` of flash-attn's ``window_size=(W, -1)`` (W + 1 keys) giving the case's window."""
    return case.window if case.window_keys == "w_plus_1" else case.window - 1


def gate_values(case: Case, g: torch.Tensor) -> torch.Tensor:
    """The multiplier the module applies to a branch: ``GATE_RULES[case.gates](g)`` (the gate itself, or its
    sigmoid for ``gates="sigmoid"``)."""
    return GATE_RULES[case.gates](g)


def gated_sum(case: Case, out: dict, g_cmp: torch.Tensor, g_slc: torch.Tensor, g_swa: torch.Tensor) -> torch.Tensor:
    """The module's combine ``o = f(g_cmp)·cmp_o + f(g_slc)·slc_o (+ f(g_swa)·swa_o with a window)``, ``f =
    gate_values``; gates ``[B, TQ, HQ]``, branches of ``out`` ``[B, TQ, HQ, DV]``."""
    o = gate_values(case, g_cmp)[..., None] * out["cmp_o"] + gate_values(case, g_slc)[..., None] * out["slc_o"]
    if case.window > 0:
        o = o + gate_values(case, g_swa)[..., None] * out["swa_o"]
    return o


def compress_kv(ops: dict, kp: torch.Tensor, vp: torch.Tensor, cu: torch.Tensor, l: int, d: int) -> tuple:
    """``avgpool_compress`` of packed K and V ``[ΣT, H, D]`` (the mean of each whole block of ``l`` keys, stride
    ``d``, per sequence of ``cu``): ``(k_cmp, v_cmp, cu_cmp)``."""
    k_cmp, cu_cmp = ops["avgpool_compress"](kp, None, cu, l, d)
    v_cmp, _ = ops["avgpool_compress"](vp, None, cu, l, d)
    return k_cmp, v_cmp, cu_cmp


def common_support(case: Case, label: str, decode: bool = False) -> Optional[str]:
    """Limits shared by the XunhaoLai ops and FSA's copy of them (asserts in the code); ``decode``: the
    adapter has a path for TQ = 1 (the decode ops of XunhaoLai, or FSA's ``fsa_preview``)."""
    if case.cmp_mask != "end_inclusive":
        return f"{label}'s compression mask is end_inclusive (c*d + l - 1 <= t), case has {case.cmp_mask}"
    if case.forced_blocks != "initial_local":
        return f"{label} forces block 0 + the two local blocks (init_blocks=1, local_blocks=2), case has {case.forced_blocks}"
    if case.cmp_block not in (16, 32, 64, 128):
        return f"{label}'s compression asserts kernel_size (l) in {{16, 32, 64, 128}}, got {case.cmp_block}"
    if case.block_size not in (32, 64, 128, 256):
        return f"{label}'s selection kernel asserts block_size (l') in {{32, 64, 128, 256}}, got {case.block_size}"
    if case.head_dim_v != case.head_dim:
        return f"{label}'s compressed attention writes o like q: DV must equal D (D={case.head_dim}, DV={case.head_dim_v})"
    if case.head_dim > 256:
        return f"{label}'s kernels take head dims up to 256, got {case.head_dim}"
    if case.q_len != case.seq_len and not (decode and case.q_len == 1 and case.cu_seqlens is None):
        if decode:
            return f"{label}'s prefill ops need TQ == T and its decode ops TQ == 1 (no chunked prefill): TQ={case.q_len}, T={case.seq_len}"
        return f"{label}'s prefill ops need TQ == T (its decode ops are not adapted): TQ={case.q_len}, T={case.seq_len}"
    return None


def run_module(ops, case: Case, inputs: Inputs, sel) -> dict[str, torch.Tensor]:
    """The whole composition (``nsa_forward``, then ``nsa_grads`` when the case wants gradients) with the
    selection kernel ``sel``; the case's own indices when it gives them (``block_indices="random"``)."""
    given = inputs.block_indices if case.block_indices == "random" else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = nsa_forward(ops, case, inputs.q, inputs.k, inputs.v, inputs.g_cmp, inputs.g_slc, inputs.g_swa, given, sel)
    if gradients_wanted(case):
        out.update(nsa_grads(ops, case, inputs, given, sel))
    return out


def checkout_availability(key: str, label: str) -> Optional[str]:
    import importlib.util
    path, _, _ = checkout_status(key)
    if path is None:
        return f"{label} checkout not found: " + how_to_enable(key)
    if importlib.util.find_spec("triton") is None:
        return f"{label} is Triton-only: needs triton and a CUDA GPU (run with --device cuda)"
    if importlib.util.find_spec("einops") is None:
        return f"{label} imports einops: pip install einops"
    return None


# ------------------------------------------------------------------------------------------- the composition
def nsa_forward(ops: dict, case: Case, q, k, v, g_cmp, g_slc, g_swa, given: Optional[torch.Tensor], sel_fn) -> dict:
    """Every branch of the module's forward on canonical tensors; ``ops`` holds ``avgpool_compress``,
    ``CompressedAttention``, ``compressed_attention``; ``sel_fn(q, k, v, idx, block_size, cu, scale)`` is the
    selection kernel; differentiable where the ops are."""
    dev = q.device
    l, d, ls, n, scale = case.cmp_block, case.cmp_stride, case.block_size, case.top_n, case.softmax_scale
    cu = cu_seqlens_int32(case, dev)
    mx = max_seqlen(case)
    qp, kp, vp = (pack(case, t).contiguous() for t in (q, k, v))
    k_cmp, v_cmp, cu_cmp = compress_kv(ops, kp, vp, cu, l, d)
    mx_cmp = max(int((cu_cmp[1:] - cu_cmp[:-1]).max().item()), 1)
    cmp_o, lse2 = ops["CompressedAttention"].apply(qp, k_cmp, v_cmp, l, d, cu, cu_cmp, mx, mx_cmp, scale)
    with torch.no_grad():
        _, topk = ops["compressed_attention"](qp.detach(), k_cmp.detach(), v_cmp.detach(), l, d, ls, n, cu, cu_cmp, mx, mx_cmp,
                                              scale, 1, 2, **ops.get("topk_kw", {}))
    sel = topk if given is None else idx_from_canonical(case, given)
    slc_o = sel_fn(qp, kp, vp, sel.to(torch.int32).contiguous(), ls, cu, scale)
    out = {"cmp_o": unpack(case, cmp_o), "cmp_lse": unpack(case, (lse2.float() * math.log(2.0)).transpose(0, 1)),
           "topk_idx": idx_to_canonical(case, topk), "slc_o": unpack(case, slc_o)}
    if case.window > 0:
        swa = flash_attn_shim.flash_attn_varlen_func(qp, kp, vp, cu, cu, mx, mx, causal=True,
                                                     window_size=(window_param(case), -1), softmax_scale=scale)
        out["swa_o"] = unpack(case, swa)
    out["o"] = gated_sum(case, out, g_cmp, g_slc, g_swa)
    return out


def nsa_decode(ops: dict, case: Case, x: Inputs) -> dict:
    """TQ = 1 through the decode ops the module's inference path uses: ``compressed_attention_decode`` (torch;
    ``cmp_o`` and its top-k, no LSE), ``topk_sparse_attention_decode``, the window through the shim
    (queries aligned to the last key, as flash-attn does), the gated sum. Padded ``[B, T, H, D]`` caches
    with ``seqlens = T``; the compressed cache is ``avgpool_compress`` of each sequence."""
    dev = x.q.device
    B, T = case.batch, case.seq_len
    l, d, ls, n, scale = case.cmp_block, case.cmp_stride, case.block_size, case.top_n, case.softmax_scale
    cu = cu_seqlens_int32(case, dev)
    k_cmp, v_cmp, cu_cmp = compress_kv(ops, pack(case, x.k).contiguous(), pack(case, x.v).contiguous(), cu, l, d)
    k_cmp, v_cmp = unpack(case, k_cmp), unpack(case, v_cmp)
    seqlens = torch.full((B,), T, dtype=torch.int32, device=dev)
    cseq = (cu_cmp[1:] - cu_cmp[:-1]).to(torch.int32)
    q1 = x.q[:, 0].contiguous()
    cmp_o, topk = ops["compressed_attention_decode"](q1, k_cmp, v_cmp, seqlens, cseq, l, d, ls, n, 1, 2, scale)
    given = x.block_indices if case.block_indices == "random" else None
    sel = topk if given is None else idx_from_canonical(case, given).reshape(case.heads_kv, B, -1)
    slc_o = ops["topk_sparse_attention_decode"](q1, x.k.contiguous(), x.v.contiguous(), sel.to(torch.int32).contiguous(), ls,
                                                seqlens, scale)
    out = {"cmp_o": cmp_o[:, None], "topk_idx": idx_to_canonical(case, topk.reshape(case.heads_kv, B, -1)), "slc_o": slc_o[:, None]}
    if case.window > 0:
        out["swa_o"] = flash_attn_shim.flash_attn_func(x.q, x.k, x.v, causal=True, window_size=(window_param(case), -1),
                                                       softmax_scale=scale)
    out["o"] = gated_sum(case, out, x.g_cmp, x.g_slc, x.g_swa)
    return out


def nsa_grads(ops: dict, case: Case, inputs: Inputs, given, sel_fn) -> dict:
    """Gradients of ``sum(o * dO)`` by autograd through ``nsa_forward`` (no gradient through the top-k)."""
    leaves = {f: getattr(inputs, f).detach().clone().contiguous().requires_grad_(True) for f in set(GRAD_INPUTS.values())}
    names = grad_branches(case)
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")
        o = nsa_forward(ops, case, leaves["q"], leaves["k"], leaves["v"], leaves["g_cmp"], leaves["g_slc"], leaves["g_swa"],
                        given, sel_fn)["o"]
        d_o = output_cotangent(case, o.device).to(o.dtype)
        got = torch.autograd.grad(o, [leaves[GRAD_INPUTS[b]] for b in names], d_o, allow_unused=True)
    return {b: (torch.zeros_like(leaves[GRAD_INPUTS[b]]) if g is None else g.detach()) for b, g in zip(names, got)}


def _load_xunhao() -> dict:
    if "xunhao" in _MODS:
        return _MODS["xunhao"]
    path, _, _ = checkout_status("xunhao")
    if path is None:
        raise ImportError("XunhaoLai checkout not configured: " + how_to_enable("xunhao"))
    flash_attn_shim.install()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pool, cmp, sel = import_from_checkout(
            path, [f"{XUNHAO_OPS}.weighted_pool", f"{XUNHAO_OPS}.compressed_attention", f"{XUNHAO_OPS}.topk_sparse_attention"],
            stubs=["native_sparse_attention", "native_sparse_attention.ops", XUNHAO_OPS])
    ops = {"avgpool_compress": pool.avgpool_compress, "CompressedAttention": cmp.CompressedAttention,
           "compressed_attention": cmp.compressed_attention, "topk_sparse_attention": sel.topk_sparse_attention}
    cdec, sdec = import_from_checkout(path, ["native_sparse_attention.ops.torch.compressed_attention_decode",
                                             f"{XUNHAO_OPS}.topk_sparse_attention_decode"],
                                      stubs=["native_sparse_attention.ops.torch"])
    ops.update(compressed_attention_decode=cdec.compressed_attention_decode,
               topk_sparse_attention_decode=sdec.topk_sparse_attention_decode)
    _MODS["xunhao"] = ops
    return ops


def _xunhao_sel(ops):
    return lambda q, k, v, idx, ls, cu, scale: ops["topk_sparse_attention"](q, k, v, idx, ls, cu, scale)


@register_oracle
class Xunhao(Oracle):
    """XunhaoLai native-sparse-attention-triton: avgpool compression, ``compressed_attention`` (cmp_o,
    base-2 LSE, its top-k), ``topk_sparse_attention``, the flash-attn window, the gated sum (module docstring)."""

    name = "xunhao"
    layer = "e2e"
    branches = FORWARD_BRANCHES + GRAD_BRANCHES
    devices = ("cuda",)
    dtypes = ("float16", "bfloat16")
    fixed_conventions = {"cmp_mask": "end_inclusive", "window_keys": "w_plus_1"}
    supported_conventions = {"gates": ("raw", "sigmoid")}  # the gated sum / combine is the adapter's
    description = f"XunhaoLai native-sparse-attention-triton@{CHECKOUTS['xunhao'].commit[:7]} ops (compression + top-k + selection), window via flash-attn/shim"

    def availability(self) -> Optional[str]:
        return checkout_availability("xunhao", "XunhaoLai native-sparse-attention-triton")

    def versions(self) -> dict:
        return checkout_versions("xunhao")

    def supports(self, case: Case, device: str) -> Optional[str]:
        why = common_support(case, "XunhaoLai", decode=True)
        if why is None and case.q_len == 1 < case.seq_len and case.block_size % case.cmp_block:
            return f"XunhaoLai's compressed_attention_decode asserts block_size % kernel_size == 0 (l'={case.block_size}, l={case.cmp_block})"
        return why

    def branch_supports(self, case: Case, branch: str) -> Optional[str]:
        if case.q_len < case.seq_len and branch == "cmp_lse":
            return "XunhaoLai's compressed_attention_decode returns no LSE"
        if case.q_len < case.seq_len and branch in GRAD_BRANCHES:
            return "XunhaoLai's decode ops have no backward (inference only)"
        return None

    def run(self, case: Case, inputs: Inputs, device: str, block_indices: Optional[torch.Tensor] = None):
        ops = _load_xunhao()
        if case.q_len < case.seq_len:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                return nsa_decode(ops, case, inputs)
        return run_module(ops, case, inputs, _xunhao_sel(ops))


@register_oracle
class XunhaoSel(Oracle):
    """XunhaoLai's ``topk_sparse_attention`` alone on given block indices (``slc_o``): ``[Hkv, ΣT, n]``
    int32, ascending with -1 last (its required format)."""

    name = "xunhao_sel"
    layer = "kernel"
    branches = ("slc_o",)
    devices = ("cuda",)
    dtypes = ("float16", "bfloat16")
    needs_block_indices = True
    description = f"XunhaoLai native-sparse-attention-triton@{CHECKOUTS['xunhao'].commit[:7]} topk_sparse_attention on given block indices"

    def availability(self) -> Optional[str]:
        return checkout_availability("xunhao", "XunhaoLai native-sparse-attention-triton")

    def versions(self) -> dict:
        return checkout_versions("xunhao")

    def supports(self, case: Case, device: str) -> Optional[str]:
        return sel_support(case, "XunhaoLai")

    def run(self, case: Case, inputs: Inputs, device: str, block_indices: Optional[torch.Tensor] = None):
        ops = _load_xunhao()
        return {"slc_o": run_sel(case, inputs, block_indices, _xunhao_sel(ops))}


def sel_support(case: Case, label: str) -> Optional[str]:
    if case.block_size not in (32, 64, 128, 256):
        return f"{label}'s selection kernel asserts block_size (l') in {{32, 64, 128, 256}}, got {case.block_size}"
    if case.head_dim_v != case.head_dim:
        return f"{label}'s selection kernel writes o like q: DV must equal D (D={case.head_dim}, DV={case.head_dim_v})"
    if case.head_dim > 256:
        return f"{label}'s kernels take head dims up to 256, got {case.head_dim}"
    if case.q_len != case.seq_len:
        return f"{label}'s varlen selection kernel asserts q_len == k_len: TQ={case.q_len}, T={case.seq_len}"
    return None


def run_sel(case: Case, inputs: Inputs, block_indices: Optional[torch.Tensor], sel_fn) -> torch.Tensor:
    idx = block_indices if block_indices is not None else inputs.block_indices
    if idx is None:
        raise ValueError("a selection kernel needs block indices")
    cu = cu_seqlens_int32(case, inputs.q.device)
    with torch.no_grad():
        o = sel_fn(pack(case, inputs.q).contiguous(), pack(case, inputs.k).contiguous(), pack(case, inputs.v).contiguous(),
                   idx_from_canonical(case, idx.to(inputs.q.device)), case.block_size, cu, case.softmax_scale)
    return unpack(case, o)
