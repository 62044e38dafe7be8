"""A planted bug that can be fixed: the window is one key too long unless ``NSACONF_TEST_FIXED=1`` (the worker
processes inherit the variable). tests/test_search.py finds it, writes its corpus entry, then replays the
entry against the fixed version."""
from __future__ import annotations

import os

from nsaconf.oracles.base import Oracle, register_oracle
from nsaconf.oracles.reference import nsa_reference


@register_oracle
class FixableWindow(Oracle):
    name = "bug_fixable_window"
    layer = "kernel"
    branches = ("swa_o",)
    description = "planted: window one key too long unless NSACONF_TEST_FIXED=1"

    def run(self, case, inputs, device, block_indices=None):
        fixed = os.environ.get("NSACONF_TEST_FIXED") == "1"
        return {"swa_o": nsa_reference(case if fixed else case.replace(window=case.window + 1), inputs, dtype=None)["swa_o"]}
