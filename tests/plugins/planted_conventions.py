"""Planted convention differences: each oracle accepts the case's conventions and computes exactly one other
convention, as real ports do. The differential diagnosis must name that convention and only it
(tests/test_diagnosis.py). ``PLANTED`` maps each oracle to the diagnosis key it must get."""
from __future__ import annotations

import math

import torch

from nsaconf.cases.model import Case
from nsaconf.oracles.base import Oracle, register_oracle
from nsaconf.oracles.reference import nsa_reference

PLANTED: dict[str, str] = {}


def _planted(key: str, name: str, branches: tuple[str, ...], run, layer: str = "e2e") -> None:
    """Register oracle ``name`` returning ``run(case, inputs)`` for ``branches``, diagnosed as ``key``."""
    cls = type(name, (Oracle,), {"name": name, "layer": layer, "branches": branches, "devices": ("cpu",),
                                 "description": f"planted convention: {key}",
                                 "run": lambda self, case, inputs, device, block_indices=None: run(case, inputs)})
    register_oracle(cls)
    PLANTED[name] = key


def _ref(case: Case, inputs, **changes) -> dict:
    return nsa_reference(case.replace(**changes) if changes else case, inputs, dtype=None)


def _pick(out: dict, branches: tuple[str, ...]) -> dict:
    return {b: out[b] for b in branches}


# every other compression mask, window length and forced-block policy (the case asks for the defaults)
for _m in ("current_block", "anti_causal", "end_exclusive"):
    _planted(f"cmp_mask={_m}", f"conv_cmp_{_m}", ("cmp_o",), lambda c, x, m=_m: _pick(_ref(c, x, cmp_mask=m), ("cmp_o",)))
_planted("window_keys=w_plus_1", "conv_window_w_plus_1", ("swa_o",),
         lambda c, x: _pick(_ref(c, x, window_keys="w_plus_1"), ("swa_o",)))
for _f in ("none", "current"):
    _planted(f"forced_blocks={_f}", f"conv_forced_{_f}", ("topk_idx",),
             lambda c, x, f=_f: _pick(_ref(c, x, forced_blocks=f), ("topk_idx",)))


def _lse_base2(c, x):
    return {"cmp_lse": _ref(c, x)["cmp_lse"] / math.log(2.0)}


_planted("lse=base2", "conv_lse_base2", ("cmp_lse",), _lse_base2)


_planted("scale=ignored_in_swa", "conv_scale_swa", ("swa_o",), lambda c, x: {"swa_o": _ref(c, x, scale=None)["swa_o"]})


def _sigmoid_gates(c, x):
    out = _ref(c, x)
    o = out["cmp_o"] * torch.sigmoid(x.g_cmp)[..., None] + out["slc_o"] * torch.sigmoid(x.g_slc)[..., None]
    if "swa_o" in out:
        o = o + out["swa_o"] * torch.sigmoid(x.g_swa)[..., None]
    return {"o": o}


_planted("gates=sigmoid", "conv_gates_sigmoid", ("o",), _sigmoid_gates)
_planted("group_importance=mean_logits", "conv_group_mean_logits", ("topk_idx",),
         lambda c, x: _pick(_ref(c, x, group_importance="mean_logits"), ("topk_idx",)))


def _empty_nan(c, x):
    out = _ref(c, x)
    empty = torch.isneginf(out["cmp_lse"])
    return {"cmp_o": torch.where(empty[..., None], torch.full_like(out["cmp_o"], float("nan")), out["cmp_o"])}


def _empty_finite(c, x):
    lse = _ref(c, x)["cmp_lse"]
    return {"cmp_lse": torch.where(torch.isneginf(lse), torch.full_like(lse, torch.finfo(lse.dtype).min), lse)}


_planted("empty_rows=nan", "conv_empty_nan", ("cmp_o",), _empty_nan)
_planted("empty_rows=finite_lse", "conv_empty_finite_lse", ("cmp_lse",), _empty_finite)


def _selection_loop(c: Case, x, causal: bool, pad_block0: bool) -> torch.Tensor:
    """The selection branch one query at a time (cases without cu_seqlens): keys of the chosen blocks,
    ``s <= p`` only when ``causal``; -1 slots read as block 0 with ``pad_block0`` (a block chosen twice
    counts twice)."""
    idx = nsa_reference(c, x, dtype=torch.float64)["topk_idx"]
    q, k, v = x.q.double(), x.k.double(), x.v.double()
    out = torch.zeros(c.batch, c.q_len, c.heads_q, c.head_dim_v, dtype=torch.float64)
    for b in range(c.batch):
        for i in range(c.q_len):
            p = c.q_offset + i
            for h in range(c.heads_q):
                hk = h // c.group
                keys = []
                for j in idx[b, i, hk].tolist():
                    if j < 0 and not pad_block0:
                        continue
                    j = max(j, 0)
                    keys += [s for s in range(j * c.block_size, min((j + 1) * c.block_size, c.seq_len)) if s <= p or not causal]
                if not keys:
                    continue
                ks = torch.tensor(keys)
                w = torch.softmax(k[b, ks, hk] @ q[b, i, h] * c.softmax_scale, 0)
                out[b, i, h] = w @ v[b, ks, hk]
    return out.to(x.q.dtype)


_planted("selection=no_causal_cut", "conv_slc_no_causal_cut", ("slc_o",),
         lambda c, x: {"slc_o": _selection_loop(c, x, causal=False, pad_block0=False)})
_planted("padding=block0", "conv_slc_pad_block0", ("slc_o",),
         lambda c, x: {"slc_o": _selection_loop(c, x, causal=True, pad_block0=True)})


def _topk_repeats(c, x):
    idx = _ref(c, x)["topk_idx"]
    return {"topk_idx": torch.where(idx < 0, idx[..., :1].expand_as(idx), idx)}


_planted("topk_padding=repeats", "conv_topk_repeats", ("topk_idx",), _topk_repeats)


# gradients follow the forward: dq, dk, dv of the loss sum(o * dO) under one other convention
def _grads_window(c, x):
    from nsaconf.oracles.reference import nsa_reference_grads
    g = nsa_reference_grads(c.replace(window_keys="w_plus_1"), x, dtype=None)
    return {b: g[b] for b in ("dq", "dk", "dv")}


def _grads_scale_swa(c, x):
    from nsaconf.oracles.reference import _forward, autograd_grads

    def forward(xi):  # the window branch with 1/sqrt(D), the others with the case's scale
        out = _forward(c, xi, None, None, False)
        plain = _forward(c.replace(scale=None), xi, None, None, False)
        return {"o": out["o"] + (plain["swa_o"] - out["swa_o"]) * xi.g_swa[..., None]}

    g = autograd_grads(forward, c, x)
    return {b: g[b] for b in ("dq", "dk", "dv")}


_planted("window_keys=w_plus_1", "conv_grads_window", ("dq", "dk", "dv"), _grads_window)
_planted("scale=ignored_in_swa", "conv_grads_scale_swa", ("dq", "dk", "dv"), _grads_scale_swa)
