"""The oracle protocol and registry.

An oracle is anything that computes (some of) the NSA forward for a canonical case. It declares what
it is and what it supports; all translation (layouts, index padding/order, window length, gate form,
LSE base, scale) happens inside its ``run``. The runner never special-cases an oracle by name.

Registering a built-in is one decorator::

    @register_oracle
    class MyOracle(Oracle):
        name = "mine"; layer = "e2e"; branches = ("o",); devices = ("cpu",)
        def run(self, case, inputs, device): ...

Third parties add oracles from a Python file (``--plugin path.py``) or the entry-point group
``nsaconf.oracles`` (each entry point names an ``Oracle`` subclass or a module that registers some).
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import json
import re
import signal
import sys
import time
from pathlib import Path
from typing import ClassVar, Iterable, Optional

import torch

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import Inputs
from nsaconf.cases.vocabulary import ALL_BRANCHES, CONVENTION_DEFAULTS, DEVICES, DTYPES, GRAD_BRANCHES, LAYERS


_FORWARD_ONLY: "contextvars.ContextVar[bool]" = contextvars.ContextVar("nsaconf_forward_only", default=False)


@contextlib.contextmanager
def forward_only():
    """Inside this block oracles compute their forward branches only (``gradients_wanted`` is False);
    ``nsaconf bench`` times forward passes this way."""
    token = _FORWARD_ONLY.set(True)
    try:
        yield
    finally:
        _FORWARD_ONLY.reset(token)


def gradients_wanted(case: Case) -> bool:
    """Whether an oracle declaring gradient branches computes them for ``case``: the engine has a
    gradient truth for it (``grad_truth_skip_reason``) and no ``forward_only()`` block is active."""
    from nsaconf.oracles.reference import grad_truth_skip_reason
    return not _FORWARD_ONLY.get() and grad_truth_skip_reason(case) is None


class OracleError(Exception):
    """Unknown oracle, broken plugin or invalid declaration (one-line message)."""


class Oracle:
    """Base class of every oracle.

    Class attributes (the declaration):
      ``name``: unique id; ``layer``: ``reference`` | ``kernel`` | ``e2e``; ``branches``: which of
      ``ALL_BRANCHES`` it returns; ``devices``: subset of ``("cpu", "cuda")``; ``dtypes``: case dtypes it
      accepts; ``needs_block_indices``: a selection-only kernel that must be *given* block indices
      (the runner passes the truth's ``topk_idx`` for ``block_indices="topk"`` cases, the case's own
      random indices otherwise); ``description``: one line for ``nsaconf list``;
      ``fixed_conventions``: the conventions the implementation computes natively, whatever the case says
      (or an adapter translates), e.g. ``{"cmp_mask": "end_inclusive", "window_keys": "w"}`` (None: it
      follows the case's ``cmp_mask``/``window_keys``). The receptive-field probe (``nsaconf masks``)
      probes it with the claimed ``cmp_mask``/``window_keys`` first, sets its other claimed case fields
      (e.g. ``forced_blocks``) on the probe case, and classifies from behaviour only; ``not_timed_by_default``: why
      ``nsaconf bench`` leaves the oracle out unless ``--oracles`` names it (None: timed);
      ``supported_conventions``: for each field of ``CONVENTION_DEFAULTS`` (``group_importance``,
      ``gates``), the values the oracle computes; a field left out supports its default only. A case
      asking for another value SKIPs, with the reason, every declared branch that the field changes
      (``CONVENTION_BRANCHES``), so an adapter written before a field existed never runs it.

    Methods to override: ``run`` (required), ``supports`` (shape limits), ``availability``
    (missing package / checkout, with what to install or configure), ``versions`` (what it ran:
    package versions, checkout commits; recorded with every cell).
    """

    name: ClassVar[str] = ""
    layer: ClassVar[str] = "e2e"
    branches: ClassVar[tuple[str, ...]] = ("o",)
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    dtypes: ClassVar[tuple[str, ...]] = DTYPES
    needs_block_indices: ClassVar[bool] = False
    description: ClassVar[str] = ""
    fixed_conventions: ClassVar[Optional[dict[str, str]]] = None
    not_timed_by_default: ClassVar[Optional[str]] = None
    supported_conventions: ClassVar[dict[str, tuple[str, ...]]] = {}

    def availability(self) -> Optional[str]:
        """None when usable here, else why not and exactly how to enable it."""
        return None

    def versions(self) -> dict[str, str]:
        """Versions of what the oracle runs (package versions, checkout commits), e.g.
        ``{"fla-core": "0.6.0"}``; merged into every cell's ``versions`` (called once per worker)."""
        return {}

    def supports(self, case: Case, device: str) -> Optional[str]:
        """None when ``case`` is supported on ``device``, else a human reason (it becomes the SKIP reason)."""
        return None

    def branch_supports(self, case: Case, branch: str) -> Optional[str]:
        """None when the declared ``branch`` is computed for this (supported) case, else why not (that
        branch's cells SKIP with the reason; ``run`` need not return it)."""
        return None

    def run(self, case: Case, inputs: Inputs, device: str, block_indices: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Compute the declared branches in canonical layouts: ``*_o`` ``[B,TQ,HQ,DV]``, ``cmp_lse``
        ``[B,TQ,HQ]`` natural log (-inf where no block is visible), ``topk_idx`` ``[B,TQ,H,n]`` int
        (any order, -1 padding). ``inputs`` are in the case dtype on ``device``; ``block_indices`` is
        given iff ``needs_block_indices`` (canonical order, -1 last)."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------------------
    def check_support(self, case: Case, device: str) -> Optional[str]:
        """Availability, device, dtype and shape checks in one place (the runner calls this)."""
        why = self.availability()
        if why:
            return why
        if device not in self.devices:
            return f"{self.name} runs on {'/'.join(self.devices)}, not {device}"
        if case.dtype not in self.dtypes:
            return f"{self.name} supports dtypes {', '.join(self.dtypes)}, not {case.dtype}"
        return convention_support(self, case) or self.supports(case, device)


#: the branches whose value a convention field changes: the gates scale the branches in ``o`` (and so every
#: gradient of ``sum(o * dO)``); the group's importance picks the blocks (``topk_idx``, then ``slc_o``, ``o``
#: and the gradients through the selection; ``dg_cmp``/``dg_swa`` do not depend on it)
CONVENTION_BRANCHES: dict[str, tuple[str, ...]] = {
    "group_importance": ("topk_idx", "slc_o", "o", "dq", "dk", "dv", "dg_slc"),
    "gates": ("o",) + GRAD_BRANCHES,
}
assert tuple(CONVENTION_BRANCHES) == tuple(CONVENTION_DEFAULTS)


def _convention_reason(oracle: "Oracle | type[Oracle]", case: Case, branch: str) -> Optional[str]:
    """Why ``oracle``'s ``branch`` cannot be judged on ``case``: a convention field it does not compute
    changes that branch (None: it can). A selection kernel given its blocks (``needs_block_indices``) gets
    the truth's, picked under the case's ``group_importance``: that field changes none of its branches."""
    for field_name, default in CONVENTION_DEFAULTS.items():
        value = getattr(case, field_name)
        allowed = tuple(oracle.supported_conventions.get(field_name, (default,)))
        if value in allowed:
            continue
        if field_name == "group_importance" and oracle.needs_block_indices:
            continue
        if branch in CONVENTION_BRANCHES[field_name]:
            return (f"{oracle.name} computes {field_name} {' / '.join(allowed)}, not the case's {value} "
                    "(a convention it does not implement)")
    return None


def convention_support(oracle: "Oracle | type[Oracle]", case: Case, branch: Optional[str] = None) -> Optional[str]:
    """The SKIP reason when ``oracle`` does not compute the case's value of a ``CONVENTION_DEFAULTS`` field
    (``Oracle.supported_conventions``) that changes ``branch``; with no ``branch``, the reason when that holds
    for every declared branch (the whole case SKIPs), else None."""
    if branch is not None:
        return _convention_reason(oracle, case, branch)
    reasons = [_convention_reason(oracle, case, b) for b in oracle.branches]
    return reasons[0] if all(reasons) else None


_REGISTRY: dict[str, type[Oracle]] = {}
#: an oracle name is a safe identifier: it names files (``--save-tensors``), report anchors and CLI arguments
ORACLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
#: seconds a plugin file may take to import in the check process (``check_plugin_import``)
PLUGIN_IMPORT_TIMEOUT_S = 120.0


def register_oracle(cls: type[Oracle]) -> type[Oracle]:
    """Class decorator: validate the declaration and add the oracle to the registry."""
    if not (isinstance(cls, type) and issubclass(cls, Oracle)):
        raise OracleError(f"register_oracle expects an Oracle subclass, got {cls!r}")
    if not cls.name:
        raise OracleError(f"oracle class {cls.__name__} declares no name")
    if not isinstance(cls.name, str) or not ORACLE_NAME.fullmatch(cls.name) or ".." in cls.name:
        shown = repr(cls.name) if isinstance(cls.name, str) else f"of type {type(cls.name).__name__}"
        raise OracleError(f"oracle class {cls.__name__}: name {shown[:80]} is not a safe identifier (1 to 64 letters, "
                          "digits, '_', '.', '-', starting with a letter or '_', no '..')")
    if cls.layer not in LAYERS:
        raise OracleError(f"oracle {cls.name!r}: layer must be one of {LAYERS}, got {cls.layer!r}")
    bad = [b for b in cls.branches if b not in ALL_BRANCHES]
    if bad or not cls.branches:
        raise OracleError(f"oracle {cls.name!r}: unknown branches {bad}; known: {ALL_BRANCHES}")
    bad = [d for d in cls.devices if d not in DEVICES]
    if bad:
        raise OracleError(f"oracle {cls.name!r}: unknown devices {bad}")
    prev = _REGISTRY.get(cls.name)
    if prev is not None and prev.__qualname__ != cls.__qualname__:
        raise OracleError(f"oracle name {cls.name!r} registered twice ({prev.__module__}.{prev.__qualname__} and {cls.__module__}.{cls.__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_oracle(name: str) -> Optional[type[Oracle]]:
    """Remove oracle ``name`` from the registry (an ad-hoc oracle of ``nsaconf.check``); returns its class,
    None when no oracle has that name."""
    return _REGISTRY.pop(name, None)


def registry() -> dict[str, type[Oracle]]:
    load_builtins()
    return dict(_REGISTRY)


def get_oracle(name: str) -> Oracle:
    reg = registry()
    if name not in reg:
        raise OracleError(f"unknown oracle {name!r}; known oracles: {', '.join(sorted(reg))}")
    return reg[name]()


_BUILTINS_LOADED = False
_PLUGINS: dict[str, list[str]] = {}  # resolved plugin path -> oracles it registered


def load_builtins() -> None:
    """Import the built-in adapter modules (each registers its oracles)."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    import nsaconf.oracles.builtin  # noqa: F401  (registers by import)


def _plugin_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise OracleError(f"plugin file {str(path)!r} does not exist")
    return path


def load_plugin(path: str | Path, check_timeout: Optional[float] = PLUGIN_IMPORT_TIMEOUT_S) -> list[str]:
    """Import a plugin file; returns the names of the oracles it registered. A file not imported yet in
    this process is first imported in a check process (``check_plugin_import``) unless ``check_timeout``
    is None. Raises ``OracleError`` with one line naming the problem."""
    load_builtins()
    path = _plugin_file(path)
    if str(path.resolve()) in _PLUGINS:  # already imported in this process
        return _PLUGINS[str(path.resolve())]
    if check_timeout is not None:
        check_plugin_import([path], check_timeout)
    before = dict(_REGISTRY)
    mod_name = f"nsaconf_plugin_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise OracleError(f"plugin {str(path)!r} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except OracleError as e:
        raise OracleError(f"plugin {str(path)!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any failure of foreign code is reported, never raised raw
        raise OracleError(f"plugin {str(path)!r} failed to import: {type(e).__name__}: {e}") from None
    added = sorted(n for n, cls in _REGISTRY.items() if before.get(n) is not cls)  # new names, or a copy re-registered
    if not added:
        raise OracleError(f"plugin {str(path)!r} registered no oracle (decorate an Oracle subclass with @register_oracle)")
    _PLUGINS[str(path.resolve())] = added
    return added


def process_exit(code: Optional[int]) -> str:
    """How a child process ended, from its exit code (negative: the signal that killed it)."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name} (exit {code})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _check_import_main(conn, paths: list[str]) -> None:
    """The check process: import each plugin, reporting progress (JSON) so that the parent names the culprit."""
    for p in paths:
        conn.send_bytes(json.dumps({"importing": p}).encode())
        try:
            load_plugin(p, check_timeout=None)
        except OracleError as e:
            conn.send_bytes(json.dumps({"error": str(e)}).encode())
            return
    conn.send_bytes(json.dumps({"done": True}).encode())


def check_plugin_import(paths: Iterable[str | Path], timeout: float = PLUGIN_IMPORT_TIMEOUT_S) -> None:
    """Import the plugin files once in a short-lived process (multiprocessing spawn), each within ``timeout``
    seconds: a plugin whose import raises, crashes the process (``os._exit``, a signal) or hangs is one
    ``OracleError`` naming it, before the caller imports it in its own process."""
    import multiprocessing as mp

    paths = [str(Path(p).resolve()) for p in paths]
    if not paths:
        return
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_check_import_main, args=(send, paths), daemon=True, name="nsaconf-plugin-check")
    proc.start()
    send.close()
    current, deadline = paths[0], time.monotonic() + timeout
    try:
        while True:
            if not recv.poll(max(0.0, deadline - time.monotonic())):
                raise OracleError(f"plugin {current!r} hung while importing (no return within {timeout:g}s)")
            try:
                msg = json.loads(recv.recv_bytes(1 << 20))
            except (EOFError, OSError, ValueError):
                proc.join(10)
                raise OracleError(f"plugin {current!r} crashed while importing (the check process "
                                  f"{process_exit(proc.exitcode)})") from None
            if "importing" in msg:
                current, deadline = msg["importing"], time.monotonic() + timeout
            elif "error" in msg:
                raise OracleError(str(msg["error"]))
            else:
                return
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(10)
        recv.close()


def load_oracle_sources(plugins: Iterable[str | Path] = (), check_timeout: Optional[float] = PLUGIN_IMPORT_TIMEOUT_S) -> list[str]:
    """Every source of oracles, in order: the built-ins, the plugin files (``--plugin``), the
    ``nsaconf.oracles`` entry points. Returns the names the plugins and entry points registered.
    The plugin files not imported yet are first imported together in one check process
    (``check_plugin_import``) unless ``check_timeout`` is None (the workers: their parent checked).
    The one loader of the CLI, the worker processes and the pytest plugin."""
    load_builtins()
    plugins = [_plugin_file(p) for p in plugins]
    todo = [p for p in plugins if str(p.resolve()) not in _PLUGINS]
    if todo and check_timeout is not None:
        check_plugin_import(todo, check_timeout)
    names = [n for p in plugins for n in load_plugin(p, check_timeout=None)]
    return names + load_entry_points()


def load_entry_points() -> list[str]:
    """Load the ``nsaconf.oracles`` entry-point group; returns the names registered."""
    from importlib.metadata import entry_points

    load_builtins()
    before = set(_REGISTRY)
    for ep in entry_points(group="nsaconf.oracles"):
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001
            raise OracleError(f"entry point {ep.name!r} ({ep.value}) failed to load: {type(e).__name__}: {e}") from None
        if isinstance(obj, type) and issubclass(obj, Oracle) and obj.name not in _REGISTRY:
            register_oracle(obj)
    return sorted(set(_REGISTRY) - before)
