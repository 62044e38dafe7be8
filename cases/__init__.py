"""Canonical NSA cases: the case model, the mask conventions and the case generator."""
from cases.model import Case, CaseError, load_cases, dump_cases
from cases.tensors import Inputs, materialize

__all__ = ["Case", "CaseError", "Inputs", "materialize", "load_cases", "dump_cases"]
