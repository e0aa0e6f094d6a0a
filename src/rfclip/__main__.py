"""``python -m rfclip ...`` runs the command line (same as the ``rfclip`` console script)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
