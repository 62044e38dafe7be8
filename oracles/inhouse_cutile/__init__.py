"""In-house NSA forward kernels in cuTile: ``kernels`` (imports ``cuda.tile``), ``forward`` (the host side, imports
``cuda.tile`` lazily so that CPU machines can import the package), ``config`` (``KernelConfig``, the tuning),
``oracle`` (the two registered oracles) and ``compile_check`` (ahead-of-time compile of every kernel variant, a
kernel-development tool)."""
