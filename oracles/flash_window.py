"""``flash_window``: the sliding-window branch through flash-attn's API (``oracles.compat.flash_attn_shim``):
the real ``flash_attn`` package when installed, else PyTorch's bundled FlashAttention-2 kernel
(``aten._flash_attention_forward`` with ``window_size_left/right``) on CUDA.

Translation: ``w`` keys -> ``causal=True, window_size=(w-1, 0)``; ``w_plus_1`` -> ``(w, 0)``; queries are
the last TQ positions (flash-attn aligns causal masks bottom-right, as the canonical case does);
varlen -> ``flash_attn_varlen_func``; ``softmax_scale`` = the case scale. ``swa_o`` only (w > 0).
On CPU the shim has only its masked-SDPA fallback, which is not a flash kernel: the oracle is declared
for cuda only (tests call ``run`` on CPU to check the translation).
"""
from __future__ import annotations

from typing import Optional

import torch

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import Inputs
from nsaconf.oracles.base import Oracle, register_oracle
from nsaconf.oracles.compat import flash_attn_shim
from nsaconf.oracles.compat.common import cu_tensor, flash_window_size


@register_oracle
class FlashWindow(Oracle):
    """Sliding window via flash-attn ``flash_attn_func(causal=True, window_size=...)`` (or PyTorch's bundled FA2)."""

    name = "flash_window"
    layer = "kernel"
    branches = ("swa_o",)
    devices = ("cuda",)
    dtypes = ("float16", "bfloat16")
    description = "sliding-window branch via flash-attn window_size (flash-attn package, else torch's bundled FA2 kernel)"

    def availability(self) -> Optional[str]:
        if flash_attn_shim._real_flash_attn() is None and not flash_attn_shim._has_aten_fa2():
            return ("no flash-attn backend: pip install flash-attn>=2.8 (or `pip install -e .[gpu]`), or a torch build "
                    "with aten._flash_attention_forward (CUDA)")
        return None

    def versions(self) -> dict:
        return {"flash_attn": flash_attn_shim.description("cuda", torch.float16), "torch": torch.__version__}

    def supports(self, case: Case, device: str) -> Optional[str]:
        if case.window <= 0:
            return "window = 0: the case has no sliding-window branch"
        if max(case.head_dim, case.head_dim_v) > 256:
            return f"FlashAttention-2 supports head dims <= 256 (D={case.head_dim}, DV={case.head_dim_v})"
        return None

    def run(self, case: Case, inputs: Inputs, device: str, block_indices: Optional[torch.Tensor] = None):
        ws = flash_window_size(case)
        if case.cu_seqlens is None:
            o = flash_attn_shim.flash_attn_func(inputs.q, inputs.k, inputs.v, causal=True, window_size=ws,
                                                softmax_scale=case.softmax_scale)
        else:
            cu = cu_tensor(case, inputs.q.device).int()
            mx = max(e - s for s, e in case.sequences)
            o = flash_attn_shim.flash_attn_varlen_func(inputs.q[0], inputs.k[0], inputs.v[0], cu, cu, mx, mx, causal=True,
                                                       window_size=ws, softmax_scale=case.softmax_scale)[None]
        return {"swa_o": o}
