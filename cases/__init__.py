"""Canonical NSA cases: the shared vocabulary, the mask conventions, the case model and the generator.

``nsaconf.cases.vocabulary`` is torch-free; the other modules import torch (import them directly).
"""
