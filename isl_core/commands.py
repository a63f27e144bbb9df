"""What each ``isl`` subcommand does: it wires the stages together (the CLI only parses arguments).

Every command checks what it can before any long computation starts (the device, the dataset, the run folder it
writes into) and raises ``UserError`` subclasses for problems the user can fix; ``cli.main`` prints them as one
line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from isl_core.config import Profile, get_profile
from isl_core.data import Case, DatasetError, case_id_from_path, load_case, load_dataset, validate_case
from isl_core.runtime import UserError, read_json, resolve_device, write_json

#: Stamp of a prediction folder: the model (by content) whose predictions it holds.
PREDICTIONS_STAMP = "isl_predictions.json"


def _out_folder(path: str | Path, option: str = "--out") -> Path:
    """``path`` as an output folder: it may be missing (it is created) but must not be a file."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out}: exists and is not a folder; give a folder path")
    return out


def profile_from_args(args: argparse.Namespace, **overrides: dict) -> Profile:
    """The ``--profile`` preset with ``overrides`` and every ``--set STAGE.FIELD=VALUE`` applied (checked here)."""
    merged: dict[str, dict] = {stage: dict(values) for stage, values in overrides.items()}
    for stage, field, value in getattr(args, "settings", []):
        merged.setdefault(stage, {})[field] = value
    try:
        return get_profile(args.profile, **merged)
    except (TypeError, ValueError) as exc:
        raise UserError(f"--set: {exc}") from None


def train(args: argparse.Namespace) -> int:
    from isl_core.data import dataset_fingerprint
    from isl_core.segment import MODEL, check_run_binding, train_baseline

    out = _out_folder(args.out)
    device = resolve_device(args.device)
    ds = load_dataset(args.dataset)
    profile = profile_from_args(args)
    fingerprint = dataset_fingerprint(ds)
    # a run folder is bound to its dataset, profile and seed: checked before anything is read or written
    check_run_binding(out, profile, ds.num_classes, args.seed, fingerprint)
    if (out / MODEL).is_file():
        print(f"{out / MODEL} exists: training is finished (remove the folder to retrain)")
        return 0
    print(f"training the baseline segmenter ({profile.name} profile, {len(ds.training)} cases) on {device}")
    _, state = train_baseline(ds, ds.training, profile, out, seed=args.seed, device=device,
                              dataset_fingerprint=fingerprint)
    last = [h for h in state.history if "val_dice" in h]
    msg = f"; validation Dice {last[-1]['val_dice']:.3f}" if last else ""
    print(f"done: {state.step} steps in {state.seconds:.0f} s{msg} -> {out / MODEL}")
    return 0


def _inputs(path: Path) -> tuple[list[Case], str]:
    """Cases to predict: one NIfTI file (checked as strictly as a dataset case), or a dataset folder's
    validation and test cases."""
    if path.is_dir():
        ds = load_dataset(path)
        if not ds.validation and not ds.test:
            raise DatasetError(f"{ds.root / 'dataset.json'}: no 'validation' or 'test' cases to predict")
        return ds.validation + ds.test, ds.modality
    if not path.is_file():
        raise DatasetError(f"{path}: not found; give a NIfTI image or a dataset folder")
    case = Case(case_id_from_path(path), path.resolve(), None, "test")
    validate_case(case, {})  # 3-D, finite, readable: the same rules as a dataset case
    return [case], "CT"


def _claim_prediction_folder(out: Path, fingerprint: str, run: Path, targets: list[Path], force: bool) -> None:
    """Stamp ``out`` with the model's fingerprint; refuse a folder holding another (or an unknown) model's
    predictions, since skipping its files as "exists" would report them as this model's."""
    stamp = out / PREDICTIONS_STAMP
    if not force:
        if stamp.is_file():
            old = read_json(stamp, "prediction folder stamp")
            if isinstance(old, dict) and old.get("model_fingerprint") == fingerprint:
                return
            made_by = old.get("run") if isinstance(old, dict) else None
            raise UserError(f"{out}: holds the predictions of another model ({made_by or 'unknown run'}, see "
                            f"{PREDICTIONS_STAMP}); use another --out, or --force to replace them")
        existing = [t for t in targets if t.exists()]
        if existing:
            raise UserError(f"{existing[0]}: exists, and {out} has no {PREDICTIONS_STAMP} saying which model made it; "
                            "use another --out, or --force to replace it")
    write_json(stamp, {"model_fingerprint": fingerprint, "run": str(run.resolve())})


def predict(args: argparse.Namespace) -> int:
    from isl_core.data import write_prediction
    from isl_core.segment import load_segmenter, model_fingerprint, predict_proba

    out = _out_folder(args.out)
    device = resolve_device(args.device)
    net, meta = load_segmenter(args.run, device)
    profile = meta["profile_obj"]
    cases, modality = _inputs(Path(args.inputs))
    targets = [out / f"{case.id}.nii.gz" for case in cases]
    _claim_prediction_folder(out, model_fingerprint(args.run), Path(args.run), targets, args.force)
    for case, target in zip(cases, targets, strict=True):
        if target.exists() and not args.force:
            print(f"skip {target} (exists, made by this model)")
            continue
        pre = load_case(Case(case.id, case.image, None, case.split), profile.data, modality)
        probs = predict_proba(net, pre["image"], profile.segment, device)[0].cpu()
        write_prediction(probs, pre, target)
        print(f"wrote {target}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from isl_core.evaluate import evaluate_predictions, paired_tests_table, summarize
    from isl_core.runtime import write_csv

    ds = load_dataset(args.dataset)
    cases = ds.split(args.split)
    if not cases:
        raise DatasetError(f"{ds.root / 'dataset.json'}: no {args.split!r} cases to evaluate against; "
                           "choose another --split or add labelled cases")
    pred_dir = Path(args.pred_dir)
    folders = [pred_dir] + ([Path(args.vs)] if args.vs else [])
    for folder in folders:
        if not folder.is_dir():
            raise DatasetError(f"{folder}: not a folder of predictions; give the --out folder of `isl predict`")
    out = _out_folder(args.out) if args.out else pred_dir
    per_case = evaluate_predictions(pred_dir, cases, ds.labels, pred_dir.name)
    if args.vs:
        other = Path(args.vs)
        per_case = pd.concat([per_case, evaluate_predictions(other, cases, ds.labels, f"{other.name} (vs)")])
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
    from isl_core import experiment as exp

    _out_folder(args.out)
    resolve_device(args.device)
    refine = {k: v for k, v in (("rounds", args.rounds), ("beta", args.beta)) if v is not None}
    profile = profile_from_args(args, **({"refine": refine} if refine else {}))
    cases = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
    settings = exp.ExperimentSettings(profile=profile, methods=args.methods, model=args.model, seed=args.seed,
                                      device=args.device, cases=cases, force=args.force, folds=args.folds,
                                      fold_seed=args.fold_seed, seeds=args.seeds, workers=args.workers,
                                      scheduler=args.scheduler, retries=args.retries)
    summary = exp.run_experiment(args.dataset, args.out, settings)
    print(f"report: {Path(args.out) / 'report.md'}")
    for name, m in summary["methods"].items():
        print(f"  {name:20s} mean Dice {m['mean_dice']:.4f}   {m['seconds_per_case']:.1f} s/case")
    failed = summary.get("failed_cases", {})
    for case, error in failed.items():
        print(f"isl: case {case} failed: {error}", file=sys.stderr)
    return 1 if failed else 0


def reproduce(args: argparse.Namespace) -> int:
    from isl_core.reproduce import notebooks, run_notebooks

    _out_folder(args.out)
    resolve_device(args.device)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    try:
        notebooks(only, args.notebooks)
    except FileNotFoundError as e:
        raise UserError(f"{'--only ' + args.only + ': ' if only else ''}{e}") from None
    return run_notebooks(out=args.out, profile=args.profile, data=args.data, device=args.device, seed=args.seed,
                         only=only, notebook_folder=args.notebooks)
