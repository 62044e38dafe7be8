"""Receptive-field probe: classification of the reference under every convention, planted bugs,
whole modules, the engine hook and the HTML section."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
import torch

from nsaconf.cases.conventions import CMP_MASKS, WINDOW_KEYS
from nsaconf.harness.probe import (ModuleProbe, ProbeConfig, ProbeError, cmp_dependency_mask, leak_check_records,
                           probe_module, probe_oracle)
from nsaconf.oracles.base import get_oracle, load_plugin, registry
from nsaconf.oracles.reference import nsa_reference
from nsaconf.oracles.reference_oracles import ReferenceOracle

PLUGIN = Path(__file__).parent / "plugins" / "probe_planted.py"

# (T, l, d, l', w): T not a multiple of l, overlapping compression blocks (l > d), tiny windows
SHAPES = [
    (40, 8, 8, 8, 8),
    (45, 16, 8, 16, 5),
    (37, 8, 4, 8, 3),
]


def _cfg(T, l, d, ls, w, **kw) -> ProbeConfig:
    return ProbeConfig(seq_len=T, block_size=ls, cmp_block=l, cmp_stride=d, window=w, top_n=3, **kw)


def _by_branch(results):
    return {r.branch: r for r in results}


@pytest.fixture(scope="module")
def planted():
    names = [n for n in registry() if n.startswith("probe_bug_")]
    return names or load_plugin(PLUGIN)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-l{}d{}ls{}-w{}".format(*s))
@pytest.mark.parametrize("cmp_mask", list(CMP_MASKS))
def test_reference_classified_as_configured(shape, cmp_mask):
    """Every (cmp_mask, window_keys) the case asks for is exactly what the probe measures."""
    wk = list(WINDOW_KEYS)[(list(CMP_MASKS).index(cmp_mask) + SHAPES.index(shape)) % 2]
    res = _by_branch(probe_oracle("reference", "cpu", _cfg(*shape), cmp_mask=cmp_mask, window_keys=wk))
    assert set(res) == {"cmp_o", "slc_o", "swa_o", "o"}
    assert res["cmp_o"].convention == cmp_mask, res["cmp_o"].distances
    assert res["swa_o"].convention == wk, res["swa_o"].distances
    assert res["slc_o"].convention == "causal" and res["slc_o"].leaks == 0
    assert res["o"].convention == f"{cmp_mask}/{wk}"
    for r in res.values():
        assert r.finding in ("ok", "leak") and r.differing_cells == 0
        assert r.calls <= 8, r.calls  # batched: 2 baselines + ceil(T / slots)
    causal = cmp_mask in ("end_inclusive", "end_exclusive")
    assert (res["cmp_o"].leaks == 0) == causal
    if not causal:
        assert res["cmp_o"].first_leak == (0, 1) and res["cmp_o"].finding == "leak"


def test_all_window_keys_each_shape():
    """Both window conventions on the first shape (the parametrised test alternates them)."""
    for wk in WINDOW_KEYS:
        res = _by_branch(probe_oracle("reference", "cpu", _cfg(*SHAPES[0]), branches=("swa_o",), window_keys=wk))
        assert res["swa_o"].convention == wk


def test_o_resolved_by_gates_when_branches_missing():
    """An e2e oracle returning only ``o``: its union mask is ambiguous for causal conventions (selection
    always reaches the current block), the gate-isolated re-probes name them."""

    class OOnly(ReferenceOracle):
        name = "o_only_test"
        branches = ("o",)

    for cm, wk in (("end_exclusive", "w_plus_1"), ("end_inclusive", "w")):
        (r,) = probe_oracle(OOnly(), "cpu", _cfg(*SHAPES[0]), cmp_mask=cm, window_keys=wk)
        assert len(r.matches) > 1  # the union alone cannot tell
        assert r.convention == f"{cm}/{wk}" and "gates" in r.gated


def test_topk_mode_and_dense_agree():
    """Without given indices (own top-k) and with the independent brute-force oracle."""

    class TopkOnly(ReferenceOracle):
        name = "topk_only_test"

        def supports(self, case, device) -> Optional[str]:
            return "given indices not supported" if case.block_indices == "random" else None

    res = _by_branch(probe_oracle(TopkOnly(), "cpu", _cfg(48, 16, 16, 16, 8), cmp_mask="end_exclusive"))
    assert res["cmp_o"].case.block_indices == "topk"
    assert res["slc_o"].convention == "causal" and res["slc_o"].dont_care is not None
    assert res["o"].convention == "end_exclusive/w"
    dres = _by_branch(probe_oracle("dense", "cpu", _cfg(32, 8, 8, 8, 6), cmp_mask="end_inclusive"))
    assert {b: r.convention for b, r in dres.items()} == {"cmp_o": "end_inclusive", "slc_o": "causal", "swa_o": "w",
                                                          "o": "end_inclusive/w"}


def test_threshold_from_oracle_noise():
    """A noisy oracle: the threshold rises above its noise and the classification still holds."""

    class Noisy(ReferenceOracle):
        name = "noisy_test"
        branches = ("cmp_o",)

        def run(self, case, inputs, device, block_indices=None):
            o = nsa_reference(case, inputs, dtype=None)["cmp_o"]
            return {"cmp_o": o + 1e-7 * torch.randn_like(o)}

    (r,) = probe_oracle(Noisy(), "cpu", _cfg(*SHAPES[0]), cmp_mask="end_inclusive")
    assert r.noise > 1e-8 and r.threshold >= 8 * r.noise
    assert r.convention == "end_inclusive" and r.min_signal > r.threshold


def test_flex_classified_as_configured():
    if "flex" not in registry():
        pytest.skip("flex oracle not registered in this checkout (adapters helper)")
    flex = get_oracle("flex")
    if flex.availability():
        pytest.skip(f"flex unavailable: {flex.availability()}")
    seen = 0
    for cm in CMP_MASKS:
        for wk in WINDOW_KEYS:
            try:
                res = _by_branch(probe_oracle(flex, "cpu", _cfg(40, 8, 8, 8, 8), cmp_mask=cm, window_keys=wk))
            except ProbeError as e:
                assert "run failed" not in str(e), str(e)
                continue
            seen += 1
            if "cmp_o" in res:
                assert res["cmp_o"].convention == cm
            if "swa_o" in res:
                assert res["swa_o"].convention == wk
    assert seen >= 2


def test_planted_bugs_detected_and_named(planted):
    cfg = _cfg(40, 8, 8, 8, 8)
    (short,) = probe_oracle("probe_bug_window_short", "cpu", cfg)
    assert short.convention == "unknown" and short.nearest == "w" and short.finding == "mismatch"
    assert short.differing_cells == 40 - 7 and all(k == "-" and s == p - 7 for p, s, k in short.differences)
    (long_,) = probe_oracle("probe_bug_window_long", "cpu", cfg)
    assert long_.convention == "w_plus_1" and long_.expected_convention == "w" and long_.finding == "mismatch"
    (blk,) = probe_oracle("probe_bug_block_causal", "cpu", cfg)
    assert blk.convention == "current_block" and blk.finding == "leak"
    assert blk.leaks == int((cmp_dependency_mask("current_block", 40, 8, 8) & ~torch.ones(40, 40, dtype=torch.bool).tril()).sum())
    assert blk.first_leak == (0, 1)
    (slc,) = probe_oracle("probe_bug_slc_whole_block", "cpu", cfg)
    assert slc.convention == "unknown" and slc.nearest == "causal" and slc.finding == "leak"
    assert slc.leaks == slc.differing_cells > 0 and all(k == "+" and s > p for p, s, k in slc.differences)
    assert slc.first_leak[1] // 8 == slc.first_leak[0] // 8  # the leak is inside the query's own block
    res = _by_branch(probe_oracle("probe_bug_claims_causal", "cpu", cfg))
    assert res["cmp_o"].claimed_convention == "end_inclusive" and res["cmp_o"].expected_convention is None
    assert res["cmp_o"].convention == "anti_causal" and res["cmp_o"].finding == "leak"
    assert res["o"].leaks > 0


class CausalLayer(torch.nn.Module):
    """Single-head causal self-attention with its own projections (+ an optional planted look-ahead)."""

    def __init__(self, dim: int, lookahead: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.qkv = torch.nn.Linear(dim, 3 * dim, dtype=torch.float64)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.randn(3 * dim, dim, generator=g, dtype=torch.float64) / dim ** 0.5)
        self.lookahead = lookahead

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        T = x.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool).tril(diagonal=self.lookahead)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_module_probe_causal_and_leaky():
    ok = probe_module(CausalLayer(8), seq_len=24, dim=8, batch=24)
    assert isinstance(ok, ModuleProbe) and ok.causal and ok.calls == 3
    assert torch.equal(ok.matrix, torch.ones(24, 24, dtype=torch.bool).tril())
    bad = probe_module(CausalLayer(8, lookahead=1), seq_len=24, dim=8, batch=8)
    assert bad.leaks == 23 and bad.first_leak == (0, 1) and bad.calls == 5


def test_leak_check_records(planted):
    recs = leak_check_records(["reference", "probe_bug_block_causal", "fla_parallel" if "fla_parallel" in registry() else "nope"], "cpu",
                              plugins=(str(PLUGIN),))
    by = {(r["oracle"], r["branch"]): r for r in recs}
    need = {"oracle", "branch", "convention", "expected_convention", "leaks", "first_leak", "differing_cells", "threshold",
            "calls", "seq_len", "block_size", "window", "matrix"}
    ref = by[("reference", "cmp_o")]
    assert need <= set(ref) and ref["convention"] == "end_inclusive" and ref["leaks"] == 0
    assert len(ref["matrix"]) == ref["seq_len"] and set("".join(ref["matrix"])) <= {"0", "1"}
    assert ref["expected_convention"] == "end_inclusive"
    blk = by[("probe_bug_block_causal", "cmp_o")]
    assert blk["leaks"] > 0 and blk["first_leak"] == [0, 1] and blk["convention"] == "current_block"
    skipped = [r for r in recs if r.get("skipped")]
    assert skipped and all(r["skipped"] for r in skipped)  # unavailable/unknown: a reason, never silent


def test_conventions_section_html(planted):
    from nsaconf.reports.conventions import COLOURS, render_conventions_section, render_standalone

    recs = leak_check_records(["probe_bug_block_causal"], "cpu", plugins=(str(PLUGIN),))
    html = render_conventions_section(recs)
    assert html.startswith("<div class='conventions-body'>") and "<h2" not in html  # the page gives the heading
    assert "<svg" in html and COLOURS["+"] in html and "key position s" in html and "query position p" in html
    assert "current_block" in html and "leak" in html
    assert render_conventions_section([]).count("No convention probe") == 1
    page = render_standalone(recs)
    assert "<!doctype html>" in page and page.count("<h2>Conventions</h2>") == 1


def test_low_precision_probe():
    """fp16 and bf16 (two OR-ed perturbation draws): still exact on the reference."""

    class Half(ReferenceOracle):
        name = "half_test"
        branches = ("cmp_o", "swa_o", "slc_o")
        dtypes = ("bfloat16", "float16")

    res = _by_branch(probe_oracle(Half(), "cpu", _cfg(*SHAPES[0]), cmp_mask="end_exclusive", window_keys="w_plus_1"))
    assert res["cmp_o"].case.dtype == "float16" and res["cmp_o"].calls == 2 * 3
    assert {b: r.convention for b, r in res.items()} == {"cmp_o": "end_exclusive", "swa_o": "w_plus_1", "slc_o": "causal"}


def test_crashing_oracle_is_an_error_record():
    class Crash(ReferenceOracle):
        name = "crash_test"

        def run(self, case, inputs, device, block_indices=None):
            raise RuntimeError("kernel exploded")

    with pytest.raises(ProbeError, match="kernel exploded"):
        probe_oracle(Crash(), "cpu", _cfg(*SHAPES[0]))
