"""What the moving-average mask M holds when mask supervision starts, per organ, on a tuning cohort.

Mask-supervised registration (``isl-mask``, ``isl-mask-ema``) pulls the atlases onto M from round
``refine.mask_from_round`` on. Whether that helps an organ should depend on whether M knows that organ better than
the intensity-aligned atlases do. For each validation case of DATASET this script runs, with a baseline trained by
``bench/tune_defaults.py`` (or ``isl train``), the intensity alignment with its fusion (``malf``: what the atlases
hold) and ``isl-intensity``, ``isl-mask`` and ``isl-mask-ema`` with their round history, and scores per organ on the
working grid: P0, the registration target of the first mask-supervised round, the fusion, and each variant's
final estimate. Writes ``bench/results/mask_quality_<name>.json`` (per-organ means over the cases, and the per-organ
Spearman correlation between "target minus fusion" and "isl-mask minus isl-intensity") and prints the table.

Example (the tuning cohorts of docs/paper_reconstruction.md)::

    python bench/mask_quality.py /tmp/tune-sample --model /tmp/tune-sample-runs/baseline --name sample
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pandas as pd
import torch
from scipy.stats import spearmanr

from isl_core.cli import set_option
from isl_core.commands import profile_from_args
from isl_core.data import load_case, load_cases, load_dataset
from isl_core.evaluate import organ_metrics
from isl_core.fusion import fuse
from isl_core.register import Atlases, register_atlases
from isl_core.runtime import seed_everything
from isl_core.segment import load_segmenter
from isl_core.sharing import Variant, adapt_variants

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"isl-intensity": Variant("intensity", False), "isl-mask": Variant("mask", False),
            "isl-mask-ema": Variant("mask", True)}


def _organ_dice(probs: torch.Tensor, truth: torch.Tensor, labels, spacing) -> pd.Series:
    table = organ_metrics(probs.argmax(0), truth, labels, spacing, hd95=False)
    table = table[table["in_truth"]]  # organs absent from the truth are scored apart (claims.py)
    return table.set_index("organ")["dice"]


def case_rows(ds, case, net0, atlases, profile, device) -> pd.DataFrame:
    """Per-organ Dice of P0, the fusion, the first mask-supervised target (per mask variant) and every final."""
    pre = load_case(case, profile.data, ds.modality)
    x, truth = pre["image"][None], pre["label"][0].long()
    score = lambda p: _organ_dice(p, truth, ds.labels, profile.data.spacing)  # noqa: E731
    mask_round = profile.refine.mask_from_round
    targets: dict[str, torch.Tensor] = {}

    def on_round(method: str, record) -> None:
        if record.round == mask_round and record.target_mask is not None:
            targets[method] = record.target_mask

    intensity = dataclasses.replace(profile.register, supervision="intensity")
    reg = register_atlases(x, atlases, intensity, ds.num_classes, device=device)
    malf = fuse(x, reg, profile.fusion)[0].cpu()
    variants = {m: Variant(profile.register.supervision_mask if v.supervision == "mask" else v.supervision, v.ema)
                for m, v in VARIANTS.items()}
    results = adapt_variants(net0, x, atlases, profile, ds.num_classes, variants, intensity_registration=reg,
                             device=device, on_round=on_round)
    columns = {"P0": score(results["isl-mask"].probs0), "malf": score(malf)}
    for method in ("isl-mask", "isl-mask-ema"):
        columns[f"target {method}"] = score(targets[method])
    for method, res in results.items():
        columns[method] = score(res.final_probs)
    return pd.DataFrame(columns).assign(case=case.id)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--model", required=True, help="the baseline's run folder")
    ap.add_argument("--name", required=True, help="name of the results file: mask_quality_<name>.json")
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", dest="settings", action="append", default=[], type=set_option, metavar="STAGE.FIELD=VALUE",
                    help="a profile change, as for isl experiment (the baseline must have been trained with it)")
    args = ap.parse_args()
    profile = profile_from_args(args)
    ds = load_dataset(args.dataset)
    net0, _ = load_segmenter(Path(args.model), args.device)
    atlases = Atlases.from_cases(load_cases(ds.training, profile.data, ds.modality), profile.data.spacing)
    frames = []
    for case in ds.validation:
        seed_everything(0)
        frames.append(case_rows(ds, case, net0, atlases, profile, args.device))
        print(f"{case.id} done")
    table = pd.concat(frames).reset_index().rename(columns={"index": "organ"})
    per_organ = table.drop(columns="case").groupby("organ", sort=False).mean()
    per_organ["target minus fusion"] = per_organ["target isl-mask"] - per_organ["malf"]
    per_organ["mask minus intensity"] = per_organ["isl-mask"] - per_organ["isl-intensity"]
    rho, p = spearmanr(per_organ["target minus fusion"], per_organ["mask minus intensity"])
    rho0, p0 = spearmanr(per_organ["P0"], per_organ["mask minus intensity"])
    result = {"dataset": str(args.dataset), "model": str(args.model), "profile": args.profile,
              "settings": [f"{stage}.{name}={json.dumps(value)}" for stage, name, value in args.settings],
              "n_cases": len(ds.validation), "mask_from_round": profile.refine.mask_from_round,
              "per_organ_mean_dice": per_organ.round(4).to_dict(orient="index"),
              "mean_over_organs": per_organ.mean().round(4).to_dict(),
              "spearman_target_minus_fusion_vs_gain": {"rho": round(float(rho), 3), "p": round(float(p), 4)},
              "spearman_p0_vs_gain": {"rho": round(float(rho0), 3), "p": round(float(p0), 4)}}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"mask_quality_{args.name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(per_organ.round(3).to_string())
    print(f"Spearman over organs, (target - fusion) vs (isl-mask - isl-intensity): rho {rho:+.2f} (p {p:.3f}); "
          f"P0 vs the same: rho {rho0:+.2f} (p {p0:.3f})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
