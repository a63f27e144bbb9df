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

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from isl_core.config import DataConfig
from isl_core.runtime import DatasetError, atomic_path, env_flag
from isl_core.validate import MAX_LABEL_ID, MAX_VOXELS, check_case_files, env_int, open_volume, read_volume

__all__ = ["MAX_LABEL_ID", "MAX_VOXELS", "SPLITS", "Case", "Dataset", "DatasetError", "dataset_fingerprint",
           "load_case", "load_cases", "load_dataset", "open_volume", "read_dataset_json", "read_volume",
           "to_source_geometry", "validate_case", "write_dataset_json", "write_nifti", "write_prediction"]

SPLITS = ("training", "validation", "test")
ALLOW_EXTERNAL_PATHS_ENV = "ISL_ALLOW_EXTERNAL_PATHS"  # a switch (runtime.env_flag): dataset.json may point outside


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


def _inside(root: Path, rel: Any, key: str, split: str, json_path: Path, allow_outside: bool) -> Path:
    """``root / rel``, refusing a non-string path and (unless allowed) one that leads out of the dataset folder."""
    if not isinstance(rel, str) or not rel:
        raise DatasetError(f"{json_path}: {key!r} of a {split!r} entry must be a non-empty path string, got {rel!r}")
    # lexical check: it is the path written in dataset.json that must stay inside (a symlinked folder is fine)
    path = Path(os.path.normpath(root / rel))
    if not allow_outside and not path.is_relative_to(root):
        raise DatasetError(f"{json_path}: {key} path {rel!r} of {split!r} leads outside the dataset folder {root}; "
                           f"copy the file into the folder, or set {ALLOW_EXTERNAL_PATHS_ENV}=1 to allow it")
    return path


def _entry_paths(root: Path, entry: Any, split: str, json_path: Path, allow_outside: bool = False
                 ) -> tuple[Path, Path | None]:
    if isinstance(entry, str):  # the Decathlon "test" list may hold bare image paths
        return _inside(root, entry, "image", split, json_path, allow_outside), None
    if not isinstance(entry, dict) or "image" not in entry:
        raise DatasetError(f"{json_path}: an entry of {split!r} has no 'image' key ({entry!r}); "
                           "write each case as {\"image\": \"imagesTr/x.nii.gz\", \"label\": \"labelsTr/x.nii.gz\"}")
    label = entry.get("label")
    image = _inside(root, entry["image"], "image", split, json_path, allow_outside)
    return image, (_inside(root, label, "label", split, json_path, allow_outside) if label is not None else None)


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
    if len(labels) != len(raw):  # "1" and "01" both read as 1: one organ's name would silently replace the other's
        keys = sorted(raw, key=lambda k: (int(k), k))
        twins = [k for k in keys if sum(int(o) == int(k) for o in keys) > 1]
        raise DatasetError(f"{json_path}: label ids {', '.join(map(repr, twins))} in 'labels' name one id twice; "
                           "keep one key per label id")
    cap = env_int("ISL_MAX_LABEL_ID", MAX_LABEL_ID)
    if min(labels) < 0 or max(labels) > cap:
        # every one-hot map has max(id) + 1 channels: one stray id like 100000 would need terabytes
        raise DatasetError(f"{json_path}: label id {max(labels) if max(labels) > cap else min(labels)} is outside "
                           f"0..{cap}; renumber the labels consecutively (or raise the cap with ISL_MAX_LABEL_ID)")
    return labels


def _allow_outside(allow_outside: bool | None) -> bool:
    if allow_outside is not None:
        return allow_outside
    return env_flag(ALLOW_EXTERNAL_PATHS_ENV)


def read_dataset_json(folder: str | Path, allow_outside: bool | None = None) -> Dataset:
    """Parse ``dataset.json`` without touching the volumes (see ``load_dataset`` for full validation).

    Image and label paths must stay inside the folder unless ``allow_outside`` (default: the environment variable
    ``ISL_ALLOW_EXTERNAL_PATHS=1``).
    """
    root = Path(folder).expanduser().resolve()
    json_path = root / "dataset.json"
    if not json_path.is_file():
        raise DatasetError(f"{json_path}: not found; point to a dataset folder with a dataset.json "
                           "(create one with `isl data synth DIR` or `isl data fetch sample --out DIR`)")
    try:
        raw = json.loads(json_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise DatasetError(f"{json_path}: not UTF-8 text; save the file as UTF-8 JSON") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{json_path}: unreadable JSON ({e}); fix or regenerate the file") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{json_path}: the top level must be an object with 'labels', 'training', 'validation' "
                           f"(got a JSON {type(raw).__name__}); see the Decathlon layout in the README")
    outside = _allow_outside(allow_outside)
    labels = _parse_labels(raw.get("labels"), json_path)
    modality = raw.get("modality", {"0": "CT"})
    modality = modality.get("0", "CT") if isinstance(modality, dict) else str(modality)

    splits: dict[str, list[Case]] = {}
    seen: dict[str, str] = {}
    for split in SPLITS:
        cases = []
        entries = raw.get(split, []) or []
        if not isinstance(entries, list):
            raise DatasetError(f"{json_path}: {split!r} must be a list of cases, got a JSON {type(entries).__name__}")
        for entry in entries:
            image, label = _entry_paths(root, entry, split, json_path, outside)
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


def validate_case(case: Case, labels: dict[int, str]) -> None:
    """Raise ``DatasetError`` naming the file if the case breaks the contract (``validate.check_case_files``)."""
    check_case_files(case.image, case.label, labels)


def load_dataset(folder: str | Path, validate: bool = True, allow_outside: bool | None = None) -> Dataset:
    """Read and fully validate a dataset folder; every problem is reported before any work starts.

    ``allow_outside``: see :func:`read_dataset_json`.
    """
    ds = read_dataset_json(folder, allow_outside)
    if validate:
        for case in ds.training + ds.validation + ds.test:
            validate_case(case, ds.labels)
    return ds


def dataset_fingerprint(ds: Dataset) -> str:
    """A content stamp of a dataset folder: ``dataset.json``'s bytes plus every case file's path, size and mtime.

    Sizes and modification times (not checksums) keep it instant on a 30 GB cohort; a file rewritten in place
    (``isl data synth --force``, a re-download) changes its mtime, so a regenerated dataset never passes for the
    old one. Copies made with ``cp -p`` / ``shutil.copytree`` keep the stamp. 32 hex characters.
    """
    h = hashlib.sha256((ds.root / "dataset.json").read_bytes())
    for case in ds.training + ds.validation + ds.test:
        for path in (case.image, case.label):
            if path is None:
                continue
            st = Path(path).stat()
            h.update(f"\0{os.path.relpath(path, ds.root)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


# --------------------------------------------------------------------------------------------- preprocessing
class _WarnIfCut:
    """Warns when the body on the working grid is larger than the common grid, which then cuts it off.

    The common shape is what lets registration batch the atlases; a long scan (a chest-abdomen-pelvis CT at the
    abdomen's grid) would otherwise lose its ends without a word.
    """

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg

    def __call__(self, d: dict[str, Any]) -> dict[str, Any]:
        size = tuple(d["image"].shape[1:])
        cut = [max(s - t, 0) for s, t in zip(size, self.cfg.shape)]
        if any(cut):
            source = getattr(d["image"], "meta", {}).get("filename_or_obj", "a case")
            mm = ", ".join(f"{c * sp:.0f}" for c, sp in zip(cut, self.cfg.spacing))
            warnings.warn(f"{source}: the body spans {size} voxels of {self.cfg.spacing} mm, more than the common "
                          f"grid {tuple(self.cfg.shape)}; ({mm}) mm along (x, y, z) are cut off. Raise data.shape "
                          "or data.spacing of the profile to keep them", stacklevel=2)
        return d


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
        _WarnIfCut(cfg),
        mt.ResizeWithPadOrCropd(keys=keys, spatial_size=cfg.shape),
        mt.EnsureTyped(keys=keys, dtype=torch.float32, track_meta=True),
    ]
    return mt.Compose(steps)


def load_case(case: Case, cfg: DataConfig, modality: str = "CT") -> dict[str, Any]:
    """One preprocessed case: ``image`` (1,*shape) float in [0,1]; ``label`` (1,*shape) float if labelled.

    The tensors are plain ``torch.Tensor``s: MONAI's metadata is dropped here, at the data boundary, so no stage
    downstream has to strip it. What the way back needs comes along: ``affine`` (4x4 float64, the working grid's
    voxel-to-world matrix, for ``to_source_geometry``), ``source_image`` (the original file) and ``id``.
    """
    with_label = case.label is not None
    out = preprocess_transform(cfg, modality, with_label)(case.as_dict())
    image = out["image"]
    out["affine"] = torch.as_tensor(image.affine, dtype=torch.float64).clone()
    out["image"] = image.as_tensor()
    out["id"] = case.id
    out["source_image"] = str(case.image)
    if with_label:
        out["label"] = out["label"].round().as_tensor()
    return out


def load_cases(cases: Sequence[Case], cfg: DataConfig, modality: str = "CT") -> list[dict[str, Any]]:
    return [load_case(c, cfg, modality) for c in cases]


def stack_cases(cases: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Batch tensors (N,1,*shape) images and (N,*shape) int64 labels from preprocessed cases."""
    images = torch.stack([torch.as_tensor(c["image"]) for c in cases])
    if all("label" in c for c in cases):
        labels = torch.stack([torch.as_tensor(c["label"])[0].long() for c in cases])
        return images, labels
    return images, None


# ------------------------------------------------------------------------------------------------ writing out
def to_source_geometry(probs: torch.Tensor, reference: dict[str, Any]) -> np.ndarray:
    """Resample class probabilities (C,*shape) on the preprocessed grid into the source image's voxel grid.

    ``reference`` is the preprocessed case from ``load_case`` (its ``affine`` is the working grid's).
    Probabilities are resampled linearly and then arg-maxed: interpolating one-hot maps gives smoother organ
    boundaries than nearest-neighbour resampling of the label map.
    Returns the integer label map in the source geometry (shape and affine of ``reference['source_image']``).
    """
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    src = nib.load(reference["source_image"])
    work = reference["affine"] if "affine" in reference else reference["image"].affine
    if isinstance(probs, MetaTensor):  # it would keep its own affine and warn that it is overwritten
        probs = probs.as_tensor()
    plain = torch.as_tensor(probs, dtype=torch.float32).detach().cpu()
    probs = MetaTensor(plain, affine=torch.as_tensor(work, dtype=torch.float64))
    out = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)(
        probs, dst_affine=torch.as_tensor(src.affine, dtype=torch.float64), spatial_size=src.shape[:3])
    if isinstance(out, MetaTensor):  # its metadata is not needed past this line
        out = out.as_tensor()
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
