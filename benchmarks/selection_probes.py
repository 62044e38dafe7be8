"""Probe kernels that split the time of the chunked selection kernel (benchmark only, not an oracle).

Both do exactly the K/V loads of ``oracles.inhouse_cutile.kernels.selection_chunk_kernel`` (same
indices, CH blocks per step, TMA, occupancy hint) and write a ``[B,TQ,HQ,DV]`` output, but less
arithmetic:

* ``gather``: every loaded element goes into an elementwise running maximum (no MMA, no softmax,
  no reduction inside the loop; a probe that touched only part of the tiles was compiled into
  narrowed plain loads, so every element is used) -- the time of the data-dependent gather;
* ``mma``: both MMAs ``s = q k^T`` and ``acc += s v`` on the loaded tiles, no masking or softmax.

selection time - ``mma`` = masking + online softmax; ``mma`` - ``gather`` = the tensor-core work the
loads do not hide. Outputs are meaningless numbers (kept only so the loads cannot be dropped).
"""
from __future__ import annotations

import cuda.tile as ct
import numpy as np
import torch

from nsaconf.oracles.inhouse_cutile import forward as F
from nsaconf.oracles.inhouse_cutile.kernels import _batch_head, _chunk_kv, _chunk_tiles, _each_tile, _group_view

ConstInt = ct.Constant[int]
ConstBool = ct.Constant[bool]
ZERO = ct.PaddingMode.ZERO


@ct.kernel
def selection_probe_kernel(Q, K, V, IDX, O, NP: ConstInt, CH: ConstInt, LS: ConstInt, G: ConstInt, GP: ConstInt,
                           DP: ConstInt, DVP: ConstInt, WITH_MMA: ConstBool, IDX_ONCE: ConstBool, NPP: ConstInt,
                           QPP: ConstInt):
    """The probe for query ``bid(0)`` (queries ``bid(0)*QPP ..`` one after the other when QPP > 1, as the
    selection kernel's ``SEL_QUERIES_PER_PROGRAM``); ``IDX_ONCE``: the indices in one ``[NPP]`` load before the
    steps (``SEL_IDX_ONCE``), else CH indices per step."""
    args = (Q, K, V, IDX, O, NP, CH, LS, G, GP, DP, DVP, WITH_MMA, IDX_ONCE, NPP)
    _each_tile(_probe_query, QPP, Q.shape[1], args)


def _probe_query(i, Q, K, V, IDX, O, NP, CH, LS, G, GP, DP, DVP, WITH_MMA, IDX_ONCE, NPP):
    b, hk = _batch_head(K)
    Qv, hidx = _group_view(Q, hk, G, GP)
    Ov, _ = _group_view(O, hk, G, GP)
    q = ct.load(Qv, index=(b, i, hidx, 0), shape=(1, 1, GP, DP), padding_mode=ZERO).reshape((GP, DP))
    acc = ct.full((GP, DVP), 0.0, dtype=np.float32)
    seen = ct.full((CH * LS, DVP), 0.0, dtype=Q.dtype)
    if IDX_ONCE:
        jall = ct.load(IDX, index=(b, i, hk, 0), shape=(1, 1, 1, NPP), padding_mode=ZERO).reshape((NPP, 1))
    for c in range(NP // CH):
        if IDX_ONCE:     # the selection kernel's loads
            k, v = _chunk_tiles(K, V, jall.extract((c, 0), (CH, 1)), b, hk, CH, LS, DP, DVP, True, 2, 4)
        else:
            jv, k, v = _chunk_kv(K, V, IDX, b, i, hk, c, CH, LS, DP, DVP, True, 2, 4)
        if WITH_MMA:
            s = ct.mma(q, k, ct.full((GP, CH * LS), 0.0, dtype=np.float32))
            acc = ct.mma(s.astype(Q.dtype), v, acc)
        else:   # elementwise running max of every loaded element (no reduction, no MMA, no softmax)
            seen = ct.maximum(seen, ct.maximum(v, ct.transpose(k)))
    if not WITH_MMA:
        acc = acc + ct.sum(seen.astype(np.float32), axis=0, keepdims=True)
    ct.store(Ov, index=(b, i, hidx, 0), tile=acc.reshape((1, 1, GP, DVP)).astype(O.dtype))


def run_probe(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, ls: int, with_mma: bool,
              ch: int = 2, occupancy: int | None = 2, idx_once: bool | None = None,
              qpp: int | None = None) -> torch.Tensor:
    """Launch the probe with the chunked selection kernel's grid and tiles (``ls`` a power of two,
    D = DV, ``ch*ls`` = D for the gather probe's elementwise K/V maximum). ``idx_once`` / ``qpp``: how the
    indices are loaded and queries per program (None: the selection kernel's ``SEL_IDX_ONCE`` /
    ``SEL_QUERIES_PER_PROGRAM``)."""
    B, TQ, HQ, D = q.shape
    H = k.shape[2]
    G = HQ // H
    GP = max(F.pow2(G), F.MIN_SEL_ROWS)
    n = idx.shape[-1]
    NP = -(-n // ch) * ch
    idx_once = F.SEL_IDX_ONCE if idx_once is None else idx_once
    qpp = F.SEL_QUERIES_PER_PROGRAM if qpp is None else qpp
    NPP = F.pow2(NP)
    sel = torch.nn.functional.pad(idx.to(torch.int32), (0, (NPP if idx_once else NP) - n), value=-1).contiguous()
    o = torch.empty_like(q)
    kern = F._hinted(selection_probe_kernel, occupancy)
    F._launch(kern, (-(-TQ // qpp), B * H, 1), (q, k, v, sel, o, NP, ch, ls, G, GP, F.pow2(D), F.pow2(D), with_mma,
                                                 idx_once, NPP, qpp))
    return o
