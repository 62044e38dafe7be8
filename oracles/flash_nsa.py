"""mdy666 Scalable-Flash-Native-Sparse-Attention (``flash_nsa``) @fcf117c adapter: ``flash_nsa``, its
``HFNSACore`` forward (mean compression) reproduced op by op, each branch returned; TQ < T through its
inference ops (``flash_nsa.inference``): TQ = 1 as its ``nsa_decode`` composes them, 1 < TQ < T (a prefill
chunk after cached keys) as its ``nsa_prefill`` does.

Loaded from a configured checkout (``oracles.config``: env ``NSACONF_FLASH_NSA`` or ``[oracles.flash_nsa]
path`` in nsaconf.toml; default ``external/Scalable-Flash-Native-Sparse-Attention``), never vendored.
Imported: ``flash_nsa/utils.py`` (``NSAHelper``, a class holding the hyper-parameters and the varlen
lengths as global state) and ``flash_nsa/ops/{compress_kv,compress_attn,topk,select_attn,combine}.py``; the
package ``__init__`` (which imports the Megatron layers and the inference engine) is skipped. TQ < T imports
``flash_nsa/inference/{compress_kv,compress_attn,topk,select_attn,combine}.py`` (its ``__init__``, which
imports flash-attn for ``nsa_prefill``'s window, is skipped too).
``flash_nsa/utils.py`` imports ``pkg_resources`` (setuptools) only for ``parse_version``: where setuptools
is absent a stand-in with ``packaging.version.parse`` is registered.

**Translation:**

* ``NSAHelper.set_hyperparameters(kernel_size=l, stride=d, block_size=l', window_size=W, top_n=n,
  num_init_blocks=1, num_local_blocks=2)`` per case, and its cached lengths reset
  (``NSAHelper.x_cu_seqlens = None``: ``init_cu_seqlens`` skips re-initialisation when ``cu_seqlens`` is
  unchanged, even after the hyper-parameters changed);
* layout: varlen only, packed as in ``oracles.xunhao``;
* ``cmp_o``, ``cmp_lse``: ``mean_pooling`` (K and V) + ``compress_attn``; its LSE ``[HQ, ΣT]`` is base 2
  (``sm_scale *= 1.44269504``, ``lse = m + log2(l)``): natural = base-2 · ln 2; rows before ``l - 1`` are
  written o = 0, LSE = 0: where the case has no visible block and the LSE is exactly 0 it becomes -inf;
* ``topk_idx``: ``slc_topk_indices(..., maybe_efficient_version=True, scale_slc_p=True)`` (what
  ``HFNSACore`` calls): ``[Hkv, ΣT, n]`` int32 padded with the sentinel ``ignore_index = ceil(T_max/l')``
  (any id ``>= ceil(T_max/l')`` becomes -1);
* ``slc_o``: ``select_attn`` on those indices (a random-indices case: the case's indices, -1 mapped to
  the sentinel);
* ``swa_o``: ``swa_varlen_func`` is ``flash_attn_varlen_func(causal=True, window_size=(W, -1))`` (W + 1
  keys); it needs the compiled flash-attn package, so the same call goes through ``compat.flash_attn_shim``
  with ``W = w`` (``w_plus_1``) or ``w - 1`` (``w``);
* ``o``: ``fused_sigmoid_combine(cmp, slc, swa, w[ΣT, HQ, 3])`` applies the sigmoid itself: raw gates
  ``g`` are passed as logits ``log(g / (1 - g))``, ``gates="sigmoid"`` cases as given; without a window
  its ``swa`` input is zeros.
* decode (TQ = 1, ``B >= 1``): one pool of pages ``[pages, P, H, D]`` for K and one for V, ``P = max(128,
  l')`` (``nsa_decode`` asserts ``P % 128 == 0``; a selection block is one tile of ``l'`` rows inside a page),
  zero-filled (the kernels read whole tiles and mask the scores, so unused slots must be finite).
  ``block_tables [B, ceil(T/P)]`` hold the T keys (the new one included, as its engine stores it first);
  ``cmp_block_tables [B, max(ceil(y/P), 1)]`` are pages of the same pool for the ``y = (T - l) // d + 1`` whole
  compressed blocks (``paged_tables``, ``to_pages``). The compressed cache is filled as its engine does:
  ``mean_pooling_prefill`` over the first T - 1 keys, then ``kv_mean_pooling_decode`` with the new block's
  slot (-1 where T closes no block). Then ``cmp_attn_decode`` (``cmp_o``; LSE ``[B, HQ]`` base 2, rows with
  T < l written o = 0, LSE = 0: translated as in prefill), ``topk_decode`` (``num_inital=1, num_local=2``;
  ``[H, B, n]`` int32, padded with -1, order block 0, the two local blocks, then by score: sorted ascending
  with -1 last), ``fused_slc_swa_attn_decode`` (``slc_o`` on those indices or on a random case's own,
  which hold exactly the ``min(n, ceil(T/l'))`` ids it reads; ``swa_o`` with ``window_size = W``, the keys
  ``[T-1-W, T-1]``: ``W`` as for flash-attn above; without a window it is dropped and ``combine_decode``
  gets zeros), ``combine_decode`` (applies the sigmoid: gates as for ``fused_sigmoid_combine``).
  ``fixed_y_maxlen`` / ``fixed_num_slc_blocks`` (its CUDA-graph sizes) are its defaults 8192 / 2048, or y and
  ``ceil(T/l')`` where larger. No backward.
* chunked prefill (1 < TQ < T): the same pools, the compressed cache of all T keys by ``mean_pooling_prefill``
  (its engine recomputes them in a prefill), queries packed ``[B*TQ, HQ, D]`` with ``x_cu_seqlens = [0, TQ,
  2TQ, ...]`` and ``context_lens = T`` (T - TQ cached keys): ``cmp_attn_prefill`` (LSE ``[HQ, B*TQ]`` base
  2, empty rows 0), ``topk_prefill`` (``[H, B*TQ, n]``, -1 padded), ``slc_attn_prefill``, ``combine_prefill``.
  ``nsa_prefill``'s window is flash-attn's kv-cache call (FA3 ``flash_attn_with_kvcache`` or FA2 with a
  ``block_table``, queries aligned to the last key): the same window through ``compat.flash_attn_shim``'s
  ``flash_attn_func`` on the unpaged ``[B, T, H, D]`` keys. No backward.

Conventions (read from the code): compression ``end_inclusive`` (``q_idx >= c*d + l - 1``); forced blocks
block 0 + the current and the previous block; selection ``s <= t``. Limits (asserted): fp16/bf16 (TMA
kernels, Hopper with triton >= 3.4, else its Ampere ops); ``d`` a power of 2, ``l % d == 0``,
``l' % d == 0``; ``l' >= l`` (``NSAConfig``); D a power of 2 or a sum of two (``split_d``); DV a power
of 2. The inference ops (TQ < T; no ``cu_seqlens``, which a case allows only with TQ = T) also need ``l'`` a
power of 2 >= 16 (``BLOCK_M = block_size`` in ``tl.arange``/``tl.dot``, select_attn.py:127 and :679) and
D >= 16; decode needs G <= 16 or a multiple of 16 (``cmp_attn_decode`` launches ``QH // min(G, 16)`` head
tiles, compress_attn.py:575-576: other G leave heads unwritten).
"""
from __future__ import annotations

import importlib.util
import math
import sys
import types
import warnings
from typing import Optional

import torch

from nsaconf.cases.conventions import num_sel_blocks
from nsaconf.cases.model import Case
from nsaconf.cases.tensors import GRAD_INPUTS, Inputs, canonical_order, grad_branches, output_cotangent
from nsaconf.cases.vocabulary import FORWARD_BRANCHES, GRAD_BRANCHES
from nsaconf.oracles.base import Oracle, gradients_wanted, register_oracle
from nsaconf.oracles.compat import flash_attn_shim
from nsaconf.oracles.compat.checkout_import import checkout_versions, import_from_checkout
from nsaconf.oracles.compat.common import empty_cmp_rows, is_pow2
from nsaconf.oracles.config import CHECKOUTS, checkout_status, how_to_enable
from nsaconf.oracles.xunhao import (cu_seqlens_int32, idx_from_canonical, idx_to_canonical, max_seqlen,
                                    pack, unpack, window_param)

_MODS: dict[str, types.ModuleType] = {}
_LABEL = "mdy666 Scalable-Flash-Native-Sparse-Attention (flash_nsa)"


def _pkg_resources_standin() -> None:
    """Register a minimal ``pkg_resources`` (``parse_version``) when setuptools is not installed."""
    if "pkg_resources" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        return
    mod = types.ModuleType("pkg_resources")
    try:
        from packaging.version import parse as parse_version
    except ImportError:  # pragma: no cover
        def parse_version(v: str):
            return tuple(int(x) for x in v.split("+")[0].split(".")[:3] if x.isdigit())
    mod.parse_version = parse_version
    sys.modules["pkg_resources"] = mod


def _load() -> dict:
    if "ops" in _MODS:
        return _MODS["ops"]
    path, _, _ = checkout_status("flash_nsa")
    if path is None:
        raise ImportError("flash_nsa checkout not configured: " + how_to_enable("flash_nsa"))
    _pkg_resources_standin()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        utils, kv, cmp, topk, sel, comb = import_from_checkout(
            path, ["flash_nsa.utils", "flash_nsa.ops.compress_kv", "flash_nsa.ops.compress_attn", "flash_nsa.ops.topk",
                   "flash_nsa.ops.select_attn", "flash_nsa.ops.combine"], stubs=["flash_nsa", "flash_nsa.ops"])
    ops = {"NSAHelper": utils.NSAHelper, "mean_pooling": kv.mean_pooling, "compress_attn": cmp.compress_attn,
           "slc_topk_indices": topk.slc_topk_indices, "select_attn": sel.select_attn,
           "fused_sigmoid_combine": comb.fused_sigmoid_combine}
    _MODS["ops"] = ops
    return ops


INFERENCE = "flash_nsa.inference"


def _load_inference() -> dict:
    """``flash_nsa/inference/{compress_kv,compress_attn,topk,select_attn,combine}.py`` (its package
    ``__init__``, which imports flash-attn for ``nsa_prefill``'s window, is skipped)."""
    if "inference" in _MODS:
        return _MODS["inference"]
    _load()  # flash_nsa.utils (NSAHelper, use_tma), which inference/utils.py imports
    path, _, _ = checkout_status("flash_nsa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kv, cmp, topk, sel, comb = import_from_checkout(
            path, [f"{INFERENCE}.{m}" for m in ("compress_kv", "compress_attn", "topk", "select_attn", "combine")],
            stubs=["flash_nsa", INFERENCE])
    ops = {"mean_pooling_prefill": kv.mean_pooling_prefill, "kv_mean_pooling_decode": kv.kv_mean_pooling_decode,
           "cmp_attn_decode": cmp.cmp_attn_decode, "topk_decode": topk.topk_decode,
           "fused_slc_swa_attn_decode": sel.fused_slc_swa_attn_decode, "combine_decode": comb.combine_decode,
           "cmp_attn_prefill": cmp.cmp_attn_prefill, "topk_prefill": topk.topk_prefill,
           "slc_attn_prefill": sel.slc_attn_prefill, "combine_prefill": comb.combine_prefill}
    _MODS["inference"] = ops
    return ops


def gate_logits(case: Case, g: torch.Tensor) -> torch.Tensor:
    """What ``fused_sigmoid_combine`` takes: logits (it applies the sigmoid). Raw gates ``g`` in (0, 1)
    -> ``log(g / (1 - g))``; ``gates="sigmoid"`` cases already hold logits."""
    if case.gates == "sigmoid":
        return g
    return torch.logit(g.float()).to(g.dtype)


def _forward(ops: dict, case: Case, q, k, v, g_cmp, g_slc, g_swa, given) -> dict:
    H = ops["NSAHelper"]
    l, d, ls, n, scale = case.cmp_block, case.cmp_stride, case.block_size, case.top_n, case.softmax_scale
    dev = q.device
    H.set_hyperparameters(kernel_size=l, stride=d, block_size=ls, window_size=max(window_param(case), 0) if case.window else 0,
                          top_n=n, num_init_blocks=1, num_local_blocks=2)
    H.x_cu_seqlens = None  # force init_cu_seqlens to recompute the compressed lengths for these hyper-parameters
    cu = cu_seqlens_int32(case, dev)
    H.init_cu_seqlens(cu)
    qp, kp, vp = (pack(case, t).contiguous() for t in (q, k, v))
    k_cmp, v_cmp = ops["mean_pooling"](kp), ops["mean_pooling"](vp)
    cmp_o, lse2 = ops["compress_attn"](qp, k_cmp, v_cmp, sm_scale=scale)
    sentinel = num_sel_blocks(max_seqlen(case), ls)
    with torch.no_grad():
        topk, _ = ops["slc_topk_indices"](qp.detach(), k_cmp.detach(), lse2.detach(), sm_scale=scale, maybe_efficient_version=True,
                                          scale_slc_p=True)
    if given is None:
        sel = topk
    else:
        sel = idx_from_canonical(case, given)
        sel = sel.masked_fill(sel < 0, sentinel).contiguous()
    slc_o = ops["select_attn"](qp, kp, vp, sel, sm_scale=scale)
    lse = (lse2.float() * math.log(2.0)).transpose(0, 1)
    lse = unpack(case, lse)
    empty = empty_cmp_rows(case, dev)[None, :, None]  # [TQ] (every batch row alike) or [ΣT] (varlen, B = 1)
    lse = torch.where(empty & (lse == 0), torch.full_like(lse, float("-inf")), lse)
    out = {"cmp_o": unpack(case, cmp_o), "cmp_lse": lse, "topk_idx": idx_to_canonical(case, topk, sentinel_from=sentinel),
           "slc_o": unpack(case, slc_o)}
    if case.window > 0:
        mx = max_seqlen(case)
        swa = flash_attn_shim.flash_attn_varlen_func(qp, kp, vp, cu, cu, mx, mx, causal=True,
                                                     window_size=(window_param(case), -1), softmax_scale=scale)
        out["swa_o"] = unpack(case, swa)
        w_swa = gate_logits(case, g_swa)
    else:
        swa = torch.zeros_like(slc_o)
        w_swa = torch.zeros_like(g_swa)
    w = torch.stack([gate_logits(case, g_cmp), gate_logits(case, g_slc), w_swa], -1)
    o = ops["fused_sigmoid_combine"](cmp_o, slc_o, swa, pack(case, w).contiguous())
    out["o"] = unpack(case, o)
    return out


# ------------------------------------------------------------------- inference ops (TQ < T: decode, chunked prefill)
PAGE_ALIGN = 128  # nsa_decode / nsa_prefill: ``assert k.size(1) % 128 == 0`` (inference/__init__.py:71, :206)
_FIXED_Y_MAXLEN, _FIXED_NUM_SLC_BLOCKS = 8192, 2048  # topk_decode's / topk_prefill's defaults (raised where needed)


def page_size(case: Case) -> int:
    """Tokens per page: 128, or ``l'`` when larger (a selection block is one TMA tile of ``l'`` rows and
    must not cross a page; ``l'`` is a power of 2, so it divides the page)."""
    return max(PAGE_ALIGN, case.block_size)


def whole_cmp_blocks(n_tokens: int, l: int, d: int) -> int:
    """Compressed blocks the inference ops keep for ``n_tokens`` keys: whole blocks only,
    ``max((n - l) // d + 1, 0)`` (``Sequence.cmp_len`` of its nano-vllm engine)."""
    return max((n_tokens - l) // d + 1, 0)


def paged_tables(batch: int, n_kv: int, n_cmp: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``block_tables [B, n_kv]`` and ``cmp_block_tables [B, n_cmp]`` int32 page ids of one pool of
    ``B * (n_kv + n_cmp)`` pages (the compressed K/V lives in pages of the same pool, as in its engine),
    numbered from the pool's end so that no table is the identity; returns the tables and the page count."""
    per = n_kv + n_cmp
    ids = (batch * per - 1) - torch.arange(batch * per).reshape(batch, per)
    return ids[:, :n_kv].to(torch.int32), ids[:, n_kv:].to(torch.int32), batch * per


def to_pages(x: torch.Tensor, table: torch.Tensor, num_pages: int, page: int) -> torch.Tensor:
    """``x [B, T, H, D]`` -> a zero-filled pool ``[num_pages, page, H, D]`` holding token t of sequence b at
    ``pool[table[b, t // page], t % page]`` (zeros past T: the kernels read whole tiles and mask scores,
    so the unused slots must be finite)."""
    B, T = x.shape[:2]
    n = table.shape[1]
    if n * page < T:
        raise ValueError(f"{n} pages of {page} tokens hold fewer than T = {T} tokens")
    padded = x.new_zeros((B, n * page) + tuple(x.shape[2:]))
    padded[:, :T] = x
    pool = x.new_zeros((num_pages, page) + tuple(x.shape[2:]))
    pool[table.long().to(x.device)] = padded.reshape((B, n, page) + tuple(x.shape[2:]))
    return pool


def from_pages(pool: torch.Tensor, table: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """The inverse of ``to_pages``: ``[B, n_tokens, H, D]`` read through ``table [B, n]``."""
    B, n = table.shape
    x = pool[table.long().to(pool.device)]
    return x.reshape((B, n * pool.shape[1]) + tuple(pool.shape[2:]))[:, :n_tokens]


def cmp_slots(cmp_table: torch.Tensor, idx: torch.Tensor, page: int) -> torch.Tensor:
    """Flat slots (``page_id * page + offset``, what ``slot_mapping`` holds) of compressed positions
    ``idx [B, m]`` of each sequence; negative ``idx`` gives -1 (no slot)."""
    idx = idx.long()
    c = idx.clamp(min=0)
    slot = cmp_table.long().gather(1, c // page) * page + c % page
    return torch.where(idx < 0, torch.full_like(slot, -1), slot).to(torch.int32)


def inference_limits(case: Case) -> Optional[str]:
    """Limits of the ``flash_nsa.inference`` ops (TQ < T) beyond the training path's: decode (TQ = 1) and
    chunked prefill (``nsa_prefill``'s ops, 1 < TQ < T)."""
    G, ls, decode = case.group, case.block_size, case.q_len == 1
    where = "select_attn.py:679" if decode else "select_attn.py:127"
    if not is_pow2(ls) or ls < 16:
        return (f"flash_nsa's selection {'decode' if decode else 'prefill'} tiles a block as BLOCK_M = block_size "
                f"({where}) in tl.arange and tl.dot: l' must be a power of 2 >= 16, got {ls}")
    if case.head_dim < 16:
        return f"flash_nsa's inference kernels tl.dot over the head dim (>= 16), D={case.head_dim}"
    if decode and G > 16 and G % 16:
        return (f"flash_nsa's cmp_attn_decode launches QH // min(G, 16) head tiles of 16 (compress_attn.py:575-576): "
                f"G > 16 must be a multiple of 16, G={G}")
    return None


def _paged_cache(ops: dict, case: Case, x: Inputs, pooled: int) -> tuple:
    """Paged K/V pools of the T keys and their tables (``paged_tables``, ``to_pages``); compressed blocks
    ``0 .. pooled-1`` written by ``mean_pooling_prefill``. Returns ``(k_pool, v_pool, block_tables,
    cmp_block_tables, context_lens [B] = T, page)``."""
    dev = x.q.device
    B, T, l, d = case.batch, case.seq_len, case.cmp_block, case.cmp_stride
    P = page_size(case)
    kv_table, cmp_table, num_pages = paged_tables(B, -(-T // P), max(-(-whole_cmp_blocks(T, l, d) // P), 1))
    kv_table, cmp_table = kv_table.to(dev), cmp_table.to(dev)
    k_pool, v_pool = to_pages(x.k, kv_table, num_pages, P), to_pages(x.v, kv_table, num_pages, P)
    if pooled > 0:
        y_cu = torch.arange(B + 1, dtype=torch.int32, device=dev) * pooled
        slots = cmp_slots(cmp_table, torch.arange(pooled, device=dev).expand(B, -1), P).reshape(-1).contiguous()
        for pool in (k_pool, v_pool):
            ops["mean_pooling_prefill"](pool, y_cu, pooled, slot_mapping=slots, block_table=kv_table, kernel_size=l,
                                        stride=d)
    return k_pool, v_pool, kv_table, cmp_table, torch.full((B,), T, dtype=torch.int32, device=dev), P


def _outputs(combine, case: Case, x: Inputs, cmp_o, lse2, topk, slc_o, swa) -> dict:
    """Canonical branches from the inference ops' packed rows (``N = B*TQ``): ``cmp_o``/``slc_o``/``swa``
    ``[N, HQ, D]`` (``swa`` None without a window), base-2 ``lse2 [N, HQ]``, ``topk [H, N, n]``; ``o`` by
    ``combine`` (``combine_decode`` / ``combine_prefill``: the sigmoid of ``w [N, HQ, 3]``)."""
    lse = unpack(case, lse2.float() * math.log(2.0))
    empty = empty_cmp_rows(case, lse.device)[None, :, None]
    lse = torch.where(empty & (lse == 0), torch.full_like(lse, float("-inf")), lse)
    out = {"cmp_o": unpack(case, cmp_o), "cmp_lse": lse, "topk_idx": canonical_order(idx_to_canonical(case, topk)),
           "slc_o": unpack(case, slc_o)}
    if swa is not None:
        out["swa_o"] = unpack(case, swa)
        w_swa = gate_logits(case, x.g_swa)
    else:
        swa, w_swa = torch.zeros_like(slc_o), torch.zeros_like(x.g_swa)
    w = pack(case, torch.stack([gate_logits(case, x.g_cmp), gate_logits(case, x.g_slc), w_swa], -1)).contiguous()
    out["o"] = unpack(case, combine(cmp_o.contiguous(), slc_o.contiguous(), swa.contiguous(), w))
    return out


def _decode(ops: dict, case: Case, x: Inputs, given: Optional[torch.Tensor]) -> dict:
    """TQ = 1 as its engine decodes: paged K/V of the T keys (the new one included), the compressed cache
    filled by ``mean_pooling_prefill`` over the first T - 1 keys and ``kv_mean_pooling_decode`` for the new
    one, then ``cmp_attn_decode``, ``topk_decode``, ``fused_slc_swa_attn_decode``, ``combine_decode``."""
    dev = x.q.device
    B, T = case.batch, case.seq_len
    l, d, ls, n, scale = case.cmp_block, case.cmp_stride, case.block_size, case.top_n, case.softmax_scale
    y_prev, y_new = whole_cmp_blocks(T - 1, l, d), whole_cmp_blocks(T, l, d)
    k_pool, v_pool, kv_table, cmp_table, ctx, P = _paged_cache(ops, case, x, y_prev)
    new = torch.full((B, 1), y_new - 1 if y_new > y_prev else -1, device=dev)
    ops["kv_mean_pooling_decode"](k_pool, v_pool, slot_mapping=cmp_slots(cmp_table, new, P).reshape(-1).contiguous(),
                                  block_table=kv_table, context_lens=ctx, kernel_size=l, stride=d)
    q1 = x.q[:, 0].contiguous()
    cmp_o, lse2 = ops["cmp_attn_decode"](q1, k_pool, v_pool, block_tables=cmp_table, context_lens=ctx, num_splits=0,
                                         kernel_size=l, stride=d, sm_scale=scale)
    topk = ops["topk_decode"](q1, k_pool, lse2, block_tables=cmp_table, context_lens=ctx, kernel_size=l, stride=d,
                              block_size=ls, top_n=n, num_inital=1, num_local=2,
                              fixed_num_slc_blocks=max(_FIXED_NUM_SLC_BLOCKS, num_sel_blocks(T, ls)),
                              fixed_y_maxlen=max(_FIXED_Y_MAXLEN, y_new), sm_scale=scale)
    sel = topk if given is None else idx_from_canonical(case, given.to(dev))  # [H, B, n], ascending, -1 last
    W = window_param(case) if case.window > 0 else 0
    slc_o, swa = ops["fused_slc_swa_attn_decode"](q1, k_pool, v_pool, sel.contiguous(), block_tables=kv_table,
                                                  context_lens=ctx, num_splits=0, block_size=ls, top_n=n, window_size=W,
                                                  sm_scale=scale)
    return _outputs(ops["combine_decode"], case, x, cmp_o, lse2, topk, slc_o, swa if case.window > 0 else None)


def _chunked_prefill(ops: dict, case: Case, x: Inputs, given: Optional[torch.Tensor]) -> dict:
    """1 < TQ < T as ``nsa_prefill`` computes a chunk after T - TQ cached keys: paged K/V of the T keys, the
    compressed cache of all of them by ``mean_pooling_prefill``, ``cmp_attn_prefill``, ``topk_prefill``,
    ``slc_attn_prefill`` (queries packed ``[B*TQ, HQ, D]``, ``x_cu_seqlens = [0, TQ, 2TQ, ...]``,
    ``context_lens = T``), its flash-attn window through the shim (queries aligned to the last key, as
    flash-attn's kv-cache call does), ``combine_prefill``."""
    dev = x.q.device
    B, T, TQ = case.batch, case.seq_len, case.q_len
    l, d, ls, n, scale = case.cmp_block, case.cmp_stride, case.block_size, case.top_n, case.softmax_scale
    y = whole_cmp_blocks(T, l, d)
    k_pool, v_pool, kv_table, cmp_table, ctx, _ = _paged_cache(ops, case, x, y)
    qp = pack(case, x.q).contiguous()
    x_cu = torch.arange(B + 1, dtype=torch.int32, device=dev) * TQ
    cmp_o, lse2 = ops["cmp_attn_prefill"](qp, k_pool, v_pool, x_cu, TQ, block_tables=cmp_table, context_lens=ctx,
                                          kernel_size=l, stride=d, sm_scale=scale)
    topk = ops["topk_prefill"](qp, k_pool, lse2, x_cu, TQ, y, block_tables=cmp_table, context_lens=ctx,
                               fixed_y_maxlen=max(_FIXED_Y_MAXLEN, y),
                               fixed_num_slc_blocks=max(_FIXED_NUM_SLC_BLOCKS, num_sel_blocks(T, ls)), kernel_size=l,
                               stride=d, block_size=ls, top_n=n, num_inital=1, num_local=2, sm_scale=scale)
    sel = topk if given is None else idx_from_canonical(case, given.to(dev))  # [H, B*TQ, n]
    slc_o, _ = ops["slc_attn_prefill"](qp, k_pool, v_pool, sel.contiguous(), x_cu, TQ, block_tables=kv_table,
                                       context_lens=ctx, block_size=ls, top_n=n, sm_scale=scale)
    swa = None
    if case.window > 0:
        swa = pack(case, flash_attn_shim.flash_attn_func(x.q, x.k, x.v, causal=True, window_size=(window_param(case), -1),
                                                         softmax_scale=scale))
    return _outputs(ops["combine_prefill"], case, x, cmp_o, lse2.transpose(0, 1), topk, slc_o, swa)


@register_oracle
class FlashNsa(Oracle):
    """mdy666 flash_nsa ``HFNSACore`` with mean compression: ``mean_pooling``, ``compress_attn``,
    ``slc_topk_indices``, ``select_attn``, the flash-attn window, ``fused_sigmoid_combine`` (module docstring)."""

    name = "flash_nsa"
    layer = "e2e"
    branches = FORWARD_BRANCHES + GRAD_BRANCHES
    devices = ("cuda",)
    dtypes = ("float16", "bfloat16")
    fixed_conventions = {"cmp_mask": "end_inclusive", "window_keys": "w_plus_1"}
    supported_conventions = {"gates": ("raw", "sigmoid")}  # the gated sum / combine is the adapter's
    description = f"mdy666 flash_nsa@{CHECKOUTS['flash_nsa'].commit[:7]} HFNSACore ops (mean compression, top-k, selection, sigmoid combine), window via flash-attn/shim"

    def availability(self) -> Optional[str]:
        path, _, _ = checkout_status("flash_nsa")
        if path is None:
            return f"{_LABEL} checkout not found: " + how_to_enable("flash_nsa")
        if importlib.util.find_spec("triton") is None:
            return f"{_LABEL} is Triton-only (Hopper TMA kernels, triton >= 3.4): needs triton and a CUDA GPU"
        return None

    def versions(self) -> dict:
        return checkout_versions("flash_nsa")

    def supports(self, case: Case, device: str) -> Optional[str]:
        l, d, ls = case.cmp_block, case.cmp_stride, case.block_size
        if case.cmp_mask != "end_inclusive":
            return f"flash_nsa's compression mask is end_inclusive (q >= c*d + l - 1), case has {case.cmp_mask}"
        if case.forced_blocks != "initial_local":
            return f"flash_nsa forces block 0 + the two local blocks (num_init_blocks=1, num_local_blocks=2), case has {case.forced_blocks}"
        if not is_pow2(d):
            return f"flash_nsa asserts the stride d is a power of 2, got {d}"
        if ls < l:
            return f"flash_nsa's NSAConfig asserts block_size >= kernel_size (l' >= l), got l={l}, l'={ls}"
        D, DV = case.head_dim, case.head_dim_v
        if not is_pow2(DV):
            return f"flash_nsa's kernels assert log2(DV) is an integer, DV={DV}"
        if not (is_pow2(D) or is_pow2(D - (1 << (D.bit_length() - 1)))):
            return f"flash_nsa splits D into two powers of 2 (split_d), D={D}"
        if DV != D:
            return f"flash_nsa's combine and window take one head dim (D={D}, DV={DV})"
        if case.q_len < case.seq_len:
            return inference_limits(case)
        if case.window > 0 and window_param(case) < 0:
            return "a window of w = 1 key is W = 0 in flash-attn's (W, -1), which flash_nsa treats as no window"
        return None

    def branch_supports(self, case: Case, branch: str) -> Optional[str]:
        if case.q_len < case.seq_len and branch in GRAD_BRANCHES:
            return "flash_nsa's inference ops (decode, nsa_prefill) have no backward"
        return None

    def run(self, case: Case, inputs: Inputs, device: str, block_indices: Optional[torch.Tensor] = None):
        given = inputs.block_indices if case.block_indices == "random" else None
        if case.q_len < case.seq_len:
            ops = _load_inference()
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                return (_decode if case.q_len == 1 else _chunked_prefill)(ops, case, inputs, given)
        ops = _load()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            out = _forward(ops, case, inputs.q, inputs.k, inputs.v, inputs.g_cmp, inputs.g_slc, inputs.g_swa, given)
        if gradients_wanted(case):
            out.update(self.grads(ops, case, inputs, given))
        return out

    def grads(self, ops: dict, case: Case, inputs: Inputs, given) -> dict:
        """Gradients of ``sum(o * dO)`` through its autograd functions (no gradient through the top-k)."""
        leaves = {f: getattr(inputs, f).detach().clone().contiguous().requires_grad_(True) for f in set(GRAD_INPUTS.values())}
        names = grad_branches(case)
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")
            o = _forward(ops, case, leaves["q"], leaves["k"], leaves["v"], leaves["g_cmp"], leaves["g_slc"], leaves["g_swa"], given)["o"]
            d_o = output_cotangent(case, o.device).to(o.dtype)
            got = torch.autograd.grad(o, [leaves[GRAD_INPUTS[b]] for b in names], d_o, allow_unused=True)
        return {b: (torch.zeros_like(leaves[GRAD_INPUTS[b]]) if g is None else g.detach()) for b, g in zip(names, got)}
