"""A plugin that does not import (for the exit-2 test)."""
import this_module_does_not_exist  # noqa: F401
