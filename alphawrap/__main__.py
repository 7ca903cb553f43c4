"""``python -m alphawrap``: the command-line tool (see :mod:`alphawrap.cli`)."""

import sys

from alphawrap.cli import main

if __name__ == "__main__":
    sys.exit(main())
