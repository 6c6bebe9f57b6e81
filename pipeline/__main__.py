"""``python -m prunelab ...`` is the ``prunelab`` command (``pipeline.cli``)."""

import sys

from prunelab.cli import main

if __name__ == "__main__":
    sys.exit(main())
