"""Import modules of an external checkout without running its package ``__init__`` files.

``import_from_checkout(root, ["pkg.sub.mod", ...], stubs=["pkg", "pkg.sub"])`` puts ``root`` first on
``sys.path``, registers each name in ``stubs`` as an empty package whose ``__path__`` is its folder under
``root`` (so that ``pkg/__init__.py``, which may import a whole library, is never executed), imports the
modules and returns them. ``isolate=True`` removes every module of the same top-level packages that is
already loaded (e.g. an installed ``fla``) for the duration of the import and puts them back afterwards:
the checkout's modules keep their own references, the rest of the process keeps the installed ones.
"""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import Iterable, Optional


def _stub(name: str, root: Path) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = [str(root.joinpath(*name.split(".")))]
    mod.__file__ = None
    mod.__package__ = name
    return mod


def import_from_checkout(root: Path, modules: Iterable[str], stubs: Iterable[str] = (), isolate: bool = False,
                         stub_attrs: Optional[dict[str, dict]] = None) -> list[types.ModuleType]:
    """The imported ``modules`` (see the module docstring); ``stub_attrs[name]`` are set on stub ``name``
    (e.g. the ``__version__`` the skipped ``__init__`` would define)."""
    modules, stubs = list(modules), list(stubs)
    tops = {m.split(".")[0] for m in modules + stubs}
    owned = lambda n: n.split(".")[0] in tops  # noqa: E731
    saved = {n: m for n, m in sys.modules.items() if owned(n)} if isolate else {}
    for n in saved:
        del sys.modules[n]
    sys.path.insert(0, str(root))
    try:
        for s in stubs:
            if s not in sys.modules:
                sys.modules[s] = _stub(s, root)
                for k, v in (stub_attrs or {}).get(s, {}).items():
                    setattr(sys.modules[s], k, v)
        out = [importlib.import_module(m) for m in modules]
    finally:
        sys.path.remove(str(root))
        if isolate:
            for n in [n for n in sys.modules if owned(n)]:
                del sys.modules[n]
            sys.modules.update(saved)
    return out


def checkout_versions(key: str, extra: Optional[dict] = None) -> dict:
    """``versions()`` of an oracle run from the configured checkout ``key``: its path and commit (and the
    commit warning, if any), torch, the flash-attn provider, triton when importable, then ``extra``."""
    import torch

    from nsaconf.oracles.compat import flash_attn_shim
    from nsaconf.oracles.config import checkout_status

    path, commit, warn = checkout_status(key)
    v = {f"{key}_checkout": str(path) if path else "missing", f"{key}_commit": commit or "unknown",
         "torch": torch.__version__, "flash_attn": flash_attn_shim.description()}
    try:
        import triton
        v["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    if warn:
        v[f"{key}_commit_warning"] = warn
    v.update(extra or {})
    return v
