"""What each ``isl`` subcommand does: it wires the stages together (the CLI only parses arguments)."""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import pandas as pd

from isl_core.config import get_profile
from isl_core.data import Case, DatasetError, case_id_from_path, load_case, load_cases, load_dataset
from isl_core.runtime import resolve_device


def train(args: argparse.Namespace) -> int:
    from isl_core.segment import MODEL, train_segmenter

    out = Path(args.out)
    if (out / MODEL).is_file():
        print(f"{out / MODEL} exists: training is finished (remove the folder to retrain)")
        return 0
    ds = load_dataset(args.dataset)
    profile = get_profile(args.profile)
    device = resolve_device(args.device)
    print(f"training the baseline segmenter ({profile.name} profile, {len(ds.training)} cases) on {device}")
    train_cases = load_cases(ds.training, profile.data, ds.modality)
    val_cases = load_cases(ds.validation, profile.data, ds.modality)
    _, state = train_segmenter(train_cases, profile, ds.num_classes, ds.labels, out=out, val_cases=val_cases,
                               device=device, seed=args.seed)
    last = [h for h in state.history if "val_dice" in h]
    msg = f"; validation Dice {last[-1]['val_dice']:.3f}" if last else ""
    print(f"done: {state.step} steps in {state.seconds:.0f} s{msg} -> {out / MODEL}")
    return 0


def _inputs(path: Path) -> tuple[list[Case], str]:
    """Cases to predict: one NIfTI file, or the validation and test cases of a dataset folder."""
    if path.is_dir():
        ds = load_dataset(path)
        return ds.validation + ds.test, ds.modality
    if not path.is_file():
        raise DatasetError(f"{path}: not found; give a NIfTI image or a dataset folder")
    return [Case(case_id_from_path(path), path, None, "test")], "CT"


def predict(args: argparse.Namespace) -> int:
    from isl_core.data import write_prediction
    from isl_core.segment import load_segmenter, predict_proba

    net, meta = load_segmenter(args.run, args.device)
    profile = meta["profile_obj"]
    cases, modality = _inputs(Path(args.inputs))
    out = Path(args.out)
    for case in cases:
        target = out / f"{case.id}.nii.gz"
        if target.exists():
            print(f"skip {target} (exists)")
            continue
        pre = load_case(Case(case.id, case.image, None, case.split), profile.data, modality)
        probs = predict_proba(net, pre["image"], profile.segment, args.device)[0].cpu()
        write_prediction(probs, pre, target)
        print(f"wrote {target}")
    return 0


def evaluate_predictions(pred_dir: Path, cases: list[Case], labels: dict[int, str], method: str) -> pd.DataFrame:
    """Per-case, per-organ Dice/HD95 of ``pred_dir/CASE.nii.gz`` against the cases' labels."""
    from isl_core.evaluate import evaluate_case

    rows = []
    for case in cases:
        pred_path = pred_dir / f"{case.id}.nii.gz"
        if not pred_path.is_file():
            raise DatasetError(f"{pred_path}: missing prediction for case {case.id}; run `isl predict` first")
        truth = nib.load(str(case.label))
        pred = nib.load(str(pred_path))
        if pred.shape != truth.shape:
            raise DatasetError(f"{pred_path}: shape {pred.shape} differs from the label {truth.shape}; "
                               "predictions must be in the source image's geometry")
        spacing = tuple(float(s) for s in truth.header.get_zooms()[:3])
        rows.append(evaluate_case(pred.get_fdata().round().astype(int), truth.get_fdata().round().astype(int),
                                  labels, spacing, case=case.id, method=method))
    return pd.concat(rows, ignore_index=True)


def evaluate(args: argparse.Namespace) -> int:
    from isl_core.evaluate import paired_tests_table, summarize, write_csv

    ds = load_dataset(args.dataset)
    cases = ds.split(args.split)
    pred_dir = Path(args.pred_dir)
    per_case = evaluate_predictions(pred_dir, cases, ds.labels, pred_dir.name)
    if args.vs:
        other = Path(args.vs)
        per_case = pd.concat([per_case, evaluate_predictions(other, cases, ds.labels, f"{other.name} (vs)")])
    out = Path(args.out) if args.out else pred_dir
    write_csv(per_case, out / "per_case.csv")
    for method, s in summarize(per_case).items():
        print(f"{method}: organ-averaged Dice {s['mean_dice']:.4f}")
        for organ, d in s["per_organ_dice"].items():
            print(f"  {organ:22s} {d:.4f}")
    if args.vs:
        tests = paired_tests_table(per_case, reference=f"{Path(args.vs).name} (vs)")
        write_csv(tests, out / "paired_tests.csv")
        print(tests.to_string(index=False))
    print(f"wrote {out / 'per_case.csv'}")
    return 0


def experiment(args: argparse.Namespace) -> int:
    from isl_core.experiment import run_experiment

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cases = [c.strip() for c in args.cases.split(",")] if args.cases else None
    summary = run_experiment(args.dataset, args.out, profile=args.profile, methods=methods, model=args.model,
                             device=args.device, seed=args.seed, rounds=args.rounds, beta=args.beta,
                             cases=cases, force=args.force)
    print(f"report: {Path(args.out) / 'report.md'}")
    for name, m in summary["methods"].items():
        print(f"  {name:20s} mean Dice {m['mean_dice']:.4f}   {m['seconds_per_case']:.1f} s/case")
    return 0


def reproduce(args: argparse.Namespace) -> int:
    from isl_core.reproduce import run_notebooks

    only = [s.strip() for s in args.only.split(",")] if args.only else None
    return run_notebooks(out=args.out, profile=args.profile, data=args.data, device=args.device, seed=args.seed,
                         only=only)
