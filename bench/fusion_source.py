"""ISL against fusion taken in the scan's own geometry, from two runs of one cohort: `vs_fusion_source` after the fact.

The control-arm runs predate the ``malf-source`` method. Fusion does not depend on the seed (the intensity
registration and the vote never see the network), so a later run of ``baseline,malf,malf-source`` on the same
cohort, folds and settings gives the source-geometry vote of every case, and this script pairs it with ISL's
per-case Dice (mean over the seeds) of the arms run. Before pairing it checks that the two runs are of one cohort
and setting: the same cases and folds, and the same ``malf`` Dice per case (the vote they share) to within
``MALF_TOLERANCE``: runs made on different CPUs round the registration differently (an Intel Xeon and an AMD EPYC
gave MALF Dice up to 4.4e-4 apart per case on the real anatomy), while another cohort or setting moves it by
hundredths.

Reports, as ``claims.compare`` computes them with the kit's verdict rule (Holm over the one added test is the test
itself): isl-mask-ema vs malf-source, isl-mask-ema vs malf (``vs_fusion`` of the arms run, for reference), malf-source
vs malf (what taking the vote in the source geometry gains), and each method's Dice on the working grid. Example::

    python bench/fusion_source.py docs/claims_runs/per_case_sample_arms.csv /runs/fusion/per_case.csv \
        --out bench/results/fusion_source_sample.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from isl_core import claims
from isl_core.runtime import json_safe

MALF_TOLERANCE = 1e-3  # per-case Dice; see the module docstring


def _paired(name: str, a: pd.Series, b: pd.Series, folds: pd.Series) -> dict[str, Any]:
    test = claims.compare(a, b, folds)
    test["p_holm"] = test["p_value"]  # one test: its own family
    interval = test[claims.conservative_interval(test["delta"], test["ci95"], test["ci95_folds"])]
    test["verdict"] = claims.verdict(test["delta"], test["p_holm"], interval=interval)
    test["below"] = int(((a - b).dropna() < 0).sum())
    return {"claim": name, "method": a.name, "reference": b.name, **test}


def fusion_source(arms: pd.DataFrame, fusion: pd.DataFrame) -> dict[str, Any]:
    """The comparisons of the module docstring, from the arms run's and the fusion run's ``per_case`` tables."""
    for column in ("case", "fold"):
        a, f = arms.groupby("case")[column].first(), fusion.groupby("case")[column].first()
        if not a.sort_index().equals(f.sort_index()):
            raise SystemExit(f"the two runs differ in their {column}s: not one cohort and split")
    table, other = claims.organ_averaged(arms), claims.organ_averaged(fusion)
    gap = float(np.abs(table["malf"] - other["malf"].reindex(table.index)).max())
    if not gap <= MALF_TOLERANCE:
        raise SystemExit(f"malf differs between the two runs by up to {gap:.2e} per case: not one cohort and setting")
    isl = table["isl-mask-ema"].rename("isl-mask-ema")
    source = other["malf-source"].rename("malf-source")
    malf = table["malf"].rename("malf")
    folds = arms.groupby("case")["fold"].first()
    grid = claims.organ_averaged(arms.dropna(subset=["dice_grid"]), "dice_grid") if "dice_grid" in arms else None
    return {
        "n_cases": int(len(table)), "seeds_of_isl": sorted(arms["seed"].unique().tolist()) if "seed" in arms else [0],
        "mean_dice": {"baseline": float(table["baseline"].mean()), "isl-mask-ema": float(isl.mean()),
                      "malf": float(malf.mean()), "malf-source": float(source.mean())},
        "mean_dice_grid": None if grid is None else {m: float(grid[m].mean()) for m in ("isl-mask-ema", "malf")},
        "tests": [_paired("vs_fusion_source", isl, source, folds), _paired("vs_fusion", isl, malf, folds),
                  _paired("source_vote_gain", source, malf, folds)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arms", type=Path, help="the arms run's per_case.csv (isl-mask-ema, malf; a seed column or not)")
    ap.add_argument("fusion", type=Path, help="the fusion run's per_case.csv (malf, malf-source)")
    ap.add_argument("--out", type=Path, help="JSON file to write (default: print only)")
    args = ap.parse_args()
    result = fusion_source(pd.read_csv(args.arms), pd.read_csv(args.fusion))
    text = json.dumps(json_safe(result), indent=2)
    if args.out:
        if args.out.exists():
            raise SystemExit(f"{args.out}: exists; this script writes only a new file, choose another name")
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
