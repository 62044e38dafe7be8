"""A ``flash_attn`` stand-in: ``flash_attn_func`` / ``flash_attn_varlen_func`` with ``causal`` and
``window_size=(left, right)``, flash-attn's semantics, from whichever backend exists.

Backends, in order (``backend(q)`` says which one a call uses):

* ``flash_attn``: the real package (flash-attn >= 2.3), when it is installed;
* ``aten_fa2``: PyTorch's bundled FlashAttention-2 kernel, ``torch.ops.aten._flash_attention_forward``
  with ``window_size_left/right`` (CUDA, fp16/bf16; head dims zero-padded to a multiple of 8);
* ``sdpa``: a masked ``scaled_dot_product_attention`` in the input dtype (CPU, fp32/fp64, or any
  other case) -- a plain torch re-statement of flash-attn's mask, not a kernel.

flash-attn's mask (queries aligned bottom-right, ``off = TK - TQ``): key j is visible to query i iff
``j <= i + off + right`` (``causal`` forces ``right = 0``) and ``j >= i + off - left``; -1 means
unbounded. A row with no visible key gives 0. GQA: HQ must be a multiple of H, query head h reads kv
head ``h // (HQ/H)``.

``install()`` puts this module into ``sys.modules["flash_attn"]`` when the real package is absent, so
that external code doing ``from flash_attn import flash_attn_func`` (FLA, nsa-impl) runs unchanged.
"""
from __future__ import annotations

import importlib.util
import sys
from typing import Optional

import torch
import torch.nn.functional as F

__version__ = "nsaconf-shim"
IS_NSACONF_SHIM = True
_REAL = None  # the real flash_attn module, if importable


def _real_flash_attn():
    global _REAL
    if _REAL is None:
        mod = sys.modules.get("flash_attn")
        if mod is not None and not getattr(mod, "IS_NSACONF_SHIM", False):
            _REAL = mod
        elif mod is None and importlib.util.find_spec("flash_attn") is not None:
            try:
                import flash_attn as real  # noqa: F401
                _REAL = real
            except Exception:  # noqa: BLE001 - a broken install counts as absent
                _REAL = False
        else:
            _REAL = False
    return _REAL or None


def _has_aten_fa2() -> bool:
    return hasattr(torch.ops.aten, "_flash_attention_forward")


def backend(q: torch.Tensor) -> str:
    """The backend a call with ``q`` uses: ``flash_attn`` | ``aten_fa2`` | ``sdpa``."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if _real_flash_attn() is not None:
            return "flash_attn"
        if _has_aten_fa2():
            return "aten_fa2"
    return "sdpa"


def _window_mask(TQ: int, TK: int, causal: bool, window_size, device) -> torch.Tensor:
    """Bool ``[TQ, TK]``: flash-attn's visibility (see module docstring)."""
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(TQ, device=device)[:, None] + (TK - TQ)
    j = torch.arange(TK, device=device)[None, :]
    m = torch.ones(TQ, TK, dtype=torch.bool, device=device)
    if right >= 0:
        m &= j <= i + right
    if left >= 0:
        m &= j >= i - left
    return m


def _sdpa(q, k, v, scale, causal, window_size):
    """q ``[B,TQ,HQ,D]``, k ``[B,TK,H,D]``, v ``[B,TK,H,DV]`` -> ``[B,TQ,HQ,DV]`` (masked SDPA)."""
    B, TQ, HQ, _ = q.shape
    TK, H = k.shape[1], k.shape[2]
    G = HQ // H
    mask = _window_mask(TQ, TK, causal, window_size, q.device)
    kk = k.repeat_interleave(G, dim=2).transpose(1, 2)
    vv = v.repeat_interleave(G, dim=2).transpose(1, 2)
    qq = q.transpose(1, 2)
    logits = torch.einsum("bhqd,bhkd->bhqk", qq, kk) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    p = torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)
    p = torch.nan_to_num(p, nan=0.0).to(v.dtype)  # empty row -> 0, like flash-attn
    return torch.einsum("bhqk,bhkd->bhqd", p, vv).transpose(1, 2)


def _pad_last(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if x.shape[-1] == n else F.pad(x, (0, n - x.shape[-1]))


def _aten(q, k, v, scale, causal, window_size, cu_q=None, cu_k=None, max_q=None, max_k=None):
    """PyTorch's bundled FA2 forward; head dims padded with zeros to a common multiple of 8."""
    D, DV = q.shape[-1], v.shape[-1]
    P = max(D, DV)
    P = -(-P // 8) * 8
    qp, kp, vp = (_pad_last(x, P).contiguous() for x in (q, k, v))
    left, right = window_size
    if causal:
        right = 0
    if cu_q is None:
        max_q, max_k = q.shape[1], k.shape[1]
    kw = dict(scale=scale, window_size_left=int(left), window_size_right=int(right))
    try:
        out = torch.ops.aten._flash_attention_forward(qp, kp, vp, cu_q, cu_k, max_q, max_k, 0.0, bool(causal), False, **kw)[0]
    except RuntimeError as e:
        if "head" not in str(e).lower():
            raise
        G = q.shape[-2] // k.shape[-2]  # GQA not accepted by this build: repeat K/V
        kp, vp = (x.repeat_interleave(G, dim=-2).contiguous() for x in (kp, vp))
        out = torch.ops.aten._flash_attention_forward(qp, kp, vp, cu_q, cu_k, max_q, max_k, 0.0, bool(causal), False, **kw)[0]
    return out[..., :DV]


def _check_and_scale(q, dropout_p, softmax_scale, softcap, alibi_slopes, return_attn_probs) -> float:
    """Refuse what the shim does not implement; the softmax scale (flash-attn's default 1/sqrt(D))."""
    if dropout_p or softcap or alibi_slopes is not None or return_attn_probs:
        raise NotImplementedError("flash_attn shim: dropout, softcap, alibi and attn probs are not supported")
    return softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5


def flash_attn_func(q, k, v, dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
                    window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None, deterministic: bool = False,
                    return_attn_probs: bool = False, **_):
    """flash-attn's ``flash_attn_func`` (forward only; no dropout, softcap or alibi)."""
    scale = _check_and_scale(q, dropout_p, softmax_scale, softcap, alibi_slopes, return_attn_probs)
    b = backend(q)
    if b == "flash_attn":
        return _real_flash_attn().flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, window_size=tuple(window_size))
    if b == "aten_fa2":
        return _aten(q, k, v, scale, causal, tuple(window_size))
    return _sdpa(q, k, v, scale, causal, tuple(window_size))


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, causal: bool = False, window_size=(-1, -1),
                           softcap: float = 0.0, alibi_slopes=None, deterministic: bool = False,
                           return_attn_probs: bool = False, **_):
    """flash-attn's ``flash_attn_varlen_func``: packed ``[total, H, D]`` with cumulative lengths."""
    scale = _check_and_scale(q, dropout_p, softmax_scale, softcap, alibi_slopes, return_attn_probs)
    b = backend(q)
    if b == "flash_attn":
        return _real_flash_attn().flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                          softmax_scale=scale, causal=causal, window_size=tuple(window_size))
    if b == "aten_fa2":
        return _aten(q, k, v, scale, causal, tuple(window_size), cu_seqlens_q.int(), cu_seqlens_k.int(),
                     int(max_seqlen_q), int(max_seqlen_k))
    cq, ck = [int(x) for x in cu_seqlens_q], [int(x) for x in cu_seqlens_k]
    outs = [_sdpa(q[None, a:b_], k[None, c:d], v[None, c:d], scale, causal, tuple(window_size))[0]
            for a, b_, c, d in zip(cq[:-1], cq[1:], ck[:-1], ck[1:])]
    return torch.cat(outs, 0)


def install() -> str:
    """Make ``import flash_attn`` work: returns ``"flash_attn"`` if the real package is importable
    (nothing is changed), else registers this shim as ``flash_attn`` and returns ``"shim"``."""
    if _real_flash_attn() is not None:
        return "flash_attn"
    sys.modules["flash_attn"] = sys.modules[__name__]
    return "shim"


def description(device: str = "cuda", dtype: torch.dtype = torch.float16) -> str:
    """Human-readable name of the backend used for ``device``/``dtype``."""
    if device == "cuda" and dtype in (torch.float16, torch.bfloat16) and torch.cuda.is_available():
        if _real_flash_attn() is not None:
            return f"flash-attn {getattr(_real_flash_attn(), '__version__', '?')}"
        if _has_aten_fa2():
            return f"torch {torch.__version__} aten._flash_attention_forward (bundled FA2)"
    return "masked SDPA fallback (torch)"
