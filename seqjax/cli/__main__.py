"""``python -m seqjax.cli``: the ``seqjax`` command."""

import sys

from seqjax.cli import main

sys.exit(main())
