"""Shared helpers of the comparator and streamed-truth tests."""
from __future__ import annotations

import torch

from nsaconf.cases.model import Case
from nsaconf.harness.comparator import CaseTruth

#: a case whose last query has a near tie between its n-th selected block and the best unselected one
TIE_CASE = Case(seq_len=96, heads_q=2, heads_kv=1, head_dim=8, block_size=16, top_n=3, window=0,
                forced_blocks="none", dtype="float32", seed=5)


def near_tie_swap(ct: CaseTruth) -> tuple[torch.Tensor, float]:
    """The truth's ``topk_idx`` with the n-th selected block of the last query (batch 0, kv head 0) swapped for
    the best unselected candidate, and the importance gap between the two (a tie tolerance above it makes
    the swap a tie)."""
    imp, idx = ct.truth["importance"], ct.truth["topk_idx"]
    b, i, h = 0, ct.case.q_len - 1, 0
    sel = [int(x) for x in idx[b, i, h] if x >= 0]
    nth = min(sel, key=lambda j: float(imp[b, i, h, j]))
    other = max((j for j in range(imp.shape[-1]) if j not in sel), key=lambda j: float(imp[b, i, h, j]))
    new = idx.clone()
    new[b, i, h] = torch.tensor(sorted([j for j in sel if j != nth] + [other]))
    return new, abs(float(imp[b, i, h, nth] - imp[b, i, h, other]))
