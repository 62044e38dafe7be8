"""Loads the nsaconf pytest plugin (profile matrix items, gpu/slow markers)."""
pytest_plugins = ("harness.pytest_plugin",)
