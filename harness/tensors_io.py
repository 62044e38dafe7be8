"""The on-disk tensor contract of ``nsaconf run --save-tensors``.

``DIR/tensors/<case_id>/inputs.pt``: dict with ``q``, ``k``, ``v``, ``g_cmp``, ``g_slc``, ``g_swa``
(+ ``block_indices`` when the case has given indices);
``DIR/tensors/<case_id>/reference.pt``: the float64 truth (``nsa_reference`` in float64), dict of
canonical branch names -> tensors (CPU);
``DIR/tensors/<case_id>/oracles/<oracle>.pt``: each oracle's outputs, same keys.

Every path is resolved (symbolic links followed) and refused with ``ValueError`` unless it lies inside
``DIR``; missing folders are created.
"""
from __future__ import annotations

from pathlib import Path

import torch

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import Inputs


def tensor_path(out: Path, *parts: str) -> Path:
    """``out/tensors/<parts>``, resolved, its folder created; ``ValueError`` if it is not inside ``out``."""
    root = Path(out).resolve()
    path = root.joinpath("tensors", *parts).resolve()
    if root not in path.parents:
        raise ValueError(f"refusing to write {str(path)!r}: not inside the output folder {str(root)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save({k: v.detach().cpu() for k, v in tensors.items()}, path)
    return path


def save_inputs(out: Path, case: Case, inputs: Inputs) -> Path:
    return _save(inputs.as_dict(), tensor_path(out, case.id, "inputs.pt"))


def save_truth(out: Path, case: Case, truth: dict[str, torch.Tensor]) -> Path:
    return _save(truth, tensor_path(out, case.id, "reference.pt"))


def save_outputs(out: Path, case: Case, oracle: str, outputs: dict[str, torch.Tensor]) -> Path:
    return _save(outputs, tensor_path(out, case.id, "oracles", f"{oracle}.pt"))
