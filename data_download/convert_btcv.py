"""BTCV ``RawData.zip`` -> dataset folder.

The archive holds ``RawData/Training/img/img0001.nii.gz`` with ``RawData/Training/label/label0001.nii.gz`` (30
labelled cases) and ``RawData/Testing/img`` (20 unlabelled ones, not used: ISL evaluates on labelled cases).
Labels already use the BTCV ids 0..13, so the files are moved as published, under the names MONAI's
``dataset_0.json`` uses (``imagesTr/img0001.nii.gz``, ``labelsTr/label0001.nii.gz``).
"""

from __future__ import annotations

import re

from data_download.convert_common import ConvertContext, Converted, nifti_id, stage_case
from data_download.errors import FetchError
from data_download.sources import BTCV_CASES

_IMG = re.compile(r"(^|/)Training/img/img\d{4}\.nii\.gz$")
_LAB = re.compile(r"(^|/)Training/label/label\d{4}\.nii\.gz$")


def include(name: str) -> bool:
    """Only the labelled training cases are extracted."""
    return bool(_IMG.search(name) or _LAB.search(name))


def convert(ctx: ConvertContext) -> Converted:
    images = sorted(p for p in ctx.root.rglob("img*.nii.gz") if _IMG.search(p.relative_to(ctx.root).as_posix()))
    if not images:
        raise FetchError(f"{ctx.archive}: no Training/img/img*.nii.gz inside; is it the Abdomen RawData.zip "
                         "(Synapse syn3379050)?")
    cases: dict[str, dict[str, str]] = {}
    for img in images:
        cid = nifti_id(img)
        label = img.parent.parent / "label" / f"label{cid[3:]}.nii.gz"
        cases[cid] = stage_case(ctx, img, label, f"Training/label/{label.name}")
    if sorted(cases) != sorted(BTCV_CASES):
        print(f"  note: {len(cases)} labelled cases found; the published RawData.zip has the 30 of the MONAI split")
    return Converted(cases)
