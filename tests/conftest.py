"""Loads the nsaconf pytest plugin (profile matrix items, gpu/slow markers)."""
pytest_plugins = ("nsaconf.harness.pytest_plugin",)
