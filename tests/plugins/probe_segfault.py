"""Oracles that are correct on the matrix's batch-1 cases but misbehave as processes in the convention
probe, whose forward calls batch perturbed copies (``batch > 1``): ``probe_segfault`` segfaults,
``probe_hang`` hangs (tests/test_probe_isolation.py)."""
from __future__ import annotations

import ctypes
import time

from nsaconf.oracles.base import register_oracle
from nsaconf.oracles.reference_oracles import ReferenceOracle


class _ProbeOnly(ReferenceOracle):
    """The reference oracle (PASS on every cell) until a forward call has ``batch > 1``."""

    description = "the reference, misbehaving only on batch > 1 (the probe)"

    def misbehave(self) -> None:
        raise NotImplementedError

    def run(self, case, inputs, device, block_indices=None):
        if case.batch > 1:
            self.misbehave()
        return super().run(case, inputs, device, block_indices)


@register_oracle
class ProbeSegfault(_ProbeOnly):
    name = "probe_segfault"

    def misbehave(self) -> None:
        ctypes.string_at(0)  # SIGSEGV


@register_oracle
class ProbeHang(_ProbeOnly):
    name = "probe_hang"

    def misbehave(self) -> None:
        time.sleep(600)
