"""flash_attn shim: CPU fallback semantics (flash-attn's mask) and the window translation."""
import sys

import pytest
import torch

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import materialize
from nsaconf.oracles.base import get_oracle
from nsaconf.oracles.compat import flash_attn_shim as shim
from nsaconf.oracles.reference import nsa_reference
from tests.adapters_util import check_against_reference


def _brute(q, k, v, scale, causal, window):
    """Per-element loop of flash-attn's documented mask (independent of the shim's vectorised mask)."""
    B, TQ, HQ, _ = q.shape
    TK, H = k.shape[1], k.shape[2]
    out = torch.zeros(B, TQ, HQ, v.shape[-1], dtype=torch.float64)
    left, right = window
    right = 0 if causal else right
    for b in range(B):
        for i in range(TQ):
            for h in range(HQ):
                js = [j for j in range(TK) if (right < 0 or j <= i + TK - TQ + right) and (left < 0 or j >= i + TK - TQ - left)]
                if not js:
                    continue
                s = torch.stack([(q[b, i, h].double() * k[b, j, h // (HQ // H)].double()).sum() * scale for j in js])
                p = torch.softmax(s, 0)
                out[b, i, h] = sum(p[n] * v[b, j, h // (HQ // H)].double() for n, j in enumerate(js))
    return out


@pytest.mark.parametrize("causal,window,TQ", [(True, (3, 0), 9), (True, (-1, -1), 9), (False, (2, 1), 9), (True, (4, 0), 4),
                                               (False, (-1, 2), 5)])
def test_sdpa_fallback_matches_flash_attn_mask(causal, window, TQ):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, TQ, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 9, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 9, 2, 5, generator=g, dtype=torch.float64)
    assert shim.backend(q) == "sdpa"
    got = shim.flash_attn_func(q, k, v, softmax_scale=0.4, causal=causal, window_size=window)
    torch.testing.assert_close(got, _brute(q, k, v, 0.4, causal, window), rtol=0, atol=1e-12)


def test_varlen_equals_per_sequence():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(11, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 4, 11])
    got = shim.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True, window_size=(2, 0))
    a = shim.flash_attn_func(q[None, :4], k[None, :4], v[None, :4], causal=True, window_size=(2, 0))[0]
    b = shim.flash_attn_func(q[None, 4:], k[None, 4:], v[None, 4:], causal=True, window_size=(2, 0))[0]
    torch.testing.assert_close(got, torch.cat([a, b]), rtol=0, atol=0)


def test_install_registers_module_only_without_flash_attn():
    prev = sys.modules.get("flash_attn")
    try:
        how = shim.install()
        import flash_attn
        assert hasattr(flash_attn, "flash_attn_func") and hasattr(flash_attn, "flash_attn_varlen_func")
        assert (how == "shim") == bool(getattr(flash_attn, "IS_NSACONF_SHIM", False))
    finally:
        if prev is None:
            sys.modules.pop("flash_attn", None)
        else:
            sys.modules["flash_attn"] = prev


@pytest.mark.parametrize("kw", [dict(window=8), dict(window=8, window_keys="w_plus_1"), dict(window=1),
                                dict(seq_len=70, q_len=21, window=16), dict(cu_seqlens=(0, 30, 80), seq_len=80, window=5),
                                dict(heads_q=6, heads_kv=3, head_dim_v=24, window=7)])
def test_flash_window_translation_on_cpu(kw):
    """flash_window is a CUDA oracle; its run() on CPU goes through the shim's fallback and must equal the
    reference window branch: (w-1, 0) for w keys, (w, 0) for w+1 keys, bottom-right causal for decode."""
    case = Case(seq_len=kw.pop("seq_len", 64), dtype="float64", **kw)
    check_against_reference(get_oracle("flash_window"), case, atol=1e-12)


def test_flash_window_off_by_one_is_caught():
    """Passing w as flash-attn's left window (w+1 keys) on a w-keys case must be detected."""
    case = Case(seq_len=64, window=8, dtype="float64")
    x = materialize(case)
    wrong = shim.flash_attn_func(x.q, x.k, x.v, causal=True, window_size=(case.window, 0))
    ref = nsa_reference(case, x)["swa_o"]
    assert (wrong - ref).abs().max() > 1e-3


def test_flash_window_declares_cuda_and_skips_no_window():
    o = get_oracle("flash_window")
    assert o.check_support(Case(window=8, dtype="float16"), "cpu") is not None
    assert "window = 0" in o.supports(Case(window=0), "cuda")
