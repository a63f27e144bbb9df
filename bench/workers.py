"""Wall-clock of the cross-validated experiment in-process, on 1 and on 2 local Dask workers.

A small synthetic cohort (default 6 cases at 32x32x24, 2 folds, the ``ci`` profile, methods baseline, malf,
isl-mask-ema) is run three times into fresh folders: in this process with all cores, with ``workers=1`` and with
``workers=2`` (cores split between the workers). The per-case Dice of the three runs is compared as well. Writes
``bench/results/workers_<date>_<device>.json`` and prints a table. On a machine with few cores expect little or
no gain: two workers halve each case's threads, and worker start-up costs a few seconds. Example::

    python bench/workers.py --profile ci --n-train 4 --n-val 2 --folds 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd

from isl_core.config import get_profile
from isl_core.experiment import ExperimentSettings, run_experiment
from isl_core.phantoms import CohortSpec, write_cohort
from isl_core.runtime import atomic_path

RESULTS = Path(__file__).resolve().parent / "results"


def _run(dataset: Path, out: Path, settings: ExperimentSettings) -> tuple[float, pd.DataFrame]:
    t0 = time.perf_counter()
    run_experiment(dataset, out, settings)
    return time.perf_counter() - t0, pd.read_csv(out / "per_case.csv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="ci")
    ap.add_argument("--n-train", type=int, default=4)
    ap.add_argument("--n-val", type=int, default=2)
    ap.add_argument("--size", type=int, nargs=3, default=(32, 32, 24))
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--methods", default="baseline,malf,isl-mask-ema")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="isl-bench-workers-") as tmp:
        root = Path(tmp)
        dataset = write_cohort(root / "cohort", CohortSpec(n_train=args.n_train, n_val=args.n_val, n_test=0,
                                                           size=tuple(args.size), seed=3))
        base = ExperimentSettings(profile=get_profile(args.profile), methods=args.methods.split(","), device="cpu",
                                  folds=args.folds, progress=False)
        runs = {}
        for name, workers in (("in-process", None), ("1 worker", 1), ("2 workers", 2)):
            seconds, per_case = _run(dataset, root / name.replace(" ", "_"),
                                     ExperimentSettings(**{**base.__dict__, "workers": workers}))
            runs[name] = {"seconds": round(seconds, 1), "per_case": per_case}
            print(f"{name:12s} {seconds:7.1f} s", flush=True)
    ref = runs["in-process"]["per_case"].set_index(["case", "method", "organ"]).sort_index()["dice"]
    result = {"date": datetime.date.today().isoformat(), "device": platform.processor() or platform.machine(),
              "cores": len(os.sched_getaffinity(0)), "load_average_1min": round(os.getloadavg()[0], 2),
              "profile": args.profile, "cases": args.n_train + args.n_val, "size": list(args.size),
              "folds": args.folds, "methods": args.methods, "runs": {}}
    for name, r in runs.items():
        dice = r["per_case"].set_index(["case", "method", "organ"]).sort_index()["dice"]
        result["runs"][name] = {"seconds": r["seconds"],
                                "max_abs_dice_difference_vs_in_process": float((dice - ref).abs().max())}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"workers_{result['date']}_cpu.json"
    with atomic_path(path) as t:
        t.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["runs"], indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
