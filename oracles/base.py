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
import sys
from pathlib import Path
from typing import ClassVar, Iterable, Optional

import torch

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import Inputs
from nsaconf.cases.vocabulary import ALL_BRANCHES, DEVICES, DTYPES, GRAD_BRANCHES, LAYERS


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
      ``fixed_conventions``: for an implementation that computes one convention whatever the case says,
      the conventions it claims, e.g. ``{"cmp_mask": "end_inclusive", "window_keys": "w"}`` (None: it
      follows the case's ``cmp_mask``/``window_keys``). The receptive-field probe (``nsaconf masks``)
      probes it with these first and classifies from behaviour only; ``not_timed_by_default``: why
      ``nsaconf bench`` leaves the oracle out unless ``--oracles`` names it (None: timed).

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
        return self.supports(case, device)


_REGISTRY: dict[str, type[Oracle]] = {}


def register_oracle(cls: type[Oracle]) -> type[Oracle]:
    """Class decorator: validate the declaration and add the oracle to the registry."""
    if not (isinstance(cls, type) and issubclass(cls, Oracle)):
        raise OracleError(f"register_oracle expects an Oracle subclass, got {cls!r}")
    if not cls.name:
        raise OracleError(f"oracle class {cls.__name__} declares no name")
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


def load_plugin(path: str | Path) -> list[str]:
    """Import a plugin file; returns the names of the oracles it registered.
    Raises ``OracleError`` with one line naming the problem."""
    load_builtins()
    path = Path(path)
    if not path.is_file():
        raise OracleError(f"plugin file {str(path)!r} does not exist")
    if str(path.resolve()) in _PLUGINS:  # already imported in this process
        return _PLUGINS[str(path.resolve())]
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


def load_oracle_sources(plugins: Iterable[str | Path] = ()) -> list[str]:
    """Every source of oracles, in order: the built-ins, the plugin files (``--plugin``), the
    ``nsaconf.oracles`` entry points. Returns the names the plugins and entry points registered.
    The one loader of the CLI, the worker processes and the pytest plugin."""
    load_builtins()
    names = [n for p in plugins for n in load_plugin(p)]
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
