"""What FSA's decode path (``fsa_preview``, @1da34f3) computes, branch by branch, against three readings of its code.

    python benchmarks/fsa_decode_probe.py        (repository root, CUDA machine, the fsa checkout configured)

On the TQ = 1 cases of ``benchmarks/field-decode.json`` that FSA's decode takes (batch 1), through the ``fsa``
adapter (``FlashSparseAttentionDecode.forward``'s composition) and the float64 reference:

* ``cmp_o`` against the reference and against the reference plus P "phantom" compressed keys (score 0, value 0),
  P = (T-1)//d - (T-l)//d: what a mask on block starts (``c*d <= t``, the decode kernel's
  ``q_start_in_seq = query_start_index + kernel_size - 1``) lets in from the zero-padded tile past the cache;
* ``topk_idx``: the ids FSA returns next to the reference's, and ``ceil(compressed length / l')``, the number
  of blocks its ``transform_score_decode`` scores when given the module's ``max_seqlen_k``;
* ``slc_o`` against ``v[0]`` (the query read as position 0 of its one-token sequence: only key 0 visible).
"""
from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    import torch
    from nsaconf.cases.model import load_cases
    from nsaconf.cases.tensors import materialize
    from nsaconf.oracles import builtin  # noqa: F401  (registers the oracles)
    from nsaconf.oracles.base import get_oracle
    from nsaconf.oracles.reference import nsa_reference

    fsa = get_oracle("fsa")
    for case in load_cases("benchmarks/field-decode.json"):
        if fsa.check_support(case, "cuda"):
            print(f"{case.id}: SKIP {fsa.check_support(case, 'cuda')}")
            continue
        x = materialize(case, "cuda")
        got = fsa.run(case, x, "cuda")
        ref = nsa_reference(case, x, dtype=torch.float64)
        T, l, d, ls, G = case.seq_len, case.cmp_block, case.cmp_stride, case.block_size, case.group
        n_cmp = (T - l) // d + 1
        P = (T - 1) // d - (T - l) // d
        q = x.q[0, 0].double()                                             # [HQ, D]
        k, v = x.k[0].double(), x.v[0].double()                             # [T, H, D]
        kc = torch.stack([k[c * d:c * d + l].mean(0) for c in range(n_cmp)])  # [C, H, D]
        vc = torch.stack([v[c * d:c * d + l].mean(0) for c in range(n_cmp)])
        kv = torch.arange(case.heads_q, device=q.device) // G
        s = torch.einsum("hd,chd->hc", q, kc[:, kv]) * case.softmax_scale    # [HQ, C]
        p = torch.softmax(torch.cat([s, s.new_zeros(s.shape[0], P)], -1), -1)[:, :n_cmp]
        phantom = torch.einsum("hc,chd->hd", p, vc[:, kv])
        err = lambda a, b: float((a.double() - b.double()).abs().max())  # noqa: E731
        print(f"{case.id}:")
        print(f"  cmp_o: max |fsa - ref| {err(got['cmp_o'][0, 0], ref['cmp_o'][0, 0]):.3g}; "
              f"max |fsa - ref with {P} phantom keys| {err(got['cmp_o'][0, 0], phantom):.3g}")
        print(f"  topk_idx: fsa {got['topk_idx'][0, 0].tolist()}; ref {ref['topk_idx'][0, 0].tolist()}; "
              f"ceil({n_cmp} compressed / l'={ls}) = {math.ceil(n_cmp / ls)} block(s) scored")
        v0 = v[0][kv]                                                        # [HQ, DV]: key 0 of each head's kv head
        print(f"  slc_o: max |fsa - ref| {err(got['slc_o'][0, 0], ref['slc_o'][0, 0]):.3g}; max |fsa - v[0]| "
              f"{err(got['slc_o'][0, 0], v0):.3g}; NaN {int(torch.isnan(got['slc_o']).sum())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
