"""``python -m diffbir_core INPUT... -o DIR``: the restore CLI (`diffbir_core.cli.main`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
