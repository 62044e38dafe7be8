"""The reference NSA forward in pure PyTorch: float64 is the truth; any float dtype, CPU or CUDA.

For query position p (inside its sequence), query head h, kv head ``hk = h // G``:

* compression: ``K_cmp[c] = mean(k[c*d : min(c*d+l, T)])`` (same for v);
  ``o_cmp = softmax(scale * q K_cmp^T + mask) V_cmp`` over the blocks ``CMP_MASKS[cmp_mask](c, p, l, d)``
  allows; ``cmp_lse = logsumexp`` (natural log). **No visible block: ``o_cmp = 0`` and ``cmp_lse = -inf``**
  (the naive all-masked softmax would give NaN).
* importance: the G query heads of a group pooled into one score per compressed block by
  ``GROUP_IMPORTANCE_RULES[group_importance]`` (``sum_probs``: sum of the probabilities, Eq. 10;
  ``mean_logits``: softmax of the group-mean logits), mapped to selection blocks by ``eq9_weights`` (Eq. 9).
* top-n: candidates of p are the selection blocks with ``j*l' <= p`` that have importance > 0 or are
  forced (``forced_blocks``); forced first, then highest importance, ties to the lower block index;
  never a non-candidate; -1 padding when fewer than n; output sorted ascending, -1 last (FLA's rule).
* selection: attention over the keys of the chosen blocks with ``s <= p``; no such key gives 0.
* window: attention over ``WINDOW_KEYS[window_keys](p, s, w)``; ``w = 0`` means no window branch.
* ``o = f(g_cmp)*o_cmp + f(g_slc)*o_slc + f(g_swa)*o_swa`` with ``f = GATE_RULES[gates]`` (``raw``: the
  identity; ``sigmoid``: the given gates are logits).

Queries are processed in chunks so that memory stays bounded (T = 64k in float64 fits in a few GB).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, Optional

import torch

from nsaconf.cases.conventions import (GATE_RULES, GROUP_IMPORTANCE_RULES, cmp_mask_matrix, eq9_weights, is_forced,
                                       num_cmp_blocks, num_sel_blocks, selection_candidate, selection_key_mask,
                                       window_mask_matrix)
from nsaconf.cases.model import Case
from nsaconf.cases.tensors import GRAD_INPUTS, Inputs, TORCH_DTYPES, canonical_order, grad_branches, output_cotangent

_ELEMENT_BUDGET = 1 << 21  # elements of the largest per-chunk temporary


def mean_pool(x: torch.Tensor, l: int, d: int) -> torch.Tensor:
    """``[T, H, D] -> [ceil(T/d), H, D]``: block c is the mean of ``x[c*d : min(c*d+l, T)]``."""
    T = x.shape[0]
    n = num_cmp_blocks(T, d)
    csum = torch.cat([x.new_zeros((1,) + x.shape[1:]), x.cumsum(0)], 0)
    start = torch.arange(n, device=x.device) * d
    end = torch.clamp(start + l, max=T)
    count = (end - start).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return (csum[end] - csum[start]) / count


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """Attention with an all-masked row giving output 0 and LSE -inf.

    ``q [C,H,G,D]``, ``k [C?,H,K,D]`` or ``[H,K,D]``, ``v`` likewise, ``mask`` broadcastable to
    ``[C,H,G,K]``. Returns ``o [C,H,G,DV]``, ``lse [C,H,G]``.
    """
    if k.dim() == 3:
        logits = torch.einsum("chgd,hkd->chgk", q, k) * scale
    else:
        logits = torch.einsum("chgd,chkd->chgk", q, k) * scale
    mask = mask.expand_as(logits)
    logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    empty = torch.isneginf(lse)
    prob = torch.exp(logits - torch.where(empty, torch.zeros_like(lse), lse)[..., None])
    prob = torch.where(mask, prob, torch.zeros_like(prob))
    if v.dim() == 3:
        o = torch.einsum("chgk,hkd->chgd", prob, v)
    else:
        o = torch.einsum("chgk,chkd->chgd", prob, v)
    return o, lse, prob


def select_blocks(case: Case, importance: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Top-n per query: ``importance [C,H,NS]`` (one per kv head), positions ``[C]`` ->
    ``[C,H,n]`` int64 block ids, ascending, -1 last (see module docstring for the rule)."""
    NS = importance.shape[-1]
    ls, n = case.block_size, case.top_n
    j = torch.arange(NS, device=pos.device)
    forced = is_forced(case.forced_blocks, j[None, :], pos[:, None], ls)[:, None, :]  # [C,1,NS]
    cand = selection_candidate(j[None, :], pos[:, None], ls)[:, None, :] & ((importance > 0) | forced)
    score = torch.where(forced, torch.full_like(importance, float("inf")), importance)
    score = torch.where(cand, score, torch.full_like(importance, float("-inf")))
    val, idx = torch.sort(score, dim=-1, descending=True, stable=True)  # stable: ties -> lower index
    k = min(n, NS)
    val, idx = val[..., :k], idx[..., :k]
    idx = torch.where(torch.isneginf(val), torch.full_like(idx, -1), idx)
    if k < n:
        idx = torch.cat([idx, idx.new_full(idx.shape[:-1] + (n - k,), -1)], dim=-1)
    return canonical_order(idx)


def _sequence(case: Case, q, k, v, pos, given_idx, chunk: int, out: dict[str, torch.Tensor]) -> None:
    """One sequence of one batch element, written into the ``out`` views (rows = its queries).
    q ``[TQs,HQ,D]``, k/v ``[Ts,H,*]``, pos ``[TQs]``."""
    H, G, D, DV = case.heads_kv, case.group, case.head_dim, case.head_dim_v
    l, d, ls, w, scale = case.cmp_block, case.cmp_stride, case.block_size, case.window, case.softmax_scale
    Ts, TQs = k.shape[0], q.shape[0]
    NC, NS = num_cmp_blocks(Ts, d), num_sel_blocks(Ts, ls)
    k_cmp = mean_pool(k, l, d).transpose(0, 1)  # [H,NC,D]
    v_cmp = mean_pool(v, l, d).transpose(0, 1)
    W = eq9_weights(NC, NS, l, d, ls).to(device=q.device, dtype=q.dtype)
    key_pos = torch.arange(Ts, device=q.device)
    kh, vh = k.transpose(0, 1), v.transpose(0, 1)  # [H,Ts,*]
    for c0 in range(0, TQs, chunk):
        rows = slice(c0, c0 + chunk)
        qc = q[rows].view(-1, H, G, D)
        pc = pos[rows]
        C = qc.shape[0]
        # compression branch
        cmask = cmp_mask_matrix(case.cmp_mask, pc, NC, l, d)[:, None, None, :]
        o_cmp, lse, p_cmp = masked_attention(qc, k_cmp, v_cmp, cmask, scale)
        out["cmp_o"][rows] = o_cmp.reshape(C, H * G, DV)
        out["cmp_lse"][rows] = lse.reshape(C, H * G)
        # importance (pooled over the group, then Eq. 9) and top-n
        logits = torch.einsum("chgd,hkd->chgk", qc, k_cmp) * scale if case.group_importance != "sum_probs" else None
        imp = GROUP_IMPORTANCE_RULES[case.group_importance](p_cmp, logits, cmask[:, :, 0, :]) @ W  # [C,H,NS]
        if "importance" in out:
            out["importance"][rows, :, :NS] = imp
        topk = select_blocks(case, imp, pc)
        out["topk_idx"][rows] = topk
        # selection branch
        idx = topk if given_idx is None else given_idx[rows]
        s = idx[..., None] * ls + torch.arange(ls, device=q.device)  # [C,H,n,ls]
        s = s.reshape(C, H, -1)
        valid = (idx[..., None] >= 0).expand(-1, -1, -1, ls).reshape(C, H, -1) & (s < Ts)
        valid &= selection_key_mask(pc, s.reshape(C, -1)).view(C, H, -1)
        sc = s.clamp(0, Ts - 1)
        heads = torch.arange(H, device=q.device)[None, :, None]
        ksel, vsel = kh[heads, sc], vh[heads, sc]  # [C,H,K,D]: one gather each
        o_slc, _, _ = masked_attention(qc, ksel, vsel, valid[:, :, None, :], scale)
        out["slc_o"][rows] = o_slc.reshape(C, H * G, DV)
        # sliding window branch
        if w > 0:
            lo = max(int(pc.min()) - w, 0)
            hi = int(pc.max()) + 1
            keys = key_pos[lo:hi]
            wmask = window_mask_matrix(case.window_keys, pc, keys, w)[:, None, None, :]
            o_swa, _, _ = masked_attention(qc, kh[:, lo:hi], vh[:, lo:hi], wmask, scale)
            out["swa_o"][rows] = o_swa.reshape(C, H * G, DV)


def _per_query_elements(case: Case) -> int:
    """Elements of the largest per-query temporaries: ``H*keys*max(D,DV) + HQ*keys`` (gathered K/V and
    logits), keys = the most any branch looks at."""
    keys = max(case.top_n * case.block_size, num_cmp_blocks(case.seq_len, case.cmp_stride), case.window + 1, 1)
    return case.heads_kv * keys * max(case.head_dim, case.head_dim_v) + case.heads_q * keys


def default_chunk(case: Case) -> int:
    """Queries per chunk so that the largest temporary stays near ``_ELEMENT_BUDGET`` elements."""
    return int(max(1, min(4096, _ELEMENT_BUDGET // _per_query_elements(case))))


def output_shapes(case: Case, return_importance: bool = False) -> dict[str, tuple[int, ...]]:
    """Shapes of ``nsa_reference``'s outputs: ``[B,TQ,HQ,DV]`` (``cmp_o slc_o swa_o o``), ``cmp_lse
    [B,TQ,HQ]``, ``topk_idx [B,TQ,H,n]`` (+ ``importance [B,TQ,H,NS]``, NS of the longest sequence)."""
    B, TQ, HQ, H, DV = case.batch, case.q_len, case.heads_q, case.heads_kv, case.head_dim_v
    shapes = {"cmp_o": (B, TQ, HQ, DV), "cmp_lse": (B, TQ, HQ), "topk_idx": (B, TQ, H, case.top_n), "slc_o": (B, TQ, HQ, DV)}
    if case.window > 0:
        shapes["swa_o"] = (B, TQ, HQ, DV)
    shapes["o"] = (B, TQ, HQ, DV)
    if return_importance:
        shapes["importance"] = (B, TQ, H, max(num_sel_blocks(e - s, case.block_size) for s, e in case.sequences))
    return shapes


#: elements of one window of ``query_windows`` (of its largest output, ``[rows, HQ, DV]``)
WINDOW_ELEMENTS = 1 << 20


def query_windows(case: Case, elements: Optional[int] = None, chunk: Optional[int] = None) -> list[tuple[int, int, int]]:
    """``(b, r0, r1)``: query rows ``r0:r1`` of batch element ``b``, about ``elements`` (default
    ``WINDOW_ELEMENTS``) output elements each, in the order of the outputs' memory (``b``, then rows). Every
    boundary inside a sequence falls on one of the reference's own chunks (``chunk`` queries from the
    sequence's start), so that ``nsa_reference(..., window=w)`` computes, bit for bit, the rows that the
    whole computation gives; short sequences share a window."""
    chunk = chunk or default_chunk(case)
    want = max(1, (elements or WINDOW_ELEMENTS) // max(1, case.heads_q * max(case.head_dim_v, 1)))
    starts = [0] if case.cu_seqlens is None else [s for s, _ in case.sequences]
    ends = [case.q_len] if case.cu_seqlens is None else [e for _, e in case.sequences]
    out = []
    for b in range(case.batch):
        r0 = 0
        for s, e in zip(starts, ends):
            for c in range(s, e, chunk):
                c1 = min(c + chunk, e)
                if c1 - r0 >= want:
                    out.append((b, r0, c1))
                    r0 = c1
        if r0 < case.q_len:
            out.append((b, r0, case.q_len))
    return out


def _forward(case: Case, x: Inputs, chunk: Optional[int], block_indices: Optional[torch.Tensor],
             return_importance: bool, window: Optional[tuple[int, int, int]] = None) -> dict[str, torch.Tensor]:
    """The forward of ``nsa_reference`` on inputs already in the compute dtype; differentiable when
    grad mode is on (the chunk writes into the preallocated outputs are recorded as ``CopySlices``)."""
    chunk = chunk or default_chunk(case)
    given = block_indices
    if given is None and case.block_indices == "random":
        given = x.block_indices
    f = dict(dtype=x.q.dtype, device=x.q.device)
    batches, lo_row, hi_row = (range(case.batch), 0, case.q_len) if window is None else ((window[0],), window[1], window[2])
    out = {}
    for name, shape in output_shapes(case, return_importance).items():
        shape = (len(batches), hi_row - lo_row) + shape[2:]
        if name == "topk_idx":
            out[name] = torch.empty(shape, dtype=torch.long, device=x.q.device)
        elif name == "importance":
            out[name] = torch.zeros(shape, **f)
        elif name != "o":
            out[name] = torch.empty(shape, **f)
    for i, b in enumerate(batches):
        for s0, s1 in case.sequences:
            qs0, qs1, p0 = (0, case.q_len, case.q_offset) if case.cu_seqlens is None else (s0, s1, 0)
            lo, hi = max(qs0, lo_row), min(qs1, hi_row)
            if lo >= hi:
                continue
            pos = torch.arange(p0 + lo - qs0, p0 + hi - qs0, device=x.q.device)
            gi = None if given is None else given[b, lo:hi].to(x.q.device).long()
            views = {name: t[i, lo - lo_row:hi - lo_row] for name, t in out.items()}
            _sequence(case, x.q[b, lo:hi], x.k[b, s0:s1], x.v[b, s0:s1], pos, gi, chunk, views)
    rows = (slice(None), slice(None)) if window is None else (slice(window[0], window[0] + 1), slice(lo_row, hi_row))
    gate = GATE_RULES[case.gates]  # on the whole gates, then the window's rows: the same bits as the whole computation
    o = out["cmp_o"] * gate(x.g_cmp)[rows][..., None]
    o.addcmul_(out["slc_o"], gate(x.g_slc)[rows][..., None])
    if "swa_o" in out:
        o.addcmul_(out["swa_o"], gate(x.g_swa)[rows][..., None])
    out["o"] = o
    return out


@torch.no_grad()
def nsa_reference(case: Case, inputs: Inputs, dtype: Optional[torch.dtype] = torch.float64,
                  chunk: Optional[int] = None, block_indices: Optional[torch.Tensor] = None,
                  return_importance: bool = False, window: Optional[tuple[int, int, int]] = None) -> dict[str, torch.Tensor]:
    """NSA forward of ``case`` on ``inputs`` computed in ``dtype`` (None: the inputs' dtype).

    Selection uses, in this order: ``block_indices`` if given, ``inputs.block_indices`` when
    ``case.block_indices == "random"``, else the top-n computed here. ``topk_idx`` is always the
    top-n computed from the compression branch. Returns canonical branches ``cmp_o``, ``cmp_lse``,
    ``topk_idx``, ``slc_o``, ``swa_o`` (only when ``window > 0``), ``o`` (+ ``importance``
    ``[B,TQ,H,NS]`` on request, zero-padded past a short sequence's blocks), all on the inputs'
    device. Outputs are preallocated and filled chunk by chunk: peak memory is the outputs plus one
    chunk's temporaries. ``window = (b, r0, r1)`` (one of ``query_windows``): only those query rows, each
    output ``[1, r1 - r0, ...]``, bit for bit the same rows as the whole computation (``block_indices``
    keeps its whole shape).
    """
    x = inputs if dtype is None else inputs.to(dtype=dtype)
    return _forward(case, x, chunk, block_indices, return_importance, window)


def autograd_grads(forward: Callable[[Inputs], dict[str, torch.Tensor]], case: Case, x: Inputs,
                   return_forward: bool = False) -> dict[str, torch.Tensor]:
    """Gradients of ``L = sum(o * dO)`` (``dO = output_cotangent``, see ``cases.tensors``) w.r.t. the
    inputs of ``grad_branches(case)``, by autograd through ``forward(inputs) -> {"o": ...}`` run on
    detached copies of ``x`` (computed in ``x``'s dtype). An input that ``o`` does not depend on gets a
    zero gradient. With ``return_forward`` the (detached) forward outputs are included."""
    names = grad_branches(case)
    leaves = {f: getattr(x, f).detach().clone().requires_grad_(True) for f in set(GRAD_INPUTS.values())}
    xi = Inputs(**leaves, block_indices=x.block_indices)
    with torch.enable_grad(), deterministic(x.q.device):
        fwd = forward(xi)
        o = fwd["o"]
        d_o = output_cotangent(case, o.device).to(o.dtype)  # dO in the case dtype (like the inputs), then o.dtype
        got = torch.autograd.grad(o, [leaves[GRAD_INPUTS[b]] for b in names], grad_outputs=d_o, allow_unused=True)
    res = {b: (torch.zeros_like(leaves[GRAD_INPUTS[b]]) if g is None else g.detach()) for b, g in zip(names, got)}
    if return_forward:
        res.update({k: v.detach() for k, v in fwd.items()})
    return res


@contextlib.contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """The same inputs give the same gradients bit for bit inside the block: the backward of a gather
    accumulates with ``index_put_``, whose float sums otherwise depend on the threads' timing. On the CPU
    one thread (the gradient truth is for small cases); on a GPU ``torch.use_deterministic_algorithms``."""
    if device.type == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
        return
    prev, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # an op without a deterministic kernel warns, never fails
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*determinis")
            yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=warn_only)


#: gradient truth only where B*TQ*(per-query elements of the chunk temporaries) <= this: autograd
#: through the chunked reference keeps every chunk's temporaries (a few times this many values)
GRAD_WORK_LIMIT = 1 << 24


def grad_truth_skip_reason(case: Case) -> Optional[str]:
    """Why no gradient truth is computed for ``case`` (None: it is); the engine SKIPs gradient cells."""
    work = case.batch * case.q_len * _per_query_elements(case)
    if work > GRAD_WORK_LIMIT:
        return (f"gradient truth is limited to B*TQ*(H*keys*max(D,DV) + HQ*keys) <= {GRAD_WORK_LIMIT:.3g} "
                f"(autograd keeps every chunk of the fp64 reference; this case: {work:.3g})")
    return None


def nsa_reference_grads(case: Case, inputs: Inputs, dtype: Optional[torch.dtype] = torch.float64,
                        block_indices: Optional[torch.Tensor] = None, chunk: Optional[int] = None,
                        return_forward: bool = False) -> dict[str, torch.Tensor]:
    """Gradients ``dq, dk, dv, dg_cmp, dg_slc`` (+ ``dg_swa`` when ``window > 0``) of
    ``L = sum(o * dO)`` through ``nsa_reference`` (same selection rule and arguments), computed in
    ``dtype`` (None: the inputs' dtype). The top-n choice is piecewise constant: gradients flow
    through the chosen blocks only. Memory: autograd keeps every chunk's temporaries (small cases)."""
    x = inputs if dtype is None else inputs.to(dtype=dtype)
    return autograd_grads(lambda xi: _forward(case, xi, chunk, block_indices, False), case, x, return_forward)


def compute_dtype(case: Case) -> torch.dtype:
    return TORCH_DTYPES[case.dtype]
