"""The units of work of an experiment: a fold's baseline, and one inference case with all its methods.

Both are plain functions of a picklable job, so the same code runs in-process or as Dask tasks on other
processes and machines (``isl_core.distributed``). Both are idempotent (a finished unit is recognised on disk and
skipped) and write atomically: a case's predictions and its Dice table first, ``cases/CASE.json`` last. That file,
carrying the settings stamp the case was made with, is the only mark of a finished case, so a process killed
mid-case leaves nothing that looks complete.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from isl_core import outputs
from isl_core.config import Profile
from isl_core.data import DatasetError, load_cases, read_dataset_json, write_nifti, write_prediction
from isl_core.evaluate import evaluate_predictions, with_grid_dice
from isl_core.folds import baseline_dir
from isl_core.fusion import SourceAtlas, fuse, fuse_in_source_geometry
from isl_core.refine import Variant, as_batch
from isl_core.register import Atlases, register_atlases
from isl_core.runtime import UserError, read_json, resolve_device, seed_everything, write_csv, write_json
from isl_core.segment import MODEL, load_segmenter, predict_proba, train_baseline, unet_dtype
from isl_core.sharing import adapt_variants

#: Every method that runs the ISL loop (isl_core.refine), as the loop's choices. "mask" stands for the profile's
#: ``register.supervision_mask`` (CaseRunner substitutes it); an unset ``ema`` or ``beta`` is the profile's. A new arm
#: is a line here and its name in ``config.METHODS`` (the names a command line accepts, checked before any work).
LOOP_METHODS: dict[str, Variant] = {
    "isl-intensity": Variant("intensity", ema=False),
    "isl-intensity-ema": Variant("intensity", ema=True),
    "isl-mask": Variant("mask", ema=False),
    "isl-mask-ema": Variant("mask", ema=True),
    "isl-mask-ema-malf": Variant("mask", ema=True),  # M0 from MALF: CaseRunner sets initial_mask
    # control arms: the default ISL variant (isl-mask-ema) without the deformation onto x*; test-time adaptation
    # on x* alone (self-training on its own moving-average prediction; TENT); C2 at a matched registration budget
    "finetune-atlases": Variant("none", ema=True),
    "pseudo-label": Variant("none", ema=True, target="pseudo-label"),
    "tent": Variant("none", ema=False, target="entropy"),
    "isl-intensity-matched": Variant("intensity", ema=False, matched_budget=True),
}
BASELINE_STAMP = "experiment_stamp.json"  # beside a baseline the experiment trained: what it was trained on


class MethodOutput(NamedTuple):
    """What one method made of one inference case."""

    probs: torch.Tensor  # (C,*S) on the working grid
    seconds: float  # what the method would cost alone
    source_labels: np.ndarray | None = None  # a label map the method made in the source geometry itself


#: methods that vote with the intensity-aligned atlases (one registration and one vote serve them all)
FUSION_METHODS = ("malf", "malf-source", "isl-mask-ema-malf")


class CaseRunner:
    """Runs every requested method on one inference case, sharing registrations between them.

    ``atlas_sources`` (the atlases' label files, :class:`isl_core.fusion.SourceAtlas`) are needed by ``malf-source``
    only; ``run`` then needs the inference case's ``reference`` (``data.load_case``) too.
    """

    def __init__(self, net0, atlases: Atlases, profile: Profile, num_classes: int, device, seed: int,
                 atlas_sources: Sequence[SourceAtlas] = ()):
        # the same Atlases serve every case: their organ maps are resampled once for the whole experiment
        self.net0, self.atlases, self.atlas_sources = net0, atlases, list(atlas_sources)
        self.profile, self.num_classes, self.device, self.seed = profile, num_classes, device, seed

    def run(self, image: torch.Tensor, methods: Sequence[str], reference: dict[str, Any] | None = None
            ) -> dict[str, MethodOutput]:
        """method -> its :class:`MethodOutput`."""
        x = as_batch(image)
        out: dict[str, MethodOutput] = {}
        t0 = time.perf_counter()
        p0 = predict_proba(self.net0, x, self.profile.segment, self.device)[0].cpu()
        t_base = time.perf_counter() - t0
        out["baseline"] = MethodOutput(p0, t_base)
        reg_int, malf, t_int, t_fuse = None, None, 0.0, 0.0
        if any(m in methods for m in FUSION_METHODS):
            cfg = dataclasses.replace(self.profile.register, supervision="intensity")
            reg_int = register_atlases(x, self.atlases, cfg, self.num_classes, device=self.device)
            t_int = reg_int.seconds
            t0 = time.perf_counter()
            malf = fuse(x, reg_int, self.profile.fusion)[0].cpu()
            t_fuse = time.perf_counter() - t0
            out["malf"] = MethodOutput(malf, t_base + t_int + t_fuse)
        if "malf-source" in methods:
            if reference is None or not self.atlas_sources:
                raise ValueError("malf-source needs the atlases' label files and the inference case's reference")
            t0 = time.perf_counter()
            labels = fuse_in_source_geometry(x, reference, self.atlas_sources, reg_int, self.profile.fusion)
            # on the working grid it is malf: that vote stands for it in the working-grid Dice
            out["malf-source"] = MethodOutput(malf, t_base + t_int + time.perf_counter() - t0, labels)
        variants, initial_seconds = {}, {}
        for method, variant in LOOP_METHODS.items():
            if method not in methods:
                continue
            if method == "isl-mask-ema-malf":
                blend = self.profile.refine.malf_blend
                variant = dataclasses.replace(variant, initial_mask=blend * malf + (1 - blend) * p0)
                # the MALF estimate costs its fusion, plus its registration unless round 1 aligns intensities
                # anyway (then adapt_variants already charges that registration to this method)
                initial_seconds[method] = t_fuse + (t_int if self.profile.refine.mask_from_round <= 1 else 0.0)
            if variant.supervision == "mask":
                variant = dataclasses.replace(variant, supervision=self.profile.register.supervision_mask)
            variants[method] = variant
        if variants:
            results = adapt_variants(self.net0, x, self.atlases, self.profile, self.num_classes, variants,
                                     intensity_registration=reg_int, probs0=(p0, t_base), keep_history=False,
                                     device=self.device, seed=self.seed)
            for method, res in results.items():
                out[method] = MethodOutput(res.final_probs, res.seconds["total"] + initial_seconds.get(method, 0.0))
        return {m: out[m] for m in methods if m in out}


@dataclass
class BaselineJob:
    """Train (or find) one fold's baseline. ``model`` set: a given run folder, nothing is trained."""

    dataset: str
    out: str
    fold: int | None
    train_ids: list[str]
    profile: Profile
    seed: int
    stamp: dict[str, Any]
    model: str | None = None
    device: str = "auto"
    progress: bool = True

    @property
    def run_dir(self) -> Path:
        return Path(self.model) if self.model else baseline_dir(self.out, self.fold)


@dataclass
class CaseJob:
    """Run ``methods`` on one inference case with its fold's baseline and atlases; write its results."""

    baseline: BaselineJob
    case_id: str
    case_seed: int
    methods: list[str]
    stamp_id: str
    threads: int | None = None  # torch threads in this process (None: leave as is)


def _cases(dataset: str, ids: Sequence[str]):
    ds = read_dataset_json(dataset)  # the driver validated every file; workers only need the paths
    by_id = {c.id: c for c in ds.training + ds.validation + ds.test}
    return ds, [by_id[i] for i in ids]


def _check_shared(out: Path) -> None:
    """A worker must see and write the driver's output folder (shared storage on a multi-node cluster)."""
    where = f"{socket.gethostname()} (pid {os.getpid()})"
    if not (out / "experiment.json").is_file():
        raise UserError(f"{out}: this worker on {where} does not see the experiment folder; the output folder must "
                        "be on storage shared by the driver and every worker (see docs/cluster.md)")
    probe = out / "cases" / f".write-test-{socket.gethostname()}-{os.getpid()}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{out / 'cases'}: this worker on {where} cannot write there ({e.strerror}); give every "
                        "worker write access to the output folder (see docs/cluster.md)") from None


def baseline_run(job: BaselineJob) -> str:
    """The fold's baseline run folder, trained (``segment.train_baseline``) if not there yet, resuming a half-trained
    one; returns its path."""
    run = job.run_dir
    if job.model:
        return str(run)
    stamp = {"stamp": job.stamp, "train_ids": sorted(job.train_ids)}
    marker = run / BASELINE_STAMP
    if (run / MODEL).is_file() and marker.is_file() and read_json(marker, "baseline stamp") == stamp:
        return str(run)
    if run.exists() and (not marker.is_file() or read_json(marker, "baseline stamp") != stamp):
        # a baseline of other settings in the experiment's own folder (the driver refused this unless --force):
        # it cannot serve these settings and is the kit's own output, so it is trained afresh
        outputs.remove_tree(run)
    write_json(marker, stamp)
    ds, train = _cases(job.dataset, job.train_ids)
    train_baseline(ds, train, job.profile, run, seed=job.seed, device=resolve_device(job.device), progress=job.progress)
    return str(run)


_RUNNERS: dict[tuple[str, str, bool], CaseRunner] = {}  # per process: one runner (network, atlases) per fold


def _runner(job: BaselineJob, methods: Sequence[str]) -> CaseRunner:
    key = (str(job.run_dir.resolve()), ",".join(sorted(job.train_ids)), "malf-source" in methods)
    if key not in _RUNNERS:
        _RUNNERS.clear()  # one fold's atlases at a time: a worker moves through folds, memory stays flat
        ds, train = _cases(job.dataset, job.train_ids)
        device = resolve_device(job.device)
        net0, meta = load_segmenter(job.run_dir, device)
        if meta["num_classes"] != ds.num_classes:
            raise DatasetError(f"{job.run_dir / 'config.json'}: the model predicts {meta['num_classes']} classes, "
                               f"the dataset declares {ds.num_classes}; train a model on this dataset")
        pre = load_cases(train, job.profile.data, ds.modality)
        atlases = Atlases.from_cases(pre, job.profile.data.spacing)
        sources = [SourceAtlas.from_case(str(c.label), p) for c, p in zip(train, pre)] if "malf-source" in methods \
            else []
        _RUNNERS[key] = CaseRunner(net0, atlases, job.profile, ds.num_classes, device, job.seed, sources)
    return _RUNNERS[key]


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):  # not inside a Dask worker
        return f"local:{socket.gethostname()}:{os.getpid()}"


def case_done(out: Path, case_id: str, methods: Sequence[str], stamp_id: str) -> bool:
    """Finished under these settings: ``cases/CASE.json`` with this stamp, every method, every prediction file."""
    meta = out / "cases" / f"{case_id}.json"
    if not meta.is_file():
        return False
    done = read_json(meta, "case result")
    return done.get("stamp_id") == stamp_id and all(
        m in done.get("methods", {}) and (out / "predictions" / m / f"{case_id}.nii.gz").is_file() for m in methods)


def run_case(job: CaseJob, baseline: str | None = None) -> dict[str, Any]:
    """Run one case (skipped when already finished) and return its ``cases/CASE.json`` record.

    ``baseline`` is the result of the fold's :func:`baseline_run` task; passing it makes Dask run this task after it.
    """
    out = Path(job.baseline.out)
    _check_shared(out)
    meta = out / "cases" / f"{job.case_id}.json"
    if case_done(out, job.case_id, job.methods, job.stamp_id):
        return read_json(meta, "case result")
    if job.threads:
        torch.set_num_threads(job.threads)
    runner = _runner(job.baseline, job.methods)
    ds, (case,) = _cases(job.baseline.dataset, [job.case_id])
    seed_everything(job.case_seed)
    t0 = time.perf_counter()
    pre = load_cases([case], job.baseline.profile.data, ds.modality)[0]
    results = runner.run(pre["image"], job.methods, pre)
    frames, seconds = [], {}
    for method, res in results.items():
        path = out / "predictions" / method / f"{case.id}.nii.gz"
        if res.source_labels is None:
            write_prediction(res.probs, pre, path)
        else:
            write_nifti(res.source_labels, nib.load(case.image).affine, path)
        seconds[method] = res.seconds
        if case.label is not None:
            scored = evaluate_predictions(out / "predictions" / method, [case], ds.labels, method)
            frames.append(with_grid_dice(scored, res.probs, pre["label"], ds.labels))
    if frames:
        write_csv(pd.concat(frames, ignore_index=True), out / "cases" / f"{case.id}.csv")
    record = {"case": case.id, "split": case.split, "fold": job.baseline.fold, "methods": seconds,
              "wall_seconds": time.perf_counter() - t0, "worker": _worker_address(), "stamp_id": job.stamp_id,
              "stamp": job.baseline.stamp,
              "unet_dtype": unet_dtype(runner.device, job.baseline.profile.segment.amp)}
    write_json(meta, record)  # last: the mark of a finished case
    return record
