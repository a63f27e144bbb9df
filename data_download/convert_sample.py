"""TotalSegmentator 2.18.0 sdist -> a one-case dataset folder with a real abdominal CT and BTCV-id labels.

The sdist (Apache-2.0) ships ``tests/reference_files/example_ct.nii.gz`` (a real 3 mm CT) and
``example_seg_fast_force_split.nii.gz`` (TotalSegmentator ``total`` class ids on the same grid). The CT is copied
byte for byte; the label map is remapped with ``TOTALSEG_TO_BTCV`` (sources.py), everything else becoming
background. The Apache-2.0 text of the sdist travels with the data as LICENSE.txt.
"""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np

from data_download.convert_common import ConvertContext, Converted, case_destinations, rel
from data_download.errors import FetchError
from data_download.sources import SAMPLE_CT_MEMBER, SAMPLE_LICENSE_MEMBER, SAMPLE_SEG_MEMBER, SOURCES, TOTALSEG_TO_BTCV

CASE_ID = "totalseg_example"


def include(name: str) -> bool:
    return name in (SAMPLE_CT_MEMBER, SAMPLE_SEG_MEMBER, SAMPLE_LICENSE_MEMBER)


def remap(seg: np.ndarray) -> np.ndarray:
    """TotalSegmentator ids -> BTCV ids via a lookup table (one pass, no per-organ loop)."""
    seg = np.asarray(seg)
    if seg.min() < 0:
        raise FetchError("the TotalSegmentator label map has negative values; it is not the published file")
    lut = np.zeros(max(int(seg.max()), max(TOTALSEG_TO_BTCV)) + 1, dtype=np.uint8)
    for ts_id, btcv_id in TOTALSEG_TO_BTCV.items():
        lut[ts_id] = btcv_id
    return lut[seg.astype(np.int64)]


def convert(ctx: ConvertContext) -> Converted:
    ct_path, seg_path = ctx.root / SAMPLE_CT_MEMBER, ctx.root / SAMPLE_SEG_MEMBER
    for p in (ct_path, seg_path):
        if not p.is_file():
            raise FetchError(f"{ctx.archive}: {p.relative_to(ctx.root)} is missing; this is not the TotalSegmentator "
                             "2.18.0 sdist")
    ct, seg = nib.load(str(ct_path)), nib.load(str(seg_path))
    if ct.shape != seg.shape or not np.allclose(ct.affine, seg.affine, atol=1e-3):
        raise FetchError(f"{ctx.archive}: example_ct and example_seg_fast_force_split do not share a grid; "
                         "this is not the published sdist")
    labels = remap(np.asanyarray(seg.dataobj))
    image_dest, label_dest = case_destinations(ctx.staging, CASE_ID)
    shutil.copyfile(ct_path, image_dest)
    lab_img = nib.Nifti1Image(labels, ct.affine, header=ct.header)
    lab_img.set_data_dtype(np.uint8)
    lab_img.header.set_slope_inter(1, 0)
    nib.save(lab_img, str(label_dest))

    names = SOURCES["sample"].labels
    ids, counts = np.unique(labels, return_counts=True)
    voxels = {names[int(i)]: int(c) for i, c in zip(ids, counts) if i != 0}
    absent = [n for i, n in sorted(names.items()) if i != 0 and n not in voxels]
    licence_file = ctx.root / SAMPLE_LICENSE_MEMBER
    meta = {
        "organ_voxels": voxels,
        "organs_absent": absent,
        "note": "one real CT for demonstrations of real anatomy (loading, preprocessing, overlays, registering "
                "atlases onto a real scan); it is the only training case and there is no validation case, "
                "because one scan cannot be both an atlas and an evaluation case: this is not an evaluation set",
        "label_origin": "TotalSegmentator 'total' prediction (example_seg_fast_force_split.nii.gz) remapped to "
                        "BTCV ids: a model output, not a manual delineation",
    }
    return Converted({CASE_ID: {"image": rel(ctx.staging, image_dest), "label": rel(ctx.staging, label_dest)}},
                     meta, licence_file.read_text() if licence_file.is_file() else "")
