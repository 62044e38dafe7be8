"""Small translation helpers shared by the external adapters (each adapter decides which it uses)."""
from __future__ import annotations

import torch

from nsaconf.cases.conventions import cmp_mask_matrix, num_cmp_blocks
from nsaconf.cases.model import Case
from nsaconf.cases.tensors import Inputs, query_positions


def flash_window_size(case: Case) -> tuple[int, int]:
    """flash-attn ``window_size`` for the case's window: ``w`` keys -> ``(w-1, 0)``, ``w+1`` keys -> ``(w, 0)``."""
    return (case.window - 1, 0) if case.window_keys == "w" else (case.window, 0)


def window_keys_count(case: Case) -> int:
    """Number of keys of the case's window (an implementation whose ``window_size`` means "w keys")."""
    return case.window if case.window_keys == "w" else case.window + 1


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def pad_last(idx: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """Pad the last dim of an index tensor to ``width`` with ``value``."""
    if idx.shape[-1] >= width:
        return idx
    return torch.cat([idx, idx.new_full(idx.shape[:-1] + (width - idx.shape[-1],), value)], dim=-1)


def full_queries(case: Case, x: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Implementations that need TQ == T: queries (and gates) are front-padded with zeros for positions
    ``0 .. T-TQ-1``; the caller keeps the last TQ rows of every output. Returns q, g_cmp, g_slc, g_swa, pad."""
    pad = case.seq_len - case.q_len if case.cu_seqlens is None else 0

    def front(t: torch.Tensor) -> torch.Tensor:
        if pad == 0:
            return t
        return torch.cat([t.new_zeros((t.shape[0], pad) + tuple(t.shape[2:])), t], dim=1)

    return front(x.q), front(x.g_cmp), front(x.g_slc), front(x.g_swa), pad


def given_indices_full(case: Case, idx: torch.Tensor, pad: int, fill: int = -1) -> torch.Tensor:
    """Front-pad ``[B,TQ,H,n]`` indices to T rows (padded rows select nothing)."""
    if pad == 0:
        return idx
    return torch.cat([idx.new_full((idx.shape[0], pad) + tuple(idx.shape[2:]), fill), idx], dim=1)


def empty_cmp_rows(case: Case, device) -> torch.Tensor:
    """Bool ``[TQ]``: queries that see no compressed block under the case's ``cmp_mask`` (canonical LSE -inf)."""
    pos = query_positions(case).to(device)
    out = torch.zeros(pos.shape[0], dtype=torch.bool, device=device)
    lens = [e - s for s, e in case.sequences]
    starts = [0] if case.cu_seqlens is None else [s for s, _ in case.sequences]
    tq = [case.q_len] if case.cu_seqlens is None else lens
    for s0, n_q, T in zip(starts, tq, lens):
        nc = num_cmp_blocks(T, case.cmp_stride)
        m = cmp_mask_matrix(case.cmp_mask, pos[s0:s0 + n_q], nc, case.cmp_block, case.cmp_stride)
        out[s0:s0 + n_q] = ~m.any(-1)
    return out


def cu_tensor(case: Case, device) -> torch.Tensor | None:
    return None if case.cu_seqlens is None else torch.tensor(case.cu_seqlens, dtype=torch.long, device=device)


class single_thread:
    """Context manager: run CPU torch on one thread (the external naive references loop over queries in
    Python with tiny ops, which intra-op threading only slows down, badly so on a loaded machine)."""

    def __init__(self, device: str):
        self.active = device == "cpu"

    def __enter__(self):
        if self.active:
            self.prev = torch.get_num_threads()
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.active:
            torch.set_num_threads(self.prev)
        return False
