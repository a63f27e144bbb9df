"""The dataset contract: a Decathlon-style folder -> validated cases -> preprocessed tensors -> NIfTI out.

A dataset folder holds ``dataset.json`` with ``labels`` (``{"0": "background", "1": "spleen", ...}``),
``training`` (labelled atlases / training cases), ``validation`` (labelled inference cases used for evaluation)
and optionally ``test`` (unlabelled inference cases). Paths are relative to the folder; images and labels
are NIfTI. ``load_dataset`` checks *everything* up front, so a bad file stops the run with one message that
names it before any training or registration starts.

Preprocessing brings every case onto one common grid (orientation RAS, target spacing, intensity window,
crop to the body, pad/crop to a fixed shape). A fixed shape is what lets Stage 2 register all atlases onto
the inference image in one batch. Predictions are resampled back into the source image's geometry with
the affines MONAI tracks through the transforms, so they overlay the original scan in any viewer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from isl_core.config import DataConfig
from isl_core.runtime import atomic_path

SPLITS = ("training", "validation", "test")
_AFFINE_ATOL_MM = 1e-3  # image and label may differ by float rounding in their headers, not by more


class DatasetError(ValueError):
    """A dataset folder breaks the contract; the message names the file and says how to fix it."""


@dataclass
class Case:
    """One entry of ``dataset.json`` with absolute paths."""

    id: str
    image: Path
    label: Path | None
    split: str

    def as_dict(self) -> dict[str, Any]:
        """The MONAI dictionary (``LoadImaged`` reads the ``image`` / ``label`` keys)."""
        d: dict[str, Any] = {"id": self.id, "image": str(self.image)}
        if self.label is not None:
            d["label"] = str(self.label)
        return d


@dataclass
class Dataset:
    root: Path
    labels: dict[int, str]
    training: list[Case]
    validation: list[Case]
    test: list[Case] = field(default_factory=list)
    modality: str = "CT"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return max(self.labels) + 1

    @property
    def organs(self) -> dict[int, str]:
        """Label id -> name without the background."""
        return {k: v for k, v in self.labels.items() if k != 0}

    def split(self, name: str) -> list[Case]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of {SPLITS}")
        return getattr(self, name)

    def case(self, case_id: str) -> Case:
        for c in self.training + self.validation + self.test:
            if c.id == case_id:
                return c
        raise KeyError(f"no case {case_id!r} in {self.root / 'dataset.json'}")


def case_id_from_path(path: str | Path) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _entry_paths(root: Path, entry: Any, split: str, json_path: Path) -> tuple[Path, Path | None]:
    if isinstance(entry, str):  # the Decathlon "test" list may hold bare image paths
        return root / entry, None
    if not isinstance(entry, dict) or "image" not in entry:
        raise DatasetError(f"{json_path}: an entry of {split!r} has no 'image' key ({entry!r}); "
                           "write each case as {\"image\": \"imagesTr/x.nii.gz\", \"label\": \"labelsTr/x.nii.gz\"}")
    label = entry.get("label")
    return root / entry["image"], (root / label if label else None)


def _parse_labels(raw: Any, json_path: Path) -> dict[int, str]:
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{json_path}: 'labels' must be a non-empty mapping like "
                           "{\"0\": \"background\", \"1\": \"spleen\"}")
    try:
        labels = {int(k): str(v) for k, v in raw.items()}
    except ValueError as e:
        raise DatasetError(f"{json_path}: label ids must be integers ({e}); fix the keys of 'labels'") from None
    if 0 not in labels:
        raise DatasetError(f"{json_path}: 'labels' must declare 0 (background)")
    return labels


def read_dataset_json(folder: str | Path) -> Dataset:
    """Parse ``dataset.json`` without touching the volumes (see ``load_dataset`` for full validation)."""
    root = Path(folder).expanduser().resolve()
    json_path = root / "dataset.json"
    if not json_path.is_file():
        raise DatasetError(f"{json_path}: not found; point to a dataset folder with a dataset.json "
                           "(create one with `isl data synth DIR` or `isl data fetch sample --out DIR`)")
    try:
        raw = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{json_path}: unreadable JSON ({e}); fix or regenerate the file") from None
    labels = _parse_labels(raw.get("labels"), json_path)
    modality = raw.get("modality", {"0": "CT"})
    modality = modality.get("0", "CT") if isinstance(modality, dict) else str(modality)

    splits: dict[str, list[Case]] = {}
    seen: dict[str, str] = {}
    for split in SPLITS:
        cases = []
        for entry in raw.get(split, []) or []:
            image, label = _entry_paths(root, entry, split, json_path)
            cid = case_id_from_path(image)
            if cid in seen:
                raise DatasetError(f"{json_path}: case id {cid!r} appears twice ({seen[cid]} and {split}); "
                                   "every image file name must be unique across training/validation/test")
            seen[cid] = split
            if split != "test" and label is None:
                raise DatasetError(f"{json_path}: {split} case {cid!r} has no 'label'; labelled cases need one "
                                   "(move unlabelled cases to 'test')")
            cases.append(Case(cid, image, label, split))
        splits[split] = cases
    if not splits["training"]:
        raise DatasetError(f"{json_path}: the 'training' list is empty; ISL needs labelled training cases "
                           "(atlases): add at least one image/label pair")
    meta = {k: v for k, v in raw.items() if k not in ("labels", *SPLITS)}
    return Dataset(root, labels, splits["training"], splits["validation"], splits["test"], modality, meta)


def _load_volume(path: Path, role: str) -> nib.Nifti1Image:
    if not path.is_file():
        raise DatasetError(f"{path}: {role} file not found; fix the path in dataset.json or restore the file")
    try:
        img = nib.load(str(path))
        img.get_fdata(dtype=np.float32)  # force a full read: a truncated .gz fails here, not mid-training
    except Exception as e:  # nibabel raises many types for corrupt files
        raise DatasetError(f"{path}: unreadable {role} ({type(e).__name__}: {e}); "
                           "re-export or re-download it") from None
    return img


def validate_case(case: Case, labels: dict[int, str]) -> None:
    """Raise ``DatasetError`` naming the file if the case breaks the contract."""
    img = _load_volume(case.image, "image")
    data = np.asanyarray(img.dataobj)
    if data.ndim != 3:
        raise DatasetError(f"{case.image}: expected a 3D volume, got shape {data.shape}; "
                           "export a single-channel 3D image")
    if not np.isfinite(data).all():
        n = int((~np.isfinite(data)).sum())
        raise DatasetError(f"{case.image}: {n} NaN/inf voxels; replace them (e.g. with the air value) "
                           "before using the image")
    if case.label is None:
        return
    lab = _load_volume(case.label, "label")
    if lab.shape != img.shape:
        raise DatasetError(f"{case.label}: label shape {lab.shape} differs from image shape {img.shape} "
                           f"({case.image.name}); resample the label onto the image grid")
    if not np.allclose(lab.affine, img.affine, atol=_AFFINE_ATOL_MM):
        raise DatasetError(f"{case.label}: label affine differs from the image affine of {case.image.name}; "
                           "the label must be saved in the image's geometry (same origin, spacing, direction)")
    values = np.asanyarray(lab.dataobj)
    if not np.isfinite(values).all() or not np.all(np.equal(np.mod(values, 1), 0)):
        raise DatasetError(f"{case.label}: label values must be integers; save the label map as an integer type")
    unknown = sorted(set(np.unique(values).astype(int).tolist()) - set(labels))
    if unknown:
        raise DatasetError(f"{case.label}: label values {unknown} are not declared in dataset.json 'labels' "
                           f"(declared: {sorted(labels)}); declare them or remap the label map")


def load_dataset(folder: str | Path, validate: bool = True) -> Dataset:
    """Read and fully validate a dataset folder; every problem is reported before any work starts."""
    ds = read_dataset_json(folder)
    if validate:
        for case in ds.training + ds.validation + ds.test:
            validate_case(case, ds.labels)
    return ds


# --------------------------------------------------------------------------------------------- preprocessing
def preprocess_transform(cfg: DataConfig, modality: str = "CT", with_label: bool = True):
    """MONAI transform: load, RAS, resample, window to [0, 1], crop to the body, pad/crop to ``cfg.shape``.

    Every step is invertible and MONAI tracks the affine through it, which is what ``to_source_geometry``
    relies on to put predictions back onto the original scan.
    """
    from monai import transforms as mt

    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    steps: list = [
        mt.LoadImaged(keys=keys, image_only=True),
        mt.EnsureChannelFirstd(keys=keys),
        mt.Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        mt.Spacingd(keys=keys, pixdim=cfg.spacing, mode=modes),
    ]
    if modality.upper() == "CT":
        lo, hi = cfg.ct_window
        steps.append(mt.ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    else:  # MR and others: robust percentile scaling, since there is no absolute intensity scale
        steps.append(mt.ScaleIntensityRangePercentilesd(keys="image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0,
                                                        clip=True))
    if cfg.crop_foreground:
        steps.append(mt.CropForegroundd(keys=keys, source_key="image", select_fn=lambda x: x > 0.02, margin=2,
                                        allow_smaller=True))
    steps += [
        mt.ResizeWithPadOrCropd(keys=keys, spatial_size=cfg.shape),
        mt.EnsureTyped(keys=keys, dtype=torch.float32, track_meta=True),
    ]
    return mt.Compose(steps)


def load_case(case: Case, cfg: DataConfig, modality: str = "CT") -> dict[str, Any]:
    """One preprocessed case: ``image`` (1,*shape) float in [0,1]; ``label`` (1,*shape) float if labelled.

    Tensors are MONAI ``MetaTensor``s that carry their affine; ``id`` and source paths come along.
    """
    with_label = case.label is not None
    out = preprocess_transform(cfg, modality, with_label)(case.as_dict())
    out["id"] = case.id
    out["source_image"] = str(case.image)
    if with_label:
        out["label"] = out["label"].round()
    return out


def load_cases(cases: Sequence[Case], cfg: DataConfig, modality: str = "CT") -> list[dict[str, Any]]:
    return [load_case(c, cfg, modality) for c in cases]


def stack_cases(cases: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Batch tensors (N,1,*shape) images and (N,*shape) int64 labels from preprocessed cases."""
    images = torch.stack([torch.as_tensor(c["image"]).as_subclass(torch.Tensor) for c in cases])
    if all("label" in c for c in cases):
        labels = torch.stack([torch.as_tensor(c["label"])[0].as_subclass(torch.Tensor).long() for c in cases])
        return images, labels
    return images, None


# ------------------------------------------------------------------------------------------------ writing out
def to_source_geometry(probs: torch.Tensor, reference: dict[str, Any]) -> np.ndarray:
    """Resample class probabilities (C,*shape) on the preprocessed grid into the source image's voxel grid.

    ``reference`` is the preprocessed case (its ``image`` carries the working-grid affine) from
    ``load_case``. Probabilities are resampled linearly and then arg-maxed: interpolating one-hot maps
    gives smoother organ boundaries than nearest-neighbour resampling of the label map.
    Returns the integer label map in the source geometry (shape and affine of ``reference['source_image']``).
    """
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    src = nib.load(reference["source_image"])
    work_affine = torch.as_tensor(reference["image"].affine, dtype=torch.float64)
    # a plain tensor first: a MetaTensor input would keep its own affine and warn that it is overwritten
    plain = torch.as_tensor(probs, dtype=torch.float32).detach().cpu().as_subclass(torch.Tensor)
    probs = MetaTensor(plain, affine=work_affine)
    out = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)(
        probs, dst_affine=torch.as_tensor(src.affine, dtype=torch.float64), spatial_size=src.shape[:3])
    out = torch.as_tensor(out).as_subclass(torch.Tensor)
    # voxels outside the working grid received no probability at all: they are background
    out[0] += (out.sum(0) < 1e-6).float()
    return out.argmax(0).numpy().astype(np.uint8 if probs.shape[0] < 256 else np.int16)


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path, header: Any = None) -> Path:
    """Write a NIfTI atomically (temporary name, then rename) so a crash never leaves a truncated file."""
    path = Path(path)
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64), header=header)
    if np.issubdtype(np.asarray(array).dtype, np.integer):
        img.set_data_dtype(np.asarray(array).dtype)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, str(tmp))
    return path


def write_prediction(probs: torch.Tensor, reference: dict[str, Any], path: str | Path) -> Path:
    """Save the arg-max of ``probs`` as a label map in the source image's geometry (shape and affine)."""
    src = nib.load(reference["source_image"])
    labels = to_source_geometry(probs, reference)
    return write_nifti(labels, src.affine, path)


def write_dataset_json(folder: str | Path, labels: dict[int, str], training: list[dict], validation: list[dict],
                       test: list | None = None, **meta: Any) -> Path:
    """Write ``dataset.json`` in the Decathlon layout (``monai.data.load_decathlon_datalist`` reads it)."""
    doc: dict[str, Any] = dict(meta)
    doc.setdefault("modality", {"0": "CT"})
    doc["labels"] = {str(k): v for k, v in sorted(labels.items())}
    doc["numTraining"] = len(training)
    doc["training"] = training
    doc["validation"] = validation
    if test:
        doc["numTest"] = len(test)
        doc["test"] = test
    path = Path(folder) / "dataset.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return path
