"""The probe's choice of case: an oracle's claimed conventions beyond the masks are set on the probe case, and
a case on which every probed branch is computed (``branch_supports``) is preferred."""
from nsaconf.harness.probe import ProbeConfig, probe_cases
from nsaconf.oracles.reference_oracles import ReferenceOracle


class OwnSelection(ReferenceOracle):
    """Selects its own blocks (no given indices) and always forces the current block."""

    name = "own_selection_probe_test"
    fixed_conventions = {"cmp_mask": "end_exclusive", "forced_blocks": "current"}

    def branch_supports(self, case, branch):
        if branch in ("slc_o", "o") and case.block_indices == "random":
            return "selects its own blocks"
        return None


def test_claimed_fields_set_and_fully_supported_case_preferred():
    case, _ = next(probe_cases(OwnSelection(), "cpu", ProbeConfig(), want=("cmp_o", "slc_o", "o")))
    assert (case.cmp_mask, case.forced_blocks, case.block_indices) == ("end_exclusive", "current", "topk")


def test_random_first_when_every_branch_runs_on_it():
    case, _ = next(probe_cases(OwnSelection(), "cpu", ProbeConfig(), want=("cmp_o", "swa_o")))
    assert case.block_indices == "random"
    case, _ = next(probe_cases(ReferenceOracle(), "cpu", ProbeConfig(), want=("cmp_o", "slc_o", "o")))
    assert (case.block_indices, case.forced_blocks) == ("random", "initial_local")
