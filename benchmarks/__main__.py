"""``python -m benchmarks [SUITE ...] [--quick|--tiny] [--plot] [--out DIR]`` (see ``benchmarks.cli``)."""

import sys

from benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())
