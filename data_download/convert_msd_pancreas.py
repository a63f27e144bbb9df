"""MSD ``Task07_Pancreas.tar`` -> dataset folder.

The archive holds ``Task07_Pancreas/{dataset.json, imagesTr, labelsTr, imagesTs}`` plus macOS ``._*`` sidecars
(skipped by the extractor). Labels are 0 background, 1 pancreas, 2 tumour ("cancer" in the archive's own
dataset.json) and are kept as published. Of the 281 labelled cases only the selection in sources.py is placed
in the dataset (210 by default, our assumption for the paper's cohort); the others are listed in
``excluded_cases`` so nothing is dropped silently.
"""

from __future__ import annotations

import json
import re

from data_download.convert_common import ConvertContext, Converted, nifti_id, stage_case
from data_download.errors import FetchError
from data_download.sources import MSD_PANCREAS_SELECTION_SALT, SOURCES
from data_download.splits import select_cases

_WANTED = re.compile(r"(^|/)(imagesTr|labelsTr)/[^/]+\.nii\.gz$|(^|/)dataset\.json$")


def include(name: str) -> bool:
    """imagesTr, labelsTr and the archive's dataset.json; the unlabelled imagesTs is not needed."""
    return bool(_WANTED.search(name))


def _check_source_labels(ctx: ConvertContext) -> None:
    found = sorted(ctx.root.rglob("dataset.json"), key=lambda p: len(p.parts))
    if not found:
        return  # the label ids are checked by the dataset validator anyway
    try:
        labels = json.loads(found[0].read_text()).get("labels", {})
    except (OSError, ValueError):
        return
    if {str(k) for k in labels} != {"0", "1", "2"}:
        raise FetchError(f"{ctx.archive}: its dataset.json declares labels {labels}, not 0 background / 1 pancreas "
                         "/ 2 cancer of Task07; this is not the MSD pancreas archive")


def convert(ctx: ConvertContext) -> Converted:
    _check_source_labels(ctx)
    images = sorted(p for p in ctx.root.rglob("*.nii.gz")
                    if p.parent.name == "imagesTr" and not p.name.startswith("._"))
    if not images:
        raise FetchError(f"{ctx.archive}: no imagesTr/*.nii.gz inside; is it Task07_Pancreas.tar?")
    by_id = {nifti_id(p): p for p in images}
    expected = SOURCES["msd-pancreas"].n_cases
    if len(by_id) != expected:
        print(f"  note: {len(by_id)} labelled cases found; the published Task07 has {expected}")
    n = ctx.n_cases or len(by_id)
    chosen = select_cases(by_id, n, MSD_PANCREAS_SELECTION_SALT) if n < len(by_id) else sorted(by_id)
    cases: dict[str, dict[str, str]] = {}
    for cid in chosen:
        img = by_id[cid]
        cases[cid] = stage_case(ctx, img, img.parent.parent / "labelsTr" / img.name, f"labelsTr/{img.name}")
    excluded = sorted(set(by_id) - set(chosen))
    meta = {
        "selection": {
            "n_cases": len(chosen),
            "of": len(by_id),
            "rule": f"the {len(chosen)} case ids first in sha256('{MSD_PANCREAS_SELECTION_SALT}' + id) order "
                    "(data_download/splits.py select_cases)",
            "assumption": "the paper reports 210 pancreas CTs without listing them; this selection is isl-kit's "
                          "assumption, not the authors' list",
        },
        "excluded_cases": excluded,
    }
    return Converted(cases, meta)
