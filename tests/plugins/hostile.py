"""Oracles that attack the harness (tests/test_hostile_engine.py).

``hostile_exit`` / ``hostile_file`` / ``hostile_sleep`` return an object whose ``__reduce__`` would, once
unpickled, end the process, create the file ``$NSACONF_HOSTILE_MARKER`` or sleep an hour; ``hostile_forge``
writes such an object (pickled) straight onto its worker's connection to the parent; ``hostile_idx_writer``
scrambles the block indices it is given (after using them); ``hostile_slow_sel`` sleeps
``$NSACONF_HOSTILE_SLEEP`` seconds (default 2) before a correct ``slc_o``."""
from __future__ import annotations

import gc
import multiprocessing.connection
import os
import time

from nsaconf.oracles.base import Oracle, register_oracle
from nsaconf.oracles.reference import nsa_reference

MARKER = os.environ.get("NSACONF_HOSTILE_MARKER", "/nonexistent/nsaconf-hostile-marker")


class EvilExit:
    def __reduce__(self):
        return (os._exit, (3,))


class EvilFile:
    def __reduce__(self):
        return (open, (MARKER, "w"))


class EvilSleep:
    def __reduce__(self):
        return (time.sleep, (3600,))


class _Hostile(Oracle):
    layer = "kernel"
    branches = ("cmp_o",)
    evil: type = EvilFile

    def run(self, case, inputs, device, block_indices=None):
        return {"cmp_o": self.evil()}


@register_oracle
class HostileExit(_Hostile):
    name = "hostile_exit"
    evil = EvilExit


@register_oracle
class HostileFile(_Hostile):
    name = "hostile_file"
    evil = EvilFile


@register_oracle
class HostileSleep(_Hostile):
    name = "hostile_sleep"
    evil = EvilSleep


@register_oracle
class HostileForge(_Hostile):
    """Bypasses the worker's own checks: a pickled ``EvilFile`` sent on the worker's connection."""

    name = "hostile_forge"

    def run(self, case, inputs, device, block_indices=None):
        for obj in gc.get_objects():
            if isinstance(obj, multiprocessing.connection.Connection) and not obj.closed:
                obj.send(EvilFile())
        return {"cmp_o": nsa_reference(case, inputs, dtype=None)["cmp_o"]}


class _Selection(Oracle):
    layer = "kernel"
    branches = ("slc_o",)
    needs_block_indices = True

    def slc_o(self, case, inputs, block_indices):
        return nsa_reference(case, inputs, dtype=None, block_indices=block_indices)["slc_o"]


@register_oracle
class HostileIdxWriter(_Selection):
    name = "hostile_idx_writer"

    def run(self, case, inputs, device, block_indices=None):
        out = {"slc_o": self.slc_o(case, inputs, block_indices)}
        block_indices.copy_(block_indices.flip(-1))  # valid ids, another order: -1 padding first
        block_indices[..., 0] = 0
        return out


@register_oracle
class HostileSlowSel(_Selection):
    name = "hostile_slow_sel"

    def run(self, case, inputs, device, block_indices=None):
        time.sleep(float(os.environ.get("NSACONF_HOSTILE_SLEEP", "2")))
        return {"slc_o": self.slc_o(case, inputs, block_indices)}
