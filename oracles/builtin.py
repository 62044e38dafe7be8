"""Imports every built-in adapter module; each registers its oracles with ``@register_oracle``.

Adapter modules must import their external packages lazily (inside ``availability``/``run``) so that
this import never fails on a machine without them.
"""
import importlib

BUILTIN_MODULES = (
    "nsaconf.oracles.reference_oracles",
    "nsaconf.oracles.inhouse_cutile.oracle",
    "nsaconf.oracles.fla",
    "nsaconf.oracles.tilelang",
    "nsaconf.oracles.nsa_impl",
    "nsaconf.oracles.flash_window",
    "nsaconf.oracles.flex",
    "nsaconf.oracles.xunhao",
    "nsaconf.oracles.fsa",
    "nsaconf.oracles.flash_nsa",
    "nsaconf.oracles.fla_main",
    "nsaconf.oracles.lucidrains",
    "nsaconf.oracles.attn_gym",
)

for _name in BUILTIN_MODULES:
    importlib.import_module(_name)
