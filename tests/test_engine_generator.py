"""Profiles: deterministic, valid, and the ci profile covers every axis the issue names."""
from __future__ import annotations

import pytest

from nsaconf.cases.conventions import CMP_MASKS, FORCED_BLOCKS, WINDOW_KEYS
from nsaconf.cases.generator import PROFILES, profile_cases
from nsaconf.cases.model import DTYPES, Case, CaseError


@pytest.mark.parametrize("name", PROFILES)
def test_profiles_are_deterministic_and_round_trip(name):
    a, b = profile_cases(name, 0), profile_cases(name, 0)
    assert [c.id for c in a] == [c.id for c in b] and len(a) == len({c.id for c in a}) > 0
    for c in a:
        assert Case.from_id(c.id) == c and Case.from_json(c.to_json()) == c
    if name == "regressions":  # the corpus replays its cases as they were found
        assert [c.id for c in profile_cases(name, 1)] == [c.id for c in a]
    else:
        assert [c.id for c in profile_cases(name, 1)] != [c.id for c in a]  # the seed changes the tensors


def test_ci_profile_coverage():
    cs = profile_cases("ci")
    assert {c.cmp_mask for c in cs} == set(CMP_MASKS)
    assert {c.window_keys for c in cs} == set(WINDOW_KEYS)
    assert {c.forced_blocks for c in cs} == set(FORCED_BLOCKS)
    assert {c.block_indices for c in cs} == {"topk", "random"}
    assert {c.dtype for c in cs} == set(DTYPES)
    assert {1, 2, 4, 16} <= {c.group for c in cs}
    assert any(c.cu_seqlens for c in cs)
    assert any(c.q_len < c.seq_len for c in cs)
    assert any(c.seq_len % c.block_size for c in cs)
    assert any(c.seq_len < c.block_size for c in cs)
    assert any(c.cmp_block != c.cmp_stride for c in cs) and any(c.block_size != c.cmp_block for c in cs)
    assert any(c.head_dim != c.head_dim_v for c in cs) and any(c.scale for c in cs) and any(c.batch > 1 for c in cs)
    assert all(16 <= c.seq_len <= 300 or c.seq_len < c.block_size for c in cs)


def test_paper_profile_is_the_paper():
    for c in profile_cases("paper"):
        assert (c.group, c.head_dim, c.head_dim_v, c.cmp_block, c.cmp_stride, c.block_size, c.top_n, c.window) == \
            (16, 192, 128, 32, 16, 64, 16, 512)


def test_gpu_profile_edges():
    cs = profile_cases("gpu")
    assert {c.dtype for c in cs} == {"float16", "bfloat16"}
    assert {16, 32, 64} <= {c.group for c in cs}
    assert any(c.seq_len < c.block_size for c in cs) and any(c.q_len < c.seq_len for c in cs) and any(c.cu_seqlens for c in cs)
    assert {(c.head_dim, c.head_dim_v) for c in cs} >= {(64, 64), (128, 128), (192, 128)}
    from nsaconf.oracles.reference import grad_truth_skip_reason

    # gradients of the one-block-size kernels (FLA's backward) are judged on at least one case per dtype
    grads = [c for c in cs if c.block_size == c.cmp_block == c.cmp_stride == 64 and c.q_len == c.seq_len
             and grad_truth_skip_reason(c) is None]
    assert {c.dtype for c in grads} == {"float16", "bfloat16"}


def test_unknown_profile():
    with pytest.raises(CaseError):
        profile_cases("nope")
