"""Imports every built-in adapter module; each registers its oracles with ``@register_oracle``.

Adapter modules must import their external packages lazily (inside ``availability``/``run``) so that
this import never fails on a machine without them.
"""
import importlib

BUILTIN_MODULES = (
    "oracles.reference_oracles",
    "oracles.inhouse_cutile.oracle",
    "oracles.fla",
    "oracles.tilelang",
    "oracles.nsa_impl",
    "oracles.flash_window",
    "oracles.flex",
)

for _name in BUILTIN_MODULES:
    importlib.import_module(_name)
