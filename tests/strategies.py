"""Hypothesis strategies for valid canonical cases (small shapes, every field)."""
from __future__ import annotations

from hypothesis import strategies as st

from nsaconf.cases.conventions import CMP_MASKS, FORCED_BLOCKS, WINDOW_KEYS, max_forced
from nsaconf.cases.model import Case


@st.composite
def small_cases(draw, dtype: str = "float64", max_t: int = 72, varlen: bool = True) -> Case:
    d = draw(st.sampled_from([2, 4]))
    l = d * draw(st.sampled_from([1, 2]))
    ls = d * draw(st.sampled_from([1, 2, 4]))
    forced = draw(st.sampled_from(FORCED_BLOCKS))
    top_n = draw(st.integers(max(1, max_forced(forced)), 5))
    h = draw(st.integers(1, 2))
    g = draw(st.integers(1, 3))
    use_varlen = varlen and draw(st.booleans()) and draw(st.booleans())
    if use_varlen:
        lens = draw(st.lists(st.integers(1, max_t // 3), min_size=1, max_size=3))
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        t, tq, b, cu_seqlens = cu[-1], cu[-1], 1, tuple(cu)
    else:
        t = draw(st.integers(1, max_t))
        tq = draw(st.integers(1, t))
        b = draw(st.integers(1, 2))
        cu_seqlens = None
    return Case(
        batch=b, seq_len=t, q_len=tq, heads_q=h * g, heads_kv=h,
        head_dim=draw(st.sampled_from([4, 8])), head_dim_v=draw(st.sampled_from([4, 6])),
        dtype=dtype, block_size=ls, cmp_block=l, cmp_stride=d, top_n=top_n,
        window=draw(st.sampled_from([0, 1, 3, 7])),
        cmp_mask=draw(st.sampled_from(sorted(CMP_MASKS))),
        window_keys=draw(st.sampled_from(sorted(WINDOW_KEYS))),
        forced_blocks=forced,
        block_indices=draw(st.sampled_from(["topk", "random"])),
        scale=draw(st.sampled_from([None, 0.3])),
        cu_seqlens=cu_seqlens,
        seed=draw(st.integers(0, 2**31 - 1)),
    )
