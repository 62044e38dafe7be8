"""The reference-layer oracles built from the two in-house pure-PyTorch implementations."""
from __future__ import annotations

from typing import Optional

import torch

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import Inputs
from nsaconf.cases.vocabulary import FORWARD_BRANCHES, GATES, GRAD_BRANCHES, GROUP_IMPORTANCE
from nsaconf.oracles.base import Oracle, gradients_wanted, register_oracle
from nsaconf.oracles.dense import nsa_dense
from nsaconf.oracles.reference import nsa_reference, nsa_reference_grads

REFERENCE_BRANCHES = FORWARD_BRANCHES
#: both in-house references compute every value of every convention field
ALL_CONVENTIONS = {"group_importance": GROUP_IMPORTANCE, "gates": GATES}


@register_oracle
class ReferenceOracle(Oracle):
    """``oracles.reference.nsa_reference`` computed in the case dtype (chunked, vectorised), and its
    gradients by autograd (``nsa_reference_grads``, its own top-n) where the engine has a gradient truth."""

    name = "reference"
    layer = "reference"
    branches = REFERENCE_BRANCHES + GRAD_BRANCHES
    devices = ("cpu", "cuda")
    description = "in-house chunked PyTorch reference (+ autograd gradients), computed in the case dtype"
    supported_conventions = ALL_CONVENTIONS

    def run(self, case: Case, inputs: Inputs, device: str, block_indices: Optional[torch.Tensor] = None):
        if gradients_wanted(case):
            return nsa_reference_grads(case, inputs, dtype=None, return_forward=True)
        return nsa_reference(case, inputs, dtype=None)


@register_oracle
class DenseOracle(Oracle):
    """``oracles.dense.nsa_dense``: brute force, full masks, Python loops; small T only."""

    name = "dense"
    layer = "reference"
    branches = REFERENCE_BRANCHES
    devices = ("cpu",)
    description = "in-house brute-force dense-mask NSA (independent code path), small T"
    max_tokens = 512
    supported_conventions = ALL_CONVENTIONS

    def supports(self, case: Case, device: str) -> Optional[str]:
        if case.batch * case.seq_len * case.heads_kv > self.max_tokens * 4:
            return f"dense brute force is limited to B*T*H <= {self.max_tokens * 4} (Python loops)"
        return None

    def run(self, case: Case, inputs: Inputs, device: str, block_indices: Optional[torch.Tensor] = None):
        return nsa_dense(case, inputs, dtype=inputs.q.dtype)
