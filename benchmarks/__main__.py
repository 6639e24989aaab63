"""``python -m benchmarks [speed|memory|spectrum|tasks ...] [--quick|--tiny] [--plot] [--out DIR]``."""

import sys

from benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())
