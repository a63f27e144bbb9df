"""Combine single-seed runs of one experiment into the results of a ``--seeds`` run.

A ``--seeds N`` run is N independent experiments (``OUT/seeds/SEED/``) whose per-case tables are then summarised
together; this script does that last step for runs made separately (seed 0 one day, seeds 1 and 2 another), with
the function ``isl experiment --seeds`` itself uses (``experiment.combine_seeds``). Each ``SEED=FOLDER`` names a
folder holding one seed's ``per_case.csv`` and ``summary.json``; the runs must agree on every setting but the seed
(profile, folds, fold seed, methods), else nothing is written. Writes ``OUT/per_case.csv`` and ``OUT/summary.json``
(``protocol.seeds`` lists the seeds, ``settings.seed`` too); like every command of the kit it refuses a folder
holding files it did not make. Example::

    python bench/merge_seeds.py --out /tmp/merged 0=/tmp/seed0 1=/runs/arms/seeds/1 2=/runs/arms/seeds/2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from isl_core import outputs
from isl_core.experiment import combine_seeds
from isl_core.runtime import differences, json_safe, read_json, write_csv, write_json

#: settings that may differ between the runs: the seed itself, and the dataset's stamp, which holds file times
#: (a cohort regenerated from the same spec on another day has new ones)
MAY_DIFFER = ("seed", "dataset")


def _parse(spec: str) -> tuple[int, Path]:
    seed, eq, folder = spec.partition("=")
    if not eq or not seed.strip().lstrip("-").isdigit():
        raise SystemExit(f"{spec!r}: write SEED=FOLDER, e.g. 1=/runs/arms/seeds/1")
    return int(seed), Path(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="SEED=FOLDER")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    runs = dict(_parse(r) for r in args.runs)
    summaries = {seed: read_json(folder / "summary.json", "a run's summary") for seed, folder in runs.items()}
    first_seed = next(iter(runs))

    def comparable(seed: int) -> dict:
        return {k: v for k, v in summaries[seed]["settings"].items() if k not in MAY_DIFFER}

    for seed in summaries:
        changed = differences(comparable(first_seed), comparable(seed))
        if changed:
            raise SystemExit(f"{runs[seed]}: its settings differ from {runs[first_seed]}'s in {', '.join(changed)}; "
                             "only runs of one setting can be combined")
    tables = {seed: pd.read_csv(folder / "per_case.csv") for seed, folder in runs.items()}
    per_case, summary = combine_seeds(tables, summaries)
    summary["settings"] = {**summaries[first_seed]["settings"], "seed": list(runs)}
    summary["dataset"] = summaries[first_seed].get("dataset")
    # the kit's output rules: a folder holding files the kit did not make is refused, never written over
    with outputs.claim(args.out, "merge_seeds.py"):
        write_csv(per_case, args.out / "per_case.csv")
        write_json(args.out / "summary.json", json_safe(summary))
    print(f"wrote {args.out / 'per_case.csv'} and {args.out / 'summary.json'} ({len(runs)} seeds, "
          f"{summary['protocol']['n_cases']} cases)")


if __name__ == "__main__":
    main()
