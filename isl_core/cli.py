"""The ``isl`` command: one subcommand per pipeline stage, plus the experiment and the notebooks.

Every subcommand takes ``--device auto|cpu|cuda`` and ``--seed``. Errors in the input (a bad dataset folder,
an existing output) end with one line naming the file and the fix, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from isl_core.config import DEFAULT_METHODS, METHODS, PROFILE_NAMES


def _common(p: argparse.ArgumentParser, profile: bool = True) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    if profile:
        p.add_argument("--profile", default="quick", choices=PROFILE_NAMES,
                       help="settings preset: ci (tests), quick (laptop CPU), paper (GPU)")


def _cmd_synth(args: argparse.Namespace) -> int:
    from isl_core.phantoms import CohortSpec, write_cohort
    from isl_core.viz import cohort_figure

    spec = CohortSpec(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, shift=args.shift,
                      size=tuple(args.size), seed=args.seed)
    out = write_cohort(args.out, spec, force=args.force)
    if args.figure:
        cohort_figure(out, out / "cohort.png")
    print(f"synthetic cohort: {out} ({spec.n_train} training, {spec.n_val} validation, {spec.n_test} test; "
          f"shift {spec.shift}; size {'x'.join(map(str, spec.size))})")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from isl_core.data import load_dataset
    from isl_core.viz import cohort_figure

    load_dataset(args.dataset)
    out = Path(args.out) if args.out else Path(args.dataset) / "cohort.png"
    cohort_figure(args.dataset, out)
    print(f"figure: {out}")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from data_download.cli import run_fetch

    return run_fetch(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isl", description="Inference-specific learning (ISL) for medical image "
                                     "segmentation: data, training, registration, refinement, experiments.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="make, fetch or look at dataset folders").add_subparsers(dest="data_cmd",
                                                                                                 required=True)
    p = data.add_parser("synth", help="write the synthetic abdominal cohort (train + shifted inference cases)")
    p.add_argument("out", help="output dataset folder")
    p.add_argument("--n-train", type=int, default=12)
    p.add_argument("--n-val", type=int, default=6)
    p.add_argument("--n-test", type=int, default=0)
    p.add_argument("--shift", type=float, default=1.0, help="domain shift of the inference cases (0 none, 1 default)")
    p.add_argument("--size", type=int, nargs=3, default=(96, 96, 64), metavar=("X", "Y", "Z"))
    p.add_argument("--force", action="store_true", help="overwrite a folder that holds something else")
    p.add_argument("--figure", action=argparse.BooleanOptionalAction, default=True,
                   help="also write cohort.png (default on)")
    _common(p, profile=False)
    p.set_defaults(func=_cmd_synth)

    p = data.add_parser("show", help="validate a dataset folder and draw a training and an inference case")
    p.add_argument("dataset")
    p.add_argument("--out", help="PNG path (default DATASET/cohort.png)")
    p.set_defaults(func=_cmd_show)

    p = data.add_parser("fetch", help="fetch, verify and convert a public dataset into a dataset folder")
    try:
        from data_download.cli import add_fetch_arguments

        add_fetch_arguments(p)
    except ImportError:  # the package is part of the kit; this only guards partial checkouts
        pass
    _common(p, profile=False)
    p.set_defaults(func=_cmd_fetch)

    _add_stage_commands(sub)
    return parser


def _add_stage_commands(sub) -> None:
    """Stage subcommands (train, predict, evaluate, experiment, reproduce)."""
    from isl_core import commands

    p = sub.add_parser("train", help="Stage 1: train the baseline segmenter on the training cases")
    p.add_argument("dataset")
    p.add_argument("--out", required=True, help="run folder (checkpoint, config, log)")
    _common(p)
    p.set_defaults(func=commands.train)

    p = sub.add_parser("predict", help="predict label maps with a trained segmenter")
    p.add_argument("run", help="run folder written by `isl train`")
    p.add_argument("inputs", help="a NIfTI image or a dataset folder (its validation and test cases)")
    p.add_argument("--out", required=True)
    _common(p, profile=False)
    p.set_defaults(func=commands.predict)

    p = sub.add_parser("evaluate", help="per-organ Dice/HD95 of a prediction folder against a dataset")
    p.add_argument("pred_dir")
    p.add_argument("dataset")
    p.add_argument("--vs", help="a second prediction folder: paired tests (Wilcoxon, t-test) against it")
    p.add_argument("--out", help="CSV folder (default PRED_DIR)")
    p.add_argument("--split", default="validation", choices=("training", "validation"))
    _common(p, profile=False)
    p.set_defaults(func=commands.evaluate)

    p = sub.add_parser("experiment", help="run baseline, MALF and ISL variants on every validation case")
    p.add_argument("dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--model", help="a run folder from `isl train` (default: train the baseline into OUT/baseline)")
    p.add_argument("--rounds", type=int, help="ISL rounds (overrides the profile)")
    p.add_argument("--beta", type=float, help="moving-average weight (overrides the profile)")
    p.add_argument("--cases", help="comma-separated validation case ids (default all)")
    p.add_argument("--force", action="store_true", help="redo finished cases instead of skipping them")
    _common(p)
    p.set_defaults(func=commands.experiment)

    p = sub.add_parser("reproduce", help="execute the notebooks headless (papermill) into OUT/notebooks")
    p.add_argument("--data", help="dataset folder (default: a synthetic cohort written into OUT/data)")
    p.add_argument("--out", default="outputs/reproduce")
    p.add_argument("--only", help="comma-separated notebook numbers, e.g. 00,03")
    _common(p)
    p.set_defaults(func=commands.reproduce)


def main(argv: list[str] | None = None) -> int:
    from isl_core.data import DatasetError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        # Input problems get one line naming the file and the fix; anything else is a bug: show the traceback.
        if not (isinstance(e, (DatasetError, FileExistsError)) or type(e).__name__ == "FetchError"):
            raise
        print(f"isl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("isl: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
