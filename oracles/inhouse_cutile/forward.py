"""The in-house NSA forward on the GPU: cuTile kernels + a little torch glue on the device.

Branch entry points (all tensors on one CUDA device, canonical layouts, one sequence per call,
queries are the last TQ positions ``p = T - TQ + i``); each takes the tuning as ``config``
(``config.KernelConfig``, default: the measured best):

* ``mean_pool(k, v, l, d)`` -> ``K_cmp, V_cmp`` ``[B,ceil(T/d),H,*]`` (fp32 accumulation);
* ``compression(q, k_cmp, v_cmp, T, ...)`` -> ``cmp_o, cmp_lse[, imp_cmp]`` (``imp_cmp`` ``[B,TQ,H,NC]``
  fp32 = compression probabilities summed over the GQA group, from the same kernel);
* ``top_n_cutile(imp, ...)`` -> the top-n blocks (Eq. 9 map + forced blocks + exact order: forced first,
  then importance, ties to the lower index, -1 padding); ``top_n`` is the same rule in torch ops;
* ``selection_chunked(q, k, v, idx, ...)`` -> ``slc_o`` (gathers the selected blocks; can apply the gates);
  ``selection`` for any block size;
* ``sliding_window(q, k, v, w, window_keys, ...)`` -> ``swa_o``; ``window_forced`` also finishes the
  selection over the forced local blocks and the gates;
* ``nsa_forward(case, inputs)`` -> every canonical branch and ``o = g_cmp*cmp_o + g_slc*slc_o + g_swa*swa_o``.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch

from nsaconf.cases.conventions import (FORCED_RULES, WINDOW_KEYS, eq9_weights, is_forced, max_forced, num_cmp_blocks,
                                       num_sel_blocks, selection_candidate)
from nsaconf.cases.model import Case
from nsaconf.cases.tensors import Inputs, canonical_order
from nsaconf.oracles.inhouse_cutile.config import DEFAULT, MIN_SEL_ROWS, KernelConfig, pow2

LOG2E = 1.0 / math.log(2.0)


def _ct():
    import cuda.tile as ct
    from nsaconf.oracles.inhouse_cutile import kernels
    return ct, kernels


_HINTED: dict = {}


def _hinted(kernel, occupancy: int):
    """``kernel`` with the cuTile occupancy hint ``occupancy``, cached: a new kernel object would recompile."""
    key = (id(kernel), occupancy)
    if key not in _HINTED:
        _HINTED[key] = kernel.replace_hints(occupancy=occupancy)
    return _HINTED[key]


def _launch(kernel, grid: tuple[int, int, int], args: tuple) -> None:
    ct, _ = _ct()
    ct.launch(torch.cuda.current_stream(), grid, kernel, args)


def mean_pool(k: torch.Tensor, v: torch.Tensor, l: int, d: int,
              config: KernelConfig = DEFAULT) -> tuple[torch.Tensor, torch.Tensor]:
    """``K_cmp[c] = mean(k[c*d : min(c*d+l, T)])`` over dim 1 (same for v)."""
    _, K = _ct()
    B, T, H, D = k.shape
    DV = v.shape[-1]
    NC = num_cmp_blocks(T, d)
    kc = torch.empty((B, NC, H, D), device=k.device, dtype=k.dtype)
    vc = torch.empty((B, NC, H, DV), device=v.device, dtype=v.dtype)
    _launch(_hinted(K.mean_pool_kernel, config.pool_occupancy), (NC, B * H, 1),
            (k, v, kc, vc, T, l, d, pow2(l), pow2(D), pow2(DV)))
    return kc, vc


def _dense(q, k, v, o, lse, imp, scale: float, T: int, nkeys: int, mode: int, l: int, d: int, w: int,
           is_cmp: bool, want_imp: bool, config: KernelConfig) -> None:
    _, K = _ct()
    B, TQ, HQ, D = q.shape
    H, DV = k.shape[2], v.shape[-1]
    G = HQ // H
    GP, TMQ, key_tile = config.dense_tile(is_cmp, G)
    nt1 = config.one_pass_tiles(nkeys, key_tile) if is_cmp and want_imp else 0
    _launch(K.dense_branch_kernel, (-(-TQ // TMQ), B * H, 1),
            (q, k, v, o, lse, imp, scale * LOG2E, T - TQ, TQ, nkeys, l, d, w, mode,
             G, GP, TMQ, key_tile, pow2(D), pow2(DV), is_cmp, want_imp, nt1))


def compression(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, T: int, l: int, d: int,
                cmp_mask: str, scale: float, want_importance: bool = False, importance_fill: Optional[float] = 0.0,
                config: KernelConfig = DEFAULT):
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
    _dense(q, k_cmp, v_cmp, o, lse, imp, scale, T, NC, K.MODE_OF_CMP_MASK[cmp_mask], l, d, 0, True, want_importance,
           config)
    return (o, lse, imp) if want_importance else (o, lse)


def sliding_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int, window_keys: str,
                   scale: float, config: KernelConfig = DEFAULT) -> torch.Tensor:
    """Attention over the keys ``WINDOW_KEYS[window_keys](p, s, w)``."""
    _, K = _ct()
    B, TQ, HQ, _ = q.shape
    T = k.shape[1]
    o = torch.empty((B, TQ, HQ, v.shape[-1]), device=q.device, dtype=q.dtype)
    dummy = torch.empty((1, 1, 1), device=q.device, dtype=torch.float32)
    _dense(q, k, v, o, dummy, dummy.view(1, 1, 1, 1), scale, T, T, K.MODE_OF_WINDOW_KEYS[window_keys], 1, 1, w,
           False, False, config)
    return o


def selection(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, ls: int,
              scale: float) -> torch.Tensor:
    """Attention over the keys ``s <= p`` of the selection blocks ``idx [B,TQ,H,n]`` (-1: none), one block
    at a time (any ``l'``)."""
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


def _gate_args(q: torch.Tensor, shape: tuple, gated: Optional[tuple], want_slc: bool):
    """What the chunked selection kernel's gated epilogue takes and what its entry point returns:
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


def _index_rows(idx: torch.Tensor, width: int, device) -> torch.Tensor:
    """The block indices of the chunked selection kernel: int32, contiguous, rows padded with -1 to
    pow2(``width``) (one aligned load of the row; the kernel reads its first ``width`` = NP)."""
    out = idx.to(device=device, dtype=torch.int32)
    cols = pow2(width)
    if cols != out.shape[-1]:
        out = torch.nn.functional.pad(out, (0, cols - out.shape[-1]), value=-1)
    return out.contiguous()


def selection_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, ls: int,
                      scale: float, gated: Optional[tuple] = None, want_slc: bool = True,
                      config: KernelConfig = DEFAULT):
    """``selection`` for a power-of-two ``l'``: ``config.chunk`` selected blocks per step concatenated into
    one key tile (no data-dependent branch); falls back to ``selection`` otherwise.

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
    CH = config.chunk(n, ls)
    NP = -(-n // CH) * CH
    sel = _index_rows(idx, NP, q.device)
    arrays, flags, result = _gate_args(q, (B, TQ, HQ, DV), gated, want_slc)
    no_lse = q.new_empty((1, 1, 1), dtype=torch.float32)
    qpp = config.sel_queries_per_program
    _launch(_hinted(K.selection_chunk_kernel, config.sel_occupancy), (-(-TQ // qpp), B * H, 1),
            (q, k, v, sel, *arrays, no_lse, scale * LOG2E, T - TQ, T, NP, CH, ls, G, GP, pow2(D), pow2(DV),
             *flags, False, pow2(NP), qpp))
    return result


def selection_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, ls: int,
                      scale: float, config: KernelConfig = DEFAULT) -> tuple[torch.Tensor, torch.Tensor]:
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
    CH = config.chunk(n, ls)
    g = q.new_empty((1, 1, 1))
    qpp = config.sel_queries_per_program
    _launch(_hinted(K.selection_chunk_kernel, config.sel_occupancy), (-(-TQ // qpp), B * H, 1),
            (q, k, v, _index_rows(idx, n, q.device), o, o, o, g, g, g, o, lse,
             scale * LOG2E, T - TQ, T, n, CH, ls, G, GP, pow2(D), pow2(DV), True, False, False, True, pow2(n), qpp))
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


def window_forced_plan(case: Case, G: int, q_off: int, config: KernelConfig = DEFAULT) -> Optional[int]:
    """``nlocal`` when the sliding-window kernel can take the forced local blocks ``p//l' - nlocal + 1 .. p//l'``
    off the selection kernel (``window_forced``), else None: 2 for ``initial_local``, 1 for ``current``. Needs
    their keys ``s <= p`` inside every position's window, the window tile's queries inside one selection block
    (``l'`` and ``q_off`` multiples of the TMQ queries per tile) and a power-of-two ``l'`` of 16..128 (the
    window kernel's key tile)."""
    if case.window <= 0:
        return None
    ls, rule = case.block_size, FORCED_RULES[case.forced_blocks]
    far = 10 * ls                     # a position far from the start (the rules are shift-invariant there)
    nlocal = 2 if bool(rule(9, far, ls)) and bool(rule(10, far, ls)) else int(bool(rule(10, far, ls)))
    _, TMQ, _ = config.dense_tile(False, G)
    if (nlocal == 0 or pow2(ls) != ls or not 16 <= ls <= 128 or ls % TMQ or q_off % TMQ
            or not bool(WINDOW_KEYS[case.window_keys](nlocal * ls - 1, 0, case.window))):
        return None
    return nlocal


def window_forced(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o_s: torch.Tensor, lse_s: torch.Tensor,
                  cmp_o: torch.Tensor, gates, nlocal: int, ls: int, w: int, window_keys: str,
                  scale: float, want_swa: bool = False, want_slc: bool = False,
                  config: KernelConfig = DEFAULT) -> dict[str, torch.Tensor]:
    """Sliding window + the ``nlocal`` forced local blocks (``window_forced_plan``) merged into the selection's
    partial result ``(o_s, lse_s)`` (``selection_partial`` over the other blocks) + the gates, in one
    cuTile kernel (``window_forced_kernel``). Returns ``o`` and, on request, ``swa_o`` / ``slc_o``."""
    _, K = _ct()
    B, TQ, HQ, D = q.shape
    T, H, DV = k.shape[1], k.shape[2], v.shape[-1]
    G = HQ // H
    GP, TMQ, _ = config.dense_tile(False, G)
    out = {name: torch.empty((B, TQ, HQ, DV), device=q.device, dtype=q.dtype)
           for name, want in (("o", True), ("swa_o", want_swa), ("slc_o", want_slc)) if want}
    unused = q.new_empty((1, 1, 1, 1))      # the kernel's store target for a branch not asked for (never written)
    gc, gs, gw = (g.contiguous() for g in gates)
    _launch(K.window_forced_kernel, (-(-TQ // TMQ), B * H, 1),
            (q, k, v, o_s, lse_s, cmp_o, gc, gs, gw, out["o"], out.get("swa_o", unused), out.get("slc_o", unused),
             scale * LOG2E, T - TQ, TQ, T, w, K.MODE_OF_WINDOW_KEYS[window_keys], nlocal, G, GP, TMQ, ls, pow2(D),
             pow2(DV), want_swa, want_slc))
    return out


def forced_by_rule(case: Case) -> bool:
    """Whether ``nsa_forward`` builds the selection blocks as the forced blocks (by rule, ``forced_list``)
    + the top ``n - max_forced`` other blocks (``top_n_cutile(..., others=True)``) when it computes the
    top-n itself and does not return it: the same set as the top-n (``tests/test_inhouse_cutile.py``),
    with fewer extraction steps."""
    return max_forced(case.forced_blocks) > 0


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
    """Top-n blocks per (query, kv head) from ``imp [B,TQ,H,NS]`` (>= 0) in torch ops: candidates ``j*l' <= p``
    with importance > 0 or forced; forced first, then by importance, ties to the lower index; -1 padding;
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
                 canonical: bool = True, others: bool = False, config: KernelConfig = DEFAULT) -> torch.Tensor:
    """``top_n`` as one cuTile kernel (``topn_stream_kernel``; same rule and tie order), then the canonical
    ascending order (a sort of the small ``[B,TQ,H,n]`` result). ``imp`` needs to be defined only on
    the candidate columns ``j*l' <= p`` of each row. ``canonical=False``: the kernel's int32
    ``[B,TQ,H,pow2(n)]`` in pick order, -1 padded (enough for the selection kernels; no sort).
    ``others``: ``top_n_others``."""
    _, K = _ct()
    B, TQ, H, NS = imp.shape
    NOUT = pow2(n)
    out = torch.empty((B, TQ, H, NOUT), device=imp.device, dtype=torch.int32)
    TR, CW = config.topn_tile(NS)
    _launch(_hinted(K.topn_stream_kernel, config.topn_occupancy), (-(-TQ // TR), B * H, 1),
            (imp.contiguous(), out, q_off, TQ, NS, ls, n, NOUT, TR, CW, K.FORCED_KINDS.index(forced_blocks), others))
    return canonical_order(out[..., :n].long()) if canonical else out


def _sequence(case: Case, q, k, v, gates, given_idx, want: set[str], keep: set[str], config: KernelConfig
              ) -> dict[str, torch.Tensor]:
    """The branches ``want`` for one sequence (q ``[B,TQs,HQ,D]``, k/v ``[B,Ts,H,*]``, gates
    ``(g_cmp, g_slc, g_swa)`` ``[B,TQs,HQ]``; ``keep``: the ones the caller returns). ``o`` comes
    from the selection epilogue (or the window kernel, ``window_forced``), else the caller combines."""
    l, d, ls, scale = case.cmp_block, case.cmp_stride, case.block_size, case.softmax_scale
    T = k.shape[1]
    out: dict[str, torch.Tensor] = {}
    need_topk = "topk_idx" in want or ("slc_o" in want and given_idx is None)
    by_rule = "topk_idx" not in keep and forced_by_rule(case)
    q_off = T - q.shape[1]
    nlocal = None      # the window kernel takes the forced local blocks (window_forced_plan)
    if by_rule and given_idx is None and "o" in want:
        nlocal = window_forced_plan(case, q.shape[2] // k.shape[2], q_off, config)
    if "swa_o" in want and case.window > 0 and nlocal is None:
        out["swa_o"] = sliding_window(q, k, v, case.window, case.window_keys, scale, config)
    if need_topk or "cmp_o" in want or "cmp_lse" in want:
        kc, vc = mean_pool(k, v, l, d, config)
        identity_map = _eq9(num_cmp_blocks(T, d), num_sel_blocks(T, ls), l, d, ls, str(q.device)) is None
        res = compression(q, kc, vc, T, l, d, case.cmp_mask, scale, want_importance=need_topk,
                          importance_fill=None if identity_map else 0.0, config=config)
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
                                              others=True, config=config)[..., :case.top_n - mf])
                out["topk_idx"] = torch.cat(parts, -1)
            else:
                out["topk_idx"] = top_n_cutile(imp, q_off, case.top_n, ls, case.forced_blocks,
                                               canonical="topk_idx" in keep, config=config)
    if nlocal is not None:     # selection over the other blocks, then the window kernel finishes slc_o and o
        o_s, lse_s = selection_partial(q, k, v, out["topk_idx"], ls, scale, config)
        out.update(window_forced(q, k, v, o_s, lse_s, out["cmp_o"], gates, nlocal, ls, case.window, case.window_keys,
                                 scale, want_swa="swa_o" in keep, want_slc="slc_o" in keep, config=config))
    elif "slc_o" in want:
        idx = given_idx if given_idx is not None else out["topk_idx"]
        if "o" in want:
            slc, out["o"] = selection_chunked(q, k, v, idx, ls, scale, want_slc="slc_o" in keep,
                                              gated=(out["cmp_o"], out.get("swa_o"), *gates), config=config)
            if slc is not None:
                out["slc_o"] = slc
        else:
            out["slc_o"] = selection_chunked(q, k, v, idx, ls, scale, config=config)
    return out


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
                branches: tuple[str, ...] = ("cmp_o", "cmp_lse", "topk_idx", "slc_o", "swa_o", "o"),
                config: KernelConfig = DEFAULT) -> dict[str, torch.Tensor]:
    """The NSA forward of ``case`` on CUDA ``inputs`` (case dtype) with the kernel tuning ``config``. Selection
    uses ``block_indices`` if given, else ``inputs.block_indices`` for ``block_indices="random"`` cases, else the
    top-n computed here. Returns the requested canonical branches (``swa_o`` only when ``window > 0``)."""
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
        out = _sequence(case, q, k, v, gates, given, want, keep, config)
    else:
        parts = []
        for s0, s1 in case.sequences:
            gi = None if given is None else given[:, s0:s1]
            parts.append(_sequence(case, q[:, s0:s1].contiguous(), k[:, s0:s1].contiguous(),
                                   v[:, s0:s1].contiguous(), tuple(g[:, s0:s1] for g in gates), gi, want, keep,
                                   config))
        out = {name: torch.cat([p[name] for p in parts], 1) for name in parts[0]}
    if "o" in want and "o" not in out:
        out["o"] = combine_gates(out["cmp_o"], out["slc_o"], out.get("swa_o"), gates)
    return {name: t for name, t in out.items() if name in branches}
