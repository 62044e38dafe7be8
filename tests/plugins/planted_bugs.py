"""Planted-bug oracles: each reproduces one real porting mistake on top of the in-house reference.
The engine must report FAIL on the named branch (tests/test_runner.py)."""
from __future__ import annotations

import torch

from nsaconf.oracles.base import Oracle, register_oracle
from nsaconf.oracles.reference import nsa_reference


@register_oracle
class WindowPlusOne(Oracle):
    """Sliding window one key too long (w+1 keys where the case says w)."""

    name = "bug_window"
    layer = "kernel"
    branches = ("swa_o",)
    description = "planted bug: window one key too long"

    def run(self, case, inputs, device, block_indices=None):
        return {"swa_o": nsa_reference(case.replace(window=case.window + 1), inputs, dtype=None)["swa_o"]}


@register_oracle
class WrongScale(Oracle):
    """Softmax scale 1/sqrt(D) * 1.25 in the compression branch."""

    name = "bug_scale"
    layer = "kernel"
    branches = ("cmp_o", "cmp_lse")
    description = "planted bug: wrong softmax scale"

    def run(self, case, inputs, device, block_indices=None):
        out = nsa_reference(case.replace(scale=case.softmax_scale * 1.25), inputs, dtype=None)
        return {"cmp_o": out["cmp_o"], "cmp_lse": out["cmp_lse"]}


@register_oracle
class KvHeadModulo(Oracle):
    """Query head h reads kv head ``h % H`` instead of ``h // G``."""

    name = "bug_kvmap"
    layer = "e2e"
    branches = ("cmp_o", "swa_o")
    description = "planted bug: kv head of query head h is h % H"

    def run(self, case, inputs, device, block_indices=None):
        HQ, H, G = case.heads_q, case.heads_kv, case.group
        slot = torch.tensor([(h % H) * G + h // H for h in range(HQ)])  # reference pairs slot s with kv s // G
        inv = torch.empty_like(slot)
        inv[slot] = torch.arange(HQ)
        x = inputs.to()
        x.q = inputs.q[:, :, inv]
        out = nsa_reference(case, x, dtype=None)
        return {"cmp_o": out["cmp_o"][:, :, slot], "swa_o": out["swa_o"][:, :, slot]}
