"""The words every part of nsaconf shares, defined once (no torch: reports import it too).

Branches, layers, statuses, dtypes and their short names, devices and the names of every case
convention. The rules behind the convention names live in ``cases.conventions``; this module only
names them.
"""
from __future__ import annotations

# ---------------------------------------------------------------------------------------------- branches
#: forward outputs, canonical layouts: ``*_o`` [B,TQ,HQ,DV], ``cmp_lse`` [B,TQ,HQ], ``topk_idx`` [B,TQ,H,n]
FORWARD_BRANCHES = ("cmp_o", "cmp_lse", "topk_idx", "slc_o", "swa_o", "o")
#: gradients of ``sum(o * do)`` with respect to q, k, v and the three gates
GRAD_BRANCHES = ("dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_swa")
ALL_BRANCHES = FORWARD_BRANCHES + GRAD_BRANCHES
#: the branches whose receptive field the convention probe measures
PROBE_BRANCHES = ("cmp_o", "slc_o", "swa_o", "o")
#: short names accepted on the command line (``nsaconf masks --branch cmp``)
BRANCH_ALIASES = {"cmp": "cmp_o", "slc": "slc_o", "swa": "swa_o", "e2e": "o",
                  **{b: b for b in PROBE_BRANCHES}}

# ---------------------------------------------------------------------------------------------- layers
#: what an oracle is: the in-house references (L0), one branch's kernel on given inputs (L1), a whole NSA (L2)
LAYERS = ("reference", "kernel", "e2e")
LAYER_KEYS = {"reference": "L0", "kernel": "L1", "e2e": "L2"}
LAYER_TITLES = {"reference": "L0 · reference", "kernel": "L1 · kernel", "e2e": "L2 · end-to-end"}

# ---------------------------------------------------------------------------------------------- statuses
STATUSES = ("PASS", "FAIL", "SKIP", "ERROR", "CRASH", "TIMEOUT")
#: statuses that make ``nsaconf run`` exit 1
BAD_STATUSES = ("FAIL", "ERROR", "CRASH", "TIMEOUT")
#: worst-of order for a group of cells: a wrong answer (FAIL) is worse than a loud one (CRASH/ERROR/TIMEOUT);
#: PASS outranks SKIP so that a group with some passes and some skips reads PASS (skips are counted)
SEVERITY = {"SKIP": 0, "PASS": 1, "TIMEOUT": 2, "ERROR": 3, "CRASH": 4, "FAIL": 5}

# ---------------------------------------------------------------------------------------------- dtypes, devices
DTYPES = ("float16", "bfloat16", "float32", "float64")
DTYPE_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}
#: every spelling the command line accepts, to the dtype
DTYPE_ALIASES = {**{d: d for d in DTYPES}, **{s: d for d, s in DTYPE_SHORT.items()},
                 "half": "float16", "float": "float32", "double": "float64"}
DEVICES = ("cpu", "cuda")

# ---------------------------------------------------------------------------------------------- conventions
#: compressed-block visibility (``cases.conventions.CMP_MASKS``)
CMP_MASKS = ("end_inclusive", "current_block", "anti_causal", "end_exclusive")
CAUSAL_CMP_MASKS = ("end_inclusive", "end_exclusive")
#: sliding-window length: w keys (the current one included) or w + 1 (``cases.conventions.WINDOW_KEYS``)
WINDOW_KEYS = ("w", "w_plus_1")
#: selection blocks every query takes whatever their score (``cases.conventions.FORCED_RULES``)
FORCED_BLOCKS = ("none", "current", "initial_local")
#: where the selection branch's block indices come from: the case's own top-n, or random (given) indices
BLOCK_INDICES = ("topk", "random")
#: the convention name of the selection branch's key rule (``cases.conventions.selection_causal``)
SLC_CONVENTION = "causal"
#: how the G query heads of a GQA group pool their compressed attention into one importance per kv head
#: (``cases.conventions.GROUP_IMPORTANCE_RULES``): sum of probabilities (paper Eq. 10) or softmax of the
#: group-mean logits (lucidrains)
GROUP_IMPORTANCE = ("sum_probs", "mean_logits")
#: what the given gate values are (``cases.conventions.GATE_RULES``): the multipliers themselves, or logits
#: that the implementation passes through a sigmoid
GATES = ("raw", "sigmoid")
#: the value of each convention field that every oracle computes unless it declares more
#: (``Oracle.supported_conventions``); a case with another value is SKIPped by an oracle that does not
CONVENTION_DEFAULTS = {"group_importance": "sum_probs", "gates": "raw"}

# ---------------------------------------------------------------------------------------------- checks without truth
#: properties an oracle must have whatever the truth (``harness.checks``); each is a cell whose branch is its name
CHECKS = ("inputs_unchanged", "determinism", "decode_consistency", "batch_independence", "gqa_equivariance",
          "causality")
#: the folder of the regression corpus (``cases/regressions/<oracle>/<case_id>.json``) and its ``--profile`` name
REGRESSIONS = "regressions"

# ---------------------------------------------------------------------------------------------- run directory
RESULTS_FILE = "results.jsonl"        # one JSON record per cell, appended and flushed as judged
RUN_INFO_FILE = "run.json"            # the command, selection, tolerance table and versions of a run
CONVENTIONS_FILE = "conventions.jsonl"  # the convention probe's records (one per oracle and branch)
