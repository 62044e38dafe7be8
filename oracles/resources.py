"""What a case's float64 truth costs, estimated from its fields before anything is allocated.

``truth_bytes(case)`` models the peak memory of ``materialize`` plus one float64 ``nsa_reference``
(with the importance, as the engine asks for it): the inputs, the outputs, the Eq. 9 map and the
temporaries of one query chunk (``reference.default_chunk``). ``work_estimate(case)`` counts the
multiply-adds of the same computation, Python-level loop steps weighted as ``PY_STEP``
multiply-adds. ``resource_problem`` compares both with the run's limits (``nsaconf run
--max-memory``, ``--max-work``): over a limit, a profile's case is a SKIP cell and an explicit case
an error, both before the case's tensors exist.

Calibration (peak RSS above an idle process, one process per case, 2 CPU cores, torch 2.13): the
forward of 12 shapes (T 8..16,384, HQ 2..128, D 8..300,000, n up to 200,000, w up to 4,096, batch 16,
random indices, fp64 and bf16) measured 0.90-1.11 times the estimate, except up to 1.47 times where
temporaries of a few MB dominate (n = 200,000 with D = 8: the allocator keeps freed heap memory); the
gradient truth of 3 shapes up to ``GRAD_WORK_LIMIT`` 0.81-1.22 times. The T = 65,536 case of
``benchmarks/reference_memory.py``: 3.4 GB estimated, 3.6 GB peak RSS (interpreter included).
"""
from __future__ import annotations

import math
import re
from typing import Optional

from nsaconf.cases.conventions import num_cmp_blocks, num_sel_blocks
from nsaconf.cases.model import Case
from nsaconf.cases.tensors import TORCH_DTYPES
from nsaconf.oracles.reference import default_chunk, grad_truth_skip_reason

F64 = 8  # bytes of a float64 (and of an int64)
#: copies of one chunk's logits alive at once inside ``masked_attention`` (of the scaled, masked and
#: shifted logits, their exp and the masked probabilities)
LOGIT_COPIES = 4
#: a Python-level loop step (``eq9_weights``, the AR(1) scan of ``materialize``, the chunk loop) in
#: multiply-adds: 15-30 us a step against the reference's 1e9-3e9 multiply-adds a second on 2 cores
PY_STEP = 20_000
DEFAULT_MAX_MEMORY = 8 * 10**9
#: per device: on 2 CPU cores 2e12 multiply-adds take about 10 minutes (the T = 65,536 case of
#: ``benchmarks/reference_memory.py`` is 1.5e12); a GPU computes the truth about 100 times faster
DEFAULT_MAX_WORK = {"cpu": 2e12, "cuda": 2e14}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _shape(case: Case) -> tuple[int, int, int, int]:
    """(keys, queries, compressed blocks, selection blocks) of the longest sequence."""
    ts = max(e - s for s, e in case.sequences)
    tqs = ts if case.cu_seqlens is not None else case.q_len
    return ts, tqs, num_cmp_blocks(ts, case.cmp_stride), num_sel_blocks(ts, case.block_size)


def _chunk_bytes(case: Case, C: int) -> int:
    """Peak of the chunk loop at ``C`` queries a chunk: ``p_cmp`` and the importance, the gathered keys and
    values with their indices, and the larger of the previous chunk's gathers (alive until the new ones
    replace them) and the largest branch's attention (its logits, or one copy of its keys and values for
    ``einsum`` plus the logits)."""
    HQ, H, D, DV, w = case.heads_q, case.heads_kv, case.head_dim, case.head_dim_v, case.window
    ts, tqs, nc, ns = _shape(case)
    ksel = case.top_n * case.block_size
    kw = min(C + w, ts) if w > 0 else 0
    gathers = C * H * ksel * (41 + F64 * (D + DV))  # 5 int64 positions (indexing temporaries), a mask, keys, values
    attention = F64 * max(C * HQ * (LOGIT_COPIES * nc + ns),
                          C * max(LOGIT_COPIES * HQ * ksel, H * ksel * max(D, DV) + HQ * ksel),
                          max(LOGIT_COPIES * C * HQ * kw, H * kw * max(D, DV) + C * HQ * kw))
    return F64 * C * (HQ * nc + H * ns) + gathers + max(gathers if tqs > C else 0, attention)


def truth_bytes(case: Case) -> int:
    """Estimated peak bytes of ``materialize(case)``, one float64 ``nsa_reference(case, x,
    return_importance=True)`` and, where the engine computes it (``grad_truth_skip_reason``), the float64
    gradient truth, on top of an idle process."""
    B, T, TQ, HQ, H, D, DV = (case.batch, case.seq_len, case.q_len, case.heads_q, case.heads_kv, case.head_dim,
                              case.head_dim_v)
    ts, tqs, nc, ns = _shape(case)
    inputs = F64 * (B * TQ * HQ * D + B * T * H * (D + DV) + 3 * B * TQ * HQ)
    cast = inputs * TORCH_DTYPES[case.dtype].itemsize // F64 if case.dtype != "float64" else 0
    drawing = inputs + 4 * F64 * B * T * H * D  # k: two normal fields and the AR(1) scan's copies
    if case.block_indices == "random":
        nb = num_sel_blocks(ts, case.block_size)
        drawing = max(drawing, inputs + 4 * F64 * B * TQ * H * nb)  # scores, masks and topk of every block
        inputs += F64 * B * TQ * H * case.top_n
    outputs = F64 * B * TQ * (HQ * DV * (3 + (case.window > 0)) + HQ + H * case.top_n + H * ns)
    pooled = F64 * (nc * H * (D + DV) + nc * ns)  # pooled keys/values and the Eq. 9 map
    pooling = 2 * F64 * (ts + 1) * H * max(D, DV)  # cumsum and its padded copy
    C = min(default_chunk(case), tqs)
    forward = inputs + cast + outputs + pooled + max(pooling, _chunk_bytes(case, C))
    grads = 0
    if grad_truth_skip_reason(case) is None:  # autograd keeps every chunk's temporaries
        grads = B * len(case.sequences) * -(-tqs // C) * _chunk_bytes(case, C)
    return int(max(drawing, forward) + grads)


def work_estimate(case: Case) -> float:
    """Estimated multiply-adds of ``truth_bytes``'s computation (a Python loop step counts ``PY_STEP``)."""
    B, T, HQ, H, D, DV = case.batch, case.seq_len, case.heads_q, case.heads_kv, case.head_dim, case.head_dim_v
    n, ls, w, l, d = case.top_n, case.block_size, case.window, case.cmp_block, case.cmp_stride
    ts, tqs, nc, ns = _shape(case)
    C = min(default_chunk(case), tqs)
    per_query = (HQ * nc * (D + DV + ns)                          # compression attention, p_cmp @ W
                 + H * ns * max(1.0, math.log2(ns))               # top-n sort
                 + (HQ + H) * n * ls * (D + DV)                   # selection gathers and attention
                 + (HQ * min(C + w, ts) * (D + DV) if w > 0 else 0))  # sliding window
    queries = B * (case.q_len if case.cu_seqlens is None else case.seq_len)
    loops = len(case.sequences) * ns * (ls // d) * (l // d) + T + B * -(-tqs // C) * len(case.sequences)
    return float(queries * per_query + loops * PY_STEP)


def resource_problem(case: Case, max_bytes: float, max_work: float) -> Optional[str]:
    """Why ``case``'s truth is over a limit (None: within both)."""
    need = truth_bytes(case)
    if need > max_bytes:
        return (f"the float64 truth of this case needs about {format_bytes(need)}, over --max-memory "
                f"{format_bytes(max_bytes)}")
    work = work_estimate(case)
    if work > max_work:
        return f"the float64 truth of this case needs about {work:.2g} multiply-adds, over --max-work {max_work:.2g}"
    return None


def format_bytes(n: float) -> str:
    """``8000000000`` -> ``8 GB`` (decimal units)."""
    for unit in ("TB", "GB", "MB", "KB"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.3g} {unit}"
    return f"{int(n)} B"


def parse_bytes(text: str) -> int:
    """``"8GB"``, ``"512MB"``, ``"1.5GiB"``, ``"1000000"`` -> bytes (KB/MB/GB/TB are powers of 1000,
    KiB/MiB/GiB/TiB of 1024). ValueError naming the accepted forms otherwise."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"expected a size such as 8GB, 512MB, 1.5GiB or a number of bytes, got {text!r}")
    value = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"expected a size of at least 1 byte, got {text!r}")
    return int(value)
