"""``fetch``: obtain an archive, verify it, extract it safely, convert it, and put a dataset folder in place.

Order of work, and why:
1. a completed folder (marker present) ends the run at once: re-runs are free;
2. licence and citation are printed before any byte is downloaded: the user sees the terms first;
3. free disk is checked before a download and again before extraction (with the exact uncompressed size);
4. the archive is verified before it is opened: nothing unverified is ever extracted;
5. extraction and conversion happen in hidden temporary folders next to ``--out``; the dataset folder appears
   by one rename only when complete, so a failure at any step leaves no partial dataset.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from data_download import download as dl
from data_download.convert_common import ConvertContext
from data_download.dataset_folder import (
    MARKER,
    check_replaceable,
    commit,
    os_error_message,
    out_lock,
    read_marker,
    remove_stale_temporaries,
    temp_prefix,
    write_folder,
)
from data_download.errors import FetchError
from data_download.extract import check_members, list_members, safe_extract, selected_size
from data_download.sources import MSD_PANCREAS_N_SELECTED, SOURCE_NAMES, Source, get_source
from data_download.splits import apply_split, split_request

SYNAPSE_TOKEN_ENV = "SYNAPSE_AUTH_TOKEN"


@dataclass
class FetchOptions:
    """Everything ``isl data fetch`` can be asked; see ``cli.add_fetch_arguments`` for each flag's meaning."""

    source: str
    out: Path
    from_file: Path | None = None
    url: str | None = None
    md5: str | None = None
    sha256: str | None = None
    cache: Path | None = None
    keep_archive: bool = False
    dry_run: bool = False
    force: bool = False
    folds: int | None = None
    fold: int = 0
    seed: int = 0
    n_cases: int | None = None
    retries: int = 5
    progress: bool | None = None


def _converter(name: str):
    return importlib.import_module(f"data_download.convert_{name.replace('-', '_')}")


def _expected(src: Source, opts: FetchOptions) -> tuple[str, str]:
    if opts.md5 and opts.sha256:
        raise FetchError("pass either --md5 or --sha256, not both")
    if opts.sha256:
        return opts.sha256.lower(), "sha256"
    if opts.md5:
        return opts.md5.lower(), "md5"
    return src.checksum, src.algorithm


def describe_split(split: dict) -> str:
    if split["method"] == "kfold":
        extra = f", {split['n_cases']} cases" if split.get("n_cases") else ""
        older = "" if split.get("assignment") else ", folds dealt in the older sha256 order"
        return f"{split['folds']}-fold CV fold {split['fold']} (seed {split['seed']}{extra}{older})"
    return {"monai-btcv-tutorial": "MONAI BTCV tutorial split (24/6)", "single-case": "one case"}[split["method"]]


def print_terms(src: Source) -> None:
    print(f"== {src.name}: {src.title}")
    print(f"   licence : {src.licence} <{src.licence_url}>")
    print(f"   cite    : {src.citation}")
    for note in src.notes:
        print(f"   note    : {note}")


def _remote_size(url: str) -> int | None:
    """Content-Length from a HEAD request, for the disk check; ``None`` if the server will not say."""
    try:
        req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": dl.USER_AGENT})
        with urllib.request.urlopen(req, timeout=30) as resp:
            length = resp.headers.get("Content-Length")
            return int(length) if length else None
    except (urllib.error.URLError, OSError, ValueError):
        return None  # the GET that follows reports the real problem


def _synapse_client(src: Source):
    """(synapseclient module, token), checked before anything is written. The token comes from the environment
    only: a command-line argument is visible to other users in the process list and lands in shell history."""
    token = os.environ.get(SYNAPSE_TOKEN_ENV)
    if not token:
        raise FetchError(f"btcv needs a Synapse login: accept the challenge terms at {src.homepage}, create a "
                         f"personal access token and export {SYNAPSE_TOKEN_ENV}=..., or download {src.filename} "
                         "in a browser and pass --from-file PATH")
    try:
        import synapseclient  # optional: only this path needs it
    except ImportError:
        raise FetchError(f"btcv download needs synapseclient (`pip install synapseclient`), or download "
                         f"{src.filename} in a browser and pass --from-file PATH") from None
    return synapseclient, token


def _synapse_download(src: Source, dest_dir: Path) -> Path:
    """RawData.zip via synapseclient (which also checks the md5 Synapse stores for the file)."""
    synapseclient, token = _synapse_client(src)
    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        syn = synapseclient.Synapse()
        syn.login(authToken=token, silent=True)
        entity = syn.get(src.synapse_id, downloadLocation=str(dest_dir), ifcollision="overwrite.local")
    except Exception as e:  # synapseclient raises its own hierarchy; all mean the same to the user
        raise FetchError(f"Synapse download of {src.synapse_id} ({src.filename}) failed ({type(e).__name__}: {e}); "
                         f"check {SYNAPSE_TOKEN_ENV} and that you accepted the terms at {src.homepage}, or pass "
                         "--from-file PATH") from None
    return Path(entity.path)


def _pip_download(src: Source, dest_dir: Path, expected: str, algorithm: str) -> Path:
    """The pinned sdist through pip, so the user's index, proxy and certificate settings apply; pip also checks
    the sha256 pin (``--require-hashes``) before it builds the sdist's metadata."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    requirement = src.pypi_requirement
    if algorithm == "sha256" and expected:
        requirement += f" --hash=sha256:{expected}"
    req_file = dest_dir / "requirements.txt"
    req_file.write_text(requirement + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
           "--no-input", "-d", str(dest_dir), "-r", str(req_file)]
    if "--hash=" in requirement:
        cmd.append("--require-hashes")
    print(f"   pip download {src.pypi_requirement} (sdist, no dependencies)")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise FetchError(f"pip download {src.pypi_requirement} failed (exit {proc.returncode}): {tail}; check that "
                         f"PyPI is reachable (proxy, pip config), or get {src.filename} from {src.url} and pass "
                         "--from-file PATH")
    found = sorted(p for p in dest_dir.iterdir() if p.name.lower() == src.filename.lower())
    if not found:
        raise FetchError(f"pip download {src.pypi_requirement} finished but {src.filename} is not in {dest_dir}; "
                         "download it from PyPI and pass --from-file PATH")
    return found[0]


def _check_disk_before_download(src: Source, opts: FetchOptions, cache: Path, out: Path, url: str | None) -> None:
    size = (_remote_size(url) if url else None) or src.size
    part = cache / f"{src.filename}.part"
    remaining = max(size - (part.stat().st_size if part.exists() else 0), 0)
    after = int(src.disk_needed * size / src.size)  # scale the table's estimate when a mirror serves another size
    if dl.same_disk(cache, out.parent):
        dl.check_free_space(out.parent, remaining + after, f"downloading and converting {src.name}")
    else:
        dl.check_free_space(cache, remaining, f"downloading {src.filename}")
        dl.check_free_space(out.parent, after, f"converting {src.name}")


def _obtain_archive(src: Source, opts: FetchOptions, cache: Path, out: Path, expected: str,
                    algorithm: str) -> tuple[Path, str, bool]:
    """(archive path, its verified sha256, whether it sits in our cache and may be deleted afterwards)."""
    if opts.from_file:
        path = Path(opts.from_file).expanduser()
        if not path.is_file():
            raise FetchError(f"--from-file {path}: no such file; give the path of the downloaded {src.filename}")
        print(f"   verifying {path} ({algorithm})")
        return path, dl.verify_file(path, expected, algorithm, str(path), opts.progress), False
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / src.filename
    if final.is_file():  # kept from an earlier run (--keep-archive / --cache): re-verify, it may have rotted
        print(f"   using the cached {final}")
        try:
            return final, dl.verify_file(final, expected, algorithm, str(final), opts.progress), True
        except FetchError:
            print(f"   the cached {final.name} fails its checksum; deleting it and downloading again")
            final.unlink()
    url = opts.url or (src.url if src.method == "http" else None)
    _check_disk_before_download(src, opts, cache, out, url)
    if url:
        print(f"   downloading {url}\n   -> {final}")
        return final, dl.download(url, final, expected, algorithm, retries=opts.retries, progress=opts.progress), True
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{src.name}-"))
    try:
        if src.method == "synapse":
            got = _synapse_download(src, tmp)
        elif src.method == "pypi":
            got = _pip_download(src, tmp, expected, algorithm)
        else:
            raise FetchError(f"source {src.name} has no download method; pass --url or --from-file")
        sha256 = dl.verify_file(got, expected, algorithm, f"{src.filename} from {src.url}", opts.progress)
        os.replace(got, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, sha256, True


def _validate_options(src: Source, opts: FetchOptions) -> int | None:
    if opts.n_cases is not None and src.name != "msd-pancreas":
        raise FetchError("--n-cases applies to msd-pancreas only")
    if src.name == "sample" and opts.folds is not None:
        raise FetchError("the sample has one case: --folds does not apply")
    if opts.from_file and opts.url:
        raise FetchError("pass either --from-file or --url, not both")
    if opts.retries < 0:
        raise FetchError(f"--retries must be 0 or more (got {opts.retries})")
    if opts.folds is not None:
        if opts.folds < 2:
            raise FetchError(f"--folds must be at least 2 (got {opts.folds})")
        if not 0 <= opts.fold < opts.folds:
            raise FetchError(f"--fold must be in 0..{opts.folds - 1} for --folds {opts.folds} (got {opts.fold})")
    elif opts.fold:
        if src.name == "btcv":
            raise FetchError("--fold needs --folds K (btcv defaults to the MONAI 24/6 split)")
        if not 0 <= opts.fold < 5:
            raise FetchError(f"--fold must be in 0..4 for the default 5 folds (got {opts.fold})")
    if src.name == "msd-pancreas":
        n = MSD_PANCREAS_N_SELECTED if opts.n_cases is None else opts.n_cases
        if n < 2:
            raise FetchError(f"--n-cases must be at least 2 (got {n})")
        return n
    return None


def fetch(opts: FetchOptions) -> Path | None:
    """Fetch ``opts.source`` into the dataset folder ``opts.out``; return it (``None`` for ``--dry-run``).

    Raises ``FetchError`` with a one-line, actionable message on every failure.
    """
    if opts.source not in SOURCE_NAMES:
        raise FetchError(f"unknown source {opts.source!r}; choose one of {', '.join(SOURCE_NAMES)}")
    src = get_source(opts.source)
    out = Path(opts.out).expanduser().absolute()
    n_cases = _validate_options(src, opts)
    split = split_request(src.name, opts.folds, opts.fold, opts.seed, n_cases)
    expected, algorithm = _expected(src, opts)

    marker = read_marker(out) if out.is_dir() else None
    if marker is None or opts.force:
        check_replaceable(out)  # a file, or a folder the kit did not make, is refused with or without --force
    if marker is not None and not opts.force:
        if not marker.get("source"):
            raise FetchError(f"{out / MARKER}: unreadable completion marker; pass --force to rebuild {out}")
        if marker["source"] != src.name:
            raise FetchError(f"{out} already holds the {marker['source']} dataset; choose another --out (or --force "
                             "to replace it)")
        if marker.get("split") != split:
            raise FetchError(f"{out} already holds {src.name} with the {describe_split(marker['split'])}, not the "
                             f"{describe_split(split)}; pass --force to rebuild it or choose another --out")
        print(f"{out}: {src.name} is already in place (verified archive sha256 {marker.get('sha256')}); "
              "nothing to do (--force rebuilds it)")
        return out

    print_terms(src)
    cache = Path(opts.cache).expanduser().absolute() if opts.cache else out.parent / ".isl-cache"
    if opts.dry_run:
        _print_plan(src, opts, out, cache, expected, algorithm, split)
        return None
    if opts.md5 or opts.sha256:
        print(f"   WARNING: expected {algorithm} overridden on the command line: {expected}")

    if src.method == "synapse" and not (opts.from_file or opts.url):
        _synapse_client(src)  # fail on a missing token before creating any folder
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out_lock(out):  # also the first write: a read-only parent is reported before any download
            remove_stale_temporaries(out)
            return _fetch_into(src, opts, out, cache, split, n_cases, expected, algorithm)
    except OSError as e:  # the local disk (a full disk, a read-only folder): the network's errors are FetchErrors
        raise FetchError(os_error_message(e, out)) from None
    finally:
        if not opts.cache:
            try:
                cache.rmdir()  # the default cache goes when empty; a .part kept for resuming keeps it
            except OSError:
                pass


def _fetch_into(src: Source, opts: FetchOptions, out: Path, cache: Path, split: dict, n_cases: int | None,
                expected: str, algorithm: str) -> Path:
    archive, sha256, ours = _obtain_archive(src, opts, cache, out, expected, algorithm)
    conv = _converter(src.name)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=temp_prefix(out, "extract")))
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=temp_prefix(out, "partial")))
    try:
        members = list_members(archive)
        check_members(archive, members)
        needed = selected_size(members, conv.include)
        # HaN-Seg is re-encoded (NRRD -> NIfTI) so extraction and output coexist; the others are moved
        dl.check_free_space(out.parent, needed * (2 if src.name == "hanseg" else 1), f"extracting {archive.name}")
        print(f"   extracting {dl.human_bytes(needed)} from {archive.name}")
        safe_extract(archive, work, conv.include, progress=opts.progress, members=members)
        print("   converting")
        converted = conv.convert(ConvertContext(archive, work, staging, n_cases, opts.progress))
        training, validation = apply_split(split, list(converted.cases))
        provenance = {"name": src.name, "filename": src.filename, "url": opts.url or src.url,
                      "archive": str(archive) if opts.from_file else src.filename, "algorithm": algorithm,
                      "checksum": expected, "checksum_origin": "command line" if (opts.md5 or opts.sha256)
                      else src.checksum_origin, "sha256": sha256}
        write_folder(staging, src, converted, training, validation, split, provenance)
        commit(staging, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    if ours and not (opts.keep_archive or opts.cache):
        archive.unlink(missing_ok=True)
    print(f"done: {out} ({len(training)} training / {len(validation)} validation cases, {describe_split(split)})")
    print(f"   terms: {out / 'LICENSE.txt'}\n   cite : {out / 'CITATION.txt'}")
    return out


def _print_plan(src: Source, opts: FetchOptions, out: Path, cache: Path, expected: str, algorithm: str,
                split: dict) -> None:
    size = f"{'' if src.size_exact else 'about '}{dl.human_bytes(src.size)}"
    if opts.from_file:
        how = f"use the local file {opts.from_file}"
    elif opts.url or src.method == "http":
        how = f"download {opts.url or src.url} ({size}, resumable) to {cache / src.filename}"
    elif src.method == "synapse":
        how = (f"download {src.synapse_id} ({src.filename}, {size}) with synapseclient, token from ${SYNAPSE_TOKEN_ENV}"
               f" ({'set' if os.environ.get(SYNAPSE_TOKEN_ENV) else 'NOT set'}) to {cache / src.filename}")
    else:
        how = f"pip download {src.pypi_requirement} (sdist, {size}) to {cache / src.filename}"
    print("dry run: nothing is downloaded or written")
    print(f"   would {how}")
    print(f"   would verify {algorithm} {expected} and record the sha256")
    print(f"   would extract the needed members safely and convert them into {out}")
    print(f"   split: {describe_split(split)}")
    print(f"   disk: needs about {dl.human_bytes(src.size + src.disk_needed)} at peak; "
          f"{dl.human_bytes(dl.free_bytes(out.parent))} free at {out.parent}")
    if not (opts.keep_archive or opts.cache or opts.from_file):
        print("   the archive would be deleted after a successful conversion (--keep-archive keeps it)")
