"""A plugin whose import misbehaves as ``$NSACONF_HOSTILE_IMPORT`` says: ``exit`` (``os._exit(7)``),
``segv`` (a segfault), ``hang`` (sleeps 30 s); otherwise it registers ``hostile_import_ok``."""
from __future__ import annotations

import ctypes
import os
import time

from nsaconf.oracles.reference_oracles import ReferenceOracle
from nsaconf.oracles.base import register_oracle

HOW = os.environ.get("NSACONF_HOSTILE_IMPORT", "")
if HOW == "exit":
    os._exit(7)
elif HOW == "segv":
    ctypes.string_at(0)
elif HOW == "hang":
    time.sleep(30)


@register_oracle
class ImportOk(ReferenceOracle):
    name = "hostile_import_ok"
