"""Subjects with real anatomy: the real abdominal CT of ``isl data fetch sample``, deformed and re-imaged.

``isl data synth OUT --anatomy sample --sample-dir DIR`` builds a cohort in the dataset contract from the one real
CT (with BTCV labels) that ``isl data fetch sample --out DIR`` writes, so the kit can be taught and tested on real
organ shapes offline. Every subject is the real scan under

* a random affine (rotation, scale, translation, as the phantoms) and a large smooth elastic deformation
  (``Variation.elastic_mm``), applied to image and labels together, so organ shapes and positions vary from
  subject to subject the way they do between patients (within what one anatomy can show); and
* a per-subject protocol: the sample is a non-contrast CT, so training subjects receive the organ enhancement of
  a portal-venous phase (the phantoms' HU tables) and inference subjects lose it again with ``ShiftSpec.contrast``,
  receive more noise (``noise``) and a softer reconstruction (``blur``).

All subjects share one anatomy, so this cohort understates real inter-patient variation in organ *shape*; it is a
test of the method on realistic organ boundaries and textures, not evidence about a population.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from isl_core.anatomy import HU_NATIVE, HU_VENOUS, ShiftSpec, Variation, random_affine, smooth_field


def load_template(sample_dir: str | Path) -> dict[str, Any]:
    """The real CT (HU) and its BTCV label map, in RAS orientation, from a folder of ``isl data fetch sample``."""
    from isl_core.data import DatasetError, load_dataset

    ds = load_dataset(sample_dir)
    case = ds.training[0]
    image = nib.as_closest_canonical(nib.load(str(case.image)))
    label = nib.as_closest_canonical(nib.load(str(case.label)))
    if ds.num_classes > 256:
        raise DatasetError(f"{case.label}: label ids above 255 are not supported for the sample anatomy")
    return {"image": image.get_fdata(dtype=np.float32), "label": np.asarray(label.dataobj).astype(np.uint8),
            "affine": image.affine, "source": str(case.image)}


def draw_sample_subject(rng: np.random.Generator, template: dict[str, Any], shift: ShiftSpec | None,
                        variation: Variation | None = None) -> dict[str, Any]:
    """One subject built from ``template`` (see the module docstring); the same keys as ``draw_subject``."""
    s = shift or ShiftSpec(0.0, 0.0, 0.0, 0.0)
    variation = variation or Variation()
    affine = template["affine"]
    size = template["image"].shape
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    centre = affine[:3, :3] @ ((np.array(size) - 1) / 2.0) + affine[:3, 3]
    idx = np.indices(size, dtype=np.float32)
    world = np.einsum("ij,j...->i...", affine[:3, :3], idx) + affine[:3, 3, None, None, None]
    subject_affine = random_affine(rng, 1.0 + 0.06 * s.body)  # about the scan's centre, not the world origin
    elastic = smooth_field(rng, size, variation.elastic_mm)
    inv = np.linalg.inv(subject_affine)
    p = world + elastic - centre[:, None, None, None]
    q = np.einsum("ij,j...->i...", inv[:3, :3], p) + inv[:3, 3, None, None, None] + centre[:, None, None, None]
    vox = np.einsum("ij,j...->i...", np.linalg.inv(affine)[:3, :3], q) + np.linalg.inv(affine)[:3, 3, None, None, None]
    image = ndimage.map_coordinates(template["image"], vox, order=1, mode="constant", cval=-1000.0)
    label = ndimage.map_coordinates(template["label"], vox, order=0, mode="constant", cval=0).astype(np.uint8)

    # protocol: venous enhancement for training subjects, lost again (with more noise and blur) under the shift
    enhancement = 1.0 - s.contrast
    for k in np.unique(label):
        if k:
            image[label == k] += enhancement * (HU_VENOUS[int(k)] - HU_NATIVE[int(k)])
    if s.blur > 0:
        image = ndimage.gaussian_filter(image, np.array([2.5 * s.blur, 2.5 * s.blur, 0.0]) / spacing)
    noise = 12.0 * (1 + 1.5 * s.noise) * rng.uniform(0.8, 1.2)
    image = image + rng.normal(0, noise, size).astype(np.float32)
    return {"image": image.astype(np.float32), "label": label, "affine": affine,
            "subject_affine": subject_affine, "elastic_mm": elastic}
