"""Oracle worker processes: one per (oracle, device), reused across cases (multiprocessing spawn).

Two requests: ``("run", case JSON, block indices or None)``: the worker materializes the inputs itself
(``materialize`` is deterministic), runs the oracle and sends back CPU tensors serialized with
``torch.save``; ``("call", fn, *args)``: the worker runs ``fn(oracle, device, *args)`` (a module-level
function, sent by name, e.g. the convention probe's ``harness.probe.serve_probe``) and sends back its
value as JSON text. A segfault, an abort, a poisoned CUDA context or a hang past the timeout kills only
the worker: the parent reports CRASH / TIMEOUT for that request (and the runner starts a fresh worker).
"""
from __future__ import annotations

import io
import json
import multiprocessing as mp
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

STARTUP_TIMEOUT_S = 180.0


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _setup(oracle_name: str, plugins: list[str], threads: int):
    from nsaconf.oracles.base import get_oracle, load_oracle_sources

    if threads > 0:
        torch.set_num_threads(threads)
    load_oracle_sources(plugins)
    return get_oracle(oracle_name)


def worker_main(conn, oracle_name: str, device: str, plugins: list[str], threads: int) -> None:
    """Process entry point: set up, then serve requests until ``None``."""
    try:
        oracle = _setup(oracle_name, plugins, threads)
        try:
            versions = {str(k): str(v) for k, v in dict(oracle.versions()).items()}
        except Exception as e:  # noqa: BLE001
            versions = {"versions_error": f"{type(e).__name__}: {e}"}
        conn.send(("ready", versions))
    except BaseException as e:  # noqa: BLE001
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        try:
            conn.send(_SERVE[msg[0]](oracle, device, *msg[1:]))
        except Exception as e:  # noqa: BLE001 - every oracle failure becomes an ERROR reply
            tb = traceback.format_exc(limit=-3)
            poisoned = False
            if device.startswith("cuda"):  # a sticky CUDA error poisons the context: exit, get restarted
                try:
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001
                    poisoned = True
            conn.send(("error", f"{type(e).__name__}: {e}".strip(), tb, poisoned))
            if poisoned:
                return
        finally:
            if device.startswith("cuda"):  # this request's tensors are gone: give their memory back
                release_cuda_cache()


def _serve_run(oracle, device: str, case_json: str, idx_bytes: Optional[bytes]) -> tuple:
    """``("ok", torch.save bytes of {branch: CPU tensor}, seconds)``."""
    from nsaconf.cases.model import Case
    from nsaconf.cases.tensors import materialize

    case = Case.from_json(case_json)
    inputs = materialize(case, device)
    idx = _loads(idx_bytes).to(device) if idx_bytes is not None else None
    t0 = time.perf_counter()
    out = oracle.run(case, inputs, device, block_indices=idx)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    if not isinstance(out, dict):
        raise TypeError(f"run() must return a dict of branch -> tensor, got {type(out).__name__}")
    cpu = {str(k): (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
    return ("ok", _dumps(cpu), secs)


def _serve_call(oracle, device: str, fn, *args) -> tuple:
    """``("json", JSON text of fn(oracle, device, *args), seconds)``."""
    t0 = time.perf_counter()
    value = fn(oracle, device, *args)
    return ("json", json.dumps(value, default=str), time.perf_counter() - t0)


_SERVE = {"run": _serve_run, "call": _serve_call}  # request kind -> handler(oracle, device, *body) -> reply


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


def _signal_name(code: Optional[int]) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name} (exit {code})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


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
        if not self.conn.poll(STARTUP_TIMEOUT_S):
            self.kill()
            return Reply("crash", message=f"worker for {self.oracle} did not start within {STARTUP_TIMEOUT_S:.0f}s")
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            code = self._reap()
            return Reply("crash", message=f"worker for {self.oracle} died while starting: {_signal_name(code)}")
        if msg[0] == "fatal":
            self.kill()
            self.fatal = msg[1]
            return Reply("fatal", message=f"worker set-up failed: {msg[1]}")
        self.versions = msg[1]
        self._ready = True
        return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def submit(self, case_json: str, block_indices: Optional[torch.Tensor]) -> Optional[Reply]:
        """Send one ``run`` request (starting the worker if needed); a Reply only if the worker cannot start."""
        payload = _dumps(block_indices.cpu()) if block_indices is not None else None
        return self._send(("run", case_json, payload))

    def submit_call(self, fn, *args) -> Optional[Reply]:
        """Send one ``call`` request: ``fn(oracle, device, *args)`` in the worker (``fn`` a module-level
        function, its value JSON-able); a Reply only if the worker cannot start."""
        return self._send(("call", fn, *args))

    def _send(self, msg: tuple) -> Optional[Reply]:
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
        except (BrokenPipeError, OSError):
            code = self._reap()
            return Reply("crash", message=f"worker {_signal_name(code)}")
        self._sent_at = time.monotonic()
        return None

    def deadline(self, timeout: float) -> float:
        """``time.monotonic()`` past which the last request is late."""
        return self._sent_at + timeout

    def collect(self, timeout: float) -> Reply:
        """Wait for the reply of the last request, at most ``timeout`` seconds from its submission."""
        left = max(0.0, self.deadline(timeout) - time.monotonic())
        then = " and restarted" if self.restart else ""
        try:
            ready = self.conn.poll(left)
        except (EOFError, OSError):
            ready = True
        if not ready:
            self.kill()
            return Reply("timeout", message=f"no result within {timeout:g}s (worker killed{then})",
                         seconds=time.monotonic() - self._sent_at)
        try:
            msg = self.conn.recv()
        except (EOFError, OSError, ConnectionResetError):
            code = self._reap()
            return Reply("crash", message=f"worker process {_signal_name(code)}" + (" (restarted)" if self.restart else ""),
                         seconds=time.monotonic() - self._sent_at)
        if msg[0] == "ok":
            try:
                return Reply("ok", outputs=_loads(msg[1]), seconds=msg[2])
            except Exception as e:  # noqa: BLE001
                return Reply("error", message=f"cannot decode the oracle's outputs: {type(e).__name__}: {e}")
        if msg[0] == "json":
            try:
                return Reply("ok", value=json.loads(msg[1]), seconds=msg[2])
            except ValueError as e:
                return Reply("error", message=f"cannot decode the worker's value: {e}")
        secs = time.monotonic() - self._sent_at
        if len(msg) > 3 and msg[3]:
            self._reap()
            return Reply("error", message=f"{msg[1]} (CUDA context poisoned: worker {'restarted' if self.restart else 'ended'})",
                         detail=msg[2], seconds=secs)
        return Reply("error", message=msg[1], detail=msg[2], seconds=secs)

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
