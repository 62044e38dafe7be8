"""The version of nsaconf (one place; ``nsaconf.__version__`` and the package metadata read it)."""
__version__ = "0.2.0"
