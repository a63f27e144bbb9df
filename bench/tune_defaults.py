"""Re-check the registration and refinement defaults on a tuning cohort (never on the cohorts the claims use).

One baseline is trained on the tuning cohort's training cases (``isl train``); then ``isl experiment --model``
runs the default quick profile and one variant per setting, each changing one setting with ``--set``, on the
cohort's validation (shifted) cases. Writes ``bench/results/tuning_<name>.json`` (mean Dice per variant and method,
per-organ Dice, the per-case differences against the default) and prints a table. The variants:

- ``default``: the quick profile, methods baseline, malf, isl-intensity, isl-mask, isl-mask-ema;
- ``warm-start-0``: mask-supervised rounds register onto M from scratch (the whole pyramid) instead of refining the
  previous round's alignment for 15 steps;
- ``warm-start-30``: 30 refinement steps instead of 15;
- ``mask-grid-image``: the soft Dice on the image grid (8 mm) instead of the displacement grid (16-20 mm);
- ``finetune-60``: 60 fine-tuning steps per round instead of 20 (the moving average updated every 15), the
  fine-tuning budget's share in ISL against multi-atlas fusion;
- ``appearance-none``: no appearance matching of the warped atlases (the kit's extension switched off);
- ``rounds-3``: three ISL rounds instead of two (mask supervision acts in rounds 2 and 3, the moving average has
  three rounds' predictions to average);
- ``mask-from-1``: mask supervision from round 1 on, onto the baseline's P0, instead of from round 2 (a
  mask-supervised registration from scratch, as long as the intensity one, in every round).

The last two (with ``warm-start-0``) ask whether mask supervision and the moving average change the result when
they are given room to act (issue "what makes ISL work", item 4). The rule, fixed before their runs: within a run,
mask supervision's effect is ``isl-mask - isl-intensity`` and the moving average's ``isl-mask-ema - isl-mask`` (mean
over the 8 cases; ``isl-intensity`` from the default run where a variant does not change it). A mechanism is said
to gain room in a variant if its effect there exceeds its effect in the default by more than 0.01 on both tuning
cohorts; a default changes only by the rule below.

The rule, fixed before the runs: a variant replaces the default only if, on both tuning cohorts, it raises the
mean Dice of ``isl-mask-ema`` by more than 0.01 and does so on at least 6 of the 8 cases; otherwise the default
stays (the variant's numbers are reported either way).

Example (the cohorts of docs/paper_reconstruction.md)::

    isl data synth /tmp/tune-phantom --variation inter-patient --n-train 18 --n-val 8 --seed 1000
    python bench/tune_defaults.py /tmp/tune-phantom --work /tmp/tune-phantom-runs --name phantom
    # the same question on a finer grid: --set applies to the baseline and every variant
    python bench/tune_defaults.py /tmp/tune-sample --work /tmp/tune-sample-6mm --name sample_6mm \
        --variants default,finetune-60 --set 'data.spacing=[6,6,8]' --set 'data.shape=[64,64,40]' \
        --set 'segment.patch_size=[64,64,40]'
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"
ALL = "baseline,malf,isl-intensity,isl-mask,isl-mask-ema"
MASK = "isl-mask,isl-mask-ema"

#: name -> (methods, --set options); one setting changed per variant
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": (ALL, []),
    "warm-start-0": (MASK, ["register.warm_start_iterations=0"]),
    "warm-start-30": (MASK, ["register.warm_start_iterations=30"]),
    "mask-grid-image": (MASK, ["register.mask_grid=image"]),
    "finetune-60": ("isl-intensity,isl-mask-ema", ["refine.finetune_steps=60", "refine.ema_every=15"]),
    "appearance-none": ("isl-intensity,isl-mask-ema", ["refine.appearance=none"]),
    "rounds-3": ("isl-intensity,isl-intensity-ema,isl-mask,isl-mask-ema", ["refine.rounds=3"]),
    "mask-from-1": (MASK, ["refine.mask_from_round=1"]),
}


def _isl(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "isl_core.cli", *args], check=True)


def _per_case(out: Path) -> pd.DataFrame:
    """Organ-averaged Dice per (case, method), organs absent from the truth left out."""
    df = pd.read_csv(out / "per_case.csv")
    df = df[df["in_truth"]]
    return df.groupby(["case", "method"])["dice"].mean().unstack()


def mechanism_effects(table: pd.DataFrame, ref: pd.DataFrame) -> dict[str, dict[str, float | int]]:
    """Mask supervision's and the moving average's effect within one run (per-case differences, mean and cases
    above 0); ``isl-intensity`` comes from the default run ``ref`` where the variant did not run it."""
    table = table.combine_first(ref[["isl-intensity"]]) if "isl-intensity" not in table else table
    pairs = {"mask": ("isl-mask", "isl-intensity"), "moving_average": ("isl-mask-ema", "isl-mask")}
    return {name: {"delta": round(float((table[a] - table[b]).mean()), 4),
                   "cases_positive": int(((table[a] - table[b]) > 0).sum())}
            for name, (a, b) in pairs.items() if a in table and b in table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--work", required=True, help="folder for the baseline and the variants' runs (resumable)")
    ap.add_argument("--name", required=True, help="name of the results file: tuning_<name>.json")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                    help="a profile change applied to the baseline and to every variant (e.g. a finer grid)")
    args = ap.parse_args()
    common = [a for s in args.set for a in ("--set", s)]
    work = Path(args.work)
    model = work / "baseline"
    _isl("train", args.dataset, "--out", str(model), "--profile", "quick", "--device", args.device, *common)
    tables, organs = {}, {}
    for name in args.variants.split(","):
        methods, sets = VARIANTS[name]
        out = work / name
        _isl("experiment", args.dataset, "--out", str(out), "--model", str(model), "--methods", methods,
             "--profile", "quick", "--device", args.device, *common, *[a for s in sets for a in ("--set", s)])
        tables[name] = _per_case(out)
        summary = json.loads((out / "summary.json").read_text())
        organs[name] = {m: v["per_organ_dice"] for m, v in summary["methods"].items()}
    ref = tables["default"]
    result = {"dataset": str(args.dataset), "n_cases": int(len(ref)), "common_settings": args.set, "variants": {}}
    for name, table in tables.items():
        entry = {"settings": VARIANTS[name][1], "mean_dice": table.mean().round(4).to_dict(),
                 "per_organ_dice": organs[name]}
        if name != "default":
            # paired differences against the default, per method present in both
            entry["vs_default"] = {m: {"delta": round(float((table[m] - ref[m]).mean()), 4),
                                       "sd": round(float((table[m] - ref[m]).std()), 4),
                                       "cases_better": int(((table[m] - ref[m]) > 0).sum())}
                                   for m in table.columns if m in ref.columns}
        entry["mechanisms"] = mechanism_effects(table, ref)
        result["variants"][name] = entry
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"tuning_{args.name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    rows = []
    for name, entry in result["variants"].items():
        row = {"variant": name, **entry["mean_dice"]}
        rows.append(row)
    print(pd.DataFrame(rows).set_index("variant").to_string(float_format=lambda v: f"{v:.3f}"))
    for name, entry in result["variants"].items():
        for m, d in entry.get("vs_default", {}).items():
            print(f"{name:16s} {m:14s} delta {d['delta']:+.4f} (sd {d['sd']:.4f}, better on "
                  f"{d['cases_better']}/{result['n_cases']})")
        for mech, d in entry["mechanisms"].items():
            print(f"{name:16s} effect of {mech:14s} {d['delta']:+.4f} (above 0 on {d['cases_positive']}/"
                  f"{result['n_cases']})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
