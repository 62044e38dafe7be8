"""The nsaconf pytest plugin (``nsaconf_cell`` items, gpu/slow markers). The installed entry point loads
it already; this line loads it where entry points are off (``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1``). pytest
registers it under its module name either way, so it is loaded once."""
pytest_plugins = ("nsaconf.harness.pytest_plugin",)
