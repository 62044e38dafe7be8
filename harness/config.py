"""The config file: ``nsaconf.toml`` in the working directory, or the file named by ``$NSACONF_CONFIG``
(or ``--config``). Sections::

    [tolerance]            # overrides of harness.tolerance (same keys as --tol)
    k = 2
    "fla.slc_o.k" = 3

    [oracles.<name>]       # adapter settings, e.g. checkout paths (read by the adapters)
    path = "external/nsa-impl"
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore

from nsaconf.harness.tolerance import ToleranceTable

CONFIG_ENV = "NSACONF_CONFIG"
CONFIG_FILE = "nsaconf.toml"


class ConfigError(ValueError):
    """Unreadable or malformed config file (one-line message)."""


def config_path(explicit: Optional[str] = None) -> Optional[Path]:
    """``explicit``, else ``$NSACONF_CONFIG``, else ``./nsaconf.toml``, else ``<repo>/nsaconf.toml``
    (the first that is given / exists)."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    for p in (Path.cwd() / CONFIG_FILE, Path(__file__).resolve().parents[1] / CONFIG_FILE):
        if p.exists():
            return p
    return None


def load_config(explicit: Optional[str] = None) -> dict[str, Any]:
    """The parsed config (``{}`` when there is none)."""
    p = config_path(explicit)
    if p is None:
        return {}
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {str(p)!r}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"malformed config {str(p)!r}: {e}") from None


def oracle_config(name: str, explicit: Optional[str] = None) -> dict[str, Any]:
    """The ``[oracles.<name>]`` section (for adapters)."""
    return dict(load_config(explicit).get("oracles", {}).get(name, {}))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def tolerance_table(cfg: dict[str, Any], cli_overrides: list[str], source_name: str = "config") -> ToleranceTable:
    """Defaults, then the config's ``[tolerance]`` section, then ``--tol`` overrides (CLI wins)."""
    table = ToleranceTable()
    for key, value in _flatten(cfg.get("tolerance", {})).items():
        table.set(key, value, source_name)
    for text in cli_overrides:
        table.set_from_string(text, "cli")
    return table
