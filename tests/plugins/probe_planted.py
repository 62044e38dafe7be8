"""Planted convention bugs for the receptive-field probe (tests/test_probe.py).

Each oracle accepts only the paper's conventions (``end_inclusive``, window ``w``) and computes another
one, as real ports do; the probe must name what they really compute.
"""
from __future__ import annotations

from typing import Optional

from nsaconf.cases.model import Case
from nsaconf.oracles.base import Oracle, register_oracle
from nsaconf.oracles.reference import nsa_reference


class _PaperOnly(Oracle):
    layer = "kernel"
    devices = ("cpu",)

    def supports(self, case: Case, device: str) -> Optional[str]:
        if case.cmp_mask != "end_inclusive" or case.window_keys != "w":
            return "implements end_inclusive / w only"
        return None


@register_oracle
class ProbeWindowShort(_PaperOnly):
    """Sliding window one key short: w-1 keys (flash-attn ``window_size=(w-2, 0)`` off-by-one)."""

    name = "probe_bug_window_short"
    branches = ("swa_o",)
    description = "planted: window of w-1 keys"

    def run(self, case, inputs, device, block_indices=None):
        return {"swa_o": nsa_reference(case.replace(window=case.window - 1), inputs, dtype=None)["swa_o"]}


@register_oracle
class ProbeWindowLong(_PaperOnly):
    """Sliding window of w+1 keys where the case says w (flash-attn ``window_size=(w, 0)``)."""

    name = "probe_bug_window_long"
    branches = ("swa_o",)
    description = "planted: window of w+1 keys"

    def run(self, case, inputs, device, block_indices=None):
        return {"swa_o": nsa_reference(case.replace(window_keys="w_plus_1"), inputs, dtype=None)["swa_o"]}


@register_oracle
class ProbeBlockCausal(_PaperOnly):
    """Compression that lets a query see its own (unfinished) block: block-causal, leaks the future."""

    name = "probe_bug_block_causal"
    branches = ("cmp_o",)
    description = "planted: current_block compression mask"

    def run(self, case, inputs, device, block_indices=None):
        return {"cmp_o": nsa_reference(case.replace(cmp_mask="current_block"), inputs, dtype=None)["cmp_o"]}


@register_oracle
class ProbeClaimsCausal(Oracle):
    """nsa-impl style: claims end_inclusive (fixed) but computes anti_causal, whatever the case says."""

    name = "probe_bug_claims_causal"
    layer = "e2e"
    devices = ("cpu",)
    branches = ("cmp_o", "o")
    fixed_conventions = {"cmp_mask": "end_inclusive", "window_keys": "w"}
    description = "planted: fixed conventions, anti-causal compression"

    def run(self, case, inputs, device, block_indices=None):
        out = nsa_reference(case.replace(cmp_mask="anti_causal", window_keys="w"), inputs, dtype=None)
        return {"cmp_o": out["cmp_o"], "o": out["o"]}


@register_oracle
class ProbeSelectionWholeBlock(Oracle):
    """Selection attends to whole selected blocks, without the in-block causal mask (s <= p)."""

    name = "probe_bug_slc_whole_block"
    layer = "kernel"
    devices = ("cpu",)
    branches = ("slc_o",)
    needs_block_indices = True
    description = "planted: selection without the in-block causal mask"

    def supports(self, case: Case, device: str) -> Optional[str]:
        if case.cu_seqlens is not None or case.q_len != case.seq_len:
            return "plain full-sequence cases only"
        return None

    def run(self, case, inputs, device, block_indices=None):
        import torch

        B, T, HQ, _ = inputs.q.shape
        G, ls = case.group, case.block_size
        out = torch.zeros(B, T, HQ, case.head_dim_v, dtype=inputs.q.dtype)
        for b in range(B):
            for p in range(T):
                for h in range(HQ):
                    idx = block_indices[b, p, h // G]
                    keys = torch.cat([torch.arange(j * ls, min((j + 1) * ls, T)) for j in idx.tolist() if j >= 0])
                    logits = inputs.k[b, keys, h // G] @ inputs.q[b, p, h] * case.softmax_scale
                    out[b, p, h] = torch.softmax(logits, 0) @ inputs.v[b, keys, h // G]
        return {"slc_o": out}
