"""HaN-Seg ``HaN-Seg.zip`` -> dataset folder.

The archive holds ``HaN-Seg/set_1/case_XX/`` with ``case_XX_IMG_CT.nrrd``, ``case_XX_IMG_MR_T1.nrrd`` (not used)
and one ``case_XX_OAR_<name>.seg.nrrd`` binary mask per delineated organ (up to 30). The CT is written as NIfTI
in RAS world coordinates (NRRD stores LPS, as DICOM does) and the masks are merged into one label map whose ids
come from the name table ``HANSEG_OARS`` in sources.py, never from file order.

Overlaps. Delineations of neighbouring organs may share voxels. Rule: the organ with fewer voxels in that case
keeps the shared voxels (ties: the lower label id). Small structures (cochleae, optic chiasm, pituitary) would
otherwise vanish under a large neighbour, and they are the ones whose Dice a single voxel changes. How many
voxels each organ lost is written to dataset.json (``overlaps``) so the rule is auditable.

A mask stored on a sub-grid of the CT (Slicer may crop a segmentation to its extent) is pasted into the CT
grid by its world coordinates; a mask on a rotated or rescaled grid is resampled by nearest neighbour.
"""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from data_download.convert_common import ConvertContext, Converted, case_destinations, rel
from data_download.errors import FetchError
from data_download.sources import HANSEG_OARS, SOURCES

_CT = re.compile(r"(^|/)(case_\d+)_IMG_CT\.nrrd$")
_OAR = re.compile(r"(^|/)(case_\d+)_OAR_(.+)\.seg\.nrrd$")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SPACE_FLIPS = {
    "left-posterior-superior": _LPS_TO_RAS, "lps": _LPS_TO_RAS,
    "right-anterior-superior": np.eye(4), "ras": np.eye(4),
    "left-anterior-superior": np.diag([-1.0, 1.0, 1.0, 1.0]), "las": np.diag([-1.0, 1.0, 1.0, 1.0]),
}
OAR_INDEX = {name: i + 1 for i, name in enumerate(HANSEG_OARS)}


def include(name: str) -> bool:
    """The CT and the OAR masks; the MR (not used) is left in the archive."""
    return bool(_CT.search(name) or _OAR.search(name))


def read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(3D voxel array, 4x4 RAS affine) of a NRRD file; 4D Slicer segmentations are collapsed to one mask."""
    import nrrd  # pynrrd: only this converter needs it

    try:
        data, header = nrrd.read(str(path))
    except Exception as e:  # pynrrd raises several types for a corrupt file
        raise FetchError(f"{path.name}: unreadable NRRD ({type(e).__name__}: {e}); the archive is damaged: "
                         "fetch it again") from None
    ndim = data.ndim
    if "space directions" in header:
        dirs = np.asarray(header["space directions"], dtype=float).reshape(ndim, -1)
        spatial = [i for i in range(ndim) if np.all(np.isfinite(dirs[i]))]
    else:  # no orientation stored: axis-aligned with the given (or unit) spacings
        spacings = np.asarray(header.get("spacings", [1.0] * ndim), dtype=float)
        spatial = [i for i in range(ndim) if np.isfinite(spacings[i])]
        dirs = np.zeros((ndim, 3))
        for k, i in enumerate(spatial[:3]):
            dirs[i, k] = spacings[i]
    if len(spatial) != 3:
        raise FetchError(f"{path.name}: expected 3 spatial axes, found {len(spatial)}; not a HaN-Seg volume")
    other = tuple(i for i in range(ndim) if i not in spatial)
    if other:  # a multi-layer segmentation: any non-zero layer is the organ
        data = np.any(data != 0, axis=other)
    affine = np.eye(4)
    affine[:3, :3] = dirs[spatial].T
    affine[:3, 3] = np.asarray(header.get("space origin", [0.0, 0.0, 0.0]), dtype=float)[:3]
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space not in _SPACE_FLIPS:
        raise FetchError(f"{path.name}: NRRD space {space!r} is not supported (LPS, RAS or LAS expected)")
    return data, _SPACE_FLIPS[space] @ affine


def resample_mask(mask: np.ndarray, mask_affine: np.ndarray, ct_shape: tuple[int, ...],
                  ct_affine: np.ndarray) -> np.ndarray:
    """``mask`` (bool) on the CT grid: a paste when the grids differ by whole voxels, else nearest neighbour."""
    m = np.linalg.inv(mask_affine) @ ct_affine  # CT voxel index -> mask voxel index
    rot, shift = m[:3, :3], m[:3, 3]
    mask = mask != 0
    if np.allclose(rot, np.eye(3), atol=1e-4) and np.allclose(shift, np.round(shift), atol=1e-3):
        t = np.round(shift).astype(int)
        out = np.zeros(ct_shape, dtype=bool)
        lo = np.maximum(0, -t)
        hi = np.minimum(np.asarray(ct_shape), np.asarray(mask.shape) - t)
        if np.all(hi > lo):
            out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = mask[lo[0] + t[0]:hi[0] + t[0], lo[1] + t[1]:hi[1] + t[1],
                                                              lo[2] + t[2]:hi[2] + t[2]]
        return out
    from scipy.ndimage import affine_transform

    return affine_transform(mask.astype(np.uint8), rot, offset=shift, output_shape=ct_shape, order=0,
                            mode="constant", cval=0).astype(bool)


def merge_masks(masks: dict[str, np.ndarray], shape: tuple[int, ...]) -> tuple[np.ndarray, dict[str, int]]:
    """One uint8 label map from per-organ boolean masks (ids from ``HANSEG_OARS``), and voxels lost per organ.

    Painted from the largest organ to the smallest, so the smaller organ keeps shared voxels (ties: lower id).
    """
    flat = {name: np.flatnonzero(m) for name, m in masks.items()}
    label = np.zeros(int(np.prod(shape)), dtype=np.uint8)
    for name in sorted(flat, key=lambda n: (-flat[n].size, -OAR_INDEX[n])):
        label[flat[name]] = OAR_INDEX[name]
    lost = {n: int(idx.size - np.count_nonzero(label[idx] == OAR_INDEX[n])) for n, idx in flat.items()}
    return label.reshape(shape), {n: v for n, v in lost.items() if v}


def convert_case(case_id: str, ct_path: Path, oar_paths: dict[str, Path], staging: Path) -> tuple[dict, dict]:
    ct, ct_affine = read_nrrd(ct_path)
    if ct.ndim != 3:
        raise FetchError(f"{ct_path.name}: the CT is not a 3D volume (shape {ct.shape})")
    masks = {}
    for name, path in oar_paths.items():
        data, affine = read_nrrd(path)
        masks[name] = resample_mask(data, affine, ct.shape, ct_affine)
    label, lost = merge_masks(masks, ct.shape)
    image_dest, label_dest = case_destinations(staging, case_id)
    # integer CTs keep their type (HU fit int16); a float CT stays float
    ct_img = nib.Nifti1Image(ct, ct_affine)
    ct_img.set_data_dtype(ct.dtype)
    nib.save(ct_img, str(image_dest))
    lab_img = nib.Nifti1Image(label, ct_affine)
    lab_img.set_data_dtype(np.uint8)
    nib.save(lab_img, str(label_dest))
    entry = {"image": rel(staging, image_dest), "label": rel(staging, label_dest)}
    return entry, lost


def convert(ctx: ConvertContext) -> Converted:
    cts: dict[str, Path] = {}
    oars: dict[str, dict[str, Path]] = {}
    for p in sorted(ctx.root.rglob("*.nrrd")):
        name = p.relative_to(ctx.root).as_posix()
        if m := _CT.search(name):
            cts[m.group(2)] = p
        elif m := _OAR.search(name):
            organ = m.group(3)
            if organ not in OAR_INDEX:
                raise FetchError(f"{ctx.archive}: {p.name} names organ {organ!r}, which is not in the HaN-Seg table "
                                 "HANSEG_OARS in data_download/sources.py; add it there (with a new id) if the "
                                 "release added an organ")
            oars.setdefault(m.group(2), {})[organ] = p
    if not cts:
        raise FetchError(f"{ctx.archive}: no case_XX_IMG_CT.nrrd inside; is it HaN-Seg.zip from Zenodo 7442914?")
    orphans = sorted(set(oars) - set(cts))
    if orphans:
        raise FetchError(f"{ctx.archive}: OAR masks without a CT for {', '.join(orphans)}; the archive is "
                         "incomplete: fetch it again")
    expected = SOURCES["hanseg"].n_cases
    if len(cts) != expected:
        print(f"  note: {len(cts)} cases found; the published HaN-Seg has {expected}")
    cases, overlaps = {}, {}
    for case_id in tqdm(sorted(cts), desc="convert HaN-Seg", unit="case", leave=False,
                        disable=None if ctx.progress is None else not ctx.progress):
        entry, lost = convert_case(case_id, cts[case_id], oars.get(case_id, {}), ctx.staging)
        cases[case_id] = entry
        if lost:
            overlaps[case_id] = lost
        for p in [cts[case_id], *oars.get(case_id, {}).values()]:
            p.unlink()  # free the extracted copy at once: the disk holds one case twice, not the whole set
    meta = {
        "overlap_rule": "where masks overlap, the organ with fewer voxels in that case keeps the voxel "
                        "(ties: lower label id)",
        "overlaps": {"voxels_lost_per_organ": overlaps},
        "mr_used": False,
    }
    return Converted(cases, meta)
