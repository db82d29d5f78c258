"""``python -m graphsurgeon``: the command line (`graphsurgeon.apps.cli`)."""
import sys

from graphsurgeon.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
