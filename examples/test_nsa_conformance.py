"""NSA conformance in your own test suite: copy this file into your repository's tests/.

    pip install nsaconf
    pytest tests/test_nsa_conformance.py                     # your function + the in-house oracles, smoke cases
    pytest tests/test_nsa_conformance.py --nsaconf-plugin my_oracle.py --nsaconf-oracles mine --nsaconf-case my_cases.json

nsaconf's entry point loads its pytest plugin: ``nsaconf_cell`` items are the matrix of ``--nsaconf-oracles``
x cases; ``nsaconf.assert_conforms`` judges a plain function.
"""
import torch
import torch.nn.functional as F

import nsaconf
from nsaconf.cases.conventions import window_mask_matrix
from nsaconf.cases.tensors import query_positions


def sdpa_window(case: nsaconf.Case, inputs: nsaconf.Inputs) -> dict:
    """Your kernel (here: the sliding-window branch through torch SDPA). q [B,TQ,HQ,D], k/v [B,T,H,*]
    -> {"swa_o": [B,TQ,HQ,DV]}; the kv head of query head h is h // (HQ / H)."""
    q = inputs.q.transpose(1, 2)
    k = inputs.k.repeat_interleave(case.group, dim=2).transpose(1, 2)
    v = inputs.v.repeat_interleave(case.group, dim=2).transpose(1, 2)
    pos = query_positions(case).to(q.device)
    mask = window_mask_matrix(case.window_keys, pos, torch.arange(case.seq_len, device=q.device), case.window)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=case.softmax_scale)
    return {"swa_o": o.transpose(1, 2)}


def test_sdpa_window_conforms():
    cases = [c for c in nsaconf.profile_cases("smoke") if c.cu_seqlens is None]  # this kernel has no varlen
    nsaconf.assert_conforms(sdpa_window, cases=cases, branches="swa_o")


def test_conformance(nsaconf_cell):
    nsaconf_cell.check()
