"""The one exception of the package: a failure the user can fix, worded as one line that names the file or URL."""

from __future__ import annotations


class FetchError(Exception):
    """A fetch, verification, extraction or conversion failed.

    The message is meant to be printed as is: it names the file or URL involved and says what to do
    next. The CLI prints it and exits with status 2; nothing half-written is left in ``--out``.
    """
