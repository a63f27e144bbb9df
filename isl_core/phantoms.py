"""A synthetic abdominal CT cohort: the embedded default data of the kit.

Each subject is drawn analytically in millimetres: a body outline with subcutaneous fat, an abdominal
muscle wall, the spine with paraspinal muscles, and thirteen organs with the BTCV label ids. Shapes are
ellipsoids and tubes evaluated on deformed coordinates, so labels stay crisp however a subject is deformed.

Inter-subject variability: a random affine (rotation, scale, translation), a smooth random elastic field,
per-organ position/size jitter and an occasionally missing gallbladder (as in real cohorts after
cholecystectomy). The inference ("validation") cases carry a controllable *domain shift*: a different
contrast phase, more noise (lower dose), a blurrier reconstruction and a larger body. A segmenter trained on
the training cases degrades on them, which is exactly the situation ISL is designed for.

The true deformation of every subject is saved (``deformations/CASE.npz``) so tests can check registration.

``CohortSpec`` and ``write_cohort`` write a cohort of either anatomy: these phantoms, or the real CT deformed by
``sample_anatomy`` (imported when a cohort asks for it). What both anatomies share (the shift, the variation, the
HU tables, random affines and elastic fields) lives below both, in ``anatomy``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from isl_core import outputs
from isl_core.anatomy import HU_NATIVE, HU_VENOUS, VARIATIONS, ShiftSpec, Variation, random_affine, smooth_field
from isl_core.config import BTCV_LABELS, SYNTH_COHORTS

# ShiftSpec, Variation and VARIATIONS live in ``anatomy`` (both anatomies use them) and are part of this module's face
__all__ = ["DEFAULT_SIZE", "FOV_MM", "VARIATIONS", "CohortSpec", "ShiftSpec", "Variation", "cohort_for_profile",
           "draw_subject", "grid_affine", "write_cohort"]

#: Field of view in mm (x: left->right, y: posterior->anterior, z: inferior->superior), fixed whatever the size.
FOV_MM = (384.0, 384.0, 320.0)
DEFAULT_SIZE = (96, 96, 64)
PHANTOM_VERSION = 2  # bump when the drawing changes, so cached cohorts are regenerated

# Organ geometry in a canonical body frame (mm; RAS: +x patient right, +y anterior, +z superior), so the liver
# sits at +x (the patient's right) and the spleen at -x.
# (label, "ellipsoid", centre, semi-axes) or (label, "tube", (start, end), radius). Painted in order; later wins.
_ORGANS: list[tuple[int, str, tuple, Any]] = [
    (6, "ellipsoid", (60.0, 5.0, 50.0), (68.0, 62.0, 62.0)),  # liver
    (1, "ellipsoid", (-78.0, -25.0, 55.0), (26.0, 38.0, 42.0)),  # spleen
    (7, "ellipsoid", (-45.0, 30.0, 55.0), (38.0, 28.0, 38.0)),  # stomach
    (2, "ellipsoid", (58.0, -50.0, -5.0), (24.0, 20.0, 42.0)),  # right kidney
    (3, "ellipsoid", (-58.0, -50.0, 5.0), (24.0, 20.0, 42.0)),  # left kidney
    (4, "ellipsoid", (42.0, 48.0, 5.0), (15.0, 15.0, 26.0)),  # gallbladder
    (11, "tube", ((22.0, 10.0, 10.0), (-62.0, -18.0, 30.0)), 11.0),  # pancreas
    (10, "tube", ((30.0, 2.0, 30.0), (-60.0, -28.0, 28.0)), 6.0),  # portal / splenic vein
    (8, "tube", ((-14.0, -38.0, -160.0), (-14.0, -38.0, 160.0)), 11.0),  # aorta
    (9, "tube", ((22.0, -32.0, -160.0), (22.0, -32.0, 110.0)), 11.0),  # inferior vena cava
    (5, "tube", ((-8.0, -30.0, 95.0), (-10.0, -40.0, 160.0)), 8.0),  # esophagus
    (12, "ellipsoid", (40.0, -38.0, 52.0), (9.0, 7.0, 15.0)),  # right adrenal
    (13, "ellipsoid", (-42.0, -36.0, 60.0), (9.0, 7.0, 15.0)),  # left adrenal
]

def grid_affine(size: tuple[int, int, int]) -> np.ndarray:
    """RAS affine of the phantom grid: constant field of view, voxel size = FOV / size, centred at 0."""
    spacing = np.array(FOV_MM) / np.array(size)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.array(size) - 1) / 2.0 * spacing
    return affine


def _ellipsoid(q: np.ndarray, centre, semi) -> np.ndarray:
    return sum(((q[i] - centre[i]) / semi[i]) ** 2 for i in range(3)) <= 1.0


def _tube(q: np.ndarray, start, end, radius) -> np.ndarray:
    a, b = np.asarray(start)[:, None, None, None], np.asarray(end)[:, None, None, None]
    ab = b - a
    t = np.clip(((q - a) * ab).sum(0) / (ab**2).sum(), 0.0, 1.0)
    return (((q - (a + t * ab)) ** 2).sum(0)) <= radius**2


def _jittered_organs(rng: np.random.Generator, drop_gallbladder: bool, variation: Variation
                     ) -> list[tuple[int, str, tuple, Any]]:
    """Per-subject organ table: every organ moved by ``organ_jitter_mm`` (sd) and resized by ``size_spread``."""
    s = variation.size_spread
    organs = []
    for label, kind, where, extent in _ORGANS:
        if label == 4 and drop_gallbladder:
            continue
        shift = rng.normal(0, variation.organ_jitter_mm, 3)
        if kind == "ellipsoid":
            semi = tuple(np.multiply(extent, rng.uniform(1 - s, 1 + s, 3)))
            organs.append((label, kind, tuple(np.add(where, shift)), semi))
        else:
            ends = (tuple(np.add(where[0], shift)), tuple(np.add(where[1], shift)))
            organs.append((label, kind, ends, extent * rng.uniform(1 - 1.25 * s, 1 + 1.25 * s)))
    return organs


def draw_subject(rng: np.random.Generator, size: tuple[int, int, int], shift: ShiftSpec | None,
                 variation: Variation | None = None) -> dict[str, Any]:
    """One subject: ``image`` (HU, float32), ``label`` (uint8), ``affine`` and the true deformation.

    The deformation maps each voxel's world position p to canonical-body coordinates
    q = A^-1 (p + u(p)), where A is the subject's affine and u the elastic field; it is saved so tests can
    compare a registration with the truth.
    """
    s = shift or ShiftSpec(0.0, 0.0, 0.0, 0.0)
    affine = grid_affine(size)
    spacing = np.diag(affine)[:3]
    idx = np.indices(size, dtype=np.float32)
    world = np.einsum("ij,j...->i...", affine[:3, :3], idx) + affine[:3, 3, None, None, None]
    body_scale = 1.0 + 0.12 * s.body
    subject_affine = random_affine(rng, body_scale)
    variation = variation or Variation()
    elastic = smooth_field(rng, size, variation.elastic_mm)
    inv = np.linalg.inv(subject_affine)
    p = world + elastic
    q = np.einsum("ij,j...->i...", inv[:3, :3], p) + inv[:3, 3, None, None, None]

    hu = {k: (1 - s.contrast) * HU_VENOUS[k] + s.contrast * HU_NATIVE[k] for k in HU_VENOUS}
    label = np.zeros(size, np.uint8)
    image = np.full(size, -1000.0, np.float32)  # air

    # body wall: the outer ellipse (fat), a muscle ring, visceral fat inside; the fat layer grows with body size
    fat = rng.uniform(1.0, 1.08) * (1.0 + 0.08 * s.body)
    r_body = (q[0] / (140 * fat)) ** 2 + (q[1] / (105 * fat)) ** 2
    r_inner = (q[0] / 130) ** 2 + (q[1] / 96) ** 2
    image[r_body <= 1] = hu["fat"]
    image[r_inner <= 1.0] = hu["muscle"]
    image[r_inner <= 0.86] = hu["visceral"]
    # spine and paraspinal muscles
    image[((q[0] / 34) ** 2 + ((q[1] + 88) / 22) ** 2) <= 1] = hu["muscle"]
    image[((q[0] / 18) ** 2 + ((q[1] + 62) / 18) ** 2) <= 1] = hu["bone"]
    image[((q[0] / 7) ** 2 + ((q[1] + 86) / 7) ** 2) <= 1] = hu["spinal_canal"]

    for lab, kind, a, b in _jittered_organs(rng, rng.random() < variation.gallbladder_absent, variation):
        mask = _ellipsoid(q, a, b) if kind == "ellipsoid" else _tube(q, a[0], a[1], b)
        mask &= r_inner <= 0.9
        label[mask] = lab
        image[mask] = hu[lab]

    # organ texture, reconstruction blur and quantum noise
    texture = ndimage.gaussian_filter(rng.normal(0, 1, size).astype(np.float32), 1.0) * 12.0
    image = np.where(label > 0, image + texture, image)
    blur_mm = np.array([1.5 + 2.5 * s.blur, 1.5 + 2.5 * s.blur, 2.0])
    image = ndimage.gaussian_filter(image, blur_mm / spacing)
    image += rng.normal(0, 12.0 * (1 + 1.5 * s.noise), size).astype(np.float32)
    return {"image": image.astype(np.float32), "label": label, "affine": affine,
            "subject_affine": subject_affine, "elastic_mm": elastic}


@dataclass
class CohortSpec:
    n_train: int = 12
    n_val: int = 6
    n_test: int = 0
    shift: float = 1.0
    size: tuple[int, int, int] = DEFAULT_SIZE
    seed: int = 0
    variation: Variation = field(default_factory=Variation)
    anatomy: str = "phantom"  # "phantom" (drawn analytically) or "sample" (the real CT of `isl data fetch sample`)
    sample_dir: str | None = None  # anatomy "sample": the folder `isl data fetch sample --out DIR` wrote

    def __post_init__(self) -> None:
        for name, low in (("n_train", 1), ("n_val", 0), ("n_test", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"CohortSpec.{name} = {value!r}: must be an integer >= {low}")
        if not (isinstance(self.shift, (int, float)) and np.isfinite(self.shift)):
            raise ValueError(f"CohortSpec.shift = {self.shift!r}: must be a finite number")
        if len(self.size) != 3 or not all(isinstance(n, (int, np.integer)) and n > 0 for n in self.size):
            raise ValueError(f"CohortSpec.size = {self.size!r}: must be three integers > 0")
        if self.anatomy not in ("phantom", "sample"):
            raise ValueError(f"CohortSpec.anatomy = {self.anatomy!r}; choose 'phantom' or 'sample'")
        if self.anatomy == "sample" and not self.sample_dir:
            raise ValueError("anatomy 'sample' needs sample_dir: the folder of `isl data fetch sample --out DIR`")

    def fingerprint(self) -> str:
        doc = {**asdict(self), "generator": PHANTOM_VERSION}
        # settings at their original defaults stay out, so cohorts written before they existed are still recognised
        for key, default in (("variation", asdict(Variation())), ("anatomy", "phantom"), ("sample_dir", None)):
            if doc[key] == default:
                del doc[key]
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def drawer(self):
        """``draw(rng, shift) -> subject`` for this cohort's anatomy (a phantom, or the real sample CT deformed)."""
        if self.anatomy == "sample":
            from isl_core.sample_anatomy import draw_sample_subject, load_template

            template = load_template(self.sample_dir)
            return lambda rng, shift: draw_sample_subject(rng, template, shift, self.variation)
        return lambda rng, shift: draw_subject(rng, tuple(self.size), shift, self.variation)


def cohort_for_profile(profile: str, seed: int = 0) -> CohortSpec:
    """The synthetic cohort that goes with a profile (``config.SYNTH_COHORTS``)."""
    return CohortSpec(seed=seed, **SYNTH_COHORTS[profile])


def write_cohort(out: str | Path, spec: CohortSpec | None = None, force: bool = False) -> Path:
    """Write the cohort in the dataset contract; returns the folder. Deterministic given ``spec``.

    A folder that already holds the same cohort (same spec) is left as it is; one holding another cohort is
    replaced only with ``force``, and one holding any file the kit did not write (``outputs.claim``) is refused,
    with or without ``force``. An interrupted run resumes: ``phantom_spec.partial.json`` (written
    first) marks the folder as this cohort in progress, every case file is written atomically, cases whose files
    are all there are skipped (each case has its own random stream, so skipping changes no other case), and
    ``phantom_spec.json`` is written last; the hidden temporaries of a killed run are removed.
    """
    from isl_core.runtime import DatasetError, read_json, write_json

    spec = spec or CohortSpec()
    out = Path(out).expanduser().resolve()
    stamp, partial = out / "phantom_spec.json", out / "phantom_spec.partial.json"
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: exists and is not a folder; give a folder path for the cohort")
    # the claim refuses a folder holding anything the kit did not write (even with force) and removes the
    # temporaries a killed run left; a folder of another cohort is the kit's, replaced only with force
    with outputs.claim(out, "isl data synth"):
        doc = {"fingerprint": spec.fingerprint(), **asdict(spec)}
        if not force and stamp.is_file() and (out / "dataset.json").is_file() \
                and read_json(stamp, "cohort stamp").get("fingerprint") == spec.fingerprint():
            return out
        resuming = partial.is_file() and read_json(partial, "cohort stamp").get("fingerprint") == spec.fingerprint()
        if _kit_files(out) and not force and not resuming:
            what = ("an interrupted cohort of other settings (see phantom_spec.partial.json): rerun with those "
                    "settings to finish it, choose an empty folder," if partial.is_file() else
                    "another synthetic cohort; choose an empty folder")
            raise FileExistsError(f"{out}: folder exists and is {what} or pass --force to overwrite it")
        outputs.remove(stamp)  # a stale final stamp must not outlive the cohort it described
        write_json(partial, doc)
        _write_cases(out, spec, resuming and not force)
        write_json(stamp, doc)
        outputs.remove(partial)
    return out


def _kit_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file() and p.name != outputs.MANIFEST]


def _write_cases(out: Path, spec: CohortSpec, resuming: bool) -> None:
    """Every case of ``spec`` and ``dataset.json``; with ``resuming``, cases whose files are all there are kept."""
    from isl_core.data import write_dataset_json, write_nifti
    from isl_core.runtime import atomic_path

    rng_root = np.random.SeedSequence(spec.seed)
    entries: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    plan = [("training", "train", spec.n_train, None), ("validation", "val", spec.n_val, spec.shift),
            ("test", "test", spec.n_test, spec.shift)]
    children = iter(rng_root.spawn(spec.n_train + spec.n_val + spec.n_test))
    draw = spec.drawer()
    for split, tag, n, shift in plan:
        img_dir, lab_dir = ("imagesTr", "labelsTr") if split != "test" else ("imagesTs", "labelsTs")
        for i in range(n):
            cid = f"synth_{tag}_{i:03d}"
            child = next(children)
            files = (out / img_dir / f"{cid}.nii.gz", out / lab_dir / f"{cid}.nii.gz", out / "deformations" /
                     f"{cid}.npz")
            if not (resuming and all(f.is_file() for f in files)):
                subj = draw(np.random.default_rng(child), ShiftSpec.scaled(shift) if shift is not None else None)
                write_nifti(np.round(subj["image"]).astype(np.int16), subj["affine"], files[0])
                write_nifti(subj["label"], subj["affine"], files[1])
                with atomic_path(files[2]) as tmp, open(tmp, "wb") as f:  # a file object: savez adds no suffix
                    np.savez_compressed(f, subject_affine=subj["subject_affine"],
                                        elastic_mm=subj["elastic_mm"].astype(np.float16))
            entry = {"image": f"{img_dir}/{cid}.nii.gz", "label": f"{lab_dir}/{cid}.nii.gz"}
            entries[split].append(entry if split != "test" else entry["image"])
    write_dataset_json(out, BTCV_LABELS, entries["training"], entries["validation"], entries["test"],
                       name="isl-kit synthetic abdomen" + (" (sample anatomy)" if spec.anatomy == "sample" else ""),
                       description=("Subjects deformed from the real CT of `isl data fetch sample`"
                                    if spec.anatomy == "sample" else "Synthetic abdominal CT phantoms")
                       + f"; validation/test cases carry a domain shift of strength {spec.shift} (contrast phase, "
                         "noise, blur, body size).",
                       licence="Apache-2.0 (derived from the TotalSegmentator sample CT)" if spec.anatomy == "sample"
                       else "CC0-1.0 (generated by isl-kit)", tensorImageSize="3D")
