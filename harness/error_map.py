"""Where the error of a failing cell lives: a small matrix of ``max |out - truth| / bound`` per
(position bin, head bin), kept in the cell's record as ``error_map`` and drawn by the HTML report.

For a tensor ``[B, rows, heads, ...]`` (``rows`` = query rows; key rows for ``dk``/``dv``), the row axis is
the position inside the row's own sequence (``query_positions``; key ``s`` minus its sequence start),
cut into at most ``MAX_ROWS`` bins of whole positions whose inner edges are multiples of a power of two,
and heads into at most ``MAX_COLS`` bins;
batch and the trailing dims are reduced by the maximum. A NaN/Inf output where the truth is finite
counts as ``inf``. Record form::

    {"rows": "query position p", "cols": "head", "row_edges": [p0, p1, ..., pn],
     "col_edges": [h0, ..., hm],  # only when heads were binned
     "values": [[err/bound, ...], ...]}  # n x m, 3 significant digits, null for a bin with no row

Bin i holds positions ``row_edges[i] <= p < row_edges[i+1]``. Built chunk by chunk alongside
``comparator.compare_numeric`` (only per-row maxima of a chunk are kept), so it costs one pass.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import query_positions

MAX_ROWS, MAX_COLS = 32, 16


def _edges(lo: int, hi: int, n: int) -> list[int]:
    """At most ``n`` bins covering the integers ``lo .. hi``: inner edges at the multiples of a power of
    two (so that block and window boundaries, powers of two too, fall on bin edges)."""
    step = 1
    while hi // step - lo // step + 1 > n:
        step *= 2
    return [lo] + [m for m in range((lo // step + 1) * step, hi + 1, step)] + [hi + 1]


def _key_positions(case: Case) -> torch.Tensor:
    """Position of each key row ``[T]`` inside its own sequence."""
    return torch.cat([torch.arange(e - s) for s, e in case.sequences])


class ErrorMapBuilder:
    """Accumulates ``max |err|`` per (position bin, head bin) over flat chunks of a ``shape`` tensor."""

    def __init__(self, case: Case, shape: tuple[int, ...], keys: bool = False) -> None:
        self.ok = len(shape) >= 3 and all(s > 0 for s in shape)
        if not self.ok:
            return
        self.rows_name = "key position s" if keys else "query position p"
        self.inner = math.prod(shape[3:])
        self.n_rows, self.heads = shape[1], shape[2]
        pos = _key_positions(case) if keys else query_positions(case)
        if pos.numel() != self.n_rows:  # a shape the case does not describe: positions = row numbers
            pos = torch.arange(self.n_rows)
        lo, hi = int(pos.min()), int(pos.max())
        self.row_edges = _edges(lo, hi, MAX_ROWS)
        self.col_edges = _edges(0, self.heads - 1, MAX_COLS)
        row_bin = torch.bucketize(pos, torch.tensor(self.row_edges), right=True) - 1
        head_bin = torch.bucketize(torch.arange(self.heads), torch.tensor(self.col_edges), right=True) - 1
        nc = len(self.col_edges) - 1
        # target bin of every (row, head) pair, in the tensor's [rows, heads] order
        self._bin = (row_bin[:, None] * nc + head_bin[None, :]).reshape(-1)
        self._acc = torch.full(((len(self.row_edges) - 1) * nc,), -1.0, dtype=torch.float64)
        self._shape = (len(self.row_edges) - 1, nc)

    def add(self, start: int, err: torch.Tensor) -> None:
        """``err``: the |difference| (inf where non-finite) of flat elements ``start ..`` (float64, >= 0)."""
        if not self.ok or not err.numel():
            return
        r0 = start // self.inner
        pad_front = start - r0 * self.inner
        n_rows = -(-(pad_front + err.numel()) // self.inner)
        pad_back = n_rows * self.inner - pad_front - err.numel()
        e = torch.nn.functional.pad(err, (pad_front, pad_back)) if pad_front or pad_back else err
        per_row = e.reshape(n_rows, self.inner).amax(dim=1)  # rows of [B*rows*heads]
        pair = torch.arange(r0, r0 + n_rows) % (self.n_rows * self.heads)
        self._acc.scatter_reduce_(0, self._bin[pair], per_row, reduce="amax")

    def to_dict(self, bound: float) -> Optional[dict[str, Any]]:
        """The record form (see module docstring), values divided by ``bound``."""
        if not self.ok:
            return None
        values: list[list[Any]] = []
        for row in self._acc.reshape(self._shape).tolist():
            out: list[Any] = []
            for v in row:
                if v < 0:
                    out.append(None)
                elif bound > 0:
                    out.append(_round(v / bound))
                else:
                    out.append(0.0 if v == 0 else math.inf)
            values.append(out)
        d: dict[str, Any] = {"rows": self.rows_name, "cols": "head", "row_edges": self.row_edges, "values": values}
        if len(self.col_edges) - 1 < self.heads:
            d["col_edges"] = self.col_edges
        return d


def _round(x: float) -> float:
    return x if not math.isfinite(x) or x == 0 else float(f"{x:.3g}")
