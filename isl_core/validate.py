"""The checks of one image or label file: every way a NIfTI file can break the kit, refused with one message naming it.

A file is read in two steps. ``open_volume`` parses the header only and refuses, before any voxel is read, a file
that is not 3-D, claims more voxels or bytes than the caps allow (a forged or damaged header must not make the kit
allocate gigabytes) or has an affine that is not finite or not invertible (no world geometry: resampling it would
end in an error deep inside MONAI or nibabel). ``read_volume`` then reads the voxels; ``check_case_files`` applies
the dataset contract to an image and its label map.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from isl_core.runtime import DatasetError

__all__ = ["MAX_BYTES", "MAX_LABEL_ID", "MAX_VOXELS", "check_case_files", "env_int", "open_volume", "read_volume"]

_AFFINE_ATOL_MM = 1e-3  # image and label may differ by float rounding in their headers, not by more

# Resource caps, checked before anything large is allocated. A forged header can claim any shape and a label id
# sets the size of every one-hot map, so both are bounded; a real dataset that needs more raises them through the
# environment variable named beside each (read at every check).
MAX_VOXELS = 2**29  # ISL_MAX_VOXELS: 537 M voxels (2 GiB as float32), e.g. 512 x 512 x 2048
MAX_BYTES = 2**31  # ISL_MAX_BYTES: 2 GiB of voxels in memory, as the header's data type (or float64 when scaled)
MAX_LABEL_ID = 255  # ISL_MAX_LABEL_ID: label ids 0..255 (predictions are written as uint8 up to this)
# Intensities beyond this overflow float32, the type every stage computes in (CT is within +-1e5 HU)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def env_int(env: str, default: int) -> int:
    """The integer environment variable ``env`` (at least 1), or ``default`` when unset."""
    raw = os.environ.get(env)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise DatasetError(f"environment variable {env}={raw!r}: not an integer") from None
    if value < 1:
        raise DatasetError(f"environment variable {env}={raw!r}: must be >= 1")
    return value


def _bytes_in_memory(img: nib.Nifti1Image, voxels: int) -> int:
    """What reading the voxels allocates: the stored type, or float64 when the header scales them."""
    itemsize = np.dtype(img.get_data_dtype()).itemsize
    slope, inter = getattr(img.dataobj, "slope", None), getattr(img.dataobj, "inter", None)
    scaled = not (slope in (None, 1) or math.isnan(slope)) or not (inter in (None, 0) or math.isnan(inter))
    return voxels * (8 if scaled else itemsize)


def _check_affine(img: nib.Nifti1Image, path: Path) -> None:
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise DatasetError(f"{path}: the header's affine (srow/qform) holds NaN or infinite values; the file has no "
                           "valid geometry: re-export it with its spacing and orientation")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DatasetError(f"{path}: the header's affine is singular (a zero spacing or a zero row); the file has "
                           "no valid geometry: re-export it with its spacing and orientation")


def open_volume(path: str | Path, role: str) -> nib.Nifti1Image:
    """The NIfTI image at ``path`` with only its header read, checked before any voxel is: it exists, parses, is
    3-D, holds at most ``ISL_MAX_VOXELS`` voxels and ``ISL_MAX_BYTES`` bytes, and has an invertible affine."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: {role} file not found; fix the path in dataset.json or restore the file")
    try:
        img = nib.load(str(path))  # parses the header only; voxels are read on demand
    except Exception as e:  # nibabel raises many types for corrupt files
        raise DatasetError(f"{path}: unreadable {role} ({type(e).__name__}: {e}); "
                           "re-export or re-download it") from None
    shape = tuple(int(n) for n in img.shape)
    if len(shape) != 3:
        raise DatasetError(f"{path}: expected a 3D volume, got shape {shape}; export a single-channel 3D image")
    cap = env_int("ISL_MAX_VOXELS", MAX_VOXELS)
    if min(shape) < 1 or math.prod(shape) > cap:
        raise DatasetError(f"{path}: the header declares shape {shape} ({math.prod(shape):,} voxels; at most "
                           f"{cap:,} allowed); the file is damaged or forged (raise ISL_MAX_VOXELS for a real "
                           "volume this large)")
    size, byte_cap = _bytes_in_memory(img, math.prod(shape)), env_int("ISL_MAX_BYTES", MAX_BYTES)
    if size > byte_cap:
        raise DatasetError(f"{path}: the header declares {shape} voxels of {img.get_data_dtype()}, {size:,} bytes in "
                           f"memory (at most {byte_cap:,} allowed); the file is damaged or forged (raise "
                           "ISL_MAX_BYTES for a real volume this large)")
    _check_affine(img, path)
    return img


def read_volume(path: str | Path, role: str) -> tuple[nib.Nifti1Image, np.ndarray]:
    """``open_volume`` plus all voxels (scaled as the header says); a truncated or corrupt file fails here."""
    img = open_volume(path, role)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel / gzip / zlib raise many types for corrupt files
        raise DatasetError(f"{path}: unreadable {role} ({type(e).__name__}: {e}); "
                           "re-export or re-download it") from None
    return img, data


def _check_intensities(path: Path, data: np.ndarray) -> None:
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise DatasetError(f"{path}: voxel type {data.dtype} is not a real number; save a scalar image")
    if not np.isfinite(data).all():
        n = int((~np.isfinite(data)).sum())
        raise DatasetError(f"{path}: {n} NaN/inf voxels; replace them (e.g. with the air value) before using the "
                           "image")
    peak = float(np.abs(data).max()) if data.size else 0.0
    if peak > _FLOAT32_MAX:
        raise DatasetError(f"{path}: intensities up to {peak:.3g} overflow the 32-bit floats the kit computes in "
                           f"(at most {_FLOAT32_MAX:.3g}); check the header's scaling (scl_slope) or rescale the image")


def check_case_files(image: Path, label: Path | None, labels: dict[int, str]) -> None:
    """Raise ``DatasetError`` naming the file if an image (and its label map) break the dataset contract."""
    img, data = read_volume(image, "image")
    _check_intensities(Path(image), data)
    if label is None:
        return
    lab, values = read_volume(label, "label")
    if lab.shape != img.shape:
        raise DatasetError(f"{label}: label shape {lab.shape} differs from image shape {img.shape} "
                           f"({Path(image).name}); resample the label onto the image grid")
    if not np.allclose(lab.affine, img.affine, atol=_AFFINE_ATOL_MM):
        raise DatasetError(f"{label}: label affine differs from the image affine of {Path(image).name}; "
                           "the label must be saved in the image's geometry (same origin, spacing, direction)")
    if not np.isfinite(values).all() or not np.all(np.equal(np.mod(values, 1), 0)):
        raise DatasetError(f"{label}: label values must be integers; save the label map as an integer type")
    unknown = sorted(set(np.unique(values).astype(int).tolist()) - set(labels))
    if unknown:
        raise DatasetError(f"{label}: label values {unknown} are not declared in dataset.json 'labels' "
                           f"(declared: {sorted(labels)}); declare them or remap the label map")
