"""attention-gym (``attn-gym==0.0.17``, PyPI, BSD-3) adapter: ``attn_gym``, its ``gather_attn`` on the CPU.

What the package ships for sparse attention is ``attn_gym.sparse.gather_attn(query [B,HQ,T,D'], local_kv
[B,1|HQ,T,D'], sparse_kv [B,1|HQ,X,D'], kv_indices [B,T,k], attention_sink=None, *, sliding_window_size,
cu_seqlens, cu_seqlens_k, impl, scale)`` (DeepSeek-V4 style): each query attends, in **one** softmax, to the
last ``sliding_window_size`` keys of ``local_kv`` (itself included: w keys) and to the ``sparse_kv`` rows
``kv_indices`` names (token indices shared by all heads, -1 ignored, a repeated index counted again, causality
the caller's), plus an optional per-head sink in the denominator. One tensor is both key and value.

No NSA branch is a softmax over the window and the selected keys together, so the adapter calls it once
per branch, each call mapping onto one branch exactly:

* ``swa_o``: no sparse index (``kv_indices`` all -1), ``sliding_window_size = w`` (``w + 1`` for a
  ``w_plus_1`` case);
* ``slc_o`` on given block indices: ``sliding_window_size = 0``; the blocks of the kv head expanded to their
  keys ``j*l' + t`` with the keys past the query (``> p``) or past the sequence set to -1 (its causality is
  the caller's); ``sparse_kv`` the same keys.

Translation: no sink (``attention_sink=None``, a sink logit of -inf); the separate k and v are one tensor
``[k | v]`` of ``D + DV`` channels with the query padded by zeros to ``[q | 0]`` (the logits are ``q.k``, the
output's last DV channels are ``P v``); the case's ``scale`` passed as ``scale``; one call per kv head
(``kv_indices`` are shared across heads; ``share_kv`` with that head's keys); decode (TQ < T) front-pads the
queries (its query length is the key length), their indices -1; varlen through its own ``cu_seqlens`` /
``cu_seqlens_k`` (batch 1, int32, indices local to the sequence, as the case's). ``impl="reference"``: the
eager PyTorch implementation (fp32 accumulation for half inputs). Its fused backends (CuTe, Triton) need CUDA
and are not wired here.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import Inputs
from nsaconf.oracles.base import Oracle, register_oracle
from nsaconf.oracles.compat.common import full_queries, given_indices_full, window_keys_count

GYM_VERSION = "0.0.17"
GYM_HOWTO = f"pip install attn-gym=={GYM_VERSION} (or nsaconf with its pinned oracles: pip install \"nsaconf[oracles]\")"
#: its eager path builds logits [B, HQ/H, T, T + n*l'] per kv head: cap B*HQ*T*(T + n*l')
MAX_WORK = 2 ** 27


def _installed() -> bool:
    return importlib.util.find_spec("attn_gym") is not None


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("attn-gym")
    except Exception:  # noqa: BLE001
        return "missing"


def expanded_keys(case: Case, idx: torch.Tensor, pos: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """Block indices ``[B,TQ,n]`` of one kv head -> token indices ``[B,TQ,n*l']``: ``j*l' + t``, -1 where the
    block is -1, the key is past the query position ``pos [TQ]`` or past its sequence (length ``seq_lens [TQ]``)."""
    ls = case.block_size
    keys = idx[..., None] * ls + torch.arange(ls, device=idx.device)  # [B,TQ,n,l']
    ok = (idx[..., None] >= 0) & (keys <= pos[None, :, None, None]) & (keys < seq_lens[None, :, None, None])
    return torch.where(ok, keys, torch.full_like(keys, -1)).flatten(2)


@register_oracle
class AttnGym(Oracle):
    """attention-gym ``gather_attn`` (eager reference backend): selection on given block indices and the
    window, one call each (module docstring)."""

    name = "attn_gym"
    layer = "kernel"
    branches = ("slc_o", "swa_o")
    devices = ("cpu",)
    needs_block_indices = True
    description = f"attention-gym attn-gym {GYM_VERSION} gather_attn (eager): selection on given indices, window"
    fixed_conventions = {"window_keys": "w"}

    def availability(self) -> Optional[str]:
        return None if _installed() else f"attn-gym is not installed: {GYM_HOWTO}"

    def versions(self) -> dict:
        return {"attn-gym": _version(), "torch": torch.__version__}

    def supports(self, case: Case, device: str) -> Optional[str]:
        T = max(e - s for s, e in case.sequences)
        work = case.batch * case.heads_q * T * (T + case.top_n * case.block_size)
        if work > MAX_WORK:
            return f"its eager path builds B*HQ*T*(T + n*l') = {work:.2e} > {MAX_WORK:.2e} logits"
        return None

    def branch_supports(self, case: Case, branch: str) -> Optional[str]:
        if branch == "swa_o" and case.window == 0:
            return "no window branch (w = 0)"
        return None

    def run(self, case: Case, inputs: Inputs, device: str, block_indices: Optional[torch.Tensor] = None):
        from attn_gym.sparse import gather_attn

        idx = block_indices if block_indices is not None else inputs.block_indices
        if idx is None:
            raise ValueError("attn_gym needs block indices")
        B, T, H, G, D, DV = case.batch, case.seq_len, case.heads_kv, case.group, case.head_dim, case.head_dim_v
        q, _, _, _, pad = full_queries(case, inputs)  # [B,T,HQ,D]
        idx = given_indices_full(case, idx.to(q.device).long(), pad)  # [B,T,H,n]
        kv = torch.cat([inputs.k, inputs.v], dim=-1)  # [B,T,H,D+DV]: one tensor is key and value
        qq = torch.nn.functional.pad(q, (0, DV))  # [q | 0]
        if case.cu_seqlens is None:
            pos = torch.arange(T, device=q.device)
            seq_lens = torch.full((T,), T, device=q.device)
            cu = {}
        else:
            pos = torch.cat([torch.arange(e - s) for s, e in case.sequences]).to(q.device)
            seq_lens = torch.cat([torch.full((e - s,), e - s) for s, e in case.sequences]).to(q.device)
            cu_t = torch.tensor(case.cu_seqlens, dtype=torch.int32, device=q.device)
            cu = {"cu_seqlens": cu_t, "cu_seqlens_k": cu_t.clone()}
        none = torch.full((B, T, 1), -1, dtype=torch.long, device=q.device)
        out = {"slc_o": [], "swa_o": []}
        for h in range(H):
            qh = qq[:, :, h * G:(h + 1) * G].transpose(1, 2).contiguous()  # [B,G,T,D+DV]
            kvh = kv[:, :, h:h + 1].transpose(1, 2).contiguous()  # [B,1,T,D+DV]
            keys = expanded_keys(case, idx[:, :, h], pos, seq_lens)
            o = gather_attn(qh, kvh, kvh, keys, None, sliding_window_size=0, impl="reference",
                            scale=case.softmax_scale, **cu)
            out["slc_o"].append(o[..., D:])
            if case.window > 0:
                o = gather_attn(qh, kvh, kvh, none, None, sliding_window_size=window_keys_count(case),
                                impl="reference", scale=case.softmax_scale, **cu)
                out["swa_o"].append(o[..., D:])
        res = {b: torch.cat(ts, dim=1).transpose(1, 2) for b, ts in out.items() if ts}  # [B,T,HQ,DV]
        return {b: t[:, pad:] for b, t in res.items()} if pad else res
