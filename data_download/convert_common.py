"""What every converter shares: its inputs, its result, and moving an image/label pair into the dataset layout."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from data_download.errors import FetchError


@dataclass
class ConvertContext:
    """Inputs of a converter: ``root`` holds the extracted archive members, ``staging`` becomes the dataset."""

    archive: Path
    root: Path
    staging: Path
    n_cases: int | None = None
    progress: bool | None = None


@dataclass
class Converted:
    """Result of a converter: case id -> {"image": relative path, "label": relative path}, extra dataset.json keys,
    and (optionally) the licence text that must travel with the data."""

    cases: dict[str, dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)
    licence_text: str = ""


def nifti_id(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else path.stem


def check_pair(image: Path, label: Path, archive: Path) -> None:
    """Header-only check (cheap: no voxel data is read) that an image and its label share one grid."""
    try:
        img, lab = nib.load(str(image)), nib.load(str(label))
    except Exception as e:  # nibabel raises many types for a corrupt header
        raise FetchError(f"{archive}: cannot read {image.name} / {label.name} ({type(e).__name__}: {e}); "
                         "the archive is damaged: delete it and fetch again") from None
    if img.shape[:3] != lab.shape[:3]:
        raise FetchError(f"{archive}: {label.name} has shape {lab.shape}, its image {image.name} {img.shape}; "
                         "this archive is not the published release: fetch it again")
    if not np.allclose(img.affine, lab.affine, atol=1e-3):
        print(f"  note: {label.name} and {image.name} differ in their affines by more than 1e-3 mm; kept as published")


def place(src: Path, dest: Path) -> Path:
    """Move ``src`` to ``dest``: a rename, since extraction and staging share a disk (a copy if they do not)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dest)
    except OSError:
        shutil.copyfile(src, dest)
    return dest


def rel(staging: Path, path: Path) -> str:
    return path.relative_to(staging).as_posix()


def stage_case(ctx: ConvertContext, image: Path, label: Path, label_hint: str) -> dict[str, str]:
    """Check an extracted image/label pair and move it into ``imagesTr/`` / ``labelsTr/`` under its archive name.

    Returns the dataset.json entry. ``label_hint`` names the missing label in the message, as the archive
    lays it out (e.g. ``Training/label/label0001.nii.gz``).
    """
    if not label.is_file():
        raise FetchError(f"{ctx.archive}: {image.name} has no label {label_hint}; the archive is incomplete: "
                         "fetch it again")
    check_pair(image, label, ctx.archive)
    image_dest = place(image, ctx.staging / "imagesTr" / image.name)
    label_dest = place(label, ctx.staging / "labelsTr" / label.name)
    return {"image": rel(ctx.staging, image_dest), "label": rel(ctx.staging, label_dest)}


def case_destinations(staging: Path, case_id: str) -> tuple[Path, Path]:
    """``imagesTr/ID.nii.gz`` and ``labelsTr/ID.nii.gz`` in ``staging``, their folders made, for a converter that
    writes new files (rather than moving the archive's own ones with ``stage_case``)."""
    paths = staging / "imagesTr" / f"{case_id}.nii.gz", staging / "labelsTr" / f"{case_id}.nii.gz"
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    return paths
