"""The in-house NSA forward on the GPU: cuTile kernels + a few fused torch device ops (top-n).

Branch entry points (all tensors on one CUDA device, canonical layouts, one sequence per call,
queries are the last TQ positions ``p = T - TQ + i``):

* ``mean_pool(k, v, l, d)`` -> ``K_cmp, V_cmp`` ``[B,ceil(T/d),H,*]`` (cuTile, fp32 accumulation);
* ``compression(q, k_cmp, v_cmp, T, ...)`` -> ``cmp_o, cmp_lse[, imp_cmp]`` (cuTile; ``imp_cmp``
  ``[B,TQ,H,NC]`` fp32 = compression probabilities summed over the GQA group, second pass of the
  same kernel reusing the LSE);
* ``top_n(imp_cmp, ...)`` -> ``[B,TQ,H,n]`` int64 (Eq. 9 map + forced blocks + exact order:
  forced first, then importance, ties to the lower index, -1 padding; torch ops on the device);
* ``selection(q, k, v, idx, ...)`` -> ``slc_o`` (cuTile, gathers the selected blocks);
* ``sliding_window(q, k, v, w, window_keys, ...)`` -> ``swa_o`` (cuTile);
* ``nsa_forward(case, inputs)`` -> every canonical branch and ``o = g_cmp*cmp_o + g_slc*slc_o + g_swa*swa_o``.
"""
from __future__ import annotations

import ast
import contextlib
import math
import sys
from functools import lru_cache
from typing import Iterable, Optional

import torch

from nsaconf.cases.conventions import (FORCED_RULES, WINDOW_KEYS, eq9_weights, is_forced, max_forced, num_cmp_blocks,
                               num_sel_blocks, selection_candidate)
from nsaconf.cases.model import Case
from nsaconf.cases.tensors import Inputs, canonical_order

LOG2E = 1.0 / math.log(2.0)
CMP_TILE = (64, 64)     # (rows = queries x heads, compressed blocks per step) of the compression kernel
WINDOW_TILE = (64, 64)  # (rows, keys per step) of the sliding-window kernel
CMP_HINTS: dict = {}    # cuTile hints (occupancy, num_worker_warps) of the compression kernel ({}: its own, occupancy 2;
#                         num_worker_warps=8 with 64- or 128-row tiles measured slower)
WINDOW_HINTS: dict = {}  # the same for the sliding-window kernel
POOL_HINTS: dict = {"occupancy": 4}  # cuTile hints of the mean-pooling kernel ({}: its own, 255 registers and one CTA
#                                      per SM; measured 16k / 64k: 0.085 / 0.158 ms, with occupancy 4 0.066 / 0.092)
DENSE_MASK_ALL = False  # mask every key tile of the compression/window kernel (False: only tiles not seen whole)
CMP_TILES_PER_PROGRAM = 1     # query tiles each compression program takes one after the other
CMP_ONE_PASS_TILES = 4  # compression + importance in one pass when the pooled blocks fit in this many key tiles
#                         (T <= 16k at the paper configuration; 0: always the two passes; measured 16k: 0.648-0.675
#                         vs 0.768-0.786 ms, 4k: 0.155-0.175 vs 0.186-0.218, runs AL and AM)
WINDOW_TILES_PER_PROGRAM = 1  # the same for the window kernels (dense_branch_kernel, window_forced_kernel)
MIN_SEL_ROWS = 16  # the selection tile pads the G heads of a group to at least this many rows


def pow2(x: int) -> int:
    """Smallest power of two >= x."""
    return 1 << max(0, (int(x) - 1).bit_length())


def _ct():
    import cuda.tile as ct
    from nsaconf.oracles.inhouse_cutile import kernels
    return ct, kernels


_HINTED: dict = {}


def _hinted(kernel, occupancy: Optional[int] = None, **hints):
    """``kernel`` with cuTile hints (``occupancy``, ``num_worker_warps``; None = the kernel's own), cached:
    a new kernel object would recompile."""
    hints = {k: v for k, v in dict(hints, occupancy=occupancy).items() if v is not None}
    if not hints:
        return kernel
    key = (id(kernel), tuple(sorted(hints.items())))
    if key not in _HINTED:
        _HINTED[key] = kernel.replace_hints(**hints)
    return _HINTED[key]


def _launch(kernel, grid: tuple[int, int, int], args: tuple) -> None:
    ct, _ = _ct()
    ct.launch(torch.cuda.current_stream(), grid, kernel, args)


def mean_pool(k: torch.Tensor, v: torch.Tensor, l: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``K_cmp[c] = mean(k[c*d : min(c*d+l, T)])`` over dim 1 (same for v)."""
    _, K = _ct()
    B, T, H, D = k.shape
    DV = v.shape[-1]
    NC = num_cmp_blocks(T, d)
    kc = torch.empty((B, NC, H, D), device=k.device, dtype=k.dtype)
    vc = torch.empty((B, NC, H, DV), device=v.device, dtype=v.dtype)
    _launch(_hinted(K.mean_pool_kernel, **POOL_HINTS), (NC, B * H, 1), (k, v, kc, vc, T, l, d, pow2(l), pow2(D), pow2(DV)))
    return kc, vc


def _dense(q, k, v, o, lse, imp, scale: float, T: int, nkeys: int, mode: int, l: int, d: int, w: int,
           is_cmp: bool, want_imp: bool) -> None:
    _, K = _ct()
    B, TQ, HQ, D = q.shape
    H, DV = k.shape[2], v.shape[-1]
    G = HQ // H
    GP = pow2(G)
    rows, key_tile = CMP_TILE if is_cmp else WINDOW_TILE
    TMQ = max(1, rows // GP)
    tpp = CMP_TILES_PER_PROGRAM if is_cmp else WINDOW_TILES_PER_PROGRAM
    grid = (-(-TQ // (TMQ * tpp)), B * H, 1)
    key_tiles = -(-nkeys // key_tile)
    nt1 = key_tiles if is_cmp and want_imp and key_tiles <= CMP_ONE_PASS_TILES else 0
    _launch(_hinted(K.dense_branch_kernel, **(CMP_HINTS if is_cmp else WINDOW_HINTS)), grid,
            (q, k, v, o, lse, imp, scale * LOG2E, T - TQ, TQ, nkeys, l, d, w, mode,
             G, GP, TMQ, key_tile, pow2(D), pow2(DV), is_cmp, want_imp, DENSE_MASK_ALL, tpp, nt1))


def compression(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, T: int, l: int, d: int,
                cmp_mask: str, scale: float, want_importance: bool = False, importance_fill: Optional[float] = 0.0):
    """Compression attention over the pooled blocks ``c`` with ``CMP_MASKS[cmp_mask](c, p, l, d)``.
    Returns ``cmp_o`` (q dtype), ``cmp_lse`` fp32 natural log (-inf: no visible block) and, on
    request, ``imp_cmp`` ``[B,TQ,H,NC]`` fp32 (probabilities summed over the group). The kernel
    writes ``imp_cmp`` on every block started by the last query of each query tile (``c*d <= p``,
    zero where not visible) and fills the rest with ``importance_fill``; ``None`` leaves it
    uninitialised (enough for a top-n over the candidates ``j*l' <= p`` when l' = d; saves a pass
    over the whole buffer)."""
    _, K = _ct()
    B, TQ, HQ, _ = q.shape
    NC, H = k_cmp.shape[1], k_cmp.shape[2]
    o = torch.empty((B, TQ, HQ, v_cmp.shape[-1]), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, TQ, HQ), device=q.device, dtype=torch.float32)
    imp = torch.empty((B, TQ, H, NC) if want_importance else (1, 1, 1, 1), device=q.device, dtype=torch.float32)
    if importance_fill is not None:
        imp.fill_(importance_fill)
    _dense(q, k_cmp, v_cmp, o, lse, imp, scale, T, NC, K.MODE_OF_CMP_MASK[cmp_mask], l, d, 0, True, want_importance)
    return (o, lse, imp) if want_importance else (o, lse)


def sliding_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int, window_keys: str,
                   scale: float) -> torch.Tensor:
    """Attention over the keys ``WINDOW_KEYS[window_keys](p, s, w)``."""
    _, K = _ct()
    B, TQ, HQ, _ = q.shape
    T = k.shape[1]
    o = torch.empty((B, TQ, HQ, v.shape[-1]), device=q.device, dtype=q.dtype)
    dummy = torch.empty((1, 1, 1), device=q.device, dtype=torch.float32)
    _dense(q, k, v, o, dummy, dummy.view(1, 1, 1, 1), scale, T, T, K.MODE_OF_WINDOW_KEYS[window_keys], 1, 1, w,
           False, False)
    return o


def selection(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, ls: int,
              scale: float) -> torch.Tensor:
    """Attention over the keys ``s <= p`` of the selection blocks ``idx [B,TQ,H,n]`` (-1: none)."""
    _, K = _ct()
    B, TQ, HQ, D = q.shape
    T, H, DV = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // H
    GP = max(pow2(G), MIN_SEL_ROWS)
    LSP = pow2(ls)
    aligned = LSP == ls
    idx32 = idx.to(device=q.device, dtype=torch.int32).contiguous()
    o = torch.empty((B, TQ, HQ, DV), device=q.device, dtype=q.dtype)
    _launch(K.selection_kernel, (TQ, B * H, 1),
            (q, k, v, idx32, o, scale * LOG2E, T - TQ, T, ls, idx32.shape[-1], G, GP, LSP, pow2(D), pow2(DV), aligned))
    return o


def block_union(idx: torch.Tensor, tqb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile of ``tqb`` consecutive queries and kv head: the ascending union of their selected
    blocks ``[B,ceil(TQ/tqb),H,tqb*n]`` int32 (-1 after the ``count`` valid entries) and ``count``
    ``[B,ceil(TQ/tqb),H]`` int32 (torch sorts on the device)."""
    B, TQ, H, n = idx.shape
    pad = -TQ % tqb
    x = idx.long()
    if pad:
        x = torch.cat([x, x.new_full((B, pad, H, n), -1)], 1)
    big = torch.iinfo(torch.int32).max
    x = x.view(B, -1, tqb, H, n).permute(0, 1, 3, 2, 4).reshape(B, -1, H, tqb * n)
    x = torch.where(x < 0, torch.full_like(x, big), x).sort(-1).values
    dup = torch.zeros_like(x, dtype=torch.bool)
    dup[..., 1:] = x[..., 1:] == x[..., :-1]
    x = torch.where(dup, torch.full_like(x, big), x).sort(-1).values
    count = (x < big).sum(-1).to(torch.int32)
    return torch.where(x == big, torch.full_like(x, -1), x).to(torch.int32).contiguous(), count.contiguous()


def _gate_args(q: torch.Tensor, shape: tuple, gated: Optional[tuple], want_slc: bool):
    """What a selection kernel with the gated epilogue takes and what its entry point returns:
    ``(arrays, flags, result)`` with ``arrays = (slc_o, cmp_o, swa_o, g_cmp, g_slc, g_swa, o)`` (new
    output buffers; unused slots hold small dummies), ``flags = (WRITE_SLC, GATES, WINDOW)`` and
    ``result`` = ``slc_o``, or ``(slc_o or None, o)`` when ``gated``."""
    write_slc = gated is None or want_slc
    slc = torch.empty(shape if write_slc else (1, 1, 1, 1), device=q.device, dtype=q.dtype)
    if gated is None:
        g = q.new_empty((1, 1, 1))
        return (slc, slc, slc, g, g, g, slc), (True, False, False), slc
    cmp_o, swa_o, gc, gs, gw = gated
    o = torch.empty(shape, device=q.device, dtype=q.dtype)
    window = swa_o is not None
    arrays = (slc, cmp_o, swa_o if window else cmp_o, gc.contiguous(), gs.contiguous(), gw.contiguous(), o)
    return arrays, (write_slc, True, window), ((slc if write_slc else None), o)


def selection_union(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, ls: int,
                    scale: float, gated: Optional[tuple] = None, want_slc: bool = True):
    """``selection`` computed per tile of consecutive queries over the union of their blocks (each
    block loaded once per tile, 64-row MMA tiles); same result. ``gated``/``want_slc`` as in
    ``selection_chunked``."""
    _, K = _ct()
    B, TQ, HQ, D = q.shape
    T, H, DV = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // H
    GP = pow2(G)
    TQB = max(1, UNION_ROWS // GP)
    n = idx.shape[-1]
    NP = pow2(n)
    sel = idx.to(device=q.device, dtype=torch.int32)
    if NP != n or TQ % TQB:
        sel = torch.nn.functional.pad(sel, (0, NP - n, 0, 0, 0, -TQ % TQB), value=-1)
    sel = sel.contiguous()
    uni, count = block_union(idx.to(q.device), TQB)
    LSP = pow2(ls)
    arrays, flags, result = _gate_args(q, (B, TQ, HQ, DV), gated, want_slc)
    _launch(_hinted(K.selection_union_kernel, UNION_OCCUPANCY), (-(-TQ // TQB), B * H, 1),
            (q, k, v, sel, uni, count, *arrays, scale * LOG2E, T - TQ, T, ls, NP, TQB, G, GP, LSP, pow2(D), pow2(DV),
             LSP == ls, *flags))
    return result


def _chunk_blocks(n: int, ls: int) -> int:
    """Selected blocks per step of the chunked selection kernel for ``n`` blocks of ``l'`` keys:
    ``CHUNK_BLOCKS``, at most 256 keys per step and at most the largest power of two <= n."""
    return max(1, min(CHUNK_BLOCKS, max(1, 256 // ls), 1 << (n.bit_length() - 1)))


def _index_rows(idx: torch.Tensor, width: int, device, aligned: bool = True) -> torch.Tensor:
    """The block indices of the chunked selection kernel: int32, contiguous, rows padded with -1 to ``width``
    (the kernel's NP) or, with ``SEL_IDX_ONCE`` and ``aligned``, to pow2(width) (one aligned load of the row; the
    kernel reads its first NP)."""
    out = idx.to(device=device, dtype=torch.int32)
    cols = pow2(width) if SEL_IDX_ONCE and aligned else width
    if cols != out.shape[-1]:
        out = torch.nn.functional.pad(out, (0, cols - out.shape[-1]), value=-1)
    return out.contiguous()


def selection_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, ls: int,
                      scale: float, gated: Optional[tuple] = None, want_slc: bool = True):
    """``selection`` for a power-of-two ``l'``: CH selected blocks per step concatenated into one
    ``CH*l'``-key tile (no data-dependent branch; ``SEL_KEY_ROWS``: the keys-on-rows kernel); falls
    back to ``selection`` otherwise.

    ``gated = (cmp_o, swa_o or None, g_cmp, g_slc, g_swa)``: the kernel's epilogue also writes
    ``o = g_cmp*cmp_o + g_slc*slc_o (+ g_swa*swa_o)`` and the call returns ``(slc_o or None, o)``
    (``want_slc=False``: slc_o is not stored). Non-power-of-two ``l'``: ``selection`` + ``combine_gates``."""
    if pow2(ls) != ls:
        slc = selection(q, k, v, idx, ls, scale)
        if gated is None:
            return slc
        cmp_o, swa_o, *gates = gated
        return slc, combine_gates(cmp_o, slc, swa_o, gates)
    _, K = _ct()
    B, TQ, HQ, D = q.shape
    T, H, DV = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // H
    GP = max(pow2(G), MIN_SEL_ROWS)
    n = idx.shape[-1]
    CH = _chunk_blocks(n, ls)
    NP = -(-n // CH) * CH
    sel = _index_rows(idx, NP, q.device, aligned=not SEL_KEY_ROWS)
    arrays, flags, result = _gate_args(q, (B, TQ, HQ, DV), gated, want_slc)
    kern = _hinted(K.selection_keyrows_kernel if SEL_KEY_ROWS else K.selection_chunk_kernel, SEL_OCCUPANCY,
                   num_worker_warps=SEL_WORKER_WARPS)
    lse = (q.new_empty((1, 1, 1), dtype=torch.float32),) if not SEL_KEY_ROWS else ()
    qpp = SEL_QUERIES_PER_PROGRAM if lse else 1
    _launch(kern, (-(-TQ // qpp), B * H, 1),
            (q, k, v, sel, *arrays, *lse, scale * LOG2E, T - TQ, T, NP, CH, ls, G, GP, pow2(D), pow2(DV), SEL_TMA,
             *SEL_LATENCY, *flags, *((False, SEL_IDX_ONCE, pow2(NP), qpp, SEL_MASK_ALL) if lse else ())))
    return result


def selection_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, ls: int,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection over the blocks ``idx [B,TQ,H,m]`` (-1: none; power-of-two ``l'``) as a partial
    result another kernel merges more blocks into: ``slc_o`` (q dtype, 0 where no key) and its base-2
    log-sum-exp of the scaled scores ``[B,TQ,HQ]`` fp32 (-inf where no key). Any ``m`` >= 0 (the chunked
    kernel takes the last ``m % CH`` blocks one at a time)."""
    _, K = _ct()
    B, TQ, HQ, D = q.shape
    T, H, DV = k.shape[1], k.shape[2], v.shape[-1]
    o = torch.empty((B, TQ, HQ, DV), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, TQ, HQ), device=q.device, dtype=torch.float32)
    n = idx.shape[-1]
    if n == 0:
        return o.zero_(), lse.fill_(-math.inf)
    G = HQ // H
    GP = max(pow2(G), MIN_SEL_ROWS)
    CH = _chunk_blocks(n, ls)
    g = q.new_empty((1, 1, 1))
    qpp = SEL_QUERIES_PER_PROGRAM
    _launch(_hinted(K.selection_chunk_kernel, SEL_OCCUPANCY, num_worker_warps=SEL_WORKER_WARPS), (-(-TQ // qpp), B * H, 1),
            (q, k, v, _index_rows(idx, n, q.device), o, o, o, g, g, g, o, lse,
             scale * LOG2E, T - TQ, T, n, CH, ls, G, GP, pow2(D), pow2(DV), SEL_TMA, *SEL_LATENCY,
             True, False, False, True, SEL_IDX_ONCE, pow2(n), qpp, SEL_MASK_ALL))
    return o, lse


@lru_cache(maxsize=16)
def forced_list(q_off: int, TQ: int, NS: int, ls: int, forced_blocks: str, device: str, nlocal: int = 0) -> torch.Tensor:
    """The forced candidate blocks (``is_forced`` and ``selection_candidate``) of each query ``p = q_off + i``,
    ascending, -1 padded: ``[TQ, max_forced]`` int32. Depends on shapes only: computed once per shape
    (torch, on ``device``). ``nlocal > 0`` leaves out the local blocks ``j > p//l' - nlocal`` that the window
    kernel takes (``window_forced_plan``); the width is then ``max_forced - nlocal`` (may be 0)."""
    mf = max_forced(forced_blocks) - nlocal
    if nlocal and mf <= 0:
        return torch.empty((TQ, 0), device=device, dtype=torch.int32)
    mf = max(1, mf)
    p = (q_off + torch.arange(TQ, device=device))[:, None]
    j = torch.arange(NS, device=device)[None, :]
    m = is_forced(forced_blocks, j, p, ls) & selection_candidate(j, p, ls)
    if nlocal:
        m &= j <= p // ls - nlocal
    f = torch.where(m, j, NS).sort(1).values[:, :mf]
    f = torch.nn.functional.pad(f, (0, mf - f.shape[1]), value=NS)      # fewer blocks than forced slots
    return torch.where(f == NS, -1, f).to(torch.int32).contiguous()


def window_forced_plan(case: Case, G: int, q_off: int) -> Optional[int]:
    """``nlocal`` when ``FORCED_LOCAL_IN_WINDOW`` lets the sliding-window kernel take the forced local blocks
    ``p//l' - nlocal + 1 .. p//l'`` off the selection kernel (``window_forced``), else None: 2 for
    ``initial_local``, 1 for ``current``. Needs their keys ``s <= p`` inside every position's window, the
    window tile's queries inside one selection block (``l'`` and ``q_off`` multiples of the TMQ queries
    per tile) and a power-of-two ``l'`` of 16..128 (the window kernel's key tile)."""
    if not FORCED_LOCAL_IN_WINDOW or case.window <= 0:
        return None
    ls, rule = case.block_size, FORCED_RULES[case.forced_blocks]
    far = 10 * ls                     # a position far from the start (the rules are shift-invariant there)
    nlocal = 2 if bool(rule(9, far, ls)) and bool(rule(10, far, ls)) else int(bool(rule(10, far, ls)))
    TMQ = max(1, WINDOW_TILE[0] // pow2(G))
    if (nlocal == 0 or pow2(ls) != ls or not 16 <= ls <= 128 or ls % TMQ or q_off % TMQ
            or not bool(WINDOW_KEYS[case.window_keys](nlocal * ls - 1, 0, case.window))):
        return None
    return nlocal


def window_forced(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o_s: torch.Tensor, lse_s: torch.Tensor,
                  cmp_o: torch.Tensor, gates, nlocal: int, ls: int, w: int, window_keys: str,
                  scale: float, want_swa: bool = False, want_slc: bool = False) -> dict[str, torch.Tensor]:
    """Sliding window + the ``nlocal`` forced local blocks (``window_forced_plan``) merged into the selection's
    partial result ``(o_s, lse_s)`` (``selection_partial`` over the other blocks) + the gates, in one
    cuTile kernel (``window_forced_kernel``). Returns ``o`` and, on request, ``swa_o`` / ``slc_o``."""
    _, K = _ct()
    B, TQ, HQ, D = q.shape
    T, H, DV = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // H
    GP = pow2(G)
    TMQ = max(1, WINDOW_TILE[0] // GP)
    out = {name: torch.empty((B, TQ, HQ, DV), device=q.device, dtype=q.dtype)
           for name, want in (("o", True), ("swa_o", want_swa), ("slc_o", want_slc)) if want}
    unused = q.new_empty((1, 1, 1, 1))      # the kernel's store target for a branch not asked for (never written)
    gc, gs, gw = (g.contiguous() for g in gates)
    tpp = WINDOW_TILES_PER_PROGRAM
    _launch(_hinted(K.window_forced_kernel, **WINDOW_HINTS), (-(-TQ // (TMQ * tpp)), B * H, 1),
            (q, k, v, o_s, lse_s, cmp_o, gc, gs, gw, out["o"], out.get("swa_o", unused), out.get("slc_o", unused),
             scale * LOG2E, T - TQ, TQ, T, w, K.MODE_OF_WINDOW_KEYS[window_keys], nlocal, G, GP, TMQ, ls, pow2(D),
             pow2(DV), want_swa, want_slc, tpp))
    return out


def forced_by_rule(case: Case) -> bool:
    """Whether ``nsa_forward`` builds the selection blocks as the forced blocks (by rule, ``forced_list``)
    + the top ``n - max_forced`` other blocks (``top_n_cutile(..., others=True)``) when it computes the
    top-n itself and does not return it (``TOPN_FORCED_BY_RULE``; the streaming cuTile top-n). The same
    set as the top-n (``tests/test_inhouse_cutile.py``), with fewer extraction steps."""
    return (TOPN_FORCED_BY_RULE and max_forced(case.forced_blocks) > 0 and TOPN_IMPL == "cutile"
            and TOPN_KERNEL == "stream")


CHUNK_BLOCKS = 2      # selected blocks per step of the chunked selection kernel (measured: 2 beats 4 and 1)
SEL_TMA = True        # allow TMA for the selected K/V tiles (False: plain loads through L1)
SEL_OCCUPANCY = 2     # cuTile occupancy hint for the selection kernel (measured: 2 beats default, 1 and 4)
SEL_WORKER_WARPS: Optional[int] = None  # cuTile num_worker_warps hint of the selection kernel (8: measured slower)
TOPN_HINTS: dict = {"occupancy": 4}  # cuTile hints of the streaming top-n kernel (measured: 2.76 vs 2.95 ms at 64k)
SEL_KEY_ROWS = False  # keys on the MMA rows, heads on the narrow side (selection_keyrows_kernel)
SEL_LATENCY = (2, 4)  # cuTile latency hints of the K and V tile loads of the selection kernel
SEL_IDX_ONCE = True   # the chunked selection kernel loads all its block indices in one load before the steps
#                       (False: CH indices per step, on the K/V loads' critical path; measured 64k, 14 blocks:
#                       16.05-16.21 vs 17.25-17.37 ms)
SEL_QUERIES_PER_PROGRAM = 4  # queries each chunked selection program takes one after the other (measured, w/o window:
#                              64k 24.53 / 24.28 / 24.03 / 24.43 ms and 16k 5.29 / 5.21 / 5.05 / 5.17 ms for 1 / 2 / 4 / 8)
SEL_MASK_ALL = False  # mask every step of the chunked selection (False: only steps with a -1 slot or a key not
#                       visible; measured 16k w/o window 5.36 -> 5.12 and 5.16 -> 5.10 ms, 14-block selection 3.93 -> 3.77)
UNION_OCCUPANCY: Optional[int] = 2  # cuTile occupancy hint of the union selection kernel (None: compiler default)
UNION_ROWS = 64       # rows (queries x padded heads) of a union selection tile: TQB = UNION_ROWS // pow2(G) queries
TOPN_IMPL = "cutile"   # or "torch" (fused torch device ops, same rule)
TOPN_KERNEL = "stream"  # "stream" (causal column chunks, running top-n), "packed" (int64 keys, one max per
#                         pick over the whole row) or "argmax" (max + min-index per pick)
TOPN_STREAM_TILE = (64, 8)   # (rows, columns per chunk) of the streaming top-n kernel (others-only, run O, 64k /
#                               16k: (32, 16) 1.11 / 0.16 ms, (64, 16) 1.16 / 0.18, (32, 32) 1.42 / 0.19, (16, 64) 1.86
#                               / 0.22, (16, 128) 2.54 / 0.29 in run N; (64, 8) vs (32, 16): 1.14 / 0.15 vs 1.14 / 0.19
#                               in run X, 16k 0.19 both in run Y4: within noise, kept)
TOPN_SLOT_BY_VALUE = True  # streaming top-n: find the worst slot by its (unique) value, one reduction less per
#                            step (64k others-only, run O: (32, 32) 1.42 vs 1.44 ms, (16, 32) 1.74 vs 1.82; within
#                            noise in runs L-N)
FUSE_GATES = True      # the chunked selection kernel writes o (gates in its epilogue) instead of a gate pass
LAZY_IMPORTANCE = True  # l = d = l': leave the importance buffer uninitialised beyond the started blocks
TOPN_FORCED_BY_RULE = True  # nsa_forward: forced blocks by rule + the top-n of the others (forced_by_rule)
FORCED_LOCAL_IN_WINDOW = True  # the window kernel takes the forced local blocks off the selection kernel and
#                                finishes slc_o and o (window_forced_plan; measured: 30.07 vs 31.51 ms at 64k)
SELECTION_IMPL = {"chunked": selection_chunked, "union": selection_union, "per_query": None}  # filled below
DEFAULT_SELECTION = "chunked"


def _flag(name: str) -> str:
    """``name`` if it is a module flag (one of the upper-case settings above), else ValueError."""
    if not (name.isupper() and hasattr(sys.modules[__name__], name)):
        raise ValueError(f"no flag {name} in oracles.inhouse_cutile.forward")
    return name


def set_flags(**values) -> None:
    """Set module flags, e.g. ``set_flags(CHUNK_BLOCKS=2)``; an unknown name is a ValueError (nothing set)."""
    for name in values:
        _flag(name)
    for name, value in values.items():
        setattr(sys.modules[__name__], name, value)


@contextlib.contextmanager
def flags(**values):
    """``set_flags(**values)`` for the block; the previous values are restored after it."""
    saved = {_flag(name): getattr(sys.modules[__name__], name) for name in values}
    set_flags(**values)
    try:
        yield
    finally:
        set_flags(**saved)


def parse_flags(items: Iterable[str]) -> dict:
    """``["NAME=VALUE", ...]`` (VALUE a Python literal) -> ``{NAME: value}``; ValueError names the bad item."""
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        try:
            if not sep:
                raise ValueError("expected NAME=VALUE")
            _flag(name)
        except ValueError as e:
            raise ValueError(f"--set {item!r}: {e}") from None
        try:
            out[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"--set {item!r}: {text!r} is not a Python literal") from None
    return out


@lru_cache(maxsize=32)
def _eq9(n_cmp: int, n_sel: int, l: int, d: int, ls: int, device: str) -> Optional[torch.Tensor]:
    """Eq. 9 map as an fp32 matrix on ``device``, or None when it is the identity (l = d = l')."""
    w = eq9_weights(n_cmp, n_sel, l, d, ls)
    if n_cmp == n_sel and torch.equal(w, torch.eye(n_cmp, dtype=w.dtype)):
        return None
    return w.to(device=device, dtype=torch.float32)


def importance(imp_cmp: torch.Tensor, l: int, d: int, ls: int, T: int) -> torch.Tensor:
    """``p_slc = p_cmp @ eq9_weights`` -> ``[B,TQ,H,NS]`` fp32."""
    NC, NS = imp_cmp.shape[-1], num_sel_blocks(T, ls)
    w = _eq9(NC, NS, l, d, ls, str(imp_cmp.device))
    return imp_cmp if w is None else imp_cmp @ w


def top_n(imp: torch.Tensor, positions: torch.Tensor, n: int, ls: int, forced_blocks: str) -> torch.Tensor:
    """Top-n blocks per (query, kv head) from ``imp [B,TQ,H,NS]`` (>= 0): candidates ``j*l' <= p`` with
    importance > 0 or forced; forced first, then by importance, ties to the lower index; -1 padding;
    ascending with -1 last. Exact order through one int64 key per block:
    ``(float bits of the score) << 32 | (NS-1-j)`` (non-negative floats order like their bits)."""
    NS = imp.shape[-1]
    j = torch.arange(NS, device=imp.device)
    pos = positions.to(imp.device)
    forced = is_forced(forced_blocks, j[None, :], pos[:, None], ls)[None, :, None, :]     # [1,TQ,1,NS]
    cand = selection_candidate(j[None, :], pos[:, None], ls)[None, :, None, :] & ((imp > 0) | forced)
    bits = imp.contiguous().view(torch.int32).to(torch.int64)
    bits = torch.where(forced, torch.full_like(bits, 0x7F800000), bits)                   # +inf bits
    key = (bits << 32) | (NS - 1 - j)
    key = torch.where(cand, key, torch.full_like(key, -1))
    kk = min(n, NS)
    val, _ = key.topk(kk, dim=-1)
    idx = torch.where(val < 0, torch.full_like(val, -1), (NS - 1) - (val & 0xFFFFFFFF))
    if kk < n:
        idx = torch.cat([idx, idx.new_full(idx.shape[:-1] + (n - kk,), -1)], dim=-1)
    return canonical_order(idx)


def top_n_others(imp: torch.Tensor, positions: torch.Tensor, n: int, ls: int, forced_blocks: str) -> torch.Tensor:
    """``top_n`` with the forced blocks left out of the candidates: the ``n`` best other blocks
    (same order and tie rule, -1 padding, ascending). ``top_n(.., n)`` = the forced candidates +
    ``top_n_others(.., n - max_forced)`` for every rule (``tests/test_inhouse_cutile.py``)."""
    NS = imp.shape[-1]
    j = torch.arange(NS, device=imp.device)
    forced = is_forced(forced_blocks, j[None, :], positions.to(imp.device)[:, None], ls)[None, :, None, :]
    return top_n(torch.where(forced, torch.zeros_like(imp), imp), positions, n, ls, "none")


def top_n_cutile(imp: torch.Tensor, q_off: int, n: int, ls: int, forced_blocks: str,
                 canonical: bool = True, others: bool = False) -> torch.Tensor:
    """``top_n`` as one cuTile kernel (``TOPN_KERNEL``; same rule and tie order), then the canonical
    ascending order (a sort of the small ``[B,TQ,H,n]`` result). ``imp`` needs to be defined only on
    the candidate columns ``j*l' <= p`` of each row. ``canonical=False``: the kernel's int32
    ``[B,TQ,H,pow2(n)]`` in pick order, -1 padded (enough for the selection kernels; no sort).
    ``others``: ``top_n_others`` (streaming kernel only)."""
    _, K = _ct()
    B, TQ, H, NS = imp.shape
    NOUT = pow2(n)
    out = torch.empty((B, TQ, H, NOUT), device=imp.device, dtype=torch.int32)
    forced = K.FORCED_KINDS.index(forced_blocks)
    if others and TOPN_KERNEL != "stream":
        raise ValueError(f"top_n_cutile(others=True) needs TOPN_KERNEL='stream', not {TOPN_KERNEL!r}")
    if TOPN_KERNEL == "stream":
        TR, CW = TOPN_STREAM_TILE
        CW = min(CW, pow2(NS))
        _launch(_hinted(K.topn_stream_kernel, **TOPN_HINTS), (-(-TQ // TR), B * H, 1),
                (imp.contiguous(), out, q_off, TQ, NS, ls, n, NOUT, TR, CW, forced, others, TOPN_SLOT_BY_VALUE))
    else:
        NSP = pow2(NS)
        TR = max(1, min(64, 8192 // NSP))
        kern = K.topn_packed_kernel if TOPN_KERNEL == "packed" else K.topn_kernel
        _launch(kern, (-(-TQ // TR), B * H, 1), (imp.contiguous(), out, q_off, TQ, NS, ls, n, NOUT, TR, NSP, forced))
    return canonical_order(out[..., :n].long()) if canonical else out


def _sequence(case: Case, q, k, v, gates, given_idx, want: set[str], keep: set[str]
              ) -> dict[str, torch.Tensor]:
    """The branches ``want`` for one sequence (q ``[B,TQs,HQ,D]``, k/v ``[B,Ts,H,*]``, gates
    ``(g_cmp, g_slc, g_swa)`` ``[B,TQs,HQ]``; ``keep``: the ones the caller returns). ``o`` comes
    from the selection epilogue when it can gate (``FUSE_GATES``, chunked or union selection), else the
    caller combines."""
    l, d, ls, scale = case.cmp_block, case.cmp_stride, case.block_size, case.softmax_scale
    T = k.shape[1]
    out: dict[str, torch.Tensor] = {}
    need_topk = "topk_idx" in want or ("slc_o" in want and given_idx is None)
    by_rule = "topk_idx" not in keep and forced_by_rule(case)
    q_off = T - q.shape[1]
    nlocal = None      # the window kernel takes the forced local blocks (window_forced_plan)
    if (by_rule and given_idx is None and "o" in want and FUSE_GATES and DEFAULT_SELECTION == "chunked"
            and not SEL_KEY_ROWS):
        nlocal = window_forced_plan(case, q.shape[2] // k.shape[2], q_off)
    if "swa_o" in want and case.window > 0 and nlocal is None:
        out["swa_o"] = sliding_window(q, k, v, case.window, case.window_keys, scale)
    if need_topk or "cmp_o" in want or "cmp_lse" in want:
        kc, vc = mean_pool(k, v, l, d)
        identity_map = _eq9(num_cmp_blocks(T, d), num_sel_blocks(T, ls), l, d, ls, str(q.device)) is None
        res = compression(q, kc, vc, T, l, d, case.cmp_mask, scale, want_importance=need_topk,
                          importance_fill=None if identity_map and LAZY_IMPORTANCE else 0.0)
        out["cmp_o"], out["cmp_lse"] = res[0], res[1]
        if need_topk:
            imp = importance(res[2], l, d, ls, T)
            if by_rule:       # [forced blocks | top n - max_forced others], unsorted (the selection kernels' input)
                mf = max_forced(case.forced_blocks)
                B, TQ, H, NS = imp.shape
                fl = forced_list(q_off, TQ, NS, ls, case.forced_blocks, str(q.device), nlocal=nlocal or 0)
                parts = [fl[None, :, None, :].expand(B, TQ, H, fl.shape[1])]
                if case.top_n > mf:
                    parts.append(top_n_cutile(imp, q_off, case.top_n - mf, ls, case.forced_blocks, canonical=False,
                                              others=True)[..., :case.top_n - mf])
                out["topk_idx"] = torch.cat(parts, -1)
            elif TOPN_IMPL == "cutile":
                out["topk_idx"] = top_n_cutile(imp, q_off, case.top_n, ls, case.forced_blocks,
                                               canonical="topk_idx" in keep)
            else:
                positions = torch.arange(q_off, T, device=q.device)      # the torch top-n only (one more launch)
                out["topk_idx"] = top_n(imp, positions, case.top_n, ls, case.forced_blocks)
    if nlocal is not None:     # selection over the other blocks, then the window kernel finishes slc_o and o
        o_s, lse_s = selection_partial(q, k, v, out["topk_idx"], ls, scale)
        out.update(window_forced(q, k, v, o_s, lse_s, out["cmp_o"], gates, nlocal, ls, case.window, case.window_keys,
                                 scale, want_swa="swa_o" in keep, want_slc="slc_o" in keep))
    elif "slc_o" in want:
        idx = given_idx if given_idx is not None else out["topk_idx"]
        if "o" in want and FUSE_GATES and DEFAULT_SELECTION in ("chunked", "union"):
            slc, out["o"] = SELECTION_IMPL[DEFAULT_SELECTION](q, k, v, idx, ls, scale, want_slc="slc_o" in keep,
                                                              gated=(out["cmp_o"], out.get("swa_o"), *gates))
            if slc is not None:
                out["slc_o"] = slc
        else:
            out["slc_o"] = SELECTION_IMPL[DEFAULT_SELECTION](q, k, v, idx, ls, scale)
    return out


SELECTION_IMPL["per_query"] = selection


def combine_gates(cmp_o: torch.Tensor, slc_o: torch.Tensor, swa_o: Optional[torch.Tensor], gates) -> torch.Tensor:
    """``o = g_cmp*cmp_o + g_slc*slc_o + g_swa*swa_o`` with ``gates = (g_cmp, g_slc, g_swa)``
    ``[B,TQ,HQ]`` (fp32 arithmetic, one cuTile pass)."""
    _, K = _ct()
    B, TQ, HQ, DV = cmp_o.shape
    HP = min(pow2(HQ), 16)
    TM = max(1, 64 // HP)
    o = torch.empty_like(cmp_o)
    g = [t.contiguous() for t in gates]
    three = swa_o is not None
    _launch(K.gate_kernel, (-(-TQ // TM), -(-HQ // HP), B),
            (cmp_o, slc_o, swa_o if three else cmp_o, g[0], g[1], g[2], o, TM, HP, pow2(DV), three))
    return o


@torch.no_grad()
def nsa_forward(case: Case, inputs: Inputs, block_indices: Optional[torch.Tensor] = None,
                branches: tuple[str, ...] = ("cmp_o", "cmp_lse", "topk_idx", "slc_o", "swa_o", "o")
                ) -> dict[str, torch.Tensor]:
    """The NSA forward of ``case`` on CUDA ``inputs`` (case dtype). Selection uses ``block_indices``
    if given, else ``inputs.block_indices`` for ``block_indices="random"`` cases, else the top-n
    computed here. Returns the requested canonical branches (``swa_o`` only when ``window > 0``)."""
    keep = set(branches)
    want = set(keep)
    if "o" in want:
        want |= {"cmp_o", "slc_o", "swa_o"}
    given = block_indices
    if given is None and case.block_indices == "random":
        given = inputs.block_indices
    q, k, v = (t.contiguous() for t in (inputs.q, inputs.k, inputs.v))
    gates = (inputs.g_cmp, inputs.g_slc, inputs.g_swa)
    if case.cu_seqlens is None:
        out = _sequence(case, q, k, v, gates, given, want, keep)
    else:
        parts = []
        for s0, s1 in case.sequences:
            gi = None if given is None else given[:, s0:s1]
            parts.append(_sequence(case, q[:, s0:s1].contiguous(), k[:, s0:s1].contiguous(),
                                   v[:, s0:s1].contiguous(), tuple(g[:, s0:s1] for g in gates), gi, want, keep))
        out = {name: torch.cat([p[name] for p in parts], 1) for name in parts[0]}
    if "o" in want and "o" not in out:
        out["o"] = combine_gates(out["cmp_o"], out["slc_o"], out.get("swa_o"), gates)
    return {name: t for name, t in out.items() if name in branches}
