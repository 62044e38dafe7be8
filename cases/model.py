"""The canonical NSA case: one frozen, hashable record that every oracle translates from.

Field names are part of the public contract (README, "Case files"). A case describes shapes,
hyper-parameters, conventions and the seed; the tensors are derived from it deterministically
(``cases.tensors.materialize``).
"""
from __future__ import annotations

import dataclasses
import json
import reprlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Optional

from nsaconf.cases.conventions import max_forced
from nsaconf.cases.vocabulary import (BLOCK_INDICES, CMP_MASKS, DTYPE_SHORT, DTYPES, FORCED_BLOCKS, GATES,
                                      GROUP_IMPORTANCE, WINDOW_KEYS)


class CaseError(ValueError):
    """A case that is malformed or internally inconsistent (message names the field)."""


#: every integer field fits a signed 64-bit integer (torch's index type); the seed's range is
#: ``[0, INT64_MAX]``, so that ``seed`` plus the offsets ``cases.tensors`` adds stays inside
#: ``torch.Generator.manual_seed``'s ``[0, 2**64)``
INT64_MAX = 2**63 - 1
#: the range of a custom ``scale``: ``|q.k|`` of a case's inputs stays below about ``7*sqrt(D)`` (6 sigma of
#: ``q ~ N(0,1)``, ``k`` of variance 1.28), so ``scale <= 100`` keeps the logits below fp16's largest finite
#: 65504 up to ``D ~ 8000``; ``scale >= 1e-4`` keeps ``|scale*q.k|`` of ``|q.k| >= 1`` above fp16's smallest
#: normal (6.1e-5), below which every softmax is flat and the case tests nothing but a mean
SCALE_RANGE = (1e-4, 1e2)
_INT_FIELDS = ("batch", "seq_len", "q_len", "heads_q", "heads_kv", "head_dim", "head_dim_v", "block_size",
               "cmp_block", "cmp_stride", "top_n", "window", "seed")


def _is_int(v: Any) -> bool:
    """An exact integer (``bool`` and ``1.0`` are not)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _r(v: Any) -> str:
    """A short repr for messages (long strings, lists and deep nesting are cut)."""
    return reprlib.repr(v)


@dataclass(frozen=True)
class Case:
    """One NSA problem.

    Queries are the last ``q_len`` positions: query i sits at absolute position ``p = T - TQ + i``.
    Query head h uses kv head ``h // G`` with ``G = heads_q // heads_kv``.
    ``cmp_block``/``cmp_stride`` default to ``block_size``; ``q_len`` to ``seq_len``; ``head_dim_v``
    to ``head_dim``. ``cu_seqlens`` (batch 1) packs sequences; positions restart in each.
    """

    batch: int = 1
    seq_len: int = 128
    q_len: Optional[int] = None
    heads_q: int = 16
    heads_kv: int = 1
    head_dim: int = 32
    head_dim_v: Optional[int] = None
    dtype: str = "float32"
    block_size: int = 16
    cmp_block: Optional[int] = None
    cmp_stride: Optional[int] = None
    top_n: int = 4
    window: int = 0
    cmp_mask: str = "end_inclusive"
    window_keys: str = "w"
    forced_blocks: str = "initial_local"
    block_indices: str = "topk"
    group_importance: str = "sum_probs"
    gates: str = "raw"
    scale: Optional[float] = None
    cu_seqlens: Optional[tuple[int, ...]] = None
    seed: int = 0

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.q_len is None:
            set_("q_len", self.seq_len)
        if self.head_dim_v is None:
            set_("head_dim_v", self.head_dim)
        if self.cmp_block is None:
            set_("cmp_block", self.block_size)
        if self.cmp_stride is None:
            set_("cmp_stride", self.cmp_block)
        self.validate()
        if self.cu_seqlens is not None:
            set_("cu_seqlens", tuple(self.cu_seqlens))
        if self.scale is not None:
            set_("scale", float(self.scale))

    # ---------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise CaseError(msg)

        for name in _INT_FIELDS:
            v = getattr(self, name)
            need(_is_int(v), f"field {name!r} must be an integer, got {_r(v)}")
            need(v <= INT64_MAX, f"field {name!r} must be <= 2**63-1, got {_r(v)}")
        for name in ("batch", "seq_len", "q_len", "heads_q", "heads_kv", "head_dim", "head_dim_v",
                     "block_size", "cmp_block", "cmp_stride", "top_n"):
            need(getattr(self, name) >= 1, f"field {name!r} must be >= 1, got {getattr(self, name)}")
        need(self.window >= 0, f"field 'window' must be >= 0, got {self.window}")
        need(self.seed >= 0, f"field 'seed' must be >= 0, got {self.seed}")
        need(self.q_len <= self.seq_len, f"q_len ({self.q_len}) must be <= seq_len ({self.seq_len})")
        need(self.heads_q % self.heads_kv == 0, f"heads_kv ({self.heads_kv}) must divide heads_q ({self.heads_q})")
        for name, allowed in (("dtype", DTYPES), ("cmp_mask", CMP_MASKS), ("window_keys", WINDOW_KEYS),
                              ("forced_blocks", FORCED_BLOCKS), ("block_indices", BLOCK_INDICES),
                              ("group_importance", GROUP_IMPORTANCE), ("gates", GATES)):
            v = getattr(self, name)
            need(isinstance(v, str) and v in allowed, f"field {name!r} must be one of {allowed}, got {_r(v)}")
        need(self.cmp_block % self.cmp_stride == 0, f"cmp_block ({self.cmp_block}) must be a multiple of cmp_stride ({self.cmp_stride})")
        need(self.block_size % self.cmp_stride == 0, f"block_size ({self.block_size}) must be a multiple of cmp_stride ({self.cmp_stride})")
        need(self.top_n >= max_forced(self.forced_blocks),
             f"top_n ({self.top_n}) must be >= the {max_forced(self.forced_blocks)} forced blocks of {self.forced_blocks!r}")
        if self.scale is not None:
            lo, hi = SCALE_RANGE
            need(isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool),
                 f"field 'scale' must be a number or null, got {_r(self.scale)}")
            need(lo <= self.scale <= hi, f"field 'scale' must be a finite number in [{lo:g}, {hi:g}] or null "
                 f"(1/sqrt(head_dim)), got {_r(self.scale)}")
        if self.cu_seqlens is not None:
            cu = self.cu_seqlens
            need(isinstance(cu, (list, tuple)), f"field 'cu_seqlens' must be a list of integers or null, got {_r(cu)}")
            bad = next((i for i, x in enumerate(cu) if not _is_int(x)), None)
            need(bad is None, f"field 'cu_seqlens' must hold integers, entry {bad} is {_r(cu[bad] if bad is not None else None)}")
            need(self.batch == 1, "cu_seqlens needs batch == 1")
            need(len(cu) >= 2 and cu[0] == 0, f"cu_seqlens must start at 0 and hold >= 2 entries, got {_r(list(cu))}")
            need(all(b > a for a, b in zip(cu, cu[1:])), f"cu_seqlens must be strictly increasing, got {_r(list(cu))}")
            need(cu[-1] == self.seq_len, f"cu_seqlens must end at seq_len ({self.seq_len}), got {cu[-1]}")
            need(self.q_len == self.seq_len, "cu_seqlens needs q_len == seq_len (varlen decode is not modelled)")

    # ---------------------------------------------------------------------------------- derived
    @property
    def group(self) -> int:
        """GQA ratio G = HQ / H."""
        return self.heads_q // self.heads_kv

    @property
    def q_offset(self) -> int:
        """Absolute position of query 0: T - TQ."""
        return self.seq_len - self.q_len

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else self.head_dim ** -0.5

    @property
    def sequences(self) -> list[tuple[int, int]]:
        """(start, end) of each packed sequence (one (0, T) without cu_seqlens)."""
        cu = self.cu_seqlens or (0, self.seq_len)
        return list(zip(cu[:-1], cu[1:]))

    @property
    def id(self) -> str:
        """Stable, human-readable id, e.g. ``bf16-B1-T1000-TQ1000-HQ32-H2-D64-DV64-l32d32ls32-n8-w128-end_inclusive-s7``.

        Non-default ``window_keys``, ``forced_blocks``, ``block_indices``, ``group_importance``,
        ``gates``, ``scale`` and ``cu_seqlens`` add suffixes (``-wplus1``, ``-fnone``/``-fcur``, ``-rand``,
        ``-gmean``, ``-gsig``, ``-sc0.1``, ``-cu0.5.12``) so that distinct cases never share an id; a case
        with the default of every field has the id it had before the field existed.
        """
        parts = [DTYPE_SHORT[self.dtype], f"B{self.batch}", f"T{self.seq_len}", f"TQ{self.q_len}",
                 f"HQ{self.heads_q}", f"H{self.heads_kv}", f"D{self.head_dim}", f"DV{self.head_dim_v}",
                 f"l{self.cmp_block}d{self.cmp_stride}ls{self.block_size}", f"n{self.top_n}",
                 f"w{self.window}", self.cmp_mask]
        if self.window_keys != "w":
            parts.append("wplus1")
        if self.forced_blocks != "initial_local":
            parts.append({"none": "fnone", "current": "fcur"}[self.forced_blocks])
        if self.block_indices != "topk":
            parts.append("rand")
        if self.group_importance != "sum_probs":
            parts.append("gmean")
        if self.gates != "raw":
            parts.append("gsig")
        if self.scale is not None:
            parts.append(f"sc{self.scale:g}")
        if self.cu_seqlens is not None:
            parts.append("cu" + ".".join(str(x) for x in self.cu_seqlens))
        parts.append(f"s{self.seed}")
        return "-".join(parts)

    def replace(self, **changes: Any) -> "Case":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if d["cu_seqlens"] is not None:
            d["cu_seqlens"] = list(d["cu_seqlens"])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Case":
        if not isinstance(d, dict):
            raise CaseError(f"a case must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(d) - known - {"id"}))
        if unknown:
            raise CaseError(f"unknown case field(s) {_r(unknown)}; known fields: {sorted(known)}")
        case = cls(**{k: v for k, v in d.items() if k in known})
        if "id" in d and d["id"] != case.id:
            raise CaseError(f"case id {_r(d['id'])} does not match its fields (expected {case.id!r})")
        return case

    @classmethod
    def from_id(cls, case_id: str) -> "Case":
        """Parse an ``id`` back into a Case (the inverse of ``Case.id``; a ``scale`` is recovered as
        printed with ``%g``). Raises ``CaseError`` naming the problem."""
        import re

        m = re.fullmatch(
            r"(fp16|bf16|fp32|fp64)-B(\d+)-T(\d+)-TQ(\d+)-HQ(\d+)-H(\d+)-D(\d+)-DV(\d+)-l(\d+)d(\d+)ls(\d+)"
            r"-n(\d+)-w(\d+)-([a-z_]+)(-wplus1)?(-fnone|-fcur)?(-rand)?(-gmean)?(-gsig)?(?:-sc([0-9.e+-]+?))?(?:-cu([0-9.]+))?-s(\d+)",
            case_id.strip())
        if m is None:
            raise CaseError(f"{case_id!r} is not a case id (expected e.g. "
                            f"bf16-B1-T200-TQ200-HQ16-H1-D32-DV32-l16d16ls16-n4-w32-end_inclusive-s7)")
        g = m.groups()
        short = {v: k for k, v in DTYPE_SHORT.items()}
        try:
            case = cls(dtype=short[g[0]], batch=int(g[1]), seq_len=int(g[2]), q_len=int(g[3]), heads_q=int(g[4]),
                       heads_kv=int(g[5]), head_dim=int(g[6]), head_dim_v=int(g[7]), cmp_block=int(g[8]),
                       cmp_stride=int(g[9]), block_size=int(g[10]), top_n=int(g[11]), window=int(g[12]),
                       cmp_mask=g[13], window_keys="w_plus_1" if g[14] else "w",
                       forced_blocks={None: "initial_local", "-fnone": "none", "-fcur": "current"}[g[15]],
                       block_indices="random" if g[16] else "topk",
                       group_importance="mean_logits" if g[17] else "sum_probs", gates="sigmoid" if g[18] else "raw",
                       scale=float(g[19]) if g[19] else None,
                       cu_seqlens=tuple(int(x) for x in g[20].split(".")) if g[20] else None, seed=int(g[21]))
        except ValueError as e:
            raise CaseError(f"case id {case_id!r}: {e}") from None
        if case.id != case_id.strip():
            raise CaseError(f"case id {case_id!r} does not round-trip (parsed as {case.id!r})")
        return case

    @classmethod
    def from_json(cls, text: str) -> "Case":
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise CaseError(f"malformed case JSON: {_json_problem(e)}") from None
        return cls.from_dict(data)


def _json_problem(e: Exception) -> str:
    """What ``json.loads`` found wrong, in one line."""
    if isinstance(e, RecursionError):
        return "nested too deeply (a case is one JSON object of numbers, strings and one list)"
    if not isinstance(e, json.JSONDecodeError):  # int(): more digits than sys.get_int_max_str_digits()
        return "an integer with too many digits"
    return str(e)


#: the keys of a regression-corpus entry (``harness.search``): the case, and what it showed when it was found
CORPUS_ENTRY_KEYS = ("case", "oracle", "failure", "found")


def load_cases(path: str | Path) -> list[Case]:
    """Read cases from a UTF-8 JSON file: one case object, a list of them, or ``{"cases": [...]}``, or a
    regression-corpus entry ``{"case": {...}, "oracle": ..., "failure": ..., "found": ...}``. JSON Lines (one
    object per line) is accepted too. A directory: every ``*.json`` file under it, in path order (a corpus)."""
    path = Path(path)
    if path.is_dir():
        return [c for f in sorted(path.rglob("*.json")) for c in load_cases(f)]
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CaseError(f"cannot read case file {str(path)!r}: {e.strerror}") from None
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise CaseError(f"case file {str(path)!r} is UTF-16 (byte-order mark); case files are UTF-8 JSON")
    if b"\x00" in raw:
        raise CaseError(f"case file {str(path)!r} holds NUL bytes (binary, or UTF-16 without a byte-order mark); "
                        "case files are UTF-8 JSON")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CaseError(f"case file {str(path)!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        "case files are UTF-8 JSON") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except (ValueError, RecursionError):
            raise CaseError(f"malformed case JSON in {str(path)!r}: {_json_problem(e)}") from None
    if isinstance(data, dict) and "cases" in data:
        extra = sorted(map(str, set(data) - {"cases"}))
        if extra:
            raise CaseError(f"{path}: unknown key(s) {_r(extra)} beside 'cases' (a case list is {{\"cases\": [...]}})")
        data = data["cases"]
        if not isinstance(data, list):
            raise CaseError(f"{path}: 'cases' must be a list of case objects, got {type(data).__name__}")
    if isinstance(data, dict) and isinstance(data.get("case"), dict):
        extra = sorted(map(str, set(data) - set(CORPUS_ENTRY_KEYS)))
        if extra:
            raise CaseError(f"{path}: unknown key(s) {_r(extra)} in a corpus entry (keys: {', '.join(CORPUS_ENTRY_KEYS)})")
        data = data["case"]
    items = data if isinstance(data, list) else [data]
    out = []
    for i, item in enumerate(items):
        try:
            out.append(Case.from_dict(item))
        except CaseError as e:
            where = f"{path}" if len(items) == 1 else f"{path}[{i}]"
            raise CaseError(f"{where}: {e}") from None
    return out


def dump_cases(cases: Iterable[Case], path: str | Path) -> None:
    Path(path).write_text(json.dumps([c.to_dict() for c in cases], indent=1) + "\n")
