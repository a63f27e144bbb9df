"""The cohort experiment: methods x inference cases -> a results folder.

    OUT/experiment.json            the settings stamp (dataset content, model, profile, seed, folds) and methods
    OUT/baseline/                  the Stage 1 run of the single split (unless ``model`` points to one)
    OUT/folds/F/baseline/          with ``folds=K``: fold F's baseline, trained on the other folds
    OUT/cases/CASE.csv|json        per-case results, written when a case is finished (the unit of resuming);
                                   the json carries the stamp it was made with, the seconds and the worker
    OUT/predictions/METHOD/CASE.nii.gz   label maps in the source image's geometry
    OUT/per_case.csv               case x method x organ: Dice, HD95 (+ fold, seconds, worker)
    OUT/summary.json               per-method means, paired tests vs baseline, the claims C1-C4, the protocol
    OUT/report.md + figures/       tables and figures

Work is shared where methods allow: one intensity registration serves ``malf`` and every ISL round that
aligns intensities, and ``sharing.adapt_variants`` runs all ISL variants of a case together, computing each
registration and fine-tuning run once however many variants need it. Each method's ``seconds_per_case`` counts
what it would cost alone (shared work is charged to every method that uses it).

Units of work (``isl_core.casework``): each fold's baseline, then each inference case with all its methods. They
run in this process, or as Dask tasks with ``workers=N`` / ``scheduler=ADDRESS`` (``isl_core.distributed``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from isl_core import outputs
from isl_core.casework import LOOP_METHODS, BaselineJob, CaseJob, CaseRunner, baseline_run, case_done, run_case
from isl_core.claims import claims as claims_of
from isl_core.config import DEFAULT_METHODS, METHODS, Profile, get_profile
from isl_core.data import Dataset, load_dataset
from isl_core.distributed import run_on_cluster
from isl_core.evaluate import paired_tests, summarize
from isl_core.folds import Fold, case_seeds, plan_folds
from isl_core.runtime import UserError, differences, json_safe, read_json, write_csv, write_json
from isl_core.stamp import make_stamp, stamp_id

UNRECORDED = "not recorded"  # the unet_dtype of a case result written before the kit recorded it

__all__ = ["CaseRunner", "ExperimentSettings", "LOOP_METHODS", "combine_seeds", "run_experiment", "write_results"]


@dataclass
class ExperimentSettings:
    """Everything ``run_experiment`` needs besides the dataset and the output folder."""

    profile: str | Profile = "quick"
    methods: Sequence[str] = DEFAULT_METHODS
    model: str | None = None  # a run folder of `isl train`; None: train the baseline(s) into the output folder
    seed: int = 0
    device: str = "auto"
    cases: Sequence[str] | None = None  # infer only these (validation/test ids; with folds, labelled ids)
    folds: int | None = None  # K-fold cross-validation over every labelled case
    fold_seed: int = 0
    force: bool = False  # recompute the selected cases under these settings
    progress: bool = True
    workers: int | None = None  # a local Dask cluster with this many worker processes
    scheduler: str | None = None  # or the address of a running Dask scheduler
    retries: int = 2  # extra attempts of a failed or lost case before it is reported as failed
    seeds: int | None = None  # run everything with this many seeds (seed, seed + 1, ...) and aggregate over them

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise UserError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
        if self.folds is not None and (isinstance(self.folds, bool) or int(self.folds) < 2):
            raise UserError(f"--folds {self.folds}: cross-validation needs at least 2 folds")
        if self.folds is not None and self.model:
            raise UserError("--model cannot be combined with --folds: each fold trains its own baseline on the other "
                            "folds (a given model may have seen the fold's cases)")
        if self.workers is not None and int(self.workers) < 1:
            raise UserError(f"--workers {self.workers}: give at least 1 worker process")
        if self.workers is not None and self.scheduler:
            raise UserError("--workers and --scheduler exclude each other: start a local cluster or join one")
        if int(self.retries) < 0:
            raise UserError(f"--retries {self.retries}: must be >= 0")
        if self.seeds is not None and (isinstance(self.seeds, bool) or int(self.seeds) < 1):
            raise UserError(f"--seeds {self.seeds}: give at least 1 seed")

    def resolved_profile(self) -> Profile:
        return dataclasses.replace(self.profile) if isinstance(self.profile, Profile) else get_profile(self.profile)


def _check_out(out: Path, stamp: dict[str, Any], methods: list[str], force: bool) -> list[str]:
    """A results folder belongs to one stamp: refuse other settings (naming them) unless ``force``; -> methods."""
    path = out / "experiment.json"
    if path.is_file():
        old = read_json(path, "experiment settings")
        if "seeds" in old:
            raise UserError(f"{path}: this folder holds a run over several seeds (--seeds); rerun with --seeds "
                            f"{len(old['seeds'])} to resume it, or use another --out")
        if not force and "stamp" not in old:
            raise UserError(f"{path}: this folder holds an experiment of an older isl-kit without a settings stamp; "
                            "use another --out, or --force to recompute every case")
        if not force and old["stamp"] != stamp:
            raise UserError(f"{path}: this folder holds an experiment with other settings: "
                            f"{'; '.join(differences(old['stamp'], stamp))}. Use another --out, or --force to "
                            "recompute the selected cases with the new settings")
        if old.get("stamp") == stamp:
            methods = list(dict.fromkeys(old.get("methods", []) + methods))
    return methods


def _check_cases(out: Path, case_ids: Sequence[str], stamp: dict[str, Any], force: bool) -> None:
    """Refuse, before any work, to extend a folder whose cases were made with other settings (unless ``force``)."""
    if force:
        return
    sid = stamp_id(stamp)
    for cid in case_ids:
        meta = out / "cases" / f"{cid}.json"
        if meta.is_file():
            old = read_json(meta, "case result")
            if old.get("stamp_id") != sid:
                what = "; ".join(differences(old["stamp"], stamp)) if "stamp" in old else "no settings stamp"
                raise UserError(f"{meta}: this case was made with other settings ({what}); rerun with --force to "
                                "recompute it with the current settings, or use another --out")


def _jobs(ds: Dataset, out: Path, plan: list[Fold], s: ExperimentSettings, profile: Profile, stamp: dict[str, Any],
          methods: list[str]) -> list[tuple[BaselineJob, list[CaseJob]]]:
    seeds = case_seeds(ds, s.folds, s.seed)
    sid = stamp_id(stamp)
    units = []
    for fold in plan:
        base = BaselineJob(str(ds.root), str(out), fold.index, [c.id for c in fold.train], profile, s.seed, stamp,
                           model=s.model, device=s.device, progress=s.progress)
        cases = [CaseJob(base, c.id, seeds[c.id], methods, sid) for c in fold.infer]
        units.append((base, cases))
    return units


def _run_in_process(units, out: Path, force: bool, progress: bool,
                    on_case: Callable[[dict[str, Any]], None] | None) -> dict[str, str]:
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(c) for _, c in units), desc="inference cases", disable=not progress)
    for base, cases in units:
        todo = [j for j in cases if force or not case_done(out, j.case_id, j.methods, j.stamp_id)]
        bar.update(len(cases) - len(todo))
        if todo:
            baseline_run(base)
        for job in todo:
            if force:  # recompute: the finished mark goes first, so an interrupted rerun redoes the case
                outputs.remove(out / "cases" / f"{job.case_id}.json")
            record = run_case(job)
            bar.update(1)
            if on_case is not None:
                on_case(record)
    bar.close()
    return {}


def run_experiment(dataset: str | Path, out: str | Path, settings: ExperimentSettings,
                   on_case: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the methods on every inference case (validation + test, or every labelled case by cross-validation);
    write and return ``summary.json``. ``on_case(record)`` is called in the driver after each finished case."""
    if not isinstance(settings, ExperimentSettings):
        raise TypeError(f"settings must be an ExperimentSettings, got {type(settings).__name__}")
    s = settings
    if s.seeds is not None:
        return _run_seeds(dataset, Path(out), s, on_case)
    methods = list(dict.fromkeys(["baseline", *s.methods]))  # the paired tests need the baseline
    profile = s.resolved_profile()
    ds = load_dataset(dataset)  # validates every file before any work
    out = Path(out)
    plan = plan_folds(ds, s.folds, s.fold_seed, s.cases)
    if s.model and not (Path(s.model) / "model.pt").is_file():
        raise UserError(f"--model {s.model}: no model.pt there; give a run folder written by `isl train`")
    stamp = make_stamp(ds, profile, s.seed, s.model, s.folds, s.fold_seed)
    outputs.check_apart(out, ds.root)
    # one run at a time, and only the kit's own files in the folder: a resumed run finds only what it wrote
    with outputs.claim(out, "isl experiment"):
        methods = _check_out(out, stamp, methods, s.force)
        _check_cases(out, [c.id for f in plan for c in f.infer], stamp, s.force)
        write_json(out / "experiment.json", {"stamp": stamp, "stamp_id": stamp_id(stamp), "methods": methods,
                                             "dataset": str(ds.root)})
        units = _jobs(ds, out, plan, s, profile, stamp, methods)
        if s.workers or s.scheduler:
            failed = run_on_cluster(units, out, workers=s.workers, scheduler=s.scheduler, device=s.device,
                                    retries=s.retries, force=s.force, progress=s.progress, on_case=on_case)
        else:
            failed = _run_in_process(units, out, s.force, s.progress, on_case)
        # the summary covers every finished case of these settings, not only the ones this call was asked to run
        return write_results(out, ds, methods, plan_folds(ds, s.folds, s.fold_seed), stamp, failed)


def _collect(out: Path, plan: list[Fold], sid: str
             ) -> tuple[pd.DataFrame, dict[str, list[float]], list[str], set[str]]:
    """The finished cases made under stamp ``sid`` (others are listed, never mixed in), their seconds per method,
    the excluded cases and the precisions the segmenter computed in (``unet_dtype`` of each case record)."""
    frames, seconds, excluded, dtypes = [], {}, [], set()
    for fold in plan:
        for case in fold.infer:
            meta = out / "cases" / f"{case.id}.json"
            if not meta.is_file():
                continue
            record = read_json(meta, "case result")
            if record.get("stamp_id") != sid:
                excluded.append(case.id)
                continue
            for m, secs in record["methods"].items():
                seconds.setdefault(m, []).append(float(secs))
            dtypes.add(record.get("unet_dtype", UNRECORDED))
            csv = out / "cases" / f"{case.id}.csv"
            if case.label is not None and csv.is_file():
                df = pd.read_csv(csv)
                if fold.index is not None:
                    df.insert(0, "fold", fold.index)
                df["seconds"] = df["method"].map(record["methods"]).astype(float)
                df["worker"] = record.get("worker", "")
                frames.append(df)
    per_case = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return per_case, seconds, excluded, dtypes


def write_results(out: Path, ds: Dataset, methods: Sequence[str], plan: list[Fold], stamp: dict[str, Any],
                  failed: dict[str, str] | None = None) -> dict[str, Any]:
    """Aggregate the finished cases of these settings into per_case.csv, summary.json and report.md."""
    per_case, seconds, excluded, dtypes = _collect(out, plan, stamp_id(stamp))
    per_case = per_case[per_case["method"].isin(methods)] if len(per_case) else per_case
    summary = _summary(per_case, methods, {m: float(np.mean(v)) for m, v in seconds.items()})
    # not in the stamp (a run resumed on other hardware is not refused), but said: bf16 and fp32 differ slightly
    summary["unet_dtype"] = sorted(dtypes)
    if stamp.get("folds"):
        n = per_case["case"].nunique() if len(per_case) else 0
        summary["protocol"] = {"folds": stamp["folds"], "fold_seed": stamp["fold_seed"], "n_cases": int(n),
                               "seeds": [stamp["seed"]]}
    if excluded:  # made with other settings (e.g. left by an earlier --force --cases): never mixed in
        summary["excluded_cases"] = {"cases": excluded, "reason": "made with other settings; rerun with --force"}
    return _write_summary(out, ds, summary, per_case, stamp, methods, failed)


def _summary(per_case: pd.DataFrame, methods: Sequence[str], seconds: dict[str, float]) -> dict[str, Any]:
    """Per-method means, paired tests against the baseline and the claims of one per-case table."""
    summary: dict[str, Any] = {"methods": {}, "paired_tests": {}}
    stats = summarize(per_case) if len(per_case) else {}
    for m in methods:
        st = stats.get(m, {})
        summary["methods"][m] = {"mean_dice": st.get("mean_dice", math.nan),
                                 "per_organ_dice": st.get("per_organ_dice", {}),
                                 "seconds_per_case": seconds.get(m, math.nan),
                                 "mean_hd95_mm": st.get("mean_hd95_mm", math.nan),
                                 "n_cases": st.get("n_cases", 0)}
    for m in methods:
        if m != "baseline" and len(per_case):
            t = paired_tests(per_case, m, "baseline")
            summary["paired_tests"][f"{m}_vs_baseline"] = {
                "delta_mean_dice": t["delta_mean_dice"], "p_value": t["p_value"], "test": "wilcoxon",
                "t_test_p_value": t["t_p_value"], "n_cases": t["n_cases"]}
    summary["claims"] = claims_of(per_case) if len(per_case) else {}
    return summary


def _write_summary(out: Path, ds: Dataset, summary: dict[str, Any], per_case: pd.DataFrame, stamp: dict[str, Any],
                   methods: Sequence[str], failed: dict[str, str] | None) -> dict[str, Any]:
    from isl_core.report import write_report

    summary["dataset"] = str(ds.root)
    summary["settings"] = {**stamp, "methods": list(methods)}
    if failed:
        summary["failed_cases"] = failed
    summary = json_safe(summary)
    if len(per_case):
        write_csv(per_case, out / "per_case.csv")
    else:
        outputs.remove(out / "per_case.csv")
    write_json(out / "summary.json", summary)
    write_report(out, summary, per_case, ds)
    return summary


# ---------------------------------------------------------------------------------------------- several seeds

def _run_seeds(dataset: str | Path, out: Path, s: ExperimentSettings,
               on_case: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    """``--seeds N``: the whole experiment once per seed in ``OUT/seeds/SEED/`` (each resumable on its own), then every
    seed's rows in ``OUT/per_case.csv`` (a ``seed`` column) and the summary over them: the claims pair per-case
    means over the seeds, and ``claims.seeds`` gives the spread (``isl_core.claims``)."""
    seeds = [s.seed + i for i in range(int(s.seeds))]
    marker = out / "experiment.json"
    if marker.is_file() and "seeds" not in read_json(marker, "experiment settings"):
        raise UserError(f"{marker}: this folder holds an experiment run without --seeds; use another --out for the "
                        "runs over several seeds")
    ds = load_dataset(dataset)
    outputs.check_apart(out, ds.root)
    with outputs.claim(out, "isl experiment --seeds"):
        return _seed_runs(ds, out, s, seeds, on_case)


def _seed_runs(ds: Dataset, out: Path, s: ExperimentSettings, seeds: list[int],
               on_case: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    write_json(out / "experiment.json", {"seeds": seeds, "runs": [str(Path("seeds") / str(seed)) for seed in seeds]})
    runs = {seed: run_experiment(ds.root, out / "seeds" / str(seed),
                                 dataclasses.replace(s, seed=seed, seeds=None), on_case) for seed in seeds}
    tables = {}
    for seed in seeds:
        path = out / "seeds" / str(seed) / "per_case.csv"
        if path.is_file():
            tables[seed] = pd.read_csv(path)
    per_case, summary = combine_seeds(tables, runs)
    failed = {f"seed {seed}: {case}": why for seed, r in runs.items()
              for case, why in r.get("failed_cases", {}).items()}
    first = runs[seeds[0]]
    stamp = {k: v for k, v in first["settings"].items() if k != "methods"}
    return _write_summary(out, ds, summary, per_case, {**stamp, "seed": seeds}, first["methods"], failed)


def combine_seeds(tables: dict[int, pd.DataFrame], summaries: dict[int, dict[str, Any]]
                  ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Single-seed runs of one setting -> every seed's rows in one table (a ``seed`` column) and the summary over
    them, as ``--seeds`` writes it. ``tables``: each seed's ``per_case.csv``; ``summaries``: each seed's
    ``summary.json`` (the methods, their seconds and the protocol come from there; the first seed's order)."""
    seeds = list(summaries)
    per_case = (pd.concat([t.assign(seed=seed) for seed, t in tables.items()], ignore_index=True) if tables
                else pd.DataFrame())
    first = summaries[seeds[0]]
    methods = list(first["methods"])
    seconds = {m: float(np.nanmean([r["methods"][m]["seconds_per_case"] for r in summaries.values()]))
               for m in methods}
    summary = _summary(per_case, methods, seconds)
    n_cases = int(per_case["case"].nunique()) if len(per_case) else 0
    summary["protocol"] = {**first.get("protocol", {}), "n_cases": n_cases, "seeds": seeds}
    summary["unet_dtype"] = sorted({d for r in summaries.values() for d in r.get("unet_dtype", [UNRECORDED])})
    return per_case, summary
