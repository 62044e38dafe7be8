"""CPU seconds of a case profile's work, per part: the float64 truth, its gradients and each oracle's ``run``.

Everything runs in this one process on one thread and is timed with ``time.process_time`` (CPU time of the
process), so the numbers hold on a machine that other jobs load; worker start-up, the convention probe and
the reports of ``nsaconf run`` are not counted. Prints a JSON object {part: seconds} and the total;
``--per-case FILE`` writes one row per case.

    python benchmarks/ci_cost.py --oracles reference,dense,fla_naive,flex [--profile ci] [--per-case FILE]
"""
from __future__ import annotations

import argparse
import collections
import json
import time

import torch

from nsaconf.cases.generator import profile_cases
from nsaconf.cases.tensors import materialize
from nsaconf.cases.vocabulary import GRAD_BRANCHES
from nsaconf.harness.comparator import CaseTruth
from nsaconf.harness.runner import branch_skip_reason
from nsaconf.oracles.base import convention_support, get_oracle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--oracles", required=True, help="comma-separated oracle names")
    ap.add_argument("--profile", default="ci")
    ap.add_argument("--per-case", help="write the per-case seconds (JSON list) here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    oracles = {n: get_oracle(n) for n in args.oracles.split(",")}
    total: collections.Counter = collections.Counter()
    rows = []
    for case in profile_cases(args.profile):
        row = {"case": case.id}
        t = time.process_time()
        ct = CaseTruth.compute(case)
        row["truth"] = time.process_time() - t
        grads = False
        for name, o in oracles.items():
            if o.check_support(case, "cpu"):
                continue
            live = [b for b in o.branches if not (branch_skip_reason(case, b) or convention_support(o, case, b)
                                                  or o.branch_supports(case, b))]
            if not live:
                continue
            grads |= any(b in GRAD_BRANCHES for b in live)
            x = materialize(case, "cpu")
            kw = {"block_indices": ct.given_indices} if o.needs_block_indices and ct.given_indices is not None else {}
            t = time.process_time()
            try:
                o.run(case, x, "cpu", **kw)
            except Exception as e:  # noqa: BLE001 - a failing oracle is timed until it fails
                print(f"{name} on {case.id}: {type(e).__name__}: {e}")
            row[name] = time.process_time() - t
        if grads:
            t = time.process_time()
            try:
                ct.grads()
            except Exception:  # noqa: BLE001
                pass
            row["truth_grads"] = time.process_time() - t
        total.update({k: v for k, v in row.items() if k != "case"})
        rows.append(row)
    print(json.dumps({k: round(v, 1) for k, v in total.items()}))
    print(f"total {sum(total.values()):.1f} CPU seconds, {len(rows)} cases")
    if args.per_case:
        with open(args.per_case, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
