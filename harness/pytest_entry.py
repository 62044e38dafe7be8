"""The ``pytest11`` entry point ``nsaconf``: loads ``nsaconf.harness.pytest_plugin`` by its module name.

pytest registers a plugin under one name; this indirection keeps that name the module's, so that
``-p nsaconf.harness.pytest_plugin`` or ``pytest_plugins = ("nsaconf.harness.pytest_plugin",)`` beside the
installed entry point load the plugin once. ``-p no:nsaconf`` turns the entry point off.
"""
pytest_plugins = ("nsaconf.harness.pytest_plugin",)
