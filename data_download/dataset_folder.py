"""Writing the finished dataset folder: dataset.json, LICENSE.txt, CITATION.txt and the completion marker.

The marker is written last and names the sha256 of the verified archive: its presence is what makes a re-run
a no-op, so a folder without it is by definition unfinished.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from data_download.convert_common import Converted
from data_download.errors import FetchError
from data_download.sources import Source

MARKER = ".isl_fetch_complete.json"
FORMAT_VERSION = 1


def read_marker(out: Path) -> dict[str, Any] | None:
    path = Path(out) / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise FetchError(f"{path}: unreadable completion marker; pass --force to rebuild {out}") from None


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
    return doc


def commit(staging: Path, out: Path) -> None:
    """Put the finished ``staging`` folder at ``out`` with renames, so ``out`` is never half-written.

    An existing ``out`` (only reached with --force, or when it is empty) is moved aside first and deleted
    only after the new folder is in place.
    """
    if out.exists() and not out.is_dir():
        raise FetchError(f"{out} exists and is a file; choose another --out")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's private 0700 would hide the dataset from other users
    if out.exists():
        if any(out.iterdir()):
            backup = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            backup.rmdir()
            os.rename(out, backup)
            os.rename(staging, out)
            shutil.rmtree(backup, ignore_errors=True)
            return
        out.rmdir()
    os.rename(staging, out)
