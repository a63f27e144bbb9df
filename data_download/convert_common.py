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
