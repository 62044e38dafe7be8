"""lucidrains' SparseAttention judged as it is: its conventions are not translated nor SKIPped.

``lucidrains_native`` is the ``lucidrains`` adapter (learned parts bypassed, the same module call) with
``sliding_window_size = w`` whatever the case's ``window_keys`` and no SKIP for the case's ``cmp_mask``,
``forced_blocks`` or ``group_importance``: a case asking for the paper's conventions FAILs, and the
diagnosis must name lucidrains' (``cmp_mask=end_exclusive``, ``window_keys=w_plus_1``, ...). Only what cannot
be compared at all still SKIPs (l != d pooling, d != l' importance, given indices, no window)."""
from __future__ import annotations

from nsaconf.oracles.base import register_oracle
from nsaconf.oracles.lucidrains import Lucidrains


@register_oracle
class LucidrainsNative(Lucidrains):
    name = "lucidrains_native"
    description = "lucidrains SparseAttention, its own conventions on every case (test plugin)"
    fixed_conventions = None

    def window_size(self, case):
        return max(case.window, 1)

    def branch_supports(self, case, branch):
        if branch == "cmp_o":
            return None if case.cmp_block == case.cmp_stride else "l != d"
        if branch == "swa_o":
            return None if case.window else "no window branch (w = 0)"
        if not case.cmp_block == case.cmp_stride == case.block_size:
            return "needs l = d = l'"
        if branch in ("slc_o", "o") and case.block_indices == "random":
            return "selects its own blocks"
        return None
