"""Deterministic tensors of a case.

Everything is drawn on the CPU in float64 from ``torch.Generator().manual_seed(case.seed)``, then
cast to the case dtype, then moved to the device: the same case gives bit-identical inputs on any
machine and device.

Magnitudes: ``q ~ N(0, 1)``; ``k = 0.8 * N(0, 1) + 0.8 * AR(1, rho=0.95)`` along the sequence, so that
keys are locally correlated like real ones and mean-pooled blocks keep a spread (compression softmaxes
are neither flat nor one-hot, top-n has few near-ties); ``v ~ N(0, 1)``; gates in (0.05, 0.95).

**Gradient convention (the one place it is defined).** The loss is ``L = sum(o * dO)`` with the
output cotangent ``dO = output_cotangent(case, device, dtype)``: ``N(0, 1)`` of shape ``[B,TQ,HQ,DV]``
drawn on the CPU in float64 from ``torch.Generator().manual_seed(case.seed + 1_000_003)``, then cast
to the case dtype (like the inputs; the float64 truth uses this rounded ``dO``), then moved. The gradients (``GRAD_INPUTS``) are ``dq [B,TQ,HQ,D]``, ``dk [B,T,H,D]``, ``dv [B,T,H,DV]``
(the input layouts) and ``dg_cmp``, ``dg_slc``, ``dg_swa`` ``[B,TQ,HQ]`` (``dg_swa`` only when
``window > 0``). The top-n selection is piecewise constant: no gradient flows through the choice of
blocks, only through the keys/values of the chosen blocks (and through the compression branch).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from nsaconf.cases.conventions import num_sel_blocks, selection_candidate
from nsaconf.cases.model import Case

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


@dataclass
class Inputs:
    """Canonical inputs. q ``[B,TQ,HQ,D]``; k ``[B,T,H,D]``; v ``[B,T,H,DV]``; gates ``[B,TQ,HQ]``
    (raw multipliers in (0,1)); ``block_indices`` ``[B,TQ,H,n]`` int64, ascending with -1 last, only
    when ``case.block_indices == "random"`` (relative to the sequence start under ``cu_seqlens``)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g_cmp: torch.Tensor
    g_slc: torch.Tensor
    g_swa: torch.Tensor
    block_indices: Optional[torch.Tensor] = None

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "Inputs":
        """Move to ``device`` and cast the float tensors to ``dtype`` (indices stay int64)."""
        out = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if t is None:
                out[f.name] = None
            elif t.is_floating_point():
                out[f.name] = t.to(device=device, dtype=dtype or t.dtype)
            else:
                out[f.name] = t.to(device=device)
        return Inputs(**out)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


COTANGENT_SEED_OFFSET = 1_000_003
#: gradient branch -> the ``Inputs`` field it differentiates
GRAD_INPUTS: dict[str, str] = {"dq": "q", "dk": "k", "dv": "v", "dg_cmp": "g_cmp", "dg_slc": "g_slc", "dg_swa": "g_swa"}


def grad_branches(case: Case) -> tuple[str, ...]:
    """The gradient branches a case has (``dg_swa`` only when ``window > 0``)."""
    return tuple(b for b in GRAD_INPUTS if b != "dg_swa" or case.window > 0)


def output_cotangent(case: Case, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``dO`` of the loss ``L = sum(o * dO)``: ``N(0,1)`` ``[B,TQ,HQ,DV]`` drawn in float64 on the CPU from
    ``manual_seed(case.seed + 1_000_003)``, cast to ``dtype`` (default: the case dtype), moved to ``device``."""
    gen = torch.Generator().manual_seed(case.seed + COTANGENT_SEED_OFFSET)
    d = torch.randn((case.batch, case.q_len, case.heads_q, case.head_dim_v), generator=gen, dtype=torch.float64)
    return d.to(dtype=dtype or TORCH_DTYPES[case.dtype]).to(device=device)


def query_positions(case: Case) -> torch.Tensor:
    """Position of each query inside its own sequence, ``[TQ]`` int64 (``T - TQ + i`` without varlen)."""
    if case.cu_seqlens is None:
        return torch.arange(case.q_offset, case.seq_len)
    return torch.cat([torch.arange(e - s) for s, e in case.sequences])


def _ar1(gen: torch.Generator, shape: tuple[int, ...], rho: float, dim: int) -> torch.Tensor:
    """Stationary AR(1) noise of unit variance along ``dim``: ``x_t = rho*x_{t-1} + sqrt(1-rho^2)*e_t``
    (a plain sequential scan: exact and deterministic)."""
    eps = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = eps.movedim(dim, 0).clone()
    scale = (1.0 - rho * rho) ** 0.5
    for t in range(1, x.shape[0]):
        x[t] = rho * x[t - 1] + scale * x[t]
    return x.movedim(0, dim)


def random_block_indices(case: Case, gen: torch.Generator) -> torch.Tensor:
    """A valid random selection ``[B,TQ,H,n]``: for each query, ``min(n, #candidates)`` distinct
    blocks with ``j*l' <= p`` (always including the current block, so no query is left without a
    key), sorted ascending, -1 padded."""
    B, TQ, H, n, ls = case.batch, case.q_len, case.heads_kv, case.top_n, case.block_size
    NB = num_sel_blocks(max(e - s for s, e in case.sequences), ls)
    pos = query_positions(case)
    j = torch.arange(NB)
    cand = selection_candidate(j[None, :], pos[:, None], ls)  # [TQ, NB]
    score = torch.rand((B, TQ, H, NB), generator=gen, dtype=torch.float64)
    score = score.masked_fill(~cand[None, :, None, :], -1.0)
    cur = (pos // ls)[None, :, None, None]
    score = torch.where(j == cur, torch.full_like(score, 2.0), score)
    k = min(n, NB)
    val, idx = score.topk(k, dim=-1)
    idx = torch.where(val < 0, torch.full_like(idx, -1), idx)
    if k < n:
        idx = torch.cat([idx, idx.new_full((B, TQ, H, n - k), -1)], dim=-1)
    return canonical_order(idx)


def canonical_order(idx: torch.Tensor) -> torch.Tensor:
    """Sort block indices ascending along the last dim with -1 padding last."""
    big = torch.iinfo(torch.int64).max
    key = torch.where(idx < 0, torch.full_like(idx, big), idx.long())
    key, _ = key.sort(dim=-1)
    return torch.where(key == big, torch.full_like(key, -1), key)


def materialize(case: Case, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None) -> Inputs:
    """The inputs of ``case`` in ``dtype`` (default: the case dtype) on ``device``."""
    gen = torch.Generator().manual_seed(case.seed)
    B, T, TQ, HQ, H, D, DV = case.batch, case.seq_len, case.q_len, case.heads_q, case.heads_kv, case.head_dim, case.head_dim_v
    q = torch.randn((B, TQ, HQ, D), generator=gen, dtype=torch.float64)
    k = 0.8 * torch.randn((B, T, H, D), generator=gen, dtype=torch.float64) + 0.8 * _ar1(gen, (B, T, H, D), 0.95, 1)
    v = torch.randn((B, T, H, DV), generator=gen, dtype=torch.float64)
    gates = 0.05 + 0.9 * torch.rand((3, B, TQ, HQ), generator=gen, dtype=torch.float64)
    idx = random_block_indices(case, gen) if case.block_indices == "random" else None
    cpu = Inputs(q=q, k=k, v=v, g_cmp=gates[0], g_slc=gates[1], g_swa=gates[2], block_indices=idx)
    return cpu.to(dtype=dtype or TORCH_DTYPES[case.dtype]).to(device=device)
