"""A brute-force dense NSA forward: a second, independent code path for the reference.

No chunking, no gathers, no ``eq9_weights``: every branch is one full mask over all positions
(``[TQ, NC]`` for compression, ``[TQ, T]`` token masks for selection and window), each mask entry
evaluated from the convention functions on plain ints, the group's importance pooled with per-row
softmaxes over the visible blocks (``sum_probs``: sum of the heads' rows; ``mean_logits``: one softmax of
the heads' mean logits), mapped to selection blocks by overlap length
(``|[c*d, c*d+l) ∩ [j*l', (j+1)*l')| / d``), top-n ranked with Python's ``sorted``; gates as
``1 / (1 + exp(-g))`` written out for ``sigmoid``.
Slow (Python loops over queries); meant for T up to a few hundred.
"""
from __future__ import annotations

import torch

from nsaconf.cases.conventions import CMP_MASKS, WINDOW_KEYS, is_forced, selection_candidate, selection_causal
from nsaconf.cases.model import Case
from nsaconf.cases.tensors import Inputs


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """q ``[TQ,D]``, k ``[T,D]``, v ``[T,DV]``, mask ``[TQ,T]`` -> (o, lse, prob); empty rows: 0, -inf.

    One ``torch.softmax`` over each whole row with the masked keys at -inf (a row without a key is
    softmaxed unmasked and then zeroed)."""
    logits = (q @ k.T) * scale
    has = mask.any(dim=1, keepdim=True)
    masked = logits.masked_fill(~(mask | ~has), float("-inf"))
    prob = torch.where(mask, torch.softmax(masked, dim=1), torch.zeros_like(logits))
    lse = torch.where(has[:, 0], torch.logsumexp(masked, dim=1), torch.full_like(logits[:, 0], float("-inf")))
    return prob @ v, lse, prob


@torch.no_grad()
def nsa_dense(case: Case, inputs: Inputs, dtype: torch.dtype = torch.float64,
              block_indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The dense forward in ``dtype`` (canonical branches, like ``nsa_reference``)."""
    return _dense(case, inputs.to(dtype=dtype), block_indices)


def nsa_dense_grads(case: Case, inputs: Inputs, dtype: torch.dtype = torch.float64,
                    block_indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Gradients of ``L = sum(o * dO)`` (``cases.tensors.output_cotangent``) by autograd through the dense
    forward (selection piecewise constant), in ``dtype``: ``dq, dk, dv, dg_cmp, dg_slc`` (+ ``dg_swa``)."""
    from nsaconf.oracles.reference import autograd_grads  # the shared loss/autograd driver only

    return autograd_grads(lambda xi: _dense(case, xi, block_indices), case, inputs.to(dtype=dtype))


def _dense(case: Case, x: Inputs, block_indices: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The dense forward on inputs already in the compute dtype (differentiable in grad mode)."""
    dtype = x.q.dtype
    B, TQ, HQ, H, G = case.batch, case.q_len, case.heads_q, case.heads_kv, case.group
    l, d, ls, n, w, scale = case.cmp_block, case.cmp_stride, case.block_size, case.top_n, case.window, case.softmax_scale
    DV = case.head_dim_v
    dev = x.q.device
    out = {"cmp_o": torch.zeros(B, TQ, HQ, DV, dtype=dtype, device=dev),
           "cmp_lse": torch.zeros(B, TQ, HQ, dtype=dtype, device=dev),
           "topk_idx": torch.full((B, TQ, H, n), -1, dtype=torch.long, device=dev),
           "slc_o": torch.zeros(B, TQ, HQ, DV, dtype=dtype, device=dev)}
    if w > 0:
        out["swa_o"] = torch.zeros(B, TQ, HQ, DV, dtype=dtype, device=dev)
    given = block_indices if block_indices is not None else (x.block_indices if case.block_indices == "random" else None)
    for b in range(B):
        for s0, s1 in case.sequences:
            T = s1 - s0
            if case.cu_seqlens is None:
                qrows, positions = range(TQ), [case.q_offset + i for i in range(TQ)]
            else:
                qrows, positions = range(s0, s1), list(range(T))
            NC = -(-T // d)
            NS = -(-T // ls)
            for hk in range(H):
                k = x.k[b, s0:s1, hk]
                v = x.v[b, s0:s1, hk]
                kc = torch.stack([k[c * d:min(c * d + l, T)].mean(0) for c in range(NC)])
                vc = torch.stack([v[c * d:min(c * d + l, T)].mean(0) for c in range(NC)])
                cmask = torch.tensor([[bool(CMP_MASKS[case.cmp_mask](c, p, l, d)) for c in range(NC)] for p in positions], device=dev)
                imp = torch.zeros(len(positions), NS, dtype=dtype, device=dev)
                overlap = torch.tensor([[max(0, min(c * d + l, (j + 1) * ls) - max(c * d, j * ls)) / d for j in range(NS)]
                                        for c in range(NC)], dtype=dtype, device=dev)
                qh = {}
                mean_logit = torch.zeros(len(positions), NC, dtype=dtype, device=dev)
                for g in range(G):
                    h = hk * G + g
                    q = x.q[b, list(qrows), h]
                    qh[h] = q
                    o, lse, prob = _attend(q, kc, vc, cmask, scale)
                    out["cmp_o"][b, list(qrows), h] = o
                    out["cmp_lse"][b, list(qrows), h] = lse
                    if case.group_importance == "sum_probs":
                        imp += prob @ overlap
                    else:  # mean_logits
                        mean_logit += (q @ kc.T) * scale / G
                if case.group_importance == "mean_logits":
                    imp += _attend(mean_logit, torch.eye(NC, dtype=dtype, device=dev), overlap, cmask, 1.0)[0]
                # top-n, one query at a time (piecewise constant: ranked on detached values)
                imp = imp.detach()
                sel_mask = torch.zeros(len(positions), T, dtype=torch.bool, device=dev)
                for i, (row, p) in enumerate(zip(qrows, positions)):
                    cands = [j for j in range(NS) if selection_candidate(j, p, ls)
                             and (imp[i, j] > 0 or bool(is_forced(case.forced_blocks, j, p, ls)))]
                    ranked = sorted(cands, key=lambda j: (not bool(is_forced(case.forced_blocks, j, p, ls)), -float(imp[i, j]), j))
                    chosen = sorted(ranked[:n])
                    out["topk_idx"][b, row, hk, :len(chosen)] = torch.tensor(chosen, dtype=torch.long)
                    use = chosen if given is None else [int(j) for j in given[b, row, hk] if j >= 0]
                    for j in use:
                        for s in range(j * ls, min((j + 1) * ls, T)):
                            sel_mask[i, s] = bool(selection_causal(p, s))
                if w > 0:
                    wmask = torch.tensor([[bool(WINDOW_KEYS[case.window_keys](p, s, w)) for s in range(T)] for p in positions], device=dev)
                for h, q in qh.items():
                    out["slc_o"][b, list(qrows), h] = _attend(q, k, v, sel_mask, scale)[0]
                    if w > 0:
                        out["swa_o"][b, list(qrows), h] = _attend(q, k, v, wmask, scale)[0]
    if case.gates == "raw":
        g_cmp, g_slc, g_swa = x.g_cmp, x.g_slc, x.g_swa
    else:  # sigmoid
        g_cmp, g_slc, g_swa = (1.0 / (1.0 + torch.exp(-g)) for g in (x.g_cmp, x.g_slc, x.g_swa))
    o = g_cmp[..., None] * out["cmp_o"] + g_slc[..., None] * out["slc_o"]
    if w > 0:
        o = o + g_swa[..., None] * out["swa_o"]
    out["o"] = o
    return out
