"""The dataset folder ``--out``: what may be replaced, the temporaries next to it, and writing it.

The marker is written last and names the sha256 of the verified archive: its presence is what makes a re-run
a no-op. A folder without it is never replaced, with or without ``--force``: it may hold anybody's work. A folder
with it is replaced (``--force``) only while it holds nothing but what the kit wrote there: the files of its
manifest (``isl_core.outputs``), each with the content the kit wrote. A case the user added, even one listed in
dataset.json, or an edited dataset.json, makes ``--force`` refuse.

While a fetch runs it holds the kit's lock file ``.OUT.lock`` next to ``--out``; with the lock held, the hidden
``.OUT.extract-*`` / ``.OUT.partial-*`` / ``.OUT.old-*`` folders that a killed run of the same ``--out`` left
behind are removed (no running fetch can own them).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_download.convert_common import Converted
from data_download.errors import FetchError
from data_download.sources import Source
from isl_core import outputs

MARKER = ".isl_fetch_complete.json"
FORMAT_VERSION = 1
#: The kinds of hidden temporary folder ``fetch`` and ``commit`` make next to ``--out`` (``tempfile.mkdtemp``
#: names: the prefix, then 8 characters).
TEMP_KINDS = ("extract", "partial", "old")


def read_marker(out: Path) -> dict[str, Any] | None:
    """The completion marker of ``out``; ``None`` when there is none, ``{}`` when it is there but unreadable."""
    path = Path(out) / MARKER
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def check_replaceable(out: Path) -> None:
    """Refuse to replace ``out`` unless it is empty or a folder the kit made that holds only the kit's files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FetchError(f"--out {out} is a file; choose a new or empty folder for --out")
    if not any(out.iterdir()):
        return
    if read_marker(out) is None:
        raise FetchError(f"--out {out} is a folder the kit did not make (no {MARKER}) and is never replaced; "
                         "choose a new or empty folder for --out")
    foreign = outputs.foreign_files(out)
    if foreign:
        raise FetchError(f"--out {out} holds {len(foreign)} file(s) the kit did not write (e.g. "
                         f"{foreign[0].relative_to(out)}: not in its {outputs.MANIFEST}, or changed since); move "
                         f"them out of {out} before rebuilding it")


def temp_prefix(out: Path, kind: str) -> str:
    """Name prefix of a hidden temporary folder of ``kind`` (one of ``TEMP_KINDS``) next to ``out``."""
    return f".{out.name}.{kind}-"


def stale_temporaries(out: Path) -> list[Path]:
    """Hidden temporary folders of this ``out`` (see ``TEMP_KINDS``) in its parent; only call with the lock held."""
    pattern = re.compile(rf"{re.escape(out.name)}\.(?:{'|'.join(TEMP_KINDS)})-[a-z0-9_]{{8}}")
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir()
                  if p.name.startswith(".") and pattern.fullmatch(p.name[1:]) and p.is_dir() and not p.is_symlink())


def remove_stale_temporaries(out: Path) -> None:
    for path in stale_temporaries(out):
        print(f"   removing {path.name}, left next to {out.name} by an interrupted fetch")
        shutil.rmtree(path)


@contextlib.contextmanager
def out_lock(out: Path) -> Iterator[None]:
    """Hold the kit's lock of ``out`` (``isl_core.outputs.lock``) while a fetch writes there; a second command
    into ``out`` is refused with a ``FetchError``."""
    try:
        with outputs.lock(out, "fetch"):
            yield
    except outputs.OutputFolderError as e:
        raise FetchError(str(e)) from None


def os_error_message(e: OSError, out: Path) -> str:
    """One line for a failed file operation, naming the path and the fix (``fetch`` turns OSError into this)."""
    where = e.filename or out.parent
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        return (f"{where}: no space left on the disk; nothing was put in {out}: free some space or point --out/--cache "
                "at a bigger disk, then run the same command again")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"{where}: {e.strerror or 'permission denied'}; check its permissions, or choose an --out (and "
                "--cache) in a folder you can write to")
    return f"{where}: {e.strerror or e}; check the folder and its disk, then run the same command again"


def licence_text(src: Source, provenance: dict[str, Any], extra: str = "") -> str:
    lines = [
        src.title,
        "",
        f"Licence / terms: {src.licence}",
        f"  {src.licence_url}",
        f"Source: {src.homepage}",
        f"Fetched from: {provenance.get('url') or provenance.get('archive')}",
        f"Archive sha256: {provenance['sha256']}",
        "",
        "These data are not part of isl-kit and are not covered by its licence. You are responsible for using",
        "them within the terms above; do not redistribute them where the terms forbid it.",
    ]
    if extra:
        lines += ["", "-" * 78, "Licence text shipped with the source:", "", extra.rstrip()]
    return "\n".join(lines) + "\n"


def citation_text(src: Source) -> str:
    return (f"If you use the {src.name} data, cite:\n\n{src.citation}\n\n"
            "and the inference-specific learning paper this kit reconstructs:\n\n"
            "Chen, Liu, Li, Han, Xing. Inference-specific learning for improved medical image segmentation. "
            "Medical Physics 2025. doi:10.1002/mp.17883\n")


def write_folder(staging: Path, src: Source, converted: Converted, training: list[str], validation: list[str],
                 split: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    """Write the metadata files into ``staging`` and return the dataset.json document."""
    doc: dict[str, Any] = {
        "name": src.name,
        "description": src.title,
        "reference": src.citation,
        "licence": f"{src.licence} ({src.licence_url})",
        "release": provenance.get("filename", src.filename),
        "tensorImageSize": "3D",
        "modality": {"0": src.modality},
        "labels": {str(k): v for k, v in sorted(src.labels.items())},
        "numTraining": len(training),
        "numValidation": len(validation),
        "training": [converted.cases[c] for c in training],
        "validation": [converted.cases[c] for c in validation],
        "split": {**split, "training": len(training), "validation": len(validation)},
        "source_sha256": provenance["sha256"],
        "source": provenance,
    }
    doc.update(converted.meta)
    (staging / "dataset.json").write_text(json.dumps(doc, indent=2) + "\n")
    (staging / "LICENSE.txt").write_text(licence_text(src, provenance, converted.licence_text))
    (staging / "CITATION.txt").write_text(citation_text(src))
    marker = {
        "format": FORMAT_VERSION,
        "source": src.name,
        "sha256": provenance["sha256"],
        "algorithm": provenance["algorithm"],
        "checksum": provenance["checksum"],
        "split": split,
        "cases": len(converted.cases),
        "completed": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    outputs.record_tree(staging)  # what the kit may later replace: exactly these files with this content
    return doc


def commit(staging: Path, out: Path) -> None:
    """Put the finished ``staging`` folder at ``out`` with renames, so ``out`` is never half-written.

    An existing ``out`` (only reached with --force, or when it is empty) is moved aside first and deleted
    only after the new folder is in place. It is checked again here: something may have been put into it
    while the archive was downloading.
    """
    check_replaceable(out)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's private 0700 would hide the dataset from other users
    if out.exists():
        if any(out.iterdir()):
            backup = Path(tempfile.mkdtemp(dir=out.parent, prefix=temp_prefix(out, "old")))
            backup.rmdir()
            os.rename(out, backup)
            os.rename(staging, out)
            shutil.rmtree(backup, ignore_errors=True)
            return
        out.rmdir()
    os.rename(staging, out)
