"""``flex``: the compression and sliding-window branches through ``torch.nn.attention.flex_attention``.

An independent torch-native oracle for every ``cmp_mask``: the ``mask_mod`` functions call the
convention functions of ``cases.conventions`` directly (``CMP_MASKS[case.cmp_mask](c, p, l, d)`` and
``WINDOW_KEYS[case.window_keys](p, s, w)``) with ``p = q_idx + T - TQ``; flex builds the block mask.

* compression: ``K_cmp[c] = mean(k[c*d : min(c*d+l, T)])`` (pooled here with ``unfold``-free
  index sums, independent of the reference's cumsum), ``o, lse = flex_attention(q, K_cmp, V_cmp,
  block_mask, scale, enable_gqa, return_lse)``; flex gives o = 0 and lse = -inf (natural log) on rows
  with no visible block, which is the canonical convention.
* window: ``flex_attention(q, k, v, window block_mask)``; w = 0 -> no branch.

Varlen runs each sequence separately. CPU: eager flex (dense fallback), with every rule of a kind in one
mask_mod (``one_of``) so that dynamo traces it once per dtype and head shape. CUDA: ``torch.compile``d
flex (the Triton kernel) unless ``NSACONF_FLEX_COMPILE=0``.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Optional

import torch

from nsaconf.cases.conventions import CMP_MASKS, WINDOW_KEYS, num_cmp_blocks
from nsaconf.cases.model import Case
from nsaconf.cases.tensors import Inputs
from nsaconf.oracles.base import Oracle, register_oracle

_COMPILED = None


def _flex_fn(device: str):
    """(flex function, kernel_options). Compiled on CUDA with the main Triton kernel forced: for TQ < 128
    torch's AUTO choice is the flex-decoding kernel, which finds no valid config for the few compressed
    keys (``NoValidChoicesError``, measured with torch 2.11 on the H100)."""
    from torch.nn.attention.flex_attention import flex_attention
    global _COMPILED
    if device == "cuda" and os.environ.get("NSACONF_FLEX_COMPILE", "1") != "0":
        if _COMPILED is None:
            _COMPILED = torch.compile(flex_attention)  # default dynamic=None: one recompile, then dynamic shapes
        return _COMPILED, {"BACKEND": "TRITON"}
    return flex_attention, None


def one_of(rules: dict, name: str, device) -> Callable:
    """``rules[name]`` written as a function of every rule: each rule is evaluated and the one whose index
    equals a captured 0-dim tensor is kept. Eager flex (CPU) traces each mask_mod with dynamo, which guards
    on the functions a closure calls (and on captured ints by value) but on a captured tensor by dtype and
    shape only: one trace serves every rule, instead of a 0.2-0.5 s retrace per new rule."""
    fns, which = tuple(rules.values()), torch.tensor(list(rules).index(name), device=device)

    def rule(*args):
        out = fns[0](*args) & (which == 0)
        for i, f in enumerate(fns[1:], 1):
            out = out | (f(*args) & (which == i))
        return out
    return rule


def pool(x: torch.Tensor, l: int, d: int) -> torch.Tensor:
    """``[B,T,H,D] -> [B,ceil(T/d),H,D]``: block c is the mean of ``x[c*d : min(c*d+l, T)]`` (accumulated
    in float32 or better, returned in ``x.dtype``)."""
    T = x.shape[1]
    n = num_cmp_blocks(T, d)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = torch.nn.functional.pad(x.to(acc), (0, 0, 0, 0, 0, max(0, (n - 1) * d + l - T)))
    idx = (torch.arange(n, device=x.device)[:, None] * d + torch.arange(l, device=x.device)[None, :])  # [n, l]
    valid = (idx < T).to(acc)  # [n, l]
    s = (xa[:, idx] * valid[None, :, :, None, None]).sum(2)
    return (s / valid.sum(1)[None, :, None, None]).to(x.dtype)


@register_oracle
class Flex(Oracle):
    """flex_attention compression (``cmp_o``, ``cmp_lse``) and window (``swa_o``) branches; every convention."""

    name = "flex"
    layer = "kernel"
    branches = ("cmp_o", "cmp_lse", "swa_o")
    devices = ("cpu", "cuda")
    description = "torch flex_attention compression + window branches, masks from cases.conventions (every cmp_mask)"

    def availability(self) -> Optional[str]:
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        except ImportError:
            return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (needs torch >= 2.5)"
        return None

    def versions(self) -> dict:
        return {"torch": torch.__version__, "flex_compiled_on_cuda": os.environ.get("NSACONF_FLEX_COMPILE", "1") != "0"}

    def supports(self, case: Case, device: str) -> Optional[str]:
        if device == "cuda" and case.dtype == "float64":
            return "compiled flex_attention (Triton) on CUDA takes fp16/bf16/fp32, not float64"
        if device == "cpu" and case.batch * case.heads_q * case.q_len * case.seq_len > 2 ** 27:
            return "eager flex_attention on CPU materialises B*HQ*TQ*T scores; limited to 2^27"
        return None

    def run(self, case: Case, inputs: Inputs, device: str, block_indices: Optional[torch.Tensor] = None):
        from torch.nn.attention.flex_attention import create_block_mask
        flex, kopts = _flex_fn(device)
        l, d, w, scale = case.cmp_block, case.cmp_stride, case.window, case.softmax_scale
        dev = inputs.q.device
        if kopts is None:  # eager (CPU): one traced mask_mod per dtype and head shape (see ``one_of``)
            rule, wrule = one_of(CMP_MASKS, case.cmp_mask, dev), one_of(WINDOW_KEYS, case.window_keys, dev)
        else:
            rule, wrule = CMP_MASKS[case.cmp_mask], WINDOW_KEYS[case.window_keys]
        # mask_mod closures bake (T-TQ, l, d, w) into the compiled graph: each new combination recompiles.
        # Dynamo's default limit (8 per function) would silently fall back to *eager* flex (measured on the
        # H100: "hit config.recompile_limit (8)") -- raise it so the Triton kernel stays in use.
        limits = contextlib.nullcontext()
        if kopts is not None:
            import torch._dynamo.config as dcfg
            limits = dcfg.patch(recompile_limit=max(256, getattr(dcfg, "recompile_limit", 8)))
        outs: dict[str, list[torch.Tensor]] = {"cmp_o": [], "cmp_lse": [], "swa_o": []}
        segs = [(0, case.seq_len, 0, case.q_len)] if case.cu_seqlens is None else [(s, e, s, e) for s, e in case.sequences]
        with warnings.catch_warnings(), limits:
            warnings.simplefilter("ignore")
            for k0, k1, q0, q1 in segs:
                T, TQ = k1 - k0, q1 - q0
                off = T - TQ
                q = inputs.q[:, q0:q1].transpose(1, 2)
                k, v = inputs.k[:, k0:k1], inputs.v[:, k0:k1]
                kc, vc = (pool(x, l, d).transpose(1, 2) for x in (k, v))
                NC = kc.shape[2]

                # CPU: the closures hold 0-dim tensors, not ints: dynamo guards on a captured int by value (a
                # retrace per new T - TQ, l, d or w). CUDA keeps the ints the compiled kernel was measured with.
                off_t, l_t, d_t, w_t = (off, l, d, w) if kopts is not None else \
                    (torch.tensor(v, device=dev) for v in (off, l, d, w))

                def cmp_mod(b, h, qi, ki):
                    return rule(ki, qi + off_t, l_t, d_t)

                bm = create_block_mask(cmp_mod, None, None, TQ, NC, device=dev)
                o, lse = flex(q, kc.contiguous(), vc.contiguous(), block_mask=bm, scale=scale, enable_gqa=True, return_lse=True,
                              kernel_options=kopts)
                outs["cmp_o"].append(o.transpose(1, 2))
                outs["cmp_lse"].append(lse.transpose(1, 2).float() if lse.dtype != torch.float64 else lse.transpose(1, 2))
                if w > 0:
                    def win_mod(b, h, qi, ki):
                        return wrule(qi + off_t, ki, w_t)

                    bw = create_block_mask(win_mod, None, None, TQ, T, device=dev)
                    ow = flex(q, k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), block_mask=bw, scale=scale,
                              enable_gqa=True, kernel_options=kopts)
                    outs["swa_o"].append(ow.transpose(1, 2))
        return {name: torch.cat(parts, 1) for name, parts in outs.items() if parts}
