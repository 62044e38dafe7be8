"""Shared helpers of the adapter tests: run an oracle and compare with the float64 reference."""
from __future__ import annotations

import torch

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import materialize
from nsaconf.oracles.reference import nsa_reference


def as_set(idx: torch.Tensor, width: int) -> torch.Tensor:
    """Block-index sets comparable across orders and paddings: sorted, -1 -> +big, padded to ``width``."""
    big = 1 << 40
    x = torch.where(idx.long() < 0, torch.full_like(idx.long(), big), idx.long()).sort(-1).values
    if x.shape[-1] < width:
        x = torch.cat([x, x.new_full(x.shape[:-1] + (width - x.shape[-1],), big)], -1)
    return x


def check_against_reference(oracle, case: Case, device: str = "cpu", k: float = 2.0, atol: float = 0.0,
                            block_indices=None, topk_rows: float = 0.0) -> dict[str, float]:
    """Run ``oracle`` on ``case`` and assert every returned branch is within ``k * baseline + atol``
    (baseline: the reference in the case dtype) of the float64 reference; returns the errors.
    ``topk_rows``: fraction of query rows whose selected set may differ (near-ties in half precision);
    when some differ, ``slc_o``/``o`` are compared with a truth recomputed on the oracle's own indices."""
    x = materialize(case, device)
    truth = nsa_reference(case, x, dtype=torch.float64)
    given = block_indices
    if given is None and oracle.needs_block_indices:
        given = x.block_indices if case.block_indices == "random" else truth["topk_idx"]
    base = nsa_reference(case, x, dtype=None, block_indices=given)
    truth_sel = nsa_reference(case, x, dtype=torch.float64, block_indices=given) if given is not None else truth
    res = oracle.run(case, x, device, block_indices=given if oracle.needs_block_indices else None)
    assert res, f"{oracle.name} returned nothing"
    errs = {}
    if "topk_idx" in res and given is None:
        n = truth["topk_idx"].shape[-1]
        diff = (as_set(res["topk_idx"], n) != as_set(truth["topk_idx"], n)).any(-1).float().mean().item()
        assert diff <= topk_rows, f"{oracle.name}: topk_idx differs on {diff:.3g} of the rows of {case.id}"
        if diff > 0:
            own = res["topk_idx"].long()
            truth_sel = nsa_reference(case, x, dtype=torch.float64, block_indices=own)
            base = nsa_reference(case, x, dtype=None, block_indices=own)
        errs["topk_rows_differ"] = diff
    for b, got in res.items():
        assert b in oracle.branches, f"{oracle.name} returned undeclared branch {b}"
        if b == "topk_idx" or b.startswith("d"):  # gradients: tests/test_engine_grads.py judges them
            continue
        t = (truth_sel if b in ("slc_o", "o") else truth)[b]
        assert got.shape == t.shape, f"{oracle.name}.{b}: shape {tuple(got.shape)} != {tuple(t.shape)}"
        if b == "cmp_lse":
            fin = torch.isfinite(t)
            assert torch.equal(torch.isneginf(got.cpu()), ~fin.cpu()), f"{oracle.name}: empty-row LSE must be -inf exactly where no block is visible"
            got, t, bb = got[fin], t[fin], base[b][fin]
        else:
            bb = base[b]
        err = float((got.double() - t.double()).abs().max()) if t.numel() else 0.0
        be = float((bb.double() - t.double()).abs().max()) if t.numel() else 0.0
        assert err <= k * be + atol, f"{oracle.name}.{b} on {case.id}: err {err:.3g} > {k} * baseline {be:.3g} + {atol:g}"
        errs[b] = err
    return errs
