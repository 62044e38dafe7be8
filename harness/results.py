"""Result records: one self-contained JSON object per cell (case x oracle x branch), streamed to
``DIR/results.jsonl`` (append, flushed per line: results already written are never lost).

A run folder is owned by one nsaconf process at a time (``owned_run_folder``), and a fresh run into a
folder that holds results first moves them aside (``keep_previous``): nothing is overwritten or deleted."""
from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from nsaconf.cases.vocabulary import (BAD_STATUSES, CONVENTIONS_FILE, RESULTS_FILE, RUN_INFO_FILE,  # noqa: F401
                                      STATUSES)  # (BAD_STATUSES re-exported)

LOCK_FILE = ".nsaconf.lock"  # in a run folder while an nsaconf process owns it: its pid, host, start, command
#: the files of one run, moved aside together by ``keep_previous``
RUN_FILES = (RESULTS_FILE, RUN_INFO_FILE, CONVENTIONS_FILE)
#: the fields without which a line of results.jsonl is not a record (the reports count it as malformed)
RECORD_FIELDS = ("case_id", "oracle", "status")


@dataclass
class CellResult:
    """One cell. ``metrics``: max_abs_err, baseline_err, floor, bound, err_ratio (=err/bound), rel_rms,
    mismatch_frac, worst_index [b, position, head], nonfinite, empty_rows, empty_rows_bad,
    topk_disagree, topk_ties, ...; ``tolerance``: rule, k, floor, source, text; ``diagnosis``: on a
    FAIL cell, the alternative conventions its output matches (``harness.diagnosis``), else None."""

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
    error_map: Optional[dict[str, Any]] = None  # numeric FAILs: err/bound per (position bin, head) (harness.error_map)
    diagnosis: Optional[dict[str, Any]] = None  # FAIL cells: the convention it matches (harness.diagnosis)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")
        if not self.timestamp:
            self.timestamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.case_id, self.oracle, self.branch, self.device)

    def to_json(self) -> str:
        d = asdict(self)
        for optional in ("error_map", "diagnosis"):  # written only where there is one
            if d.get(optional) is None:
                d.pop(optional, None)
        return json.dumps(_jsonable(d), allow_nan=False)

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
        if not resume:
            keep_previous(self.path.parent)
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


def read_records(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a results file (a directory means its ``results.jsonl``) and the number of lines
    that are none: not JSON (a run killed mid-line), not an object, or without a ``RECORD_FIELDS`` value."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_FILE
    if not p.exists():
        return [], 0
    records, skipped = [], 0
    with open(p, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if isinstance(d, dict) and all(d.get(k) not in (None, "") for k in RECORD_FIELDS):
                records.append(d)
            else:
                skipped += 1
    return records, skipped


def iter_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of ``read_records`` (lines that are not records are left out)."""
    yield from read_records(path)[0]


def load_results(path: str | Path) -> list[CellResult]:
    return [CellResult.from_dict(d) for d in iter_records(path)]


def record_key(d: dict[str, Any]) -> tuple[str, str, str, str]:
    """A record's cell: (case_id, oracle, branch, device) as text, as ``CellResult.key`` (a missing one is "")."""
    return tuple("" if d.get(k) is None else str(d[k]) for k in ("case_id", "oracle", "branch", "device"))  # type: ignore[return-value]


def done_keys(path: str | Path) -> set[tuple[str, str, str, str]]:
    """Cells already recorded (for ``--resume``)."""
    return {record_key(d) for d in iter_records(path)}


def merge_runs(dirs: list[Path], out: Path) -> tuple[int, int]:
    """Merge the ``results.jsonl`` (one record per cell; a later directory wins a repeated cell),
    ``conventions.jsonl`` and ``run.json`` (commands, case counts, oracles; first directory's tolerance
    table and versions) of run directories into ``out``, its own earlier files kept by ``keep_previous``.
    Returns (cells written, lines of the inputs that are not records). Raises ValueError naming a
    directory without results."""
    cells: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    conventions: list[str] = []
    infos: list[dict[str, Any]] = []
    skipped = 0
    for d in dirs:
        if not (Path(d) / RESULTS_FILE).is_file():
            raise ValueError(f"{str(Path(d) / RESULTS_FILE)!r} does not exist")
        records, bad = read_records(d)
        skipped += bad
        for r in records:
            cells[record_key(r)] = r
        conv = Path(d) / CONVENTIONS_FILE
        if conv.is_file():
            conventions += [ln for ln in conv.read_text(encoding="utf-8").splitlines() if ln.strip()]
        info = Path(d) / RUN_INFO_FILE
        if info.is_file():
            try:
                obj = json.loads(info.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                infos.append(obj)
    keep_previous(out)
    with open(out / RESULTS_FILE, "w", encoding="utf-8") as f:
        for r in cells.values():
            f.write(json.dumps(r) + "\n")
    if conventions:
        (out / CONVENTIONS_FILE).write_text("\n".join(conventions) + "\n", encoding="utf-8")
    if infos:
        merged = dict(infos[0])
        merged["command"] = [i.get("command") for i in infos]
        merged["merged_from"] = [str(d) for d in dirs]
        merged["n_cases"] = len({k[0] for k in cells})
        merged["oracles"] = sorted({str(o) for i in infos if isinstance(i.get("oracles"), list) for o in i["oracles"]})
        merged.pop("shard", None)
        (out / RUN_INFO_FILE).write_text(json.dumps(merged, indent=1) + "\n", encoding="utf-8")
    return len(cells), skipped


# ------------------------------------------------------------------------------------------ run folders
class RunFolderError(Exception):
    """A run folder that is not a writable directory, or that another nsaconf process owns (one line)."""


def keep_previous(out: str | Path) -> Optional[str]:
    """Before a fresh run (or merge) writes a folder that holds results: move its ``RUN_FILES`` to the first
    suffix free for all of them, ``.prev``, ``.prev2``, ``.prev3``, ... (the highest number is the most
    recent; nothing is overwritten or deleted). Returns the suffix, or None when there were no results."""
    out = Path(out)
    if not os.path.lexists(out / RESULTS_FILE):
        return None
    n = 1
    while any(os.path.lexists(out / (f + _prev(n))) for f in RUN_FILES):
        n += 1
    for f in RUN_FILES:
        if os.path.lexists(out / f):
            (out / f).replace(out / (f + _prev(n)))
    return _prev(n)


def _prev(n: int) -> str:
    return ".prev" if n == 1 else f".prev{n}"


@contextmanager
def owned_run_folder(out: str | Path, command: str) -> Iterator[Path]:
    """Create ``out`` and own it for the ``with`` block: ``LOCK_FILE`` holds this process's pid, host, start
    time and ``command`` under an exclusive ``flock`` (the kernel releases it when the process dies, however).
    RunFolderError when ``out`` is not a writable directory or another process owns it (naming that one)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunFolderError(f"{str(out)!r} exists and is not a directory") from None
    except OSError as e:
        raise RunFolderError(f"cannot create {str(out)!r}: {e.strerror or e}") from None
    path = out / LOCK_FILE
    fd = _lock(path, out)
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        yield out
    finally:
        try:
            os.unlink(path)  # while still locked: a process that opened this file retries on the next one
        except OSError:
            pass
        os.close(fd)


def _lock(path: Path, out: Path) -> int:
    """An fd of ``path`` holding its exclusive lock (the file still at ``path``, not one being removed)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunFolderError(f"cannot write in {str(out)!r}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderError(f"{out} is in use by another nsaconf run ({_holder(path)})") from None
        except OSError as e:
            os.close(fd)
            raise RunFolderError(f"cannot lock {str(path)!r}: {e.strerror or e}") from None
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _holder(path: Path) -> str:
    """The owner recorded in a lock file, as text for the refusal."""
    try:
        h = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        h = None
    if not isinstance(h, dict):
        return "owner not recorded yet"
    return f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started {h.get('started', '?')}, command {h.get('command', '?')}"
