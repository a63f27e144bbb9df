"""Output folders: what the kit may overwrite or delete there, and one run at a time in each.

Every output folder a command writes (``isl train``, ``predict``, ``evaluate``, ``experiment``, ``data synth``,
``data fetch``) carries a manifest, ``.isl_manifest.jsonl``: one JSON line per file the kit wrote there, with its
path relative to the folder and its sha256. A file is *the kit's* when the nearest manifest above it lists it with
the content it still has. The kit overwrites or deletes only such files; anything else in an output folder (a
user's notes, a file the user edited, a ``model.pt`` copied in by hand) makes the command refuse before any work,
naming the file.

``runtime.atomic_path`` records every file it writes into the nearest manifest above it, so a folder is claimed
once (``claim``) and every writer below it, in this process or on a Dask worker, keeps the manifest true. The
manifest is append-only (one short line per write, a single ``write`` call), so concurrent writers need no lock
and a killed run loses at most its last, unparseable line.

``lock`` holds ``.OUT.lock`` next to the folder while a command writes into it: a second command into the same
folder is refused with one line. This module sits below every module that writes results and imports nothing
of the kit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

MANIFEST = ".isl_manifest.jsonl"
_LOCK = re.compile(r"\..+\.lock")
_TEMP_TAG = re.compile(r"(?=\.[a-z0-9_]{8})")  # tempfile.mkstemp's 8 random characters


class OutputFolderError(Exception):
    """An output folder holds what the kit did not write, belongs to a running command, or lies inside a dataset.

    Printed as one line ``isl: error: ...`` (exit status 2); the message names the file and what to do.
    """


# ------------------------------------------------------------------------------------------- the temporaries
_TEMP = ".isl-tmp."  # the kit's own mark: a user's hidden file never looks like one of its temporaries


def temporary_prefix(path: Path) -> str:
    """Name prefix of the temporary ``runtime.atomic_path`` writes before renaming it onto ``path``."""
    return f"{_TEMP}{path.name}."


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is named like a temporary of ``atomic_path``: ``.isl-tmp.NAME.XXXXXXXX`` + a suffix of NAME."""
    name = path.name
    if not name.startswith(_TEMP):
        return False
    body = name[len(_TEMP):]
    for m in _TEMP_TAG.finditer(body):
        target, rest = body[: m.start()], body[m.start() + 9:]
        if target and target.endswith(rest):
            return True
    return False


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries a killed run left under ``folder``; only call with the folder's lock held."""
    stale = [p for p in _files(folder) if is_temporary(p)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# ---------------------------------------------------------------------------------------------- the manifest
def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest_root(path: Path) -> Path | None:
    """The folder of the nearest manifest at or above ``path``'s folder (``None``: no claimed folder holds it)."""
    folder = Path(os.path.abspath(path)).parent
    for candidate in (folder, *folder.parents):
        if (candidate / MANIFEST).is_file():
            return candidate
    return None


def _entries(root: Path) -> dict[str, str | None]:
    entries: dict[str, str | None] = {}
    try:
        lines = (root / MANIFEST).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return entries
    for line in lines:
        try:
            doc = json.loads(line)
            entries[str(doc["file"])] = doc["sha256"]
        except (ValueError, KeyError, TypeError):
            continue  # the last line of a killed run may be cut short; it recorded nothing then
    return entries


def _append(root: Path, rel: str, digest: str | None) -> None:
    line = json.dumps({"file": rel, "sha256": digest}) + "\n"
    fd = os.open(root / MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _rel(root: Path, path: Path) -> str:
    return Path(os.path.abspath(path)).relative_to(root).as_posix()


def record(path: Path) -> None:
    """Note ``path`` (just written by the kit) in the nearest manifest above it; nothing when there is none."""
    root = manifest_root(path)
    if root is not None:
        _append(root, _rel(root, path), sha256(path))


def owned(path: Path) -> bool:
    """Whether ``path`` is a file the kit wrote and nobody changed since (listed with this content)."""
    root = manifest_root(path)
    if root is None or not Path(path).is_file():
        return False
    digest = _entries(root).get(_rel(root, path))
    return digest is not None and digest == sha256(path)


def _refusal(path: Path, root: Path | None) -> OutputFolderError:
    where = f"{root / MANIFEST}" if root is not None else "no manifest of the kit above it"
    return OutputFolderError(f"{path}: the kit did not write this file, or it changed since ({where}); the kit "
                             "overwrites and deletes only its own files: move it out, or choose another --out")


def check_replaceable(path: Path) -> None:
    """Refuse to overwrite an existing ``path`` of a claimed folder unless it is the kit's (see ``owned``)."""
    path = Path(path)
    if path.exists() and manifest_root(path) is not None and not owned(path):
        raise _refusal(path, manifest_root(path))


def remove(path: Path) -> None:
    """Delete ``path`` if it is the kit's; a missing file is fine, anyone else's is refused."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not owned(path):
        raise _refusal(path, manifest_root(path))
    path.unlink()
    root = manifest_root(path)
    if root is not None:
        _append(root, _rel(root, path), None)


def remove_tree(folder: Path) -> None:
    """Delete every file under ``folder`` (all must be the kit's: checked first), then the empty folders."""
    files = _files(folder)
    foreign = [p for p in files if not (owned(p) or p.name == MANIFEST)]
    if foreign:
        raise _refusal(foreign[0], manifest_root(foreign[0]))
    for p in files:
        if p.name != MANIFEST:
            remove(p)
    for p in sorted((d for d in Path(folder).rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
        with contextlib.suppress(OSError):
            (p / MANIFEST).unlink(missing_ok=True)
            p.rmdir()
    with contextlib.suppress(OSError):
        (Path(folder) / MANIFEST).unlink(missing_ok=True)
        Path(folder).rmdir()


def _files(folder: Path) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()) if folder.is_dir() else []


def foreign_files(folder: Path) -> list[Path]:
    """Files under ``folder`` that are not the kit's (manifests and lock files aside)."""
    return [p for p in _files(folder) if p.name != MANIFEST and not _LOCK.fullmatch(p.name) and not owned(p)]


def record_tree(folder: Path) -> None:
    """Write a manifest of every file now under ``folder`` (a staging folder the kit filled by itself)."""
    folder = Path(folder).resolve()
    (folder / MANIFEST).touch()
    for p in _files(folder):
        if p.name != MANIFEST:
            _append(folder, _rel(folder, p), sha256(p))


def _start_manifest(out: Path) -> None:
    """Create ``out``'s manifest, or rewrite it with one line per file still there (it only grows otherwise)."""
    entries = {rel: d for rel, d in _entries(out).items() if d is not None and (out / rel).is_file()}
    tmp = out / f"{MANIFEST}.new"
    tmp.write_text("".join(json.dumps({"file": rel, "sha256": d}) + "\n" for rel, d in sorted(entries.items())))
    os.replace(tmp, out / MANIFEST)


# --------------------------------------------------------------------------------------------- claim and lock
def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def lock(out: Path, what: str = "command") -> Iterator[None]:
    """Hold ``.OUT.lock`` next to ``out`` while a command writes there; a second one into ``out`` is refused.

    The lock file goes when the command ends; the OS releases the lock of a killed run, so a stale file blocks
    nothing. After locking, the path is checked to still name the locked file: a run that ended in between may
    have removed it, and a lock on a removed file would exclude nobody.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; two commands into one folder at once are not guarded
        yield
        return
    path = lock_path(Path(os.path.abspath(out)))
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputFolderError(f"another {what} is writing into {out} (it holds {path}); wait for it to end, "
                                    "or choose another --out") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


@contextlib.contextmanager
def claim(out: Path, what: str = "command", only: Iterable[Path] | None = None) -> Iterator[Path]:
    """Lock ``out``, remove its stale temporaries and check that it holds only the kit's files; yields ``out``.

    ``only``: check just these paths (the files the command will write) instead of the whole folder, for a
    folder that may rightly hold other files (``isl evaluate`` writes its tables into a prediction folder that
    another tool may have made). Every file written below ``out`` while claimed is recorded in its manifest.
    """
    out = Path(os.path.abspath(out))
    with lock(out, what):
        out.mkdir(parents=True, exist_ok=True)
        if only is None:
            if (out / MANIFEST).is_file():  # a folder the kit has claimed before: its killed runs' leftovers
                remove_stale_temporaries(out)
            foreign = foreign_files(out)
            if foreign:
                raise _refusal(foreign[0], manifest_root(foreign[0]))
        else:
            for path in only:
                if Path(path).exists() and not owned(path):
                    raise _refusal(Path(path), manifest_root(Path(path)))
        if only is None or manifest_root(out / MANIFEST) != out:
            _start_manifest(out)
        yield out


def check_apart(out: Path, dataset: Path, option: str = "--out") -> None:
    """Refuse an output folder inside the dataset folder, or a dataset folder inside the output folder."""
    o, d = Path(os.path.abspath(out)).resolve(), Path(os.path.abspath(dataset)).resolve()
    if o == d or o.is_relative_to(d):
        raise OutputFolderError(f"{option} {out}: lies inside the dataset folder {dataset}; the kit never writes into "
                                "a dataset: choose an --out outside it")
    if d.is_relative_to(o):
        raise OutputFolderError(f"{option} {out}: holds the dataset folder {dataset}; choose an --out that does "
                                "not contain the dataset")
