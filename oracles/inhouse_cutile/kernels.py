"""cuTile kernels of the in-house NSA forward (imported lazily: needs ``cuda-tile`` 1.7.0).

Layouts are the canonical ones: q ``[B,TQ,HQ,D]``, k ``[B,T,H,D]``, v ``[B,T,H,DV]``; query i sits at
``p = q_off + i``. Every program handles the G query heads of one kv head together (rows of a tile
are ``(query, head)`` pairs, ``row = i_local*GP + g``), so each K/V tile is loaded once per group.
Heads are padded to ``GP`` (a power of two >= G) through a sliced view whose padding loads zeros;
padded rows are never stored. Visibility rules are the functions of ``cases.conventions`` called
inside the kernels (cuTile inlines plain Python functions), so no rule is re-derived here.

Softmax is online in base 2 (``s2 = scale*log2(e) * q.k``) with a finite initial maximum, so a row
that sees no key keeps ``l = 0`` and is written as ``o = 0``, ``lse = -inf`` without any NaN.
"""
from __future__ import annotations

import math

import cuda.tile as ct
import numpy as np

from nsaconf.cases.conventions import (anti_causal, current_block, end_exclusive, end_inclusive, forced_current,
                               forced_initial_local, forced_none,
                               selection_candidate, selection_causal, window_w, window_w_plus_1)

ConstInt = ct.Constant[int]
ConstBool = ct.Constant[bool]
ZERO = ct.PaddingMode.ZERO
NEG = -1.0e30          # finite initial running max: all-masked rows never form inf - inf
LN2 = math.log(2.0)

# MODE of ``dense_branch_kernel``: the compression conventions 0..3, then the two window rules
MODE_OF_CMP_MASK = {"end_inclusive": 0, "current_block": 1, "anti_causal": 2, "end_exclusive": 3}
MODE_OF_WINDOW_KEYS = {"w": 4, "w_plus_1": 5}


def _visible(IS_CMP, mode, key, pos, L, DS, W):
    """Visibility of key/compressed block ``key`` ``[1,TN]`` for positions ``pos`` ``[M,1]``;
    ``mode`` is a run-time int (one compiled kernel serves every convention)."""
    if IS_CMP:
        return ct.where(mode == 0, end_inclusive(key, pos, L, DS),
                        ct.where(mode == 1, current_block(key, pos, L, DS),
                                 ct.where(mode == 2, anti_causal(key, pos, L, DS),
                                          end_exclusive(key, pos, L, DS))))
    else:
        return ct.where(mode == 4, window_w(pos, key, W), window_w_plus_1(pos, key, W))


def _group_view(A, hk, G, GP):
    """The G heads of kv head ``hk`` along axis 2 of ``A`` and the head-tile index into the result: ``A``
    itself and ``hk`` when G is the padded group size GP, else a sliced view (padding loads zeros,
    padded rows are dropped on store) and 0."""
    if G == GP:
        view = A
        hidx = hk
    else:
        view = A.slice(axis=2, start=hk * G, stop=hk * G + G)
        hidx = 0
    return view, hidx


def _batch_head(A):
    """(batch, head) of this program: grid axis 1 runs over ``B * H`` with ``H = A.shape[2]``."""
    bh = ct.bid(1)
    H = A.shape[2]
    return bh // H, bh % H


def _each_tile(body, PER_PROGRAM, n_tiles, args):
    """``body(tile, *args)`` for this program's tiles ``bid(0)*PER_PROGRAM ..``, one after the other (tile
    ``bid(0)`` alone when PER_PROGRAM is 1); the last program repeats tile ``n_tiles - 1`` where ``n_tiles`` is
    not a multiple of PER_PROGRAM, so it writes the same values again."""
    if PER_PROGRAM == 1:
        body(ct.bid(0), *args)
    else:
        for t in range(PER_PROGRAM):
            body(min(ct.bid(0) * PER_PROGRAM + t, n_tiles - 1), *args)


def _softmax_state(M, DVP):
    """Initial online-softmax state of M rows: running max ``NEG`` (finite, so a row that never sees a
    key gives no ``inf - inf``), sum 0, accumulator ``[M, DVP]`` 0."""
    return (ct.full((M, 1), NEG, dtype=np.float32), ct.full((M, 1), 0.0, dtype=np.float32),
            ct.full((M, DVP), 0.0, dtype=np.float32))


def _softmax_finish(acc, l_i):
    """``acc / l_i`` for rows that saw a key, exactly 0 for rows that saw none (``l_i = 0``)."""
    has = l_i > 0.0
    return ct.where(has, acc / ct.where(has, l_i, 1.0), 0.0)


def _selected_kv(K, V, b, hk, j, start, T, LS, LSP, DP, DVP, ALIGNED):
    """``K^T`` ``[DP, LSP]`` and ``V`` ``[LSP, DVP]`` of selection block ``j`` (keys ``start ..
    start+LS-1``) of kv head ``hk``: by tile index when ``ALIGNED`` (LS = LSP), else through views
    sliced to the block (and to T), padded with zeros."""
    if ALIGNED:
        k = ct.load(K, index=(b, hk, 0, j), shape=(1, 1, DP, LSP), order=(0, 2, 3, 1),
                    padding_mode=ZERO, latency=2).reshape((DP, LSP))
        v = ct.load(V, index=(b, j, hk, 0), shape=(1, LSP, 1, DVP), padding_mode=ZERO,
                    latency=4).reshape((LSP, DVP))
    else:
        stop = min(start + LS, T)
        Ks = K.slice(axis=1, start=start, stop=stop)
        Vs = V.slice(axis=1, start=start, stop=stop)
        k = ct.load(Ks, index=(b, hk, 0, 0), shape=(1, 1, DP, LSP), order=(0, 2, 3, 1),
                    padding_mode=ZERO, latency=2).reshape((DP, LSP))
        v = ct.load(Vs, index=(b, 0, hk, 0), shape=(1, LSP, 1, DVP), padding_mode=ZERO,
                    latency=4).reshape((LSP, DVP))
    return k, v


def _softmax_step(s, vis, qk_scale2, m_i, l_i, acc, v, dtype):
    """One online-softmax step in base 2 over the keys on the last axis: scores ``s`` (masked by
    ``vis``), values ``v``; returns the new running max ``m_i``, sum ``l_i`` and ``acc``."""
    return _softmax_update(ct.where(vis, s * qk_scale2, -np.inf), m_i, l_i, acc, v, dtype)


def _softmax_update(s, m_i, l_i, acc, v, dtype):
    """``_softmax_step`` on scores ``s`` already scaled to base 2 and masked (-inf)."""
    m_new = ct.maximum(m_i, ct.max(s, axis=-1, keepdims=True))
    pr = ct.exp2(s - m_new, flush_to_zero=True)
    alpha = ct.exp2(m_i - m_new, flush_to_zero=True)
    l_i = l_i * alpha + ct.sum(pr, axis=-1, keepdims=True)
    acc = ct.mma(pr.astype(dtype), v, acc * alpha)
    return m_new, l_i, acc



def _tile_all_visible(IS_CMP, mode, c0, c1, p0, p1, NKEYS, L, DS, W):
    """Whether every key ``c0..c1`` is visible to every position ``p0..p1`` (scalars), from two corners:
    each rule's visible keys for a position form an interval whose ends do not decrease with the
    position (causal block rules, the leaky ``anti_causal``, windows), so the tile is fully visible
    iff ``(c1, p0)`` and ``(c0, p1)`` are (``tests/test_inhouse_cutile.py`` checks this on every rule)."""
    return (c1 < NKEYS) & _visible(IS_CMP, mode, c1, p0, L, DS, W) & _visible(IS_CMP, mode, c0, p1, L, DS, W)


def _dense_step(q, K, V, b, hk, kt, M, TN, DP, DVP, IS_CMP, MODE, pos, p0, p1, NKEYS, L, DS, W, qk_scale2,
                m_i, l_i, acc, dtype):
    """One key tile ``kt`` (TN keys) of the compression or window attention (``_visible``) for the rows at
    ``pos``: the online-softmax step over ``_tile_scores``."""
    s = _tile_scores(q, K, b, hk, kt, M, TN, DP, IS_CMP, MODE, pos, p0, p1, NKEYS, L, DS, W, qk_scale2)
    m_new = ct.maximum(m_i, ct.max(s, axis=-1, keepdims=True))
    p = ct.exp2(s - m_new, flush_to_zero=True)
    alpha = ct.exp2(m_i - m_new, flush_to_zero=True)
    l_i = l_i * alpha + ct.sum(p, axis=-1, keepdims=True)
    acc = ct.mma(p.astype(dtype), _tile_values(V, b, hk, kt, TN, DVP), acc * alpha)
    return m_new, l_i, acc


def _tile_scores(q, K, b, hk, kt, M, TN, DP, IS_CMP, MODE, pos, p0, p1, NKEYS, L, DS, W, qk_scale2):
    """Scores of key tile ``kt`` (TN keys) for the rows at ``pos``, scaled to base 2, -inf where not visible
    (``_visible``); the mask only on tiles that some row does not see whole (``_tile_all_visible``)."""
    k = ct.load(K, index=(b, hk, 0, kt), shape=(1, 1, DP, TN), order=(0, 2, 3, 1),
                padding_mode=ZERO, latency=2).reshape((DP, TN))
    s = ct.mma(q, k, ct.full((M, TN), 0.0, dtype=np.float32))
    if _tile_all_visible(IS_CMP, MODE, kt * TN, kt * TN + TN - 1, p0, p1, NKEYS, L, DS, W):
        s = s * qk_scale2                 # no mask on tiles every row sees whole
    else:
        key = kt * TN + ct.arange(TN, dtype=np.int32)[None, :]
        s = ct.where(_visible(IS_CMP, MODE, key, pos, L, DS, W) & (key < NKEYS), s * qk_scale2, -np.inf)
    return s


def _tile_values(V, b, hk, kt, TN, DVP):
    """``V`` tile ``kt`` ``[TN, DVP]`` of kv head ``hk`` (zero-padded past the end)."""
    return ct.load(V, index=(b, kt, hk, 0), shape=(1, TN, 1, DVP), padding_mode=ZERO, latency=4).reshape((TN, DVP))


def _key_tiles(MODE, p0, p1, NKEYS, L, DS, W, TN):
    """The key tiles ``kt_lo .. kt_hi - 1`` that some position ``p0..p1`` may see (exact masking is the caller's):
    the interval of keys each rule (``_visible``) allows, rounded out to tiles of TN keys."""
    lo = 0
    hi = NKEYS
    if MODE == 0:
        hi = min(max(p1 - L + 1 + DS, 0) // DS, NKEYS)
    elif MODE == 1:
        hi = min(p1 // DS + 1, NKEYS)
    elif MODE == 2:
        lo = max(p0 - L + DS, 0) // DS
    elif MODE == 3:
        hi = min(max(p1 - L + DS, 0) // DS, NKEYS)
    else:
        lo = max(p0 - W, 0)
        hi = min(p1 + 1, NKEYS)
    kt_lo = lo // TN
    kt_hi = ct.cdiv(hi, TN)
    if hi <= lo:
        kt_hi = kt_lo
    return kt_lo, kt_hi


def _dense_rows(qt, Q, K, q_off, TQ, G, GP, TMQ, DP):
    """The rows of query tile ``qt`` (TMQ queries x the GP padded heads of kv head ``bid(1) % H``): batch, kv head,
    row count M, first and last position, each row's head in the group ``[M]`` and position ``[M,1]``, the head-tile
    index of ``_group_view`` and ``q`` ``[M, DP]``."""
    b, hk = _batch_head(K)
    M = TMQ * GP
    p0 = q_off + qt * TMQ
    p1 = min(p0 + TMQ - 1, q_off + TQ - 1)
    rows = ct.arange(M, dtype=np.int32)
    row_g = rows % GP                          # head inside the group
    pos = (p0 + rows // GP)[:, None]           # [M,1]
    Qv, hidx = _group_view(Q, hk, G, GP)
    q = ct.load(Qv, index=(b, qt, hidx, 0), shape=(1, TMQ, GP, DP), padding_mode=ZERO).reshape((M, DP))
    return b, hk, M, p0, p1, row_g, pos, hidx, q


def _dense_finish(m_i, l_i, acc, O, LSE, b, qt, hk, hidx, G, GP, TMQ, DVP, IS_CMP):
    """Store ``o = acc / l`` (0 for a row that saw no key) and, for the compression (``IS_CMP``), the natural-log
    LSE (-inf: no key); returns ``has = l > 0``, ``l`` with 1 where not ``has``, and the base-2 LSE ``[M,1]``."""
    has = l_i > 0.0
    l_safe = ct.where(has, l_i, 1.0)
    out = ct.where(has, acc / l_safe, 0.0)
    Ov, _ = _group_view(O, hk, G, GP)
    ct.store(Ov, index=(b, qt, hidx, 0), tile=out.reshape((1, TMQ, GP, DVP)).astype(O.dtype))
    lse2 = ct.where(has, m_i + ct.log2(l_safe), -np.inf)   # [M,1] base 2
    if IS_CMP:
        LSEv, _ = _group_view(LSE, hk, G, GP)
        ct.store(LSEv, index=(b, qt, hidx), tile=(lse2 * LN2).reshape((1, TMQ, GP)))
    return has, l_safe, lse2


def _dense_tile_one_pass(qt, Q, K, V, O, LSE, IMP, qk_scale2, q_off, TQ, NKEYS, L, DS, W, MODE, G, GP, TMQ, TN, DP,
                         DVP, IS_CMP, WRITE_IMP, NT1):
    """``_dense_tile`` for the compression with importance when every key tile fits at once (``NKEYS <= NT1*TN``):
    the scaled, masked scores ``s_t`` of the tiles ``t`` in ``kt_lo .. kt_hi - 1`` (the others: -inf, no load),
    ``m = max_t rowmax(s_t)``, ``p_t = 2^(s_t - m)``, ``l = sum_t rowsum(p_t)``, ``o = sum_t p_t V_t / l``,
    ``IMP[.., t] = sum_g p_t / l``: the same values as the two passes (up to rounding), one ``q K^T`` per tile."""
    b, hk, M, p0, p1, row_g, pos, hidx, q = _dense_rows(qt, Q, K, q_off, TQ, G, GP, TMQ, DP)
    kt_lo, kt_hi = _key_tiles(MODE, p0, p1, NKEYS, L, DS, W, TN)
    m_i = ct.full((M, 1), NEG, dtype=np.float32)
    ss = ()
    for t in ct.static_iter(range(NT1)):
        if (t >= kt_lo) & (t < kt_hi):
            s = _tile_scores(q, K, b, hk, t, M, TN, DP, IS_CMP, MODE, pos, p0, p1, NKEYS, L, DS, W, qk_scale2)
        else:
            s = ct.full((M, TN), -np.inf, dtype=np.float32)
        m_i = ct.maximum(m_i, ct.max(s, axis=-1, keepdims=True))
        ss += (s,)
    l_i = ct.full((M, 1), 0.0, dtype=np.float32)
    acc = ct.full((M, DVP), 0.0, dtype=np.float32)
    ps = ()
    for t in ct.static_iter(range(NT1)):
        p = ct.exp2(ss[t] - m_i, flush_to_zero=True)      # m_i >= NEG is finite: masked keys give 0
        l_i = l_i + ct.sum(p, axis=-1, keepdims=True)
        if (t >= kt_lo) & (t < kt_hi):
            acc = ct.mma(p.astype(Q.dtype), _tile_values(V, b, hk, t, TN, DVP), acc)
        ps += (p,)
    has, l_safe, _ = _dense_finish(m_i, l_i, acc, O, LSE, b, qt, hk, hidx, G, GP, TMQ, DVP, IS_CMP)
    # IMP on the tiles _dense_tile writes: every block started by the tile's last query (zero where not visible)
    # and every tile some row may see
    inv = ct.where(has & (row_g < G)[:, None], 1.0 / l_safe, 0.0)
    kt_started = ct.cdiv(min(p1 // DS + 1, NKEYS), TN)
    for t in ct.static_iter(range(NT1)):
        if (t < kt_started) | ((t >= kt_lo) & (t < kt_hi)):
            imp = ct.sum((ps[t] * inv).reshape((TMQ, GP, TN)), axis=1)
            ct.store(IMP, index=(b, qt, hk, t), tile=imp.reshape((1, TMQ, 1, TN)))


@ct.kernel(occupancy=2)
def dense_branch_kernel(Q, K, V, O, LSE, IMP,
                        qk_scale2: float, q_off: int, TQ: int, NKEYS: int, L: int, DS: int, W: int,
                        MODE: int, G: ConstInt, GP: ConstInt, TMQ: ConstInt, TN: ConstInt,
                        DP: ConstInt, DVP: ConstInt, IS_CMP: ConstBool, WRITE_IMP: ConstBool, NT1: ConstInt):
    """Compression (MODE 0..3, K/V = pooled blocks, NKEYS = #blocks) or sliding-window (MODE 4/5)
    attention for TMQ queries x G heads of kv head ``bid(1) % H``.

    ``o = softmax(scale q K^T + mask) V``; ``LSE`` natural log; ``IMP[b,i,h,c] = sum_g p[i,g,c]``
    (second pass over the same key tiles reusing the LSE; compression only). Key tiles that every
    row of the tile sees whole (``_tile_all_visible``) skip the mask.

    ``NT1`` > 0 (compression with ``WRITE_IMP``, the caller guarantees ``NKEYS <= NT1*TN``): one pass instead of
    two (``_dense_tile_one_pass``): the scores of all key tiles are held at once, so ``IMP`` comes from the same
    probabilities as ``o``, without a second ``q K^T``. Only the tiles some row may see are loaded."""
    args = (Q, K, V, O, LSE, IMP, qk_scale2, q_off, TQ, NKEYS, L, DS, W, MODE, G, GP, TMQ, TN, DP, DVP, IS_CMP,
            WRITE_IMP)
    if NT1 > 0:
        _dense_tile_one_pass(ct.bid(0), *args, NT1)
    else:
        _dense_tile(ct.bid(0), *args)


def _dense_tile(qt, Q, K, V, O, LSE, IMP, qk_scale2, q_off, TQ, NKEYS, L, DS, W, MODE, G, GP, TMQ, TN, DP, DVP, IS_CMP,
                WRITE_IMP):
    """The body of ``dense_branch_kernel`` for query tile ``qt``."""
    b, hk, M, p0, p1, row_g, pos, hidx, q = _dense_rows(qt, Q, K, q_off, TQ, G, GP, TMQ, DP)
    kt_lo, kt_hi = _key_tiles(MODE, p0, p1, NKEYS, L, DS, W, TN)
    offs_n = ct.arange(TN, dtype=np.int32)[None, :]
    m_i, l_i, acc = _softmax_state(M, DVP)
    for kt in range(kt_lo, kt_hi):
        m_i, l_i, acc = _dense_step(q, K, V, b, hk, kt, M, TN, DP, DVP, IS_CMP, MODE, pos, p0, p1, NKEYS, L, DS, W,
                                    qk_scale2, m_i, l_i, acc, Q.dtype)
    has, _, lse2 = _dense_finish(m_i, l_i, acc, O, LSE, b, qt, hk, hidx, G, GP, TMQ, DVP, IS_CMP)
    if WRITE_IMP:
        keep = has & (row_g < G)[:, None]
        # IMP is defined on every block started by the tile's last query (zero where not visible), so
        # the caller may pass an uninitialised buffer when the selection blocks are these blocks
        kt_started = ct.cdiv(min(p1 // DS + 1, NKEYS), TN)
        zeros = ct.full((1, TMQ, 1, TN), 0.0, dtype=np.float32)
        for kt in range(0, kt_lo):
            ct.store(IMP, index=(b, qt, hk, kt), tile=zeros)
        for kt in range(kt_hi, kt_started):
            ct.store(IMP, index=(b, qt, hk, kt), tile=zeros)
        lse_keep = ct.where(keep, lse2, np.inf)     # rows not kept: exp2(s - inf) = 0
        for kt in range(kt_lo, kt_hi):
            k = ct.load(K, index=(b, hk, 0, kt), shape=(1, 1, DP, TN), order=(0, 2, 3, 1),
                        padding_mode=ZERO, latency=2).reshape((DP, TN))
            s = ct.mma(q, k, ct.full((M, TN), 0.0, dtype=np.float32))
            pr = ct.exp2(s * qk_scale2 - lse_keep, flush_to_zero=True)
            if not _tile_all_visible(IS_CMP, MODE, kt * TN, kt * TN + TN - 1, p0, p1, NKEYS, L, DS, W):
                key = kt * TN + offs_n
                pr = ct.where(_visible(IS_CMP, MODE, key, pos, L, DS, W) & (key < NKEYS), pr, 0.0)
            imp = ct.sum(pr.reshape((TMQ, GP, TN)), axis=1)
            ct.store(IMP, index=(b, qt, hk, kt), tile=imp.reshape((1, TMQ, 1, TN)))


def _merge_normalised(o_a, lse_a, m_b, l_b, acc_b):
    """Softmax output over the union of two disjoint key sets: ``o_a`` (normalised, fp32) with base-2
    log-sum-exp ``lse_a`` (-inf: no key) and an online state ``(m_b, l_b, acc_b)`` (``o = 0`` if neither
    saw a key)."""
    mx = ct.maximum(lse_a, m_b)          # m_b >= NEG is finite, so mx is
    wa = ct.exp2(lse_a - mx, flush_to_zero=True)
    eb = ct.exp2(m_b - mx, flush_to_zero=True)
    den = wa + eb * l_b
    has = den > 0.0
    return ct.where(has, (o_a * wa + acc_b * eb) / ct.where(has, den, 1.0), 0.0)


@ct.kernel(occupancy=2)
def window_forced_kernel(Q, K, V, OS, LSES, CMP, GC, GS, GW, OUT, SWA, SLC,
                         qk_scale2: float, q_off: int, TQ: int, T: int, W: int, MODE: int,
                         NLOCAL: ConstInt, G: ConstInt, GP: ConstInt, TMQ: ConstInt, LS: ConstInt,
                         DP: ConstInt, DVP: ConstInt, WRITE_SWA: ConstBool, WRITE_SLC: ConstBool):
    """Sliding window (MODE 4/5) that also finishes the selection branch and the gates, for TMQ queries x
    the G heads of kv head ``bid(1) % H``, key tiles of LS keys = selection blocks.

    The caller guarantees that the tile's queries lie in one selection block ``c`` and that the NLOCAL
    forced local blocks ``c-NLOCAL+1 .. c`` lie inside every row's window, so one softmax state over
    their tiles is both the window's and the selection's state over them (same keys ``s <= p``):
      1. state B over the local tiles; ``slc_o`` = merge(B, the selection kernel's result over the
         other blocks ``(OS, LSES)``: normalised, base-2 log-sum-exp);
      2. the window goes on from B over its other tiles: ``swa_o``;
      3. ``OUT = GC*CMP + GS*slc_o + GW*swa_o`` in fp32 (``WRITE_SWA``/``WRITE_SLC``: also store those)."""
    _window_forced_tile(ct.bid(0), Q, K, V, OS, LSES, CMP, GC, GS, GW, OUT, SWA, SLC, qk_scale2, q_off, TQ, T, W, MODE,
                        NLOCAL, G, GP, TMQ, LS, DP, DVP, WRITE_SWA, WRITE_SLC)


def _window_forced_tile(qt, Q, K, V, OS, LSES, CMP, GC, GS, GW, OUT, SWA, SLC, qk_scale2, q_off, TQ, T, W, MODE,
                        NLOCAL, G, GP, TMQ, LS, DP, DVP, WRITE_SWA, WRITE_SLC):
    """The body of ``window_forced_kernel`` for query tile ``qt``."""
    b, hk, M, p0, p1, _, pos, hidx, q = _dense_rows(qt, Q, K, q_off, TQ, G, GP, TMQ, DP)
    c = p0 // LS
    loc_lo = max(c - NLOCAL + 1, 0)
    kt_lo = max(p0 - W, 0) // LS
    o_s = _rows_of(OS, b, qt, hk, G, GP, TMQ, DVP)
    LSv, _ = _group_view(LSES, hk, G, GP)
    lse_s = ct.load(LSv, index=(b, qt, hidx), shape=(1, TMQ, GP), padding_mode=ZERO).reshape((M, 1))
    m_i, l_i, acc = _softmax_state(M, DVP)
    for kt in range(loc_lo, c + 1):
        m_i, l_i, acc = _dense_step(q, K, V, b, hk, kt, M, LS, DP, DVP, False, MODE, pos, p0, p1, T, 1, 1, W,
                                    qk_scale2, m_i, l_i, acc, Q.dtype)
    slc = _merge_normalised(o_s, lse_s, m_i, l_i, acc)
    if WRITE_SLC:
        SLCv, _ = _group_view(SLC, hk, G, GP)
        ct.store(SLCv, index=(b, qt, hidx, 0), tile=slc.reshape((1, TMQ, GP, DVP)).astype(SLC.dtype))
    gated = slc * _gate_of(GS, b, qt, hk, G, GP, TMQ) \
        + _gate_of(GC, b, qt, hk, G, GP, TMQ) * _rows_of(CMP, b, qt, hk, G, GP, TMQ, DVP)
    for kt in range(kt_lo, loc_lo):
        m_i, l_i, acc = _dense_step(q, K, V, b, hk, kt, M, LS, DP, DVP, False, MODE, pos, p0, p1, T, 1, 1, W,
                                    qk_scale2, m_i, l_i, acc, Q.dtype)
    swa = _softmax_finish(acc, l_i)
    if WRITE_SWA:
        SWAv, _ = _group_view(SWA, hk, G, GP)
        ct.store(SWAv, index=(b, qt, hidx, 0), tile=swa.reshape((1, TMQ, GP, DVP)).astype(SWA.dtype))
    out = gated + _gate_of(GW, b, qt, hk, G, GP, TMQ) * swa
    OUTv, _ = _group_view(OUT, hk, G, GP)
    ct.store(OUTv, index=(b, qt, hidx, 0), tile=out.reshape((1, TMQ, GP, DVP)).astype(OUT.dtype))


@ct.kernel
def selection_kernel(Q, K, V, IDX, O, qk_scale2: float, q_off: int, T: int, LS: int,
                     NSEL: ConstInt, G: ConstInt, GP: ConstInt, LSP: ConstInt, DP: ConstInt,
                     DVP: ConstInt, ALIGNED: ConstBool):
    """Selection attention of query ``bid(0)``, kv head ``bid(1) % H``, its G heads together:
    attention over the keys ``s <= p`` of the blocks ``IDX[b,i,h,:]`` (-1 = none), each block of
    ``LS`` keys loaded once (``ALIGNED``: LS is the power-of-two tile, loaded by tile index; else
    a sliced view padded to LSP)."""
    i = ct.bid(0)
    b, hk = _batch_head(K)
    p = q_off + i
    Qv, hidx = _group_view(Q, hk, G, GP)
    Ov, _ = _group_view(O, hk, G, GP)
    q = ct.load(Qv, index=(b, i, hidx, 0), shape=(1, 1, GP, DP), padding_mode=ZERO).reshape((GP, DP))
    offs = ct.arange(LSP, dtype=np.int32)[None, :]
    m_i, l_i, acc = _softmax_state(GP, DVP)
    for t in range(NSEL):
        j = ct.load(IDX, index=(b, i, hk, t), shape=())
        start = j * LS
        if (j >= 0) & (start <= p):
            k, v = _selected_kv(K, V, b, hk, j, start, T, LS, LSP, DP, DVP, ALIGNED)
            s = ct.mma(q, k, ct.full((GP, LSP), 0.0, dtype=np.float32))
            key = start + offs
            vis = selection_causal(p, key) & (offs < LS) & (key < T)
            m_i, l_i, acc = _softmax_step(s, vis, qk_scale2, m_i, l_i, acc, v, Q.dtype)
    out = _softmax_finish(acc, l_i)
    ct.store(Ov, index=(b, i, hidx, 0), tile=out.reshape((1, 1, GP, DVP)).astype(O.dtype))


@ct.kernel
def mean_pool_kernel(K, V, KC, VC, T: int, L: int, DS: int, LP: ConstInt, DP: ConstInt, DVP: ConstInt):
    """``KC[b,c,h] = mean(K[b, c*d : min(c*d+l, T), h])`` (same for V), accumulated in fp32."""
    c = ct.bid(0)
    b, h = _batch_head(K)
    start = c * DS
    stop = min(start + L, T)
    Ks = K.slice(axis=1, start=start, stop=stop)
    Vs = V.slice(axis=1, start=start, stop=stop)
    inv = 1.0 / (stop - start)
    k = ct.load(Ks, index=(b, 0, h, 0), shape=(1, LP, 1, DP), padding_mode=ZERO).astype(np.float32)
    v = ct.load(Vs, index=(b, 0, h, 0), shape=(1, LP, 1, DVP), padding_mode=ZERO).astype(np.float32)
    kc = ct.sum(k, axis=1, keepdims=True) * inv
    vc = ct.sum(v, axis=1, keepdims=True) * inv
    ct.store(KC, index=(b, c, h, 0), tile=kc.astype(KC.dtype))
    ct.store(VC, index=(b, c, h, 0), tile=vc.astype(VC.dtype))


def _cat4(ts, axis):
    """Concatenate a tuple of 1, 2 or 4 equal tiles along ``axis`` (ct.cat takes pairs)."""
    if len(ts) == 1:
        return ts[0]
    elif len(ts) == 2:
        return ct.cat((ts[0], ts[1]), axis)
    else:
        return ct.cat((ct.cat((ts[0], ts[1]), axis), ct.cat((ts[2], ts[3]), axis)), axis)


def _chunk_tiles(K, V, jv, b, hk, CH, LS, DP, DVP):
    """``K^T`` ``[DP, CH*LS]`` and ``V`` ``[CH*LS, DVP]`` of the CH blocks ``jv`` ``[CH, 1]`` of kv head ``hk``,
    concatenated (a -1 slot loads block 0; the caller masks it)."""
    ks = ()
    vs = ()
    for t in ct.static_iter(range(CH)):
        j = ct.maximum(jv.extract((t, 0), (1, 1)).item(), 0)
        ks += (ct.load(K, index=(b, hk, 0, j), shape=(1, 1, DP, LS), order=(0, 2, 3, 1),
                       padding_mode=ZERO, latency=2, allow_tma=True).reshape((DP, LS)),)
        vs += (ct.load(V, index=(b, j, hk, 0), shape=(1, LS, 1, DVP), padding_mode=ZERO,
                       latency=4, allow_tma=True).reshape((LS, DVP)),)
    return _cat4(ks, 1), _cat4(vs, 0)


def _chunk_step(q, k, v, jv, offs, p, T, CH, LS, GP, qk_scale2, m_i, l_i, acc, dtype):
    """One step of the chunked selection over the CH blocks ``jv`` ``[CH, 1]`` (-1 = none; keys
    ``selection_causal``, ``s < T``) with their concatenated tiles ``k`` ``[DP, CH*LS]``, ``v`` ``[CH*LS, DVP]``.
    A step whose blocks are all valid and whose last key is visible (the rule keeps a prefix of the keys, so
    then every key is) skips the mask."""
    s = ct.mma(q, k, ct.full((GP, CH * LS), 0.0, dtype=np.float32))
    lo = jv.extract((0, 0), (1, 1)).item()
    hi = lo
    for t in ct.static_iter(range(1, CH)):
        jt = jv.extract((t, 0), (1, 1)).item()
        lo = min(lo, jt)
        hi = max(hi, jt)
    last = hi * LS + LS - 1
    if (lo >= 0) & selection_causal(p, last) & (last < T):
        s = s * qk_scale2
    else:
        key = (jv * LS + offs).reshape((1, CH * LS))
        ok = ct.broadcast_to(jv >= 0, (CH, LS)).reshape((1, CH * LS))
        s = ct.where(ok & selection_causal(p, key) & (key < T), s * qk_scale2, -np.inf)
    return _softmax_update(s, m_i, l_i, acc, v, dtype)


@ct.kernel
def selection_chunk_kernel(Q, K, V, IDX, O, CMP, SWA, GC, GS, GW, OUT, LSE, qk_scale2: float, q_off: int, T: int,
                           NP: ConstInt, CH: ConstInt, LS: ConstInt, G: ConstInt, GP: ConstInt,
                           DP: ConstInt, DVP: ConstInt, WRITE_SLC: ConstBool, GATES: ConstBool, WINDOW: ConstBool,
                           WRITE_LSE: ConstBool, NPP: ConstInt, QPP: ConstInt):
    """Selection attention of the queries ``bid(0)*QPP ..`` (one after the other; the last program repeats the
    last query where TQ is not a multiple of QPP: same values written) and the G heads of kv head ``bid(1) % H``
    for a power-of-two block size ``LS``. A query's ``NP`` block indices ``IDX[b,i,h,:NP]`` (-1 = none) are loaded
    once, as one ``[NPP]`` tile (NPP = pow2(NP)); the blocks are then taken CH at a time (the last ``NP % CH`` one at
    a time), their K/V tiles loaded by tile index and concatenated into one ``CH*LS``-key step (one MMA, one
    softmax update). No data-dependent branch: a -1 slot loads block 0 and is masked, as are keys ``s > p``; a
    step whose keys the query sees whole skips the mask (``_chunk_step``).

    Writes ``slc_o`` to ``O`` (``WRITE_SLC``), its base-2 log-sum-exp of the scaled scores to ``LSE``
    ``[B,TQ,HQ]`` fp32 (``WRITE_LSE``; -inf for a row that saw no key, so another kernel can merge
    more blocks into it) and, with ``GATES``, the gated output in fp32 from the unrounded ``slc_o``:
    ``OUT = GC*CMP + GS*slc_o (+ GW*SWA if WINDOW)``."""
    args = (Q, K, V, IDX, O, CMP, SWA, GC, GS, GW, OUT, LSE, qk_scale2, q_off, T, NP, CH, LS, G, GP, DP, DVP,
            WRITE_SLC, GATES, WINDOW, WRITE_LSE, NPP)
    _each_tile(_selection_query, QPP, Q.shape[1], args)


def _selection_query(i, Q, K, V, IDX, O, CMP, SWA, GC, GS, GW, OUT, LSE, qk_scale2, q_off, T, NP, CH, LS, G, GP, DP,
                     DVP, WRITE_SLC, GATES, WINDOW, WRITE_LSE, NPP):
    """The body of ``selection_chunk_kernel`` for query ``i``."""
    b, hk = _batch_head(K)
    p = q_off + i
    Qv, hidx = _group_view(Q, hk, G, GP)
    q = ct.load(Qv, index=(b, i, hidx, 0), shape=(1, 1, GP, DP), padding_mode=ZERO).reshape((GP, DP))
    offs = ct.arange(LS, dtype=np.int32)[None, :]
    m_i, l_i, acc = _softmax_state(GP, DVP)
    jall = ct.load(IDX, index=(b, i, hk, 0), shape=(1, 1, 1, NPP), padding_mode=ZERO).reshape((NPP, 1))
    for c in range(NP // CH):
        jv = jall.extract((c, 0), (CH, 1))
        k, v = _chunk_tiles(K, V, jv, b, hk, CH, LS, DP, DVP)
        m_i, l_i, acc = _chunk_step(q, k, v, jv, offs, p, T, CH, LS, GP, qk_scale2, m_i, l_i, acc, Q.dtype)
    for r in ct.static_iter(range(NP % CH)):
        jv = jall.extract(((NP // CH) * CH + r, 0), (1, 1))
        k, v = _chunk_tiles(K, V, jv, b, hk, 1, LS, DP, DVP)
        m_i, l_i, acc = _chunk_step(q, k, v, jv, offs, p, T, 1, LS, GP, qk_scale2, m_i, l_i, acc, Q.dtype)
    out = _softmax_finish(acc, l_i)
    _selection_epilogue(out, O, CMP, SWA, GC, GS, GW, OUT, b, i, hk, G, GP, 1, DVP, WRITE_SLC, GATES, WINDOW)
    if WRITE_LSE:
        LSEv, _ = _group_view(LSE, hk, G, GP)
        lse2 = ct.where(l_i > 0.0, m_i + ct.log2(ct.where(l_i > 0.0, l_i, 1.0)), -np.inf)
        ct.store(LSEv, index=(b, i, hidx), tile=lse2.reshape((1, 1, GP)))


def _selection_epilogue(out, O, CMP, SWA, GC, GS, GW, OUT, b, qt, hk, G, GP, NQ, DVP, WRITE_SLC, GATES, WINDOW):
    """Store ``slc_o`` = ``out`` ``[NQ*GP, DVP]`` fp32 (rows ``(query, head)``) of query tile ``qt``
    (``WRITE_SLC``) and/or the gated ``OUT = GC*CMP + GS*out (+ GW*SWA)`` computed from the unrounded
    ``out`` (``GATES``)."""
    if WRITE_SLC:
        Ov, hidx = _group_view(O, hk, G, GP)
        ct.store(Ov, index=(b, qt, hidx, 0), tile=out.reshape((1, NQ, GP, DVP)).astype(O.dtype))
    if GATES:
        o = out * _gate_of(GS, b, qt, hk, G, GP, NQ) \
            + _gate_of(GC, b, qt, hk, G, GP, NQ) * _rows_of(CMP, b, qt, hk, G, GP, NQ, DVP)
        if WINDOW:
            o = o + _gate_of(GW, b, qt, hk, G, GP, NQ) * _rows_of(SWA, b, qt, hk, G, GP, NQ, DVP)
        OUTv, hidx = _group_view(OUT, hk, G, GP)
        ct.store(OUTv, index=(b, qt, hidx, 0), tile=o.reshape((1, NQ, GP, DVP)).astype(OUT.dtype))


def _rows_of(A, b, qt, hk, G, GP, NQ, DVP):
    """``A[b, NQ queries of tile qt, heads of kv head hk, :]`` as fp32 ``[NQ*GP, DVP]`` (zeros on padding)."""
    Av, hidx = _group_view(A, hk, G, GP)
    return ct.load(Av, index=(b, qt, hidx, 0), shape=(1, NQ, GP, DVP),
                   padding_mode=ZERO).reshape((NQ * GP, DVP)).astype(np.float32)


def _gate_of(A, b, qt, hk, G, GP, NQ):
    """Gates ``A[b, NQ queries of tile qt, heads of kv head hk]`` as fp32 ``[NQ*GP, 1]``."""
    Av, hidx = _group_view(A, hk, G, GP)
    return ct.load(Av, index=(b, qt, hidx), shape=(1, NQ, GP), padding_mode=ZERO).reshape((NQ * GP, 1)).astype(np.float32)


FORCED_KINDS = ("none", "current", "initial_local")   # index = FORCED constexpr of topn_stream_kernel


def _forced(FORCED, j, p, LS):
    if FORCED == 0:
        return forced_none(j, p, LS)
    elif FORCED == 1:
        return forced_current(j, p, LS)
    else:
        return forced_initial_local(j, p, LS)


def _topn_candidates(imp, j, p, q_off, TQ, NS, LS, FORCED):
    """Masks of the forced blocks and of the candidates (``selection_candidate`` with importance > 0,
    or forced) for blocks ``j`` ``[1, W]`` of the positions ``p`` ``[TR, 1]`` inside the array."""
    inside = (j < NS) & (p < q_off + TQ)
    forced = _forced(FORCED, j, p, LS) & inside
    return forced, selection_candidate(j, p, LS) & ((imp > 0.0) | forced) & inside


@ct.kernel
def gate_kernel(A, B_, C, GA, GB, GC, O, TM: ConstInt, HP: ConstInt, DVP: ConstInt, THREE: ConstBool):
    """``o = g_cmp*cmp_o + g_slc*slc_o (+ g_swa*swa_o)`` in fp32 for TM queries x HP heads."""
    qt = ct.bid(0)
    ht = ct.bid(1)
    b = ct.bid(2)
    a = ct.load(A, index=(b, qt, ht, 0), shape=(1, TM, HP, DVP), padding_mode=ZERO).astype(np.float32)
    ga = ct.load(GA, index=(b, qt, ht), shape=(1, TM, HP), padding_mode=ZERO).astype(np.float32)
    bb = ct.load(B_, index=(b, qt, ht, 0), shape=(1, TM, HP, DVP), padding_mode=ZERO).astype(np.float32)
    gb = ct.load(GB, index=(b, qt, ht), shape=(1, TM, HP), padding_mode=ZERO).astype(np.float32)
    o = a * ga.reshape((1, TM, HP, 1)) + bb * gb.reshape((1, TM, HP, 1))
    if THREE:
        c = ct.load(C, index=(b, qt, ht, 0), shape=(1, TM, HP, DVP), padding_mode=ZERO).astype(np.float32)
        gc = ct.load(GC, index=(b, qt, ht), shape=(1, TM, HP), padding_mode=ZERO).astype(np.float32)
        o = o + c * gc.reshape((1, TM, HP, 1))
    ct.store(O, index=(b, qt, ht, 0), tile=o.astype(O.dtype))


@ct.kernel
def topn_stream_kernel(IMP, OUT, q_off: int, TQ: int, NS: int, LS: int, N: ConstInt, NOUT: ConstInt, TR: ConstInt,
                       CW: ConstInt, FORCED: ConstInt, OTHERS: ConstBool):
    """Top-N selection blocks of TR queries x kv head ``bid(1) % H`` from ``IMP [B,TQ,H,NS]`` (>= 0): candidates
    are ``selection_candidate`` blocks with importance > 0 or forced (``is_forced``); forced first, then by
    importance, ties to the lower index; -1 when fewer than N candidates. Writes ``OUT [B,TQ,H,NOUT]`` in pick
    order (the caller sorts into canonical order when it needs to).

    One int64 key per block, ``(float bits of the score) << 32 | (NS-1-j)`` (non-negative floats order like
    their bits; forced = +inf bits; non-candidate = -1), streamed over column chunks of CW blocks, only up to
    the tile's last ``selection_candidate`` column (the causal part of the row; IMP beyond it is never read
    unmasked). Keeps the N best keys of each row in ``best`` (slots >= N hold the int64 maximum, never
    replaced); a chunk takes as many extraction steps as its rows have keys above their current N-th best
    (at most N), each step moving the row's best remaining key in place of its N-th best if larger. Keys are
    unique per row (the index is in the low bits), so the kept set is exactly the top N. The empty slots
    start as distinct negative values (``-1 - slot``) and only valid keys (>= 0) enter, so every slot value is
    unique and the worst slot is the one equal to the row minimum.
    ``OTHERS``: the forced blocks are not candidates (the top N of the other blocks)."""
    qt = ct.bid(0)
    b, h = _batch_head(IMP)
    p = (q_off + qt * TR + ct.arange(TR, dtype=np.int32))[:, None]
    p_last = min(q_off + qt * TR + TR - 1, q_off + TQ - 1)
    n_chunks = ct.cdiv(min(p_last // LS + 1, NS), CW)
    jc = ct.arange(CW, dtype=np.int32)[None, :]
    cols = ct.arange(NOUT, dtype=np.int32)[None, :]
    best = ct.where(cols < N, ct.broadcast_to(-1 - cols, (TR, NOUT)).astype(np.int64), 0x7FFFFFFFFFFFFFFF)
    for c in range(n_chunks):
        imp = ct.load(IMP, index=(b, qt, h, c), shape=(1, TR, 1, CW), padding_mode=ZERO).reshape((TR, CW))
        j = c * CW + jc
        forced, cand = _topn_candidates(imp, j, p, q_off, TQ, NS, LS, FORCED)
        if OTHERS:
            cand = cand & ~forced
        bits = ct.bitcast(imp, np.int32).astype(np.int64)
        bits = ct.where(forced, 0x7F800000, bits)
        key = ct.where(cand, (bits << 32) | (NS - 1 - j).astype(np.int64), -1)
        worst = ct.min(best, axis=1, keepdims=True)
        steps = ct.minimum(ct.max(ct.sum(ct.where(key > ct.maximum(worst, -1), 1, 0), axis=1)), N)   # valid keys only
        for t in range(steps):
            m = ct.max(key, axis=1, keepdims=True)
            worst = ct.min(best, axis=1, keepdims=True)
            best = ct.where((best == worst) & (m > worst) & (m >= 0), m, best)
            key = ct.where(key == m, -1, key)
    idx = ct.where((best < 0) | (cols >= N), -1, (NS - 1) - (best & 0xFFFFFFFF))
    ct.store(OUT, index=(b, qt, h, 0), tile=idx.astype(np.int32).reshape((1, TR, 1, NOUT)))
