"""Oracles that misbehave as processes: raise, segfault, abort, hang, return zeros or a constant.
``bad_crash`` and ``bad_hang`` misbehave only on cases with ``seed == 1`` so a test can see the
worker restart and the next case pass."""
from __future__ import annotations

import ctypes
import os
import time

import torch

from nsaconf.oracles.base import Oracle, register_oracle
from nsaconf.oracles.reference import nsa_reference


class _Good(Oracle):
    layer = "kernel"
    branches = ("cmp_o",)

    def good(self, case, inputs):
        return {"cmp_o": nsa_reference(case, inputs, dtype=None)["cmp_o"]}


@register_oracle
class Raises(_Good):
    name = "bad_raise"

    def run(self, case, inputs, device, block_indices=None):
        raise RuntimeError("planted exception in run()")


@register_oracle
class Segfault(_Good):
    name = "bad_crash"

    def run(self, case, inputs, device, block_indices=None):
        if case.seed == 1:
            ctypes.string_at(0)  # SIGSEGV
        return self.good(case, inputs)


@register_oracle
class Abort(_Good):
    name = "bad_abort"

    def run(self, case, inputs, device, block_indices=None):
        os.abort()


@register_oracle
class Hang(_Good):
    name = "bad_hang"

    def run(self, case, inputs, device, block_indices=None):
        if case.seed == 1:
            time.sleep(600)
        return self.good(case, inputs)


@register_oracle
class Zeros(_Good):
    name = "bad_zeros"

    def run(self, case, inputs, device, block_indices=None):
        return {"cmp_o": torch.zeros_like(self.good(case, inputs)["cmp_o"])}


@register_oracle
class Constant(_Good):
    name = "bad_const"

    def run(self, case, inputs, device, block_indices=None):
        o = self.good(case, inputs)["cmp_o"]
        return {"cmp_o": torch.full_like(o, float(o.double().mean()))}
