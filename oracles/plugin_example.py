"""A complete nsaconf plugin: the sliding-window branch computed with torch SDPA.

    nsaconf run --plugin oracles/plugin_example.py --oracles my_sdpa_window --profile smoke
"""
from typing import Optional

import torch
import torch.nn.functional as F

from nsaconf.cases.conventions import window_mask_matrix
from nsaconf.cases.tensors import query_positions
from nsaconf.oracles.base import Oracle, register_oracle


@register_oracle
class SdpaWindow(Oracle):
    name = "my_sdpa_window"           # unique id (--oracles my_sdpa_window)
    layer = "kernel"                  # reference | kernel | e2e
    branches = ("swa_o",)             # canonical branches returned by run()
    devices = ("cpu", "cuda")
    dtypes = ("float16", "bfloat16", "float32", "float64")
    description = "sliding-window branch via torch SDPA (plugin example)"

    def supports(self, case, device) -> Optional[str]:
        if case.cu_seqlens is not None:   # None = supported, else the SKIP reason
            return "this example does not handle varlen (cu_seqlens)"
        return None

    def run(self, case, inputs, device, block_indices=None):
        # canonical q [B,TQ,HQ,D], k/v [B,T,H,*] -> SDPA's [B,heads,seq,dim]; kv head of h is h // G
        q = inputs.q.transpose(1, 2)
        k = inputs.k.repeat_interleave(case.group, dim=2).transpose(1, 2)
        v = inputs.v.repeat_interleave(case.group, dim=2).transpose(1, 2)
        pos = query_positions(case).to(q.device)
        mask = window_mask_matrix(case.window_keys, pos, torch.arange(case.seq_len, device=q.device), case.window)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=case.softmax_scale)
        return {"swa_o": o.transpose(1, 2)}  # back to canonical [B,TQ,HQ,DV]
