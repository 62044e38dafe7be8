"""The config file ``nsaconf.toml`` and the external checkouts the adapters load code from.

The config file is ``--config FILE``, else ``$NSACONF_CONFIG``, else ``./nsaconf.toml``, else
``<repo>/nsaconf.toml``. It is data: parsed as TOML, never executed. Sections::

    [tolerance]            # overrides of the tolerance table (same keys as --tol)
    k = 2
    "fla_naive.slc_o.k" = 3

    [oracles.<name>]       # adapter settings: the path of an external checkout
    path = "external/nsa-impl"

    [limits]               # what one case's float64 truth may need (run --max-memory, --max-work)
    max_memory = "8GB"
    max_work = 2e12

Any other top-level key, a section that is not a table or an unknown ``[limits]`` key is a ConfigError.

Lookup order for a checkout (``tilelang``, ``nsa_impl``, ``xunhao``, ``fsa``, ``flash_nsa``, ``fla_main``):

1. the environment variable (``NSACONF_TILELANG_EXAMPLES``, ``NSACONF_NSA_IMPL``, ``NSACONF_XUNHAO``,
   ``NSACONF_FSA``, ``NSACONF_FLASH_NSA``, ``NSACONF_FLA_MAIN``);
2. ``[oracles.<name>] path = "..."`` in the config file; a relative path is relative to the file's folder;
3. the default folder under ``<repo>/external/`` when it exists.

A checkout is the repository root (a git work tree, or a ``git archive`` of the pinned commit with a
``COMMIT`` file holding the full hash). External code is never vendored: it is only loaded from here.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore

CONFIG_ENV = "NSACONF_CONFIG"
CONFIG_FILE = "nsaconf.toml"
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Checkout:
    """One external source tree an adapter loads code from."""

    key: str            # nsaconf.toml section name: [oracles.<key>]
    env: str            # environment variable holding the path
    url: str            # where to get it
    commit: str         # pinned commit
    default: str        # default location under the repo
    marker: str         # a file that must exist under the checkout root
    paths: str = ""     # the folders a ``git archive`` needs (space-separated; default: the marker's first folder)


CHECKOUTS: dict[str, Checkout] = {
    "tilelang": Checkout("tilelang", "NSACONF_TILELANG_EXAMPLES", "https://github.com/tile-ai/tilelang",
                         "a35008a42531c62b976ae4cec3855d4383db0f3c", "external/tilelang",
                         "examples/deepseek_nsa/reference.py"),
    "nsa_impl": Checkout("nsa_impl", "NSACONF_NSA_IMPL", "https://github.com/tilde-research/nsa-impl",
                         "623e2c5a30a6979e1fc0cf264c09b66963b1e175", "external/nsa-impl", "nsa/nsa.py"),
    "xunhao": Checkout("xunhao", "NSACONF_XUNHAO", "https://github.com/XunhaoLai/native-sparse-attention-triton",
                       "9bea856c911ebf263be88d797fb28458f82f1d94", "external/native-sparse-attention-triton",
                       "native_sparse_attention/ops/triton/compressed_attention.py"),
    "fsa": Checkout("fsa", "NSACONF_FSA", "https://github.com/Relaxed-System-Lab/Flash-Sparse-Attention",
                    "1da34f35cb1884f4c35d3bfdf9e59ab6ae6e543a", "external/Flash-Sparse-Attention",
                    "fsa/ops/FSA_topk_sparse_attention.py", "fsa fsa_preview nsa_ref"),
    "flash_nsa": Checkout("flash_nsa", "NSACONF_FLASH_NSA", "https://github.com/mdy666/Scalable-Flash-Native-Sparse-Attention",
                          "fcf117c3c8a12e274aa75f2a01b0d12d76f44128", "external/Scalable-Flash-Native-Sparse-Attention",
                          "flash_nsa/ops/select_attn.py"),
    "fla_main": Checkout("fla_main", "NSACONF_FLA_MAIN", "https://github.com/fla-org/flash-linear-attention",
                         "bc3b101dcb713ddc5bd8924b66754eb68b5ccf89", "external/flash-linear-attention",
                         "fla/ops/nsa/parallel.py"),
}


class ConfigError(ValueError):
    """Unreadable or malformed config file (one-line message)."""


#: the top-level tables of the config file
SECTIONS = ("tolerance", "oracles", "limits")
LIMIT_KEYS = ("max_memory", "max_work")


def config_path(explicit: Optional[str] = None) -> Optional[Path]:
    """``explicit``, else ``$NSACONF_CONFIG``, else ``./nsaconf.toml``, else ``<repo>/nsaconf.toml``
    (the first that is given / exists)."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    for p in (Path.cwd() / CONFIG_FILE, REPO_ROOT / CONFIG_FILE):
        if p.exists():
            return p
    return None


def load_config(explicit: Optional[str] = None) -> dict[str, Any]:
    """The parsed config (``{}`` when there is none), its sections checked (``check_sections``)."""
    p = config_path(explicit)
    if p is None:
        return {}
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {str(p)!r}: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {str(p)!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"malformed config {str(p)!r}: {e}") from None
    except RecursionError:
        raise ConfigError(f"malformed config {str(p)!r}: nested too deeply") from None
    check_sections(data, str(p))
    return data


def check_sections(data: dict[str, Any], where: str) -> None:
    """ConfigError unless ``data`` holds only ``SECTIONS``, each a table: ``[oracles.<name>]`` tables with a
    string ``path``, ``[limits]`` with ``LIMIT_KEYS`` only."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(f"config {where!r}: {msg}")

    unknown = sorted(set(data) - set(SECTIONS))
    need(not unknown, f"unknown top-level key(s) {unknown}; known sections: {', '.join(f'[{s}]' for s in SECTIONS)}")
    for name in SECTIONS:
        section = data.get(name, {})
        need(isinstance(section, dict), f"'{name}' must be a table ([{name}]), got {type(section).__name__}")
    for key, table in data.get("oracles", {}).items():
        need(isinstance(table, dict), f"'oracles.{key}' must be a table ([oracles.{key}]), got {type(table).__name__}")
        need(isinstance(table.get("path", ""), str), f"[oracles.{key}] path must be a string")
    unknown = sorted(set(data.get("limits", {})) - set(LIMIT_KEYS))
    need(not unknown, f"unknown [limits] key(s) {unknown}; known: {', '.join(LIMIT_KEYS)}")


def _load_toml() -> tuple[dict[str, Any], Optional[Path]]:
    """The config file's contents and folder."""
    path = config_path()
    if path is None or not path.is_file():
        return {}, None
    return load_config(str(path)), path.resolve().parent


def checkout_path(key: str) -> tuple[Optional[Path], str]:
    """(path or None, where it came from / why missing). The path is returned only if its marker file exists."""
    co = CHECKOUTS[key]
    env = os.environ.get(co.env)
    if env:
        p = Path(env).expanduser()
        src = f"${co.env}"
    else:
        data, base = _load_toml()
        val = data.get("oracles", {}).get(key, {}).get("path")
        if val:
            p = Path(val).expanduser()
            if not p.is_absolute() and base is not None:
                p = base / p
            src = f"nsaconf.toml [oracles.{key}] path"
        else:
            p = REPO_ROOT / co.default
            src = f"default {co.default}"
    if (p / co.marker).is_file():
        return p.resolve(), src
    return None, f"{src} = {str(p)!r} has no {co.marker}"


def checkout_commit(path: Path) -> Optional[str]:
    """The commit of a checkout: ``git rev-parse HEAD`` in a work tree, else the ``COMMIT`` file."""
    if (path / ".git").exists():
        try:
            out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0:
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    f = path / "COMMIT"
    if f.is_file():
        return f.read_text().strip() or None
    return None


def how_to_enable(key: str) -> str:
    """The exact steps to provide a checkout (for ``availability`` / ``nsaconf list``)."""
    co = CHECKOUTS[key]
    sub = co.paths or co.marker.split("/")[0]
    return (f"get {co.url} @ {co.commit[:12]} (e.g. `git clone {co.url} {co.default} && git -C {co.default} checkout "
            f"{co.commit}`, or `git archive {co.commit} {sub} | tar -x -C {co.default}` plus a COMMIT file), then set "
            f"${co.env}=<checkout root> or `[oracles.{co.key}] path = \"<checkout root>\"` in nsaconf.toml "
            f"(default location: {co.default})")


def checkout_status(key: str) -> tuple[Optional[Path], Optional[str], Optional[str]]:
    """(path, commit, warning). ``path`` None means missing; warning names a commit mismatch."""
    path, _ = checkout_path(key)
    if path is None:
        return None, None, None
    commit = checkout_commit(path)
    pin = CHECKOUTS[key].commit
    warn = None
    if commit is None:
        warn = f"commit of {path} unknown (no .git, no COMMIT file); pinned {pin[:12]}"
    elif not commit.startswith(pin) and not pin.startswith(commit):
        warn = f"checkout {path} is at {commit[:12]}, pinned {pin[:12]}: results may differ"
    return path, commit, warn
