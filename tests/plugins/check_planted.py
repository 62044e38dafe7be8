"""Planted bugs that only the checks without truth see, or see without the truth (tests/test_checks.py).

Each oracle computes the in-house reference (so it PASSes against the truth where noted) and breaks one
property of ``harness.checks``.
"""
from __future__ import annotations

import torch

from nsaconf.oracles.base import Oracle, register_oracle
from nsaconf.oracles.reference import nsa_reference


class _Planted(Oracle):
    layer = "e2e"
    branches = ("o",)
    devices = ("cpu",)


@register_oracle
class MutatesInputs(_Planted):
    """Right output, then writes into its inputs (q scaled in place, k zeroed in place): the truth cannot see it."""

    name = "bug_mutates_inputs"
    description = "planted: writes into q and k after computing o"

    def run(self, case, inputs, device, block_indices=None):
        o = nsa_reference(case, inputs, dtype=None)["o"]
        inputs.q.mul_(0.5)
        inputs.k.zero_()
        return {"o": o}


@register_oracle
class DecodeForgetsOffset(_Planted):
    """A decode path (q_len < T) that forgets the queries' offset: it treats them as positions 0..TQ-1."""

    name = "bug_decode_offset"
    description = "planted: decode queries placed at positions 0..TQ-1"

    def run(self, case, inputs, device, block_indices=None):
        if case.q_len == case.seq_len:
            return {"o": nsa_reference(case, inputs, dtype=None)["o"]}
        TQ = case.q_len
        short = case.replace(seq_len=TQ, q_len=TQ)
        x = inputs.to()
        x.k, x.v = inputs.k[:, :TQ], inputs.v[:, :TQ]
        return {"o": nsa_reference(short, x, dtype=None)["o"]}


@register_oracle
class BatchMix(_Planted):
    """Every batch element reads the keys and values of element 0."""

    name = "bug_batch_mix"
    description = "planted: batch elements share element 0's keys/values"

    def run(self, case, inputs, device, block_indices=None):
        x = inputs.to()
        x.k = inputs.k[:1].expand_as(inputs.k).contiguous()
        x.v = inputs.v[:1].expand_as(inputs.v).contiguous()
        return {"o": nsa_reference(case, x, dtype=None)["o"]}


@register_oracle
class NonDeterministic(_Planted):
    """Adds a little noise of its own (a racing atomic add, say): two runs differ."""

    name = "bug_nondeterministic"
    description = "planted: output noise differs run to run"

    def run(self, case, inputs, device, block_indices=None):
        o = nsa_reference(case, inputs, dtype=None)["o"]
        return {"o": o + 1e-2 * torch.randn(o.shape, dtype=o.dtype)}


@register_oracle
class DecodeWithoutLse(Oracle):
    """Right outputs; its decode path (q_len < T) returns no ``cmp_lse`` and says so in ``branch_supports``
    (as decode kernels that return no LSE do): decode_consistency compares the other branches."""

    name = "decode_without_lse"
    layer = "e2e"
    branches = ("cmp_o", "cmp_lse", "o")
    devices = ("cpu",)
    description = "planted: no cmp_lse in decode, declared"
    declares = True

    def branch_supports(self, case, branch):
        if self.declares and case.q_len < case.seq_len and branch == "cmp_lse":
            return "its decode path returns no LSE"
        return None

    def run(self, case, inputs, device, block_indices=None):
        ref = nsa_reference(case, inputs, dtype=None)
        out = {b: ref[b] for b in ("cmp_o", "cmp_lse", "o")}
        if case.q_len < case.seq_len:
            del out["cmp_lse"]
        return out


@register_oracle
class DecodeDropsLse(DecodeWithoutLse):
    """The same outputs, but the missing ``cmp_lse`` is not declared: a decode_consistency FAIL."""

    name = "bug_decode_drops_lse"
    description = "planted: no cmp_lse in decode, undeclared"
    declares = False
