"""The cohort experiment: methods x inference cases -> a results folder.

    OUT/experiment.json            the settings (profile, methods, seed, dataset); a rerun must match them
    OUT/baseline/                  the Stage 1 run (unless --model points to one)
    OUT/cases/CASE.csv|json        per-case results, written when a case is finished (the unit of resuming)
    OUT/predictions/METHOD/CASE.nii.gz   label maps in the source image's geometry
    OUT/per_case.csv               case x method x organ: Dice, HD95
    OUT/summary.json               the DESIGN.md contract (per-method means, paired tests vs baseline)
    OUT/report.md + figures/       tables and figures

Work is shared where methods allow: one intensity registration serves ``malf`` and every ISL round that
aligns intensities, and ``refine.adapt_variants`` runs all ISL variants of a case together, computing each
registration and fine-tuning run once however many variants need it. Until mask supervision starts
(``refine.mask_from_round``, 2 by default) the variants fine-tune identically, so round 1 is one run for all of
them; isl-intensity and isl-intensity-ema share every round. Each method's ``seconds_per_case`` counts what
it would cost alone (shared work is charged to every method that uses it).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from isl_core.config import METHODS, Profile, get_profile
from isl_core.data import Dataset, DatasetError, load_cases, load_dataset, stack_cases, write_prediction
from isl_core.evaluate import evaluate_case, json_safe, paired_tests, summarize, write_csv
from isl_core.fusion import fuse
from isl_core.refine import Variant, adapt_variants
from isl_core.register import AtlasOrgans, register_atlases
from isl_core.runtime import resolve_device, seed_everything, write_json
from isl_core.segment import MODEL, load_segmenter, predict_proba, train_segmenter

#: method -> (registration supervision, moving average, initial mask from MALF)
ISL_VARIANTS: dict[str, tuple[str, bool, bool]] = {
    "isl-intensity": ("intensity", False, False),
    "isl-intensity-ema": ("intensity", True, False),
    "isl-mask": ("mask", False, False),
    "isl-mask-ema": ("mask", True, False),
    "isl-mask-ema-malf": ("mask", True, True),
}


def _settings(dataset: Path, profile: Profile, methods: Sequence[str], seed: int, model: str | None) -> dict:
    return {"dataset": str(dataset), "profile": profile.to_dict(), "methods": list(methods), "seed": seed,
            "model": model}


def _check_out(out: Path, settings: dict, force: bool) -> None:
    """A results folder belongs to one set of settings: never mix results of different runs."""
    path = out / "experiment.json"
    if path.is_file() and not force:
        old = json.loads(path.read_text())
        # compare as stored: a JSON round trip turns the profile's tuples into lists
        same = {k: old.get(k) for k in ("dataset", "profile", "seed", "model")} == \
               json.loads(json.dumps({k: settings[k] for k in ("dataset", "profile", "seed", "model")}))
        if not same:
            raise FileExistsError(f"{path}: this folder holds an experiment with other settings; use another --out, "
                                  "or --force to recompute every case with the new settings")
        settings["methods"] = list(dict.fromkeys(old.get("methods", []) + settings["methods"]))
    write_json(path, settings)


def _baseline(ds: Dataset, out: Path, profile: Profile, model: str | None, device, seed: int, train_cases):
    if model:
        net, meta = load_segmenter(model, device)
        if meta["num_classes"] != ds.num_classes:
            raise DatasetError(f"{Path(model) / 'config.json'}: the model predicts {meta['num_classes']} classes, "
                               f"the dataset declares {ds.num_classes}; train a model on this dataset")
        return net
    run = out / "baseline"
    if (run / MODEL).is_file():
        return load_segmenter(run, device)[0]
    val_cases = load_cases(ds.validation[:2], profile.data, ds.modality)
    net, _ = train_segmenter(train_cases, profile, ds.num_classes, ds.labels, out=run, val_cases=val_cases,
                             device=device, seed=seed)
    return net


class CaseRunner:
    """Runs every requested method on one inference case, sharing registrations between them."""

    def __init__(self, net0, atlas_images, atlas_labels, profile: Profile, num_classes: int, device, seed: int):
        self.net0, self.images, self.labels = net0, atlas_images, atlas_labels
        self.profile, self.num_classes, self.device, self.seed = profile, num_classes, device, seed
        self.organs = AtlasOrgans(atlas_labels)  # the same atlases serve every case: resample their organs once

    def _register_intensity(self, x):
        cfg = copy.deepcopy(self.profile.register)
        cfg.supervision = "intensity"
        t0 = time.perf_counter()
        reg = register_atlases(x, self.images, self.labels, cfg, self.num_classes, device=self.device)
        return reg, time.perf_counter() - t0

    def run(self, image: torch.Tensor, methods: Sequence[str]) -> dict[str, tuple[torch.Tensor, float]]:
        """method -> (probabilities (C,*S) on the working grid, seconds it cost)."""
        x = torch.as_tensor(image).as_subclass(torch.Tensor)[None].float()
        out: dict[str, tuple[torch.Tensor, float]] = {}
        t0 = time.perf_counter()
        p0 = predict_proba(self.net0, x, self.profile.segment, self.device)[0].cpu()
        t_base = time.perf_counter() - t0
        out["baseline"] = (p0, t_base)
        reg_int, malf, t_int, t_fuse = None, None, 0.0, 0.0
        if "malf" in methods or "isl-mask-ema-malf" in methods:
            reg_int, t_int = self._register_intensity(x)
            t0 = time.perf_counter()
            malf = fuse(x, reg_int, self.profile.fusion)[0].cpu()
            t_fuse = time.perf_counter() - t0
            out["malf"] = (malf, t_base + t_int + t_fuse)
        variants, initial_seconds = {}, {}
        for method, (supervision, ema, from_malf) in ISL_VARIANTS.items():
            if method not in methods:
                continue
            initial = None
            if from_malf:
                blend = self.profile.refine.malf_blend
                initial = blend * malf + (1 - blend) * p0
                # the MALF estimate costs its fusion, plus its registration unless round 1 aligns intensities
                # anyway (then adapt_variants already charges that registration to this method)
                initial_seconds[method] = t_fuse + (t_int if self.profile.refine.mask_from_round <= 1 else 0.0)
            if supervision == "mask":
                supervision = self.profile.register.supervision_mask
            variants[method] = Variant(supervision, ema, initial_mask=initial)  # beta: the profile's
        if variants:
            results = adapt_variants(self.net0, x, self.images, self.labels, self.profile, self.num_classes,
                                     variants, intensity_registration=reg_int, keep_history=False,
                                     device=self.device, seed=self.seed, probs0=(p0, t_base),
                                     atlas_organs=self.organs)
            for method, res in results.items():
                out[method] = (res.final_probs, res.seconds["total"] + initial_seconds.get(method, 0.0))
        return {m: out[m] for m in methods if m in out}


def _case_done(out: Path, case_id: str, methods: Sequence[str]) -> bool:
    meta = out / "cases" / f"{case_id}.json"
    if not meta.is_file():
        return False
    done = json.loads(meta.read_text()).get("methods", {})
    return all(m in done and (out / "predictions" / m / f"{case_id}.nii.gz").is_file() for m in methods)


def _evaluate(case, pred_path: Path, labels: dict[int, str], method: str) -> pd.DataFrame:
    import nibabel as nib

    truth = nib.load(str(case.label))
    spacing = tuple(float(s) for s in truth.header.get_zooms()[:3])
    pred = np.asarray(nib.load(str(pred_path)).dataobj).astype(int)
    return evaluate_case(pred, np.asarray(truth.dataobj).round().astype(int), labels, spacing, case=case.id,
                         method=method)


def run_experiment(dataset: str | Path, out: str | Path, profile: str | Profile = "quick",
                   methods: Sequence[str] = ("baseline", "malf", "isl-intensity", "isl-mask", "isl-mask-ema"),
                   model: str | None = None, device: str = "auto", seed: int = 0, rounds: int | None = None,
                   beta: float | None = None, cases: Sequence[str] | None = None, force: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Run ``methods`` on every validation case (and predict test cases); write and return ``summary.json``."""
    from tqdm.auto import tqdm

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    methods = list(dict.fromkeys(["baseline", *methods]))  # the paired tests need the baseline
    profile = copy.deepcopy(profile) if isinstance(profile, Profile) else get_profile(profile)
    if rounds is not None:
        profile.refine.rounds = rounds
    if beta is not None:
        profile.refine.beta = beta
    ds = load_dataset(dataset)  # validates every file before any work
    if not ds.validation and not ds.test:
        raise DatasetError(f"{ds.root / 'dataset.json'}: no 'validation' or 'test' cases to run the methods on")
    targets = ds.validation + ds.test
    if cases:
        missing = sorted(set(cases) - {c.id for c in targets})
        if missing:
            raise DatasetError(f"{ds.root / 'dataset.json'}: no validation/test case named {missing}")
        targets = [c for c in targets if c.id in cases]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_out(out, _settings(ds.root, profile, methods, seed, model), force)

    device = resolve_device(device)
    seed_everything(seed)
    train_cases = load_cases(ds.training, profile.data, ds.modality)
    net0 = _baseline(ds, out, profile, model, device, seed, train_cases)
    atlas_images, atlas_labels = stack_cases(train_cases)
    runner = CaseRunner(net0, atlas_images, atlas_labels, profile, ds.num_classes, device, seed)

    for i, case in enumerate(tqdm(targets, desc="inference cases", disable=not progress)):
        if not force and _case_done(out, case.id, methods):
            continue
        seed_everything(seed + i)
        pre = load_cases([case], profile.data, ds.modality)[0]
        results = runner.run(pre["image"], methods)
        frames, seconds = [], {}
        for method, (probs, secs) in results.items():
            path = write_prediction(probs, pre, out / "predictions" / method / f"{case.id}.nii.gz")
            seconds[method] = secs
            if case.label is not None:
                frames.append(_evaluate(case, path, ds.labels, method))
        if frames:
            write_csv(pd.concat(frames, ignore_index=True), out / "cases" / f"{case.id}.csv")
        write_json(out / "cases" / f"{case.id}.json", {"case": case.id, "split": case.split,
                                                      "methods": seconds})
    return write_results(out, ds, methods, targets)


def _collect(out: Path, targets) -> tuple[pd.DataFrame, dict[str, list[float]]]:
    frames, seconds = [], {}
    for case in targets:
        csv = out / "cases" / f"{case.id}.csv"
        if case.label is not None and csv.is_file():
            frames.append(pd.read_csv(csv))
        meta = out / "cases" / f"{case.id}.json"
        if meta.is_file():
            for m, s in json.loads(meta.read_text())["methods"].items():
                seconds.setdefault(m, []).append(float(s))
    per_case = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return per_case, seconds


def write_results(out: Path, ds: Dataset, methods: Sequence[str], targets) -> dict[str, Any]:
    """Aggregate the finished cases into per_case.csv, summary.json and report.md."""
    from isl_core.report import write_report

    per_case, seconds = _collect(out, targets)
    per_case = per_case[per_case["method"].isin(methods)] if len(per_case) else per_case
    summary: dict[str, Any] = {"methods": {}, "paired_tests": {}}
    stats = summarize(per_case) if len(per_case) else {}
    for m in methods:
        s = stats.get(m, {})
        summary["methods"][m] = {"mean_dice": s.get("mean_dice", float("nan")),
                                 "per_organ_dice": s.get("per_organ_dice", {}),
                                 "seconds_per_case": float(np.mean(seconds.get(m, [float("nan")]))),
                                 "mean_hd95_mm": s.get("mean_hd95_mm", float("nan")),
                                 "n_cases": s.get("n_cases", 0)}
    for m in methods:
        if m != "baseline" and len(per_case):
            t = paired_tests(per_case, m, "baseline")
            summary["paired_tests"][f"{m}_vs_baseline"] = {
                "delta_mean_dice": t["delta_mean_dice"], "p_value": t["p_value"], "test": "wilcoxon",
                "t_test_p_value": t["t_p_value"], "n_cases": t["n_cases"]}
    summary["dataset"] = str(ds.root)
    summary["settings"] = json.loads((out / "experiment.json").read_text())
    summary = json_safe(summary)
    if len(per_case):
        write_csv(per_case, out / "per_case.csv")
    write_json(out / "summary.json", summary)
    write_report(out, summary, per_case, ds)
    return summary
