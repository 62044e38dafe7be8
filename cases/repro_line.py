"""The ``nsaconf repro`` command line that reruns one case against one oracle: built here only (the reports,
``nsaconf.check`` messages and the pytest plugin print it). Torch-free, below every layer that prints it."""
from __future__ import annotations

import re
import shlex
from typing import Iterable

_PLAIN = re.compile(r"[A-Za-z0-9_./=+:,@%-]+")


def shell_word(w: str) -> str:
    """``w`` quoted for a POSIX shell only when needed (keeps the common command readable)."""
    return w if _PLAIN.fullmatch(w) else shlex.quote(w)


def repro_command(case_id: str, oracle: str, device: str = "cpu", plugins: Iterable[str] = (),
                  tol: Iterable[str] = ()) -> str:
    """``nsaconf repro CASE --oracles ORACLE [--device D] [--plugin P]... [--tol ORACLE.BRANCH.PARAM=V]...``"""
    words = ["nsaconf", "repro", case_id, "--oracles", oracle]
    if device and device != "cpu":
        words += ["--device", device]
    for p in plugins:
        words += ["--plugin", str(p)]
    for t in tol:
        words += ["--tol", t]
    return " ".join(shell_word(w) for w in words)
