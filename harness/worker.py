"""Oracle worker processes: one per (oracle, device), reused across cases (multiprocessing spawn).

Two requests: ``("run", case JSON, block indices spec or None)``: the worker materializes the inputs itself
(``materialize`` is deterministic), runs the oracle and sends its outputs back; ``("call", fn, *args)``: the
worker runs ``fn(oracle, device, *args)`` (a module-level function, sent by name, e.g. the convention probe's
``harness.probe.serve_probe``) and sends back its value as JSON. A segfault, an abort, a poisoned CUDA context
or a hang past the timeout kills only the worker: the parent reports CRASH / TIMEOUT for that request (and the
runner starts a fresh worker).

Everything the worker sends is data, never pickled objects (``send_message`` / ``recv_message``): one JSON
header, then the raw bytes of each tensor it lists (``WIRE_DTYPES``, read straight into tensors the receiver
allocates). An oracle output that is not a dict of str -> tensor is an error naming the key and type,
found in the worker (``plain_outputs``).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from nsaconf.oracles.base import process_exit

STARTUP_TIMEOUT_S = 180.0
MAX_HEADER_BYTES = 64 << 20
BODY_TIMEOUT_S = 600.0  # for a message's tensors once its header is in (the sender is done: it only writes)
WIRE_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool)}


class WireError(Exception):
    """A message that does not follow the wire format."""


def plain_outputs(out: Any) -> dict[str, torch.Tensor]:
    """An oracle's ``run()`` value as ``{branch: detached tensor}``; ``TypeError`` naming the offending key
    and type when it is not a dict of str -> strided tensor of a ``WIRE_DTYPES`` dtype."""
    if not isinstance(out, dict):
        raise TypeError(f"run() must return a dict of branch -> tensor, got {type(out).__name__}")
    res = {}
    for k, v in out.items():
        if type(k) is not str:
            raise TypeError(f"run() returned a key of type {type(k).__name__}; branch names are str")
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"run() returned {type(v).__name__} for branch {k!r}, not a torch.Tensor")
        if v.layout != torch.strided or str(v.dtype).removeprefix("torch.") not in WIRE_DTYPES:
            raise TypeError(f"run() returned a {v.layout} {v.dtype} tensor for branch {k!r}; "
                            f"expected a dense tensor of {', '.join(WIRE_DTYPES)}")
        res[k] = v.detach().as_subclass(torch.Tensor)
    return res


def _bytes_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, shared with it."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def send_message(conn, header: dict, tensors: Optional[dict[str, torch.Tensor]] = None) -> None:
    """One message: ``header`` (JSON-able, non-JSON values as ``str``) with ``tensors`` listed under its
    ``"tensors"`` key, then each tensor's raw bytes; each tensor is dropped from ``tensors`` once sent."""
    tensors = tensors if tensors is not None else {}
    specs = [{"key": k, "dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for k, v in tensors.items()]
    conn.send_bytes(json.dumps({**header, "tensors": specs}, default=str).encode())
    fd = conn.fileno()
    for spec in specs:
        t = tensors.pop(spec["key"]).detach().cpu().contiguous()
        buf, off = _bytes_view(t), 0
        while off < len(buf):
            off += os.write(fd, buf[off:])
        del t, buf


def _spec(spec: Any) -> tuple[str, torch.dtype, tuple[int, ...]]:
    if not (isinstance(spec, dict) and isinstance(spec.get("key"), str) and spec.get("dtype") in WIRE_DTYPES
            and isinstance(spec.get("shape"), list) and len(spec["shape"]) <= 8
            and all(type(s) is int and 0 <= s < 2**40 for s in spec["shape"])):
        raise WireError(f"malformed tensor spec {str(spec)[:200]}")
    return spec["key"], WIRE_DTYPES[spec["dtype"]], tuple(spec["shape"])


def recv_message(conn, deadline: Optional[float] = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The header and the tensors of one ``send_message``, each tensor read into memory allocated here
    (nothing is unpickled). ``WireError`` for a malformed message, ``TimeoutError`` when no header came by
    ``deadline`` (``time.monotonic()``) or the tensors did not follow within ``BODY_TIMEOUT_S``,
    ``EOFError`` / ``OSError`` when the peer went away."""
    if deadline is not None and not conn.poll(max(0.0, deadline - time.monotonic())):
        raise TimeoutError
    try:
        header = json.loads(conn.recv_bytes(MAX_HEADER_BYTES))
    except ValueError as e:  # JSON or UTF-8
        raise WireError(f"malformed header: {e}") from None
    if not (isinstance(header, dict) and isinstance(header.get("kind"), str) and isinstance(header.get("tensors"), list)):
        raise WireError("malformed header")
    fd = conn.fileno()
    deadline = None if deadline is None else time.monotonic() + BODY_TIMEOUT_S
    tensors: dict[str, torch.Tensor] = {}
    for spec in header["tensors"]:
        key, dtype, shape = _spec(spec)
        t = torch.empty(shape, dtype=dtype)
        buf, off = _bytes_view(t), 0
        while off < len(buf):
            if deadline is not None and not conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError
            n = os.readv(fd, [buf[off:]])
            if n == 0:
                raise EOFError
            off += n
        tensors[key] = t
    return header, tensors


def _setup(oracle_name: str, plugins: list[str], threads: int):
    from nsaconf.oracles.base import get_oracle, load_oracle_sources

    if threads > 0:
        torch.set_num_threads(threads)
    load_oracle_sources(plugins, check_timeout=None)  # the parent checked the plugins' import
    return get_oracle(oracle_name)


def worker_main(conn, oracle_name: str, device: str, plugins: list[str], threads: int) -> None:
    """Process entry point: set up, then serve requests until ``None``."""
    try:
        oracle = _setup(oracle_name, plugins, threads)
        try:
            versions = {str(k): str(v) for k, v in dict(oracle.versions()).items()}
        except Exception as e:  # noqa: BLE001
            versions = {"versions_error": f"{type(e).__name__}: {e}"}
        send_message(conn, {"kind": "ready", "versions": versions})
    except BaseException as e:  # noqa: BLE001
        send_message(conn, {"kind": "fatal", "message": f"{type(e).__name__}: {e}"})
        return
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        try:
            header, tensors = _SERVE[msg[0]](conn, oracle, device, *msg[1:])
        except Exception as e:  # noqa: BLE001 - every oracle failure becomes an ERROR reply
            header, tensors = _error_header(e, device), {}
        try:
            send_message(conn, header, tensors)
        except Exception:  # noqa: BLE001 - the header is out, not all its tensors: the stream is lost
            return
        del tensors
        if device.startswith("cuda"):  # this request's tensors are gone: give their memory back
            release_cuda_cache()
        if header.get("poisoned"):
            return


def _error_header(e: Exception, device: str) -> dict:
    """The ERROR reply of a failed request; ``poisoned`` when a sticky CUDA error ends the worker."""
    tb = traceback.format_exc(limit=-3)
    poisoned = False
    if device.startswith("cuda"):
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001
            poisoned = True
    return {"kind": "error", "message": f"{type(e).__name__}: {e}".strip(), "detail": tb, "poisoned": poisoned}


def _serve_run(conn, oracle, device: str, case_json: str, idx_header: Optional[dict]) -> tuple[dict, dict]:
    """The oracle's outputs: ``({"kind": "ok", "seconds"}, {branch: tensor})``."""
    from nsaconf.cases.model import Case
    from nsaconf.cases.tensors import materialize

    idx = recv_message(conn)[1]["block_indices"] if idx_header is not None else None
    case = Case.from_json(case_json)
    inputs = materialize(case, device)
    idx = idx.to(device) if idx is not None else None
    t0 = time.perf_counter()
    out = oracle.run(case, inputs, device, block_indices=idx)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    del inputs, idx
    return {"kind": "ok", "seconds": secs}, plain_outputs(out)


def _serve_call(conn, oracle, device: str, fn, *args) -> tuple[dict, dict]:
    """``fn(oracle, device, *args)``: ``({"kind": "json", "value", "seconds"}, {})``."""
    t0 = time.perf_counter()
    value = json.loads(json.dumps(fn(oracle, device, *args), default=str))
    return {"kind": "json", "value": value, "seconds": time.perf_counter() - t0}, {}


_SERVE = {"run": _serve_run, "call": _serve_call}  # request kind -> handler(conn, oracle, device, *body)


def release_cuda_cache() -> None:
    """Give cached, unused GPU memory back after each case (workers and the runner's truth): a GPU run
    has one worker process per oracle (and ``--shard`` runs multiply that), and caching allocators that
    keep every process's peak would exhaust the card between them."""
    try:
        torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - a poisoned context is reported by the next request
        pass


@dataclass
class Reply:
    """What came back for one request: status ok | error | crash | timeout | fatal; when ok, ``outputs``
    (run) or ``value`` (call)."""

    status: str
    outputs: Optional[dict[str, Any]] = None
    value: Any = None
    message: str = ""
    detail: str = ""
    seconds: Optional[float] = None


def _number(x: Any) -> Optional[float]:
    return float(x) if type(x) in (int, float) else None


@dataclass
class Worker:
    """Parent-side handle of one worker process (started lazily, restarted after a crash/timeout unless
    ``restart`` is False: a one-request worker, e.g. the convention probe's)."""

    oracle: str
    device: str
    plugins: list[str] = field(default_factory=list)
    threads: int = 0
    restart: bool = True
    proc: Any = None
    conn: Any = None
    versions: dict[str, str] = field(default_factory=dict)
    _sent_at: float = 0.0
    _ready: bool = False
    fatal: str = ""
    restarts: int = 0

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, self.oracle, self.device, list(self.plugins), self.threads),
                                daemon=True, name=f"nsaconf-{self.oracle}-{self.device}")
        self.proc.start()
        child.close()
        self.conn = parent
        self._ready = False

    def _await_ready(self) -> Optional[Reply]:
        if self._ready:
            return None
        try:
            header, _ = recv_message(self.conn, time.monotonic() + STARTUP_TIMEOUT_S)
        except TimeoutError:
            self.kill()
            return Reply("crash", message=f"worker for {self.oracle} did not start within {STARTUP_TIMEOUT_S:.0f}s")
        except (EOFError, OSError):
            code = self._reap()
            return Reply("crash", message=f"worker for {self.oracle} died while starting: {process_exit(code)}")
        except WireError as e:
            self.kill()
            return Reply("crash", message=f"worker for {self.oracle} sent a malformed message while starting: {e}")
        if header["kind"] != "ready":
            self.kill()
            self.fatal = str(header.get("message", header["kind"]))
            return Reply("fatal", message=f"worker set-up failed: {self.fatal}")
        versions = header.get("versions")
        self.versions = {str(k): str(v) for k, v in versions.items()} if isinstance(versions, dict) else {}
        self._ready = True
        return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def submit(self, case_json: str, block_indices: Optional[torch.Tensor]) -> Optional[Reply]:
        """Send one ``run`` request (starting the worker if needed); a Reply only if the worker cannot start."""
        if block_indices is None:
            return self._send(("run", case_json, None))
        return self._send(("run", case_json, {}), {"block_indices": block_indices})

    def submit_call(self, fn, *args) -> Optional[Reply]:
        """Send one ``call`` request: ``fn(oracle, device, *args)`` in the worker (``fn`` a module-level
        function, its value JSON-able); a Reply only if the worker cannot start."""
        return self._send(("call", fn, *args))

    def _send(self, msg: tuple, tensors: Optional[dict[str, torch.Tensor]] = None) -> Optional[Reply]:
        if self.fatal:
            return Reply("error", message=f"worker set-up failed: {self.fatal}")
        if not self.alive():
            if self.proc is not None:
                self.restarts += 1
            self.start()
        bad = self._await_ready()
        if bad is not None:
            return bad
        try:
            self.conn.send(msg)
            if tensors is not None:
                send_message(self.conn, {"kind": "tensors"}, dict(tensors))
        except OSError:
            code = self._reap()
            return Reply("crash", message=f"worker {process_exit(code)}")
        self._sent_at = time.monotonic()
        return None

    def deadline(self, timeout: float) -> float:
        """``time.monotonic()`` past which the last request is late."""
        return self._sent_at + timeout

    def collect(self, timeout: float) -> Reply:
        """Wait for the reply of the last request, at most ``timeout`` seconds from its submission."""
        then = " and restarted" if self.restart else ""
        try:
            header, tensors = recv_message(self.conn, self.deadline(timeout))
        except TimeoutError:
            self.kill()
            return Reply("timeout", message=f"no result within {timeout:g}s (worker killed{then})",
                         seconds=time.monotonic() - self._sent_at)
        except (EOFError, OSError):
            code = self._reap()
            return Reply("crash", message=f"worker process {process_exit(code)}" + (" (restarted)" if self.restart else ""),
                         seconds=time.monotonic() - self._sent_at)
        except (WireError, RuntimeError, MemoryError) as e:  # RuntimeError: a tensor it announced cannot be allocated
            self.kill()
            return Reply("error", message=f"cannot decode the worker's reply: {type(e).__name__}: {e} (worker killed{then})")
        kind, secs = header["kind"], _number(header.get("seconds"))
        if kind == "ok":
            return Reply("ok", outputs=tensors, seconds=secs)
        if kind == "json":
            return Reply("ok", value=header.get("value"), seconds=secs)
        secs = time.monotonic() - self._sent_at
        if kind != "error":
            self.kill()
            return Reply("error", message=f"unexpected reply {kind[:40]!r} from the worker (worker killed{then})", seconds=secs)
        message, detail = str(header.get("message", "")), str(header.get("detail", ""))
        if header.get("poisoned"):
            self._reap()
            return Reply("error", message=f"{message} (CUDA context poisoned: worker {'restarted' if self.restart else 'ended'})",
                         detail=detail, seconds=secs)
        return Reply("error", message=message, detail=detail, seconds=secs)

    def _reap(self) -> Optional[int]:
        if self.proc is None:
            return None
        self.proc.join(5)
        if self.proc.is_alive():
            self.kill()
        return self.proc.exitcode

    def kill(self) -> None:
        if self.proc is None or getattr(self.proc, "_popen", None) is None:
            return
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001
            pass

    def stop(self) -> None:
        if self.alive():
            try:
                self.conn.send(None)
                self.proc.join(5)
            except (BrokenPipeError, OSError):
                pass
        self.kill()


def collect_all(workers: list[Worker], timeout: float) -> Iterator[tuple[Worker, Reply]]:
    """The replies of each worker's last request in order of arrival, each at most ``timeout`` seconds
    from its own submission (``Worker.collect``: a late or dead worker gives its TIMEOUT / CRASH reply)."""
    from multiprocessing.connection import wait

    pending = list(workers)
    while pending:
        first = min(w.deadline(timeout) for w in pending)
        ready = wait([w.conn for w in pending], timeout=max(0.0, first - time.monotonic()))
        now = time.monotonic()
        for w in [w for w in pending if w.conn in ready or w.deadline(timeout) <= now]:
            pending.remove(w)
            yield w, w.collect(timeout)
