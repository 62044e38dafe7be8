"""nsaconf harness: runner, comparator, tolerance, probe and CLI."""
__version__ = "0.1.0"
