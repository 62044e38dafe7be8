"""Result records: one self-contained JSON object per cell (case x oracle x branch), streamed to
``DIR/results.jsonl`` (append, flushed per line: results already written are never lost)."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from nsaconf.cases.vocabulary import BAD_STATUSES, RESULTS_FILE, STATUSES  # noqa: F401 (BAD_STATUSES re-exported)


@dataclass
class CellResult:
    """One cell. ``metrics``: max_abs_err, baseline_err, floor, bound, err_ratio (=err/bound), rel_rms,
    mismatch_frac, worst_index [b, position, head], nonfinite, empty_rows, empty_rows_bad,
    topk_disagree, topk_ties, ...; ``tolerance``: rule, k, floor, source, text."""

    case_id: str
    case: dict[str, Any]
    oracle: str
    layer: str
    branch: str
    dtype: str
    device: str
    status: str
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    tolerance: dict[str, Any] = field(default_factory=dict)
    seconds: Optional[float] = None
    versions: dict[str, str] = field(default_factory=dict)
    timestamp: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")
        if not self.timestamp:
            self.timestamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.case_id, self.oracle, self.branch, self.device)

    def to_json(self) -> str:
        return json.dumps(_jsonable(asdict(self)), allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CellResult":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def _jsonable(x: Any) -> Any:
    """Strict JSON: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(x, float):
        if math.isfinite(x):
            return x
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


class ResultWriter:
    """Appends records to ``DIR/results.jsonl``, one line each, flushed and fsync'ed per line."""

    def __init__(self, out_dir: str | Path, resume: bool = False) -> None:
        self.path = Path(out_dir) / RESULTS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume and self.path.exists():  # a fresh run: keep the previous results beside it
            self.path.replace(self.path.with_name(RESULTS_FILE + ".prev"))
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as f:  # a run killed mid-line: start on a fresh line
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        else:
            torn = False
        self._f = open(self.path, "a", encoding="utf-8")
        if torn:
            self._f.write("\n")

    def write(self, rec: CellResult) -> None:
        self._f.write(rec.to_json() + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def iter_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of a results file (a directory means its ``results.jsonl``); a truncated last line
    (a run killed mid-write) is ignored."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_FILE
    if not p.exists():
        return
    with open(p, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def load_results(path: str | Path) -> list[CellResult]:
    return [CellResult.from_dict(d) for d in iter_records(path)]


def record_key(d: dict[str, Any]) -> tuple[str, str, str, str]:
    """A record's cell: (case_id, oracle, branch, device), as ``CellResult.key``."""
    return (d["case_id"], d["oracle"], d["branch"], d["device"])


def done_keys(path: str | Path) -> set[tuple[str, str, str, str]]:
    """Cells already recorded (for ``--resume``)."""
    return {record_key(d) for d in iter_records(path)}


def summarize(records: Iterable[CellResult | dict]) -> dict[str, int]:
    counts = {s: 0 for s in STATUSES}
    for r in records:
        s = r.status if isinstance(r, CellResult) else r["status"]
        counts[s] = counts.get(s, 0) + 1
    return counts


def merge_runs(dirs: list[Path], out: Path) -> int:
    """Merge the ``results.jsonl`` (one record per cell; a later directory wins a repeated cell),
    ``conventions.jsonl`` and ``run.json`` (commands, case counts, oracles; first directory's tolerance
    table and versions) of run directories into ``out``; returns the number of cells written.
    Raises ValueError naming a directory without results."""
    cells: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    conventions: list[str] = []
    infos: list[dict[str, Any]] = []
    for d in dirs:
        if not (Path(d) / RESULTS_FILE).exists():
            raise ValueError(f"{str(Path(d) / RESULTS_FILE)!r} does not exist")
        for r in iter_records(d):
            cells[record_key(r)] = r
        conv = Path(d) / "conventions.jsonl"
        if conv.exists():
            conventions += [ln for ln in conv.read_text(encoding="utf-8").splitlines() if ln.strip()]
        info = Path(d) / "run.json"
        if info.exists():
            try:
                infos.append(json.loads(info.read_text(encoding="utf-8")))
            except json.JSONDecodeError:
                pass
    out.mkdir(parents=True, exist_ok=True)
    with open(out / RESULTS_FILE, "w", encoding="utf-8") as f:
        for r in cells.values():
            f.write(json.dumps(r) + "\n")
    if conventions:
        (out / "conventions.jsonl").write_text("\n".join(conventions) + "\n", encoding="utf-8")
    if infos:
        merged = dict(infos[0])
        merged["command"] = [i.get("command") for i in infos]
        merged["merged_from"] = [str(d) for d in dirs]
        merged["n_cases"] = len({k[0] for k in cells})
        merged["oracles"] = sorted({o for i in infos for o in i.get("oracles", [])})
        merged.pop("shard", None)
        (out / "run.json").write_text(json.dumps(merged, indent=1) + "\n", encoding="utf-8")
    return len(cells)
