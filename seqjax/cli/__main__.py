"""``python -m seqjax.cli``: the ``seqjax`` command."""

import sys

from seqjax.cli import main

if __name__ == "__main__":
    sys.exit(main())
