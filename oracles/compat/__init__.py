"""Compatibility layers that let external NSA code run where its own dependencies are missing."""
