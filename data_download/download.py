"""Resumable, verified HTTP downloads with the standard library only.

Multi-GB archives over flaky links are the norm for these datasets, so a download is written to
``NAME.part`` and resumed with an HTTP ``Range`` request after a dropped connection (within one run, with
retries and backoff, and across runs: re-running the same command picks the ``.part`` up). Only a file whose
checksum matches is renamed to ``NAME``; a file that fails its checksum is deleted, because resuming a corrupt
file can never repair it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from data_download.errors import FetchError

CHUNK = 1 << 20
#: Seconds before the first retry; doubled on every further one. Tests set it near zero.
RETRY_BACKOFF_S = 2.0
TIMEOUT_S = 60.0
USER_AGENT = "isl-kit-data-download/0.1 (+python-urllib)"
_TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}


def human_bytes(n: float) -> str:
    """``n`` bytes the way the progress bars write them (tqdm's formatting, decimal units: 38.0MB, 11.5GB)."""
    return tqdm.format_sizeof(n, "B")


def _existing_dir(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Free bytes on the disk that holds ``path`` (or its nearest existing parent)."""
    return shutil.disk_usage(_existing_dir(Path(path))).free


def same_disk(a: str | Path, b: str | Path) -> bool:
    return os.stat(_existing_dir(Path(a))).st_dev == os.stat(_existing_dir(Path(b))).st_dev


def check_free_space(path: str | Path, needed: int, what: str) -> None:
    """Refuse to start work that would fill the disk halfway through (a full disk corrupts more than it saves)."""
    free = free_bytes(path)
    if needed > free:
        raise FetchError(
            f"not enough free disk at {_existing_dir(Path(path))}: {what} needs about {human_bytes(needed)}, "
            f"only {human_bytes(free)} free; free some space or point --out/--cache at a bigger disk")


def hash_file(path: str | Path, algorithms: Iterable[str] = ("sha256",),
              progress: bool | None = None) -> dict[str, str]:
    """Hex digests of ``path`` for every algorithm in one pass (an 11 GB archive is read once, not twice)."""
    path = Path(path)
    # usedforsecurity=False: md5 here detects corruption, and FIPS builds refuse md5 without it
    hashers = {a: hashlib.new(a, usedforsecurity=False) for a in dict.fromkeys(algorithms)}
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, leave=False,
                                      desc=f"verify {path.name}", disable=_disable(progress)) as bar:
        while chunk := f.read(CHUNK):
            for h in hashers.values():
                h.update(chunk)
            bar.update(len(chunk))
    return {a: h.hexdigest() for a, h in hashers.items()}


def verify_file(path: str | Path, expected: str | None, algorithm: str, what: str,
                progress: bool | None = None) -> str:
    """Check ``path`` against ``expected`` (``algorithm``); return its sha256, which the dataset folder records."""
    digests = hash_file(path, {algorithm, "sha256"}, progress)
    if expected and digests[algorithm].lower() != expected.lower():
        raise FetchError(
            f"checksum mismatch for {what}: {algorithm} is {digests[algorithm]}, expected {expected.lower()}; "
            "the file is damaged or not the published release: download it again (if it keeps failing the "
            "file on the server changed, and --md5/--sha256 can pin the new value once you have checked it)")
    return digests["sha256"]


def _disable(progress: bool | None) -> bool | None:
    # tqdm's None means "only on a terminal", which keeps CI logs and test output clean.
    return None if progress is None else not progress


def _content_range_total(value: str | None) -> int | None:
    m = re.match(r"bytes\s+(?:\d+-\d+|\*)/(\d+)", value or "")
    return int(m.group(1)) if m else None


def _content_range_start(value: str | None) -> int | None:
    m = re.match(r"bytes\s+(\d+)-\d+/", value or "")
    return int(m.group(1)) if m else None


class _Incomplete(Exception):
    """The connection ended before the announced length: resume, do not give up."""


def download(url: str, dest: str | Path, expected: str | None, algorithm: str, *, retries: int = 5,
             progress: bool | None = None, timeout: float | None = None) -> str:
    """Download ``url`` to ``dest``, resuming ``dest.part``; verify; move into place; return the sha256.

    Retries (with exponential backoff) cover dropped connections, timeouts and 5xx/429 answers; an attempt
    that received bytes resets the count, so a long download on a bad link keeps going as long as it makes
    progress. A 4xx answer other than 408/429 stops at once: retrying a missing file does not help.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = 0
    last_error = ""
    total: int | None = None
    while True:
        offset = part.stat().st_size if part.exists() else 0
        received = 0
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            req = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(req, timeout=timeout or TIMEOUT_S) as resp:
                mode = "ab"
                if resp.status == 206:
                    start = _content_range_start(resp.headers.get("Content-Range"))
                    if start != offset:  # a server that answers another range than asked: start over
                        offset, mode = 0, "wb"
                        part.unlink(missing_ok=True)
                        continue
                    total = _content_range_total(resp.headers.get("Content-Range")) or total
                else:  # 200: the server ignored Range (or there was none): the body is the whole file
                    if offset:
                        print(f"  {url}: server does not resume (no Range support); starting over")
                    offset, mode = 0, "wb"
                    length = resp.headers.get("Content-Length")
                    total = int(length) if length else None
                with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                                 desc=dest.name, disable=_disable(progress)) as bar:
                    while True:
                        chunk = resp.read(CHUNK)
                        if not chunk:
                            break
                        f.write(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
            size = part.stat().st_size
            if total is not None and size < total:
                raise _Incomplete(f"connection closed at {size} of {total} bytes")
            if total is not None and size > total:
                part.unlink()
                raise _Incomplete(f"received {size} bytes, more than the announced {total}; starting over")
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset:
                # Range not satisfiable: either the .part is already complete or it is longer than the file.
                total = _content_range_total(e.headers.get("Content-Range"))
                if total is not None and offset == total:
                    break
                part.unlink(missing_ok=True)
                last_error = "HTTP 416 (partial file longer than the remote one; starting over)"
            elif e.code in _TRANSIENT_HTTP:
                last_error = f"HTTP {e.code} {e.reason}"
            else:
                raise FetchError(
                    f"HTTP {e.code} {e.reason} for {url}; the file may have moved: check the URL in "
                    "data_download/sources.py (or the --url you passed) and your access to it") from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, _Incomplete) as e:
            reason = getattr(e, "reason", None) or e
            last_error = str(e) if isinstance(e, _Incomplete) else f"{type(e).__name__}: {reason}"
        except OSError as e:  # not the network (urlopen wraps those in URLError): the local disk
            raise FetchError(f"cannot write {part}: {e}; check the free space and permissions of --cache") from None
        failures = 0 if received else failures + 1
        if failures > retries:
            raise FetchError(
                f"download of {url} failed after {retries + 1} tries without progress ({last_error}); "
                + (f"the partial file {part} is kept: re-run the same command to resume, or try later" if part.exists()
                   else "check the URL and the connection, or try later"))
        wait = RETRY_BACKOFF_S * (2 ** max(failures - 1, 0)) if failures else 0.0
        again = "resuming" if part.exists() and part.stat().st_size else "retrying"
        print(f"  {dest.name}: {last_error}; {again}{f' in {wait:.0f} s' if wait >= 1 else ''}")
        time.sleep(wait)

    try:
        sha256 = verify_file(part, expected, algorithm, f"{url} (downloaded to {part})", progress)
    except FetchError as e:
        part.unlink(missing_ok=True)  # a corrupt .part would be "resumed" forever
        raise FetchError(f"{e} (the damaged download was deleted)") from None
    os.replace(part, dest)
    return sha256
