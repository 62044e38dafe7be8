"""The on-disk tensor contract of ``nsaconf run --save-tensors``.

``DIR/tensors/<case_id>/inputs.pt``: dict with ``q``, ``k``, ``v``, ``g_cmp``, ``g_slc``, ``g_swa``
(+ ``block_indices`` when the case has given indices);
``DIR/tensors/<case_id>/reference.pt``: the float64 truth (``nsa_reference`` in float64), dict of
canonical branch names -> tensors (CPU);
``DIR/tensors/<case_id>/oracles/<oracle>.pt``: each oracle's outputs, same keys.
"""
from __future__ import annotations

from pathlib import Path

import torch

from nsaconf.cases.model import Case
from nsaconf.cases.tensors import Inputs


def case_dir(out: Path, case: Case) -> Path:
    d = Path(out) / "tensors" / case.id
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_inputs(out: Path, case: Case, inputs: Inputs) -> Path:
    path = case_dir(out, case) / "inputs.pt"
    torch.save({k: v.detach().cpu() for k, v in inputs.as_dict().items()}, path)
    return path


def save_truth(out: Path, case: Case, truth: dict[str, torch.Tensor]) -> Path:
    path = case_dir(out, case) / "reference.pt"
    torch.save({k: v.detach().cpu() for k, v in truth.items()}, path)
    return path


def save_outputs(out: Path, case: Case, oracle: str, outputs: dict[str, torch.Tensor]) -> Path:
    (case_dir(out, case) / "oracles").mkdir(exist_ok=True)
    path = case_dir(out, case) / "oracles" / f"{oracle}.pt"
    torch.save({k: v.detach().cpu() for k, v in outputs.items()}, path)
    return path
