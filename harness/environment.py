"""What a result was measured with: the versions every record carries and the device it ran on.

The one place that collects them: ``nsaconf run`` (every cell and run.json), ``nsaconf masks`` (every probe
record) and ``nsaconf bench`` (every timing) call these; an oracle adds its own ``Oracle.versions()``.
"""
from __future__ import annotations

import platform

from nsaconf._version import __version__


def versions() -> dict[str, str]:
    """python, torch, the CUDA torch was built with (``none`` on a CPU build) and nsaconf."""
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": str(torch.version.cuda or "none"), "nsaconf": __version__}


def where(device: str) -> dict[str, str]:
    """``device``, the card's (or the CPU's) name and the torch version: kept with each probe record so that
    a report rendered later says where it was measured."""
    import torch

    on_gpu = device.startswith("cuda") and torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if on_gpu else (platform.processor() or "cpu")
    return {"device": device, "device_name": name, "torch": torch.__version__}
