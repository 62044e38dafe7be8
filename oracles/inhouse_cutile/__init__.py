"""In-house NSA forward kernels in cuTile (issue 6). ``kernels`` imports ``cuda.tile``; everything
else imports it lazily so that CPU machines can import the package."""
