"""``python -m nsaconf`` = the ``nsaconf`` command."""
import sys

from nsaconf.harness.cli import main

sys.exit(main())
