"""``python -m data_download SOURCE --out DIR``: the same fetch as ``isl data fetch``."""

import sys

from data_download.cli import main

if __name__ == "__main__":
    sys.exit(main())
