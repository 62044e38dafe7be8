"""Planted gradient bugs on top of the in-house reference gradients: the engine must report FAIL (or
ERROR for a missing branch) on the named gradient branch (tests/test_engine_grads.py)."""
from __future__ import annotations

import torch

from nsaconf.cases.tensors import GRAD_INPUTS, grad_branches
from nsaconf.oracles.base import Oracle, register_oracle
from nsaconf.oracles.reference import nsa_reference_grads


class _GradBug(Oracle):
    layer = "kernel"
    branches = ("dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_swa")
    devices = ("cpu", "cuda")

    def run(self, case, inputs, device, block_indices=None):
        return self.mutate(case, inputs, nsa_reference_grads(case, inputs, dtype=None))

    def mutate(self, case, inputs, g):
        return g


@register_oracle
class DqMissingScale(_GradBug):
    """dQ without the softmax scale (dS K instead of scale * dS K): dq / scale."""

    name = "bug_grad_dq_scale"
    description = "planted bug: dq misses the softmax scale"

    def mutate(self, case, inputs, g):
        g["dq"] = g["dq"] / case.softmax_scale
        return g


@register_oracle
class DvOnePercent(_GradBug):
    """dV off by 1 % (e.g. a stale rescale factor)."""

    name = "bug_grad_dv"
    description = "planted bug: dv 1% too large"

    def mutate(self, case, inputs, g):
        g["dv"] = g["dv"] * 1.01
        return g


@register_oracle
class WrongCotangent(_GradBug):
    """Gradients of a different loss (cotangent of the next seed): every branch must FAIL."""

    name = "bug_grad_cotangent"
    description = "planted bug: wrong output cotangent"

    def run(self, case, inputs, device, block_indices=None):
        return nsa_reference_grads(case.replace(seed=case.seed + 1), inputs, dtype=None)


@register_oracle
class MissingDk(_GradBug):
    """Declares dk but does not return it."""

    name = "bug_grad_missing"
    description = "planted bug: declared dk not returned"

    def mutate(self, case, inputs, g):
        g.pop("dk")
        return g
