"""Every NSA masking convention, each written once as a tiny pure function.

All dense masks in nsaconf (reference oracle, brute-force tests, flex_attention oracle, receptive-field
probe) are built from these functions; no other module re-derives a visibility rule.

Notation: ``p`` is the absolute 0-based query position (inside its sequence), ``s`` a key position,
``c`` a compressed-block index. Compressed block ``c`` covers keys ``[c*d, c*d + l)`` (``l`` =
``cmp_block``, ``d`` = ``cmp_stride``); it is the mean over the keys of that range that exist.
Selection block ``j`` covers keys ``[j*ls, (j+1)*ls)`` (``ls`` = ``block_size``, the paper's l').

Each visibility function works on Python ints and, elementwise with broadcasting, on integer tensors;
the group-importance and gate functions work on float tensors.
"""
from __future__ import annotations

from typing import Callable

import torch

from nsaconf.cases import vocabulary as V

# --------------------------------------------------------------------------------------------------
# Compression-branch visibility: may query p attend to compressed block c?
# --------------------------------------------------------------------------------------------------


def end_inclusive(c, p, l, d):
    """Visible iff the block ends at or before p: ``c*d + l - 1 <= p``.

    Used by the NSA paper (Eq. 7: blocks ``0 <= i <= floor((t-l)/d)``), FLA ``fla.ops.nsa`` (naive and
    Triton, for l = d = BS: ``c < (p+1)//BS``), fla-org/native-sparse-attention, XunhaoLai
    native-sparse-attention-triton, Flash-Sparse-Attention and mdy666 flash_nsa. Causal.
    """
    return c * d + l - 1 <= p


def current_block(c, p, l, d):
    """Visible iff the block starts at or before p: ``c*d <= p`` (block-causal).

    Intra-block bidirectional: the block holding p is visible as a whole, so p sees up to l-1 future
    keys through its mean. Not causal; some ports use it by mistake.
    """
    return c * d <= p


def anti_causal(c, p, l, d):
    """Visible iff the block ends at or after p: ``c*d + l - 1 >= p``.

    tilde-research/nsa-impl @623e2c5 (its ``t <= (c+1)*BS - 1`` mask, commented as causal): sees the
    current and all future blocks and never a past one (tilde-research/nsa-release#3; copied by
    iree-org/wave#1246). Leaks the future.
    """
    return c * d + l - 1 >= p


def end_exclusive(c, p, l, d):
    """Visible iff the block ends strictly before p: ``c*d + l - 1 < p``.

    lucidrains native-sparse-attention-pytorch 0.2.3 (``(c+1)*d - 1 < t``): one position later than
    the paper. Causal.
    """
    return c * d + l - 1 < p


CMP_MASKS: dict[str, Callable] = {
    "end_inclusive": end_inclusive,
    "current_block": current_block,
    "anti_causal": anti_causal,
    "end_exclusive": end_exclusive,
}
CAUSAL_CMP_MASKS = V.CAUSAL_CMP_MASKS
assert tuple(CMP_MASKS) == V.CMP_MASKS

def cmp_block_covers(c, s, l, d):
    """Compressed block c is pooled from key s: ``c*d <= s < c*d + l`` (keys past T do not exist)."""
    return (c * d <= s) & (s < c * d + l)


# --------------------------------------------------------------------------------------------------
# Sliding-window visibility: may query p attend to key s?
# --------------------------------------------------------------------------------------------------


def window_w(p, s, w):
    """w keys, the current one included: ``p - w < s <= p``.

    FLA (flash-attn ``window_size=(w-1, 0)``), TileLang ``reference.py``, nsa-impl,
    fla-org/native-sparse-attention, TileGym ``attention_sink``.
    """
    return (s <= p) & (s > p - w)


def window_w_plus_1(p, s, w):
    """w+1 keys: ``p - w <= s <= p``.

    lucidrains (``LocalAttention(exact_windowsize=True)``), XunhaoLai / FSA / mdy666 (flash-attn
    ``window_size=(w, -1)``), attention-gym ``generate_sliding_window(W)``.
    """
    return (s <= p) & (s >= p - w)


WINDOW_KEYS: dict[str, Callable] = {"w": window_w, "w_plus_1": window_w_plus_1}
assert tuple(WINDOW_KEYS) == V.WINDOW_KEYS

# --------------------------------------------------------------------------------------------------
# Selection branch
# --------------------------------------------------------------------------------------------------


def selection_causal(p, s):
    """Inside a selected block, key s is used iff ``s <= p`` (every implementation except
    lucidrains' dense path, which adds the diagonal block with an in-block causal mask: same rule)."""
    return s <= p


def selection_candidate(j, p, ls):
    """Selection block j may be chosen for query p iff it starts at or before p: ``j*ls <= p``."""
    return j * ls <= p


FORCED_BLOCKS = V.FORCED_BLOCKS


def forced_none(j, p, ls):
    """``none``: no block is forced."""
    return (j < 0) & (j >= 0)


def forced_current(j, p, ls):
    """``current``: the block holding p, ``j == p//ls`` (FLA < 0.3.1, fla-org legacy)."""
    return j == p // ls


def forced_initial_local(j, p, ls):
    """``initial_local``: block 0, the current and the previous block (paper §4.1 "1 initial block and
    2 local blocks", FLA >= 0.3.1, XunhaoLai/FSA, mdy666)."""
    cur = p // ls
    return (j == 0) | (j == cur) | (j == cur - 1)


FORCED_RULES: dict[str, Callable] = {"none": forced_none, "current": forced_current,
                                     "initial_local": forced_initial_local}
assert tuple(FORCED_RULES) == V.FORCED_BLOCKS


def is_forced(kind: str, j, p, ls):
    """Is selection block j forced for query p? (``FORCED_RULES[kind]``; the per-kind functions are
    plain expressions so that GPU kernels can inline them.)"""
    if kind not in FORCED_RULES:
        raise ValueError(f"unknown forced_blocks {kind!r}; expected one of {FORCED_BLOCKS}")
    return FORCED_RULES[kind](j, p, ls)


def max_forced(kind: str) -> int:
    """Largest number of forced blocks a query can have under ``kind``."""
    return {"none": 0, "current": 1, "initial_local": 3}[kind]


# --------------------------------------------------------------------------------------------------
# Importance across the GQA group: one score per kv head and compressed block
# --------------------------------------------------------------------------------------------------
# Arguments (tensors): ``prob [..., G, NC]`` the compressed-attention probabilities of the group's G query
# heads (0 on invisible blocks), ``logits [..., G, NC]`` their scaled pre-softmax logits
# (``scale * q.K_cmp``; any value on invisible blocks), ``visible [..., NC]`` bool, the compression mask
# (the same for every head of the group). Result ``[..., NC]``; Eq. 9 then maps it to selection blocks.


def masked_softmax(x, visible):
    """Softmax of ``x`` over the last dim restricted to ``visible`` entries; 0 elsewhere and on a row with no
    visible entry."""
    x = x.masked_fill(~visible, float("-inf"))
    m = x.amax(dim=-1, keepdim=True)
    e = torch.exp(x - torch.where(torch.isneginf(m), torch.zeros_like(m), m))
    s = e.sum(dim=-1, keepdim=True)
    return e / torch.where(s == 0, torch.ones_like(s), s)


def sum_probs(prob, logits, visible):
    """``sum_probs``: ``imp[c] = sum_g p_g[c]`` -- the paper's Eq. 10 (shared selection across the group);
    FLA, nsa-impl, TileLang, XunhaoLai, FSA, mdy666. Sums to G on a row with a visible block."""
    return prob.sum(dim=-2)


def mean_logits(prob, logits, visible):
    """``mean_logits``: ``imp[c] = softmax_{c visible}(mean_g logits_g[c])`` (0 on invisible blocks and on a
    row with none) -- lucidrains native-sparse-attention-pytorch 0.2.3 (``query_heads_share_selected_kv``:
    ``reduce(csim, 'b (h g) ... -> b h ...', 'mean')``, then a softmax). Sums to 1 on a row with a visible block."""
    return masked_softmax(logits.mean(dim=-2), visible)


GROUP_IMPORTANCE_RULES: dict[str, Callable] = {"sum_probs": sum_probs, "mean_logits": mean_logits}
assert tuple(GROUP_IMPORTANCE_RULES) == V.GROUP_IMPORTANCE


# --------------------------------------------------------------------------------------------------
# Gates: the multiplier of each branch from the given gate value g (tensors)
# --------------------------------------------------------------------------------------------------


def gate_raw(g):
    """``raw``: the given value is the multiplier, ``o = g_cmp*o_cmp + g_slc*o_slc + g_swa*o_swa`` (the
    paper's g_t^c, FLA ``naive_nsa``/``parallel_nsa``, nsa-impl, TileLang)."""
    return g


def gate_sigmoid(g):
    """``sigmoid``: the given value is a logit, the multiplier is ``1 / (1 + exp(-g))`` (lucidrains applies
    ``nn.Sigmoid`` to its gate MLP's output inside the module; the paper's "MLP and sigmoid activation")."""
    return torch.sigmoid(g)


GATE_RULES: dict[str, Callable] = {"raw": gate_raw, "sigmoid": gate_sigmoid}
assert tuple(GATE_RULES) == V.GATES


# --------------------------------------------------------------------------------------------------
# Dense masks, all built from the functions above
# --------------------------------------------------------------------------------------------------


def cmp_mask_matrix(cmp_mask: str, positions: torch.Tensor, n_blocks: int, l: int, d: int) -> torch.Tensor:
    """Bool ``[len(positions), n_blocks]``: ``M[i, c] = CMP_MASKS[cmp_mask](c, positions[i], l, d)``."""
    rule = CMP_MASKS[cmp_mask]
    c = torch.arange(n_blocks, device=positions.device)
    return rule(c[None, :], positions[:, None], l, d)


def window_mask_matrix(window_keys: str, positions: torch.Tensor, keys: torch.Tensor, w: int) -> torch.Tensor:
    """Bool ``[len(positions), len(keys)]``: ``M[i, j] = WINDOW_KEYS[window_keys](positions[i], keys[j], w)``."""
    return WINDOW_KEYS[window_keys](positions[:, None], keys[None, :], w)


def selection_key_mask(positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Bool ``[len(positions), len(keys)]`` of ``selection_causal`` (before block membership)."""
    return selection_causal(positions[:, None], keys[None, :])


def num_cmp_blocks(seq_len: int, d: int) -> int:
    """Compressed blocks of a sequence of length T: every block that starts inside it, ``ceil(T/d)``
    (the tail blocks are means over the keys that exist, as FLA's ``mean_pooling``)."""
    return -(-seq_len // d)


def num_sel_blocks(seq_len: int, ls: int) -> int:
    """Selection blocks of a sequence of length T: ``ceil(T/ls)``."""
    return -(-seq_len // ls)


def eq9_weights(n_cmp: int, n_sel: int, l: int, d: int, ls: int) -> torch.Tensor:
    """Float ``[n_cmp, n_sel]`` map from compression probabilities to selection importance (Eq. 9).

    Our reading of Eq. 9 (l % d == 0 and ls % d == 0):
    ``p_slc[j] = sum_{m < ls/d} sum_{n < l/d} p_cmp[(ls/d)*j + m - n]`` (indices outside
    ``[0, n_cmp)`` dropped). The paper prints ``- m - n``; ``+ m - n`` is the reading under which the
    sum runs exactly over the compressed blocks that overlap selection block j, each weighted by its
    overlap in units of d (XunhaoLai's reading). For l = d = ls it is the identity (FLA).
    """
    if l % d or ls % d:
        raise ValueError(f"Eq. 9 needs cmp_block % cmp_stride == 0 and block_size % cmp_stride == 0 (l={l}, d={d}, l'={ls})")
    w = torch.zeros(n_cmp, n_sel, dtype=torch.float64)
    r = ls // d
    for j in range(n_sel):
        for m in range(r):
            for n in range(l // d):
                c = r * j + m - n
                if 0 <= c < n_cmp:
                    w[c, j] += 1.0
    return w
