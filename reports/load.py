"""Read ``DIR/results.jsonl`` into records and a flat pandas table; the shared vocabulary of the writers.

One line = one cell (case x oracle x branch). Lines that are not JSON objects with ``case_id``,
``oracle`` and ``status`` (e.g. a line truncated by a killed run) are kept as *malformed* and shown in
every report, never dropped silently. When a cell appears twice (``--resume`` after an interrupted
write) the last line wins. Records are sorted by (layer, oracle, case_id, branch, dtype, device) so
that rebuilding a report from the same file is byte-identical.

Case groups (the columns of the matrices) are ``<dtype> · <cmp_mask>``, e.g. ``bf16 · end_inclusive``:
precision and compression-mask convention are the two axes along which adapters most often differ.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import pandas as pd

from nsaconf.cases.vocabulary import (ALL_BRANCHES as BRANCH_ORDER, DTYPE_SHORT, LAYER_KEYS, LAYER_TITLES,  # noqa: F401
                                      LAYERS, RESULTS_FILE, SEVERITY, STATUSES)
from nsaconf.cases.repro_line import repro_command

UNKNOWN_SEVERITY = 6  # a status outside STATUSES is shown as is and treated as worst
DTYPE_ORDER = ("fp64", "fp32", "bf16", "fp16")  # column order: most mantissa bits first
#: column order of the compression masks (presentation only; the rules live in cases.conventions)
MASK_ORDER = ("end_inclusive", "current_block", "end_exclusive", "anti_causal")
#: metrics shown first (in this order) in tables; any others follow alphabetically
METRIC_ORDER = ("err_ratio", "max_abs_err", "baseline_err", "bound", "rel_rms", "mismatch_frac",
                "worst_index", "nonfinite", "empty_rows", "topk_disagree")


class ReportError(Exception):
    """Unreadable results directory (one-line message; the CLI exits 2)."""


@dataclass(frozen=True)
class CellRecord:
    """One result cell as written by the runner (missing optional fields become None / {})."""

    case_id: str
    oracle: str
    status: str
    layer: str = "e2e"
    branch: str = ""
    dtype: str = ""
    device: str = ""
    reason: Optional[str] = None
    case: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    tolerance: dict = field(default_factory=dict)
    seconds: Optional[float] = None
    versions: dict = field(default_factory=dict)
    timestamp: Optional[str] = None
    diagnosis: Optional[dict] = None  # FAIL cells: key, matched, variants, nearest, text (harness.diagnosis)
    error_map: Optional[dict] = None  # numeric FAIL: err/bound per (position bin, head) (harness.error_map)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "CellRecord":
        def as_dict(v: Any) -> dict:
            return v if isinstance(v, dict) else {}

        case = as_dict(obj.get("case"))
        secs = obj.get("seconds")
        metrics = {k: _nonfinite(v) for k, v in as_dict(obj.get("metrics")).items()}
        return cls(
            case_id=str(obj["case_id"]), oracle=str(obj["oracle"]), status=str(obj["status"]).upper(),
            layer=str(obj.get("layer") or "e2e"), branch=str(obj.get("branch") or ""),
            dtype=str(obj.get("dtype") or case.get("dtype") or ""), device=str(obj.get("device") or ""),
            reason=None if obj.get("reason") is None else str(obj["reason"]),
            case=case, metrics=metrics, tolerance=as_dict(obj.get("tolerance")),
            seconds=float(secs) if isinstance(secs, (int, float)) else None,
            versions=as_dict(obj.get("versions")),
            timestamp=None if obj.get("timestamp") is None else str(obj["timestamp"]),
            diagnosis=_diagnosis(obj.get("diagnosis")),
            error_map=obj["error_map"] if isinstance(obj.get("error_map"), dict) else None,
        )

    # ---------------------------------------------------------------------------------- derived
    @property
    def key(self) -> tuple[str, str, str, str, str]:
        """Identity of a cell (duplicates with the same key: last one wins)."""
        return (self.case_id, self.oracle, self.branch, self.dtype, self.device)

    @property
    def dtype_short(self) -> str:
        return DTYPE_SHORT.get(self.dtype, self.dtype or "?")

    @property
    def group(self) -> str:
        """Matrix column: ``<dtype> · <cmp_mask>``."""
        return f"{self.dtype_short} · {self.case.get('cmp_mask') or '?'}"

    @property
    def severity(self) -> int:
        return SEVERITY.get(self.status, UNKNOWN_SEVERITY)

    @property
    def is_bad(self) -> bool:
        return self.status not in ("PASS", "SKIP")

    @property
    def err_ratio(self) -> Optional[float]:
        v = self.metrics.get("err_ratio")
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    @property
    def one_line_reason(self) -> str:
        return one_line(self.reason)

    @property
    def repro(self) -> str:
        """The one-line command that reruns this cell (``Results.repro`` adds the run's plugins/overrides)."""
        return repro_command(self.case_id, self.oracle, self.device or "cpu")

    def sort_key(self) -> tuple:
        return (layer_rank(self.layer), self.oracle, self.case_id, branch_rank(self.branch),
                self.dtype, self.device, self.status)


@dataclass
class Results:
    """Everything the writers need: sorted records, malformed lines and side files of DIR."""

    out_dir: Path
    records: list[CellRecord]
    malformed: list[tuple[int, str]]  # (line number, one-line why)
    duplicates: int = 0
    run_info: Optional[dict] = None  # DIR/run.json when present

    @property
    def counts(self) -> Counter:
        return Counter(r.status for r in self.records)

    @property
    def bad(self) -> list[CellRecord]:
        return sorted((r for r in self.records if r.is_bad), key=bad_sort_key)

    def repro(self, r: CellRecord) -> str:
        """``r.repro`` plus the run's ``--plugin`` files and tolerance overrides (from run.json), so that
        the rerun sees the same oracle and the same bound."""
        plugins, tol = self.repro_args()
        return repro_command(r.case_id, r.oracle, r.device or "cpu", plugins, tol)

    def repro_args(self) -> tuple[list[str], list[str]]:
        """The run's ``--plugin`` files and ``--tol`` assignments (from run.json)."""
        info = self.run_info or {}
        plugins = [str(p) for p in info.get("plugins") or []] if isinstance(info.get("plugins"), list) else []
        tol = info.get("tolerance")
        overrides = tol.get("overrides") if isinstance(tol, dict) else None
        assigns = []
        if isinstance(overrides, list):
            for o in overrides:
                if isinstance(o, dict) and {"oracle", "branch", "param", "value"} <= set(o):
                    assigns.append(f"{o['oracle']}.{o['branch']}.{o['param']}={o['value']}")
        return plugins, assigns

    def probe_records(self) -> list[dict]:
        """The convention probe's records of the run (``conventions.jsonl``; [] when it was not run)."""
        from nsaconf.cases.vocabulary import CONVENTIONS_FILE

        path = Path(self.out_dir) / CONVENTIONS_FILE
        return read_jsonl(path)[0] if path.is_file() else []

    @property
    def verdict(self) -> str:
        """FAIL if any cell FAILed/ERRORed/CRASHed/TIMEOUTed, PASS if something passed, else what happened."""
        c = self.counts
        if not self.records:
            return "NO RESULTS"
        if any(r.is_bad for r in self.records):
            return "FAIL"
        if c.get("PASS"):
            return "PASS"
        return "ALL SKIPPED"


# -------------------------------------------------------------------------------------- helpers
_NONFINITE = {"inf": math.inf, "+inf": math.inf, "-inf": -math.inf, "nan": math.nan,
              "infinity": math.inf, "-infinity": -math.inf}


def _diagnosis(v: Any) -> Optional[dict]:
    """A record's ``diagnosis`` when it has the documented shape (a ``text`` string), else None."""
    if not isinstance(v, dict) or not isinstance(v.get("text"), str):
        return None
    return {"key": str(v.get("key") or ""), "matched": v.get("matched") is True,
            "variants": [x for x in v.get("variants") or [] if isinstance(x, dict)] if isinstance(v.get("variants"), list) else [],
            "nearest": v.get("nearest") if isinstance(v.get("nearest"), dict) else None, "text": v["text"]}


def _nonfinite(v: Any) -> Any:
    """Strict-JSON writers spell non-finite floats as strings ("inf", "-inf", "nan"): back to floats."""
    if isinstance(v, str) and v.strip().lower() in _NONFINITE:
        return _NONFINITE[v.strip().lower()]
    return v


def layer_rank(layer: str) -> tuple[int, str]:
    return (LAYERS.index(layer), "") if layer in LAYERS else (len(LAYERS), layer)


def branch_rank(branch: str) -> tuple[int, str]:
    return (BRANCH_ORDER.index(branch), "") if branch in BRANCH_ORDER else (len(BRANCH_ORDER), branch)


def group_rank(group: str) -> tuple[int, str]:
    dt, _, mask = group.partition(" · ")
    return (DTYPE_ORDER.index(dt) if dt in DTYPE_ORDER else len(DTYPE_ORDER), dt,
            MASK_ORDER.index(mask) if mask in MASK_ORDER else len(MASK_ORDER), mask)


def metric_rank(name: str) -> tuple[int, str]:
    return (METRIC_ORDER.index(name), "") if name in METRIC_ORDER else (len(METRIC_ORDER), name)


def bad_sort_key(r: CellRecord) -> tuple:
    """Failures first by status severity (worst first), then in report order."""
    return (-r.severity,) + r.sort_key()


def one_line(text: Optional[str], limit: int = 240) -> str:
    """First meaningful line of a reason (the last line of a traceback), cut to ``limit`` characters."""
    if not text:
        return ""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    if not lines:
        return ""
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    if len(lines) > 1 and not lines[0].startswith("Traceback"):
        line += " …"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def fmt_num(v: Any, kind: str = "g") -> str:
    """Stable short text for a metric value (``inf``/``nan`` spelled out; lists as ``a, b, c``)."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if kind == "e":
            return f"{v:.3e}"
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(fmt_num(x, kind) for x in v) + ")"
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


def fmt_metric(name: str, v: Any) -> str:
    return fmt_num(v, "e" if name in ("max_abs_err", "baseline_err", "bound", "floor") else "g")


# -------------------------------------------------------------------------------------- loading
def load(out_dir: str | Path) -> Results:
    """Read ``out_dir/results.jsonl`` (or the given results file) and ``run.json`` next to it when present."""
    out_dir = Path(out_dir)
    if out_dir.is_file():  # the results file itself was given
        path, out_dir = out_dir, out_dir.parent
    else:
        path = out_dir / RESULTS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ReportError(f"cannot read results file {str(path)!r}: {e.strerror}") from None
    records, malformed = _parse_lines(text.splitlines())
    by_key: dict[tuple, CellRecord] = {}
    for r in records:
        by_key[r.key] = r
    deduped = sorted(by_key.values(), key=CellRecord.sort_key)
    run_info = None
    run_path = out_dir / "run.json"
    if run_path.is_file():
        try:
            obj = json.loads(run_path.read_text(encoding="utf-8"))
            run_info = obj if isinstance(obj, dict) else {"run.json": obj}
        except (OSError, json.JSONDecodeError) as e:
            malformed.append((0, f"run.json unreadable: {e}"))
    return Results(out_dir=out_dir, records=deduped, malformed=malformed,
                   duplicates=len(records) - len(deduped), run_info=run_info)


def _parse_lines(lines: Iterable[str]) -> tuple[list[CellRecord], list[tuple[int, str]]]:
    records: list[CellRecord] = []
    malformed: list[tuple[int, str]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            malformed.append((n, f"not JSON: {e.msg} (column {e.colno})"))
            continue
        if not isinstance(obj, dict):
            malformed.append((n, f"a JSON {type(obj).__name__}, not an object"))
            continue
        missing = [k for k in ("case_id", "oracle", "status") if obj.get(k) in (None, "")]
        if missing:
            malformed.append((n, f"missing field(s) {', '.join(missing)}"))
            continue
        records.append(CellRecord.from_json(obj))
    return records, malformed


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """Side files (conventions.jsonl, bench.jsonl): the JSON-object lines and the count of bad lines."""
    good: list[dict] = []
    bad = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(obj, dict):
            good.append(obj)
        else:
            bad += 1
    return good, bad


# -------------------------------------------------------------------------------------- pandas
ID_COLUMNS = ("case_id", "oracle", "layer", "branch", "dtype", "device", "status", "reason", "seconds")


def to_frame(records: list[CellRecord]) -> pd.DataFrame:
    """One row per cell: id columns, then ``metric.*``, ``tolerance.*``, ``case.*`` (sorted), ``group``.

    Lists (``worst_index``) become ``b,pos,head`` text, dicts JSON; columns absent from a record are empty.
    """
    metric_keys = sorted({k for r in records for k in r.metrics}, key=metric_rank)
    tol_keys = sorted({k for r in records for k in r.tolerance})
    case_keys: list[str] = []
    for r in records:  # keep the Case field order of the first record that has each key
        case_keys += [k for k in r.case if k not in case_keys]
    rows = []
    for r in records:
        row: dict[str, Any] = {c: getattr(r, c) for c in ID_COLUMNS}
        row["group"] = r.group
        row.update({f"metric.{k}": _cell(r.metrics.get(k)) for k in metric_keys})
        row.update({f"tolerance.{k}": _cell(r.tolerance.get(k)) for k in tol_keys})
        row.update({f"case.{k}": _cell(r.case.get(k)) for k in case_keys})
        rows.append(row)
    columns = list(ID_COLUMNS) + ["group"] + [f"metric.{k}" for k in metric_keys] + \
        [f"tolerance.{k}" for k in tol_keys] + [f"case.{k}" for k in case_keys]
    return pd.DataFrame(rows, columns=columns)


def _cell(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, default=str)
    return v


def write_csv(records: list[CellRecord], path: Path) -> Path:
    """``results.csv``: ``to_frame`` with ``\\n`` line ends (byte-identical on rebuild)."""
    to_frame(records).to_csv(path, index=False, lineterminator="\n")
    return path


def results_frame(out_dir: str | Path) -> pd.DataFrame:
    """``DIR/results.jsonl`` as a DataFrame (see ``to_frame``)."""
    return to_frame(load(out_dir).records)
