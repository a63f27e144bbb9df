"""Combine single-seed runs of one experiment into the results of a ``--seeds`` run.

A ``--seeds N`` run is N independent experiments (``OUT/seeds/SEED/``) whose per-case tables are then summarised
together; this script does that last step for runs made separately (seed 0 one day, seeds 1 and 2 another), with
the function ``isl experiment --seeds`` itself uses (``experiment.combine_seeds``). Each ``SEED=FOLDER`` names a
folder holding one seed's ``per_case.csv`` and ``summary.json``; a bare ``FOLDER`` names a combined run (an earlier
merge, or a ``--seeds`` run's own folder), whose ``seed`` column says which seeds it holds, so a further seed can be
added to a committed run. The runs must agree on every setting but the seed (profile, folds, fold seed, methods), and
no seed may come twice, else nothing is written. Writes ``OUT/per_case.csv`` and ``OUT/summary.json``
(``protocol.seeds`` lists the seeds, ``settings.seed`` too); like every command of the kit it refuses a folder
holding files it did not make. Example::

    python bench/merge_seeds.py --out /tmp/merged 0=/tmp/seed0 1=/runs/arms/seeds/1 2=/runs/arms/seeds/2
    python bench/merge_seeds.py --out /tmp/merged3 /tmp/merged 3=/runs/arms/seeds/3
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


def _parse(spec: str) -> tuple[int | None, Path]:
    seed, eq, folder = spec.partition("=")
    if not eq:
        return None, Path(spec)
    if not seed.strip().lstrip("-").isdigit():
        raise SystemExit(f"{spec!r}: write SEED=FOLDER (one seed's run) or FOLDER (a combined run)")
    return int(seed), Path(folder)


def _seed_runs(specs: list[str]) -> tuple[dict[int, pd.DataFrame], dict[int, dict], dict[int, Path]]:
    """Every input as one table and one summary per seed. A combined run's summary stands for each of its seeds:
    its seconds are already means over them, so the mean over all seeds stays the right one."""
    tables: dict[int, pd.DataFrame] = {}
    summaries: dict[int, dict] = {}
    where: dict[int, Path] = {}
    for spec in specs:
        seed, folder = _parse(spec)
        summary = read_json(folder / "summary.json", "a run's summary")
        table = pd.read_csv(folder / "per_case.csv")
        if seed is None:
            if "seed" not in table.columns:
                raise SystemExit(f"{folder / 'per_case.csv'}: no seed column, so not a combined run; "
                                 "name its seed: SEED=FOLDER")
            parts = {int(s): t.drop(columns="seed").reset_index(drop=True)
                     for s, t in table.groupby("seed", sort=False)}
        else:
            parts = {seed: table}
        for s, part in parts.items():
            if s in tables:
                raise SystemExit(f"{folder}: seed {s} is also in {where[s]}; every seed may come once")
            tables[s], summaries[s], where[s] = part, summary, folder
    return tables, summaries, where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="SEED=FOLDER | FOLDER")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    tables, summaries, where = _seed_runs(args.runs)
    first_seed = next(iter(summaries))

    def comparable(seed: int) -> dict:
        return {k: v for k, v in summaries[seed]["settings"].items() if k not in MAY_DIFFER}

    for seed in summaries:
        changed = differences(comparable(first_seed), comparable(seed))
        if changed:
            raise SystemExit(f"{where[seed]}: its settings differ from {where[first_seed]}'s in {', '.join(changed)}; "
                             "only runs of one setting can be combined")
    per_case, summary = combine_seeds(tables, summaries)
    summary["settings"] = {**summaries[first_seed]["settings"], "seed": list(summaries)}
    summary["dataset"] = summaries[first_seed].get("dataset")
    # the kit's output rules: a folder holding files the kit did not make is refused, never written over
    with outputs.claim(args.out, "merge_seeds.py"):
        write_csv(per_case, args.out / "per_case.csv")
        write_json(args.out / "summary.json", json_safe(summary))
    print(f"wrote {args.out / 'per_case.csv'} and {args.out / 'summary.json'} ({len(summaries)} seeds, "
          f"{summary['protocol']['n_cases']} cases)")


if __name__ == "__main__":
    main()
