"""The ``isl`` command: one subcommand per pipeline stage, plus the experiment and the notebooks.

Every subcommand takes ``--device auto|cpu|cuda`` and ``--seed``.

Exit status and messages:

* ``0`` done; ``130`` interrupted (Ctrl-C; rerun the same command to resume).
* ``2`` a problem the user can fix: a bad option value (checked when the command line is parsed), a bad dataset
  or model file, an output folder that belongs to another run, a read-only or full disk. stderr ends with one line
  ``isl: error: <what, naming the file or option, and what to do>``.
* ``1`` anything else: a bug of the kit. One line ``isl: internal error: ...`` asks to rerun with ``--debug``.

``isl --debug ...`` (the flag may stand anywhere on the line) or ``ISL_DEBUG=1`` shows the Python traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import math
import sys

from data_download.errors import FetchError
from isl_core import commands
from isl_core.config import DEFAULT_METHODS, METHODS, PROFILE_NAMES, Setting, parse_setting
from isl_core.outputs import OutputFolderError
from isl_core.runtime import UserError, configure_threads, env_flag


class UsageError(UserError):
    """A command line argparse rejects (unknown option, missing argument, value out of range)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line raises ``UsageError`` (one ``isl: error:`` line, exit 2) instead of
    printing the usage block and calling ``sys.exit`` from inside the parser."""

    def error(self, message: str):
        command = self.prog.removeprefix("isl").strip()  # "isl data synth" -> "data synth"
        raise UsageError(f"{command + ': ' if command else ''}{message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------------------------- option values (parse time)
def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    return parse


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _beta(text: str) -> float:
    value = _finite(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"the moving-average weight must be in [0, 1), got {text}")
    return value


def _methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; "
                                         f"choose from {', '.join(METHODS)}")
    return methods


def _device(text: str) -> str:
    name, _, index = text.partition(":")
    if name not in ("auto", "cpu", "cuda", "mps") or (index and not (name == "cuda" and index.isdigit())):
        raise argparse.ArgumentTypeError(f"{text!r}: choose auto, cpu, cuda, cuda:N or mps")
    return text


def set_option(text: str) -> Setting:
    """The argparse type of ``--set STAGE.FIELD=VALUE`` (for the kit's commands and the bench scripts):
    ``config.parse_setting``, which checks the value against its field, with argparse's way of refusing."""
    try:
        return parse_setting(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _common(p: argparse.ArgumentParser, profile: bool = True) -> None:
    p.add_argument("--device", default="auto", type=_device, help="auto (cuda, then mps, then cpu), cpu or cuda")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="random seed (default 0)")
    if profile:
        p.add_argument("--profile", default="quick", choices=PROFILE_NAMES,
                       help="settings preset: ci (tests), quick (laptop CPU), paper (GPU)")
        p.add_argument("--set", dest="settings", type=set_option, action="append", default=[],
                       metavar="STAGE.FIELD=VALUE", help="change one setting of the profile (repeatable), e.g. "
                       "refine.appearance=none or data.spacing=[6,6,8]; recorded in the run's settings stamp")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="isl", description="Inference-specific learning (ISL) for medical image "
                     "segmentation: data, training, registration, refinement, experiments.")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error "
                        "(also ISL_DEBUG=1; the flag may stand anywhere on the command line)")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="make, fetch or look at dataset folders").add_subparsers(dest="data_cmd",
                                                                                                 required=True)
    p = data.add_parser("synth", help="write the synthetic abdominal cohort (train + shifted inference cases)")
    p.add_argument("out", help="output dataset folder")
    p.add_argument("--n-train", type=_int_at_least(1), default=12)
    p.add_argument("--n-val", type=_int_at_least(0), default=6)
    p.add_argument("--n-test", type=_int_at_least(0), default=0)
    p.add_argument("--shift", type=_finite, default=1.0, help="domain shift of the inference cases (0 none, 1 default)")
    p.add_argument("--size", type=_int_at_least(1), nargs=3, default=(96, 96, 64), metavar=("X", "Y", "Z"),
                   help="phantom grid in voxels (the field of view is fixed; the sample anatomy keeps its own grid)")
    p.add_argument("--anatomy", choices=("phantom", "sample"), default="phantom",
                   help="phantom: organs drawn analytically; sample: the real CT of `isl data fetch sample`, deformed")
    p.add_argument("--sample-dir", help="with --anatomy sample: the folder `isl data fetch sample --out DIR` wrote")
    p.add_argument("--variation", choices=("default", "inter-patient"), default="default",
                   help="anatomical variation between subjects (inter-patient: closer to real abdominal CT)")
    p.add_argument("--elastic-mm", type=_non_negative, help="largest elastic displacement (overrides --variation)")
    p.add_argument("--organ-jitter-mm", type=_non_negative, help="sd of each organ's own shift (overrides --variation)")
    p.add_argument("--size-spread", type=_non_negative, help="organ size spread, e.g. 0.12 for +-12%% "
                   "(overrides --variation)")
    p.add_argument("--gallbladder-absent", type=_non_negative, help="share of subjects without a gallbladder "
                   "(overrides --variation)")
    p.add_argument("--force", action="store_true", help="overwrite a folder that holds something else")
    p.add_argument("--figure", action=argparse.BooleanOptionalAction, default=True,
                   help="also write cohort.png (default on)")
    _common(p, profile=False)
    p.set_defaults(func=commands.synth)

    p = data.add_parser("show", help="validate a dataset folder and draw a training and an inference case")
    p.add_argument("dataset")
    p.add_argument("--out", help="PNG path (default DATASET/cohort.png)")
    p.set_defaults(func=commands.show)

    p = data.add_parser("fetch", help="fetch, verify and convert a public dataset into a dataset folder")
    try:
        from data_download.cli import add_fetch_arguments

        add_fetch_arguments(p)
    except ImportError:  # the package is part of the kit; this only guards partial checkouts
        pass
    _common(p, profile=False)
    p.set_defaults(func=commands.fetch)

    _add_stage_commands(sub)
    return parser


def _add_stage_commands(sub) -> None:
    """Stage subcommands (train, predict, evaluate, experiment, reproduce)."""
    p = sub.add_parser("train", help="Stage 1: train the baseline segmenter on the training cases")
    p.add_argument("dataset")
    p.add_argument("--out", required=True, help="run folder (checkpoint, config, log)")
    _common(p)
    p.set_defaults(func=commands.train)

    p = sub.add_parser("predict", help="predict label maps with a trained segmenter")
    p.add_argument("run", help="run folder written by `isl train`")
    p.add_argument("inputs", help="a NIfTI image or a dataset folder (its validation and test cases)")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true",
                   help="replace the predictions of another model in OUT instead of refusing")
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
    p.add_argument("--methods", type=_methods, default=list(DEFAULT_METHODS),
                   help=f"comma-separated, from: {', '.join(METHODS)} (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--model", help="a run folder from `isl train` (default: train the baseline into OUT/baseline)")
    p.add_argument("--rounds", type=_int_at_least(1), help="ISL rounds, >= 1 (overrides the profile)")
    p.add_argument("--beta", type=_beta, help="moving-average weight in [0, 1) (overrides the profile)")
    p.add_argument("--cases", help="comma-separated validation case ids (default all)")
    p.add_argument("--force", action="store_true", help="redo finished cases instead of skipping them")
    p.add_argument("--folds", type=_int_at_least(2), metavar="K", help="K-fold cross-validation over every labelled "
                   "case (training + validation): a baseline per fold, each case inferred once")
    p.add_argument("--fold-seed", type=_int_at_least(0), default=0, metavar="S",
                   help="seed of the fold assignment (default 0)")
    p.add_argument("--seeds", type=_int_at_least(1), metavar="N", help="run every baseline and method with N seeds "
                   "(--seed, --seed + 1, ...) in OUT/seeds/SEED/; the claims use per-case means over the seeds")
    p.add_argument("--workers", type=_int_at_least(1), metavar="N", help="run the cases on a local Dask cluster of N "
                   "worker processes (one per GPU on a GPU machine; docs/cluster.md)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="run on a running Dask cluster, e.g. tcp://host:8786")
    p.add_argument("--retries", type=_int_at_least(0), default=2,
                   help="extra attempts of a failed or lost case before it is reported as failed (default 2)")
    _common(p)
    p.set_defaults(func=commands.experiment)

    p = sub.add_parser("reproduce", help="execute the notebooks headless (papermill) into OUT/notebooks")
    p.add_argument("--data", help="dataset folder (default: a synthetic cohort written into OUT/data)")
    p.add_argument("--out", default="outputs/reproduce")
    p.add_argument("--only", help="comma-separated notebook numbers, e.g. 00,03")
    p.add_argument("--notebooks", help="folder of the numbered notebooks (default: $ISL_NOTEBOOKS, else the "
                   "checkout's notebooks/; a non-editable install needs one of the two)")
    p.add_argument("--jobs", type=_int_at_least(1), default=1, metavar="N",
                   help="notebooks that share no results run N at a time (default 1: one after another; 2 helps "
                   "when kernels start and imports take much of the time, as at the smoke profile)")
    _common(p)
    p.set_defaults(func=commands.reproduce)


_OS_REASONS = {
    errno.EACCES: "permission denied; choose another --out or fix the folder's permissions",
    errno.EPERM: "operation not permitted; choose another --out or fix the folder's permissions",
    errno.EROFS: "read-only file system; choose an --out on a writable disk",
    errno.ENOSPC: "no space left on the device; free some space or choose an --out on another disk",
    errno.EDQUOT: "disk quota exceeded; free some space or choose an --out on another disk",
    errno.ENOENT: "no such file or folder; check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "is a folder where a file was expected; check the path",
    errno.ENAMETOOLONG: "file name too long; choose a shorter path",
}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe_error(e: BaseException) -> tuple[int, str]:
    """(exit status, the one line for stderr) of an exception that ends an ``isl`` command."""
    if isinstance(e, (UserError, FileExistsError, FetchError, OutputFolderError)):
        return 2, f"isl: error: {_one_line(e)}"
    if isinstance(e, OSError) and e.errno in _OS_REASONS:
        # the expected failures of the file system name the path the kit was reading or writing
        line = f"{e.filename}: {_OS_REASONS[e.errno]}" if e.filename is not None else _one_line(e)
        return 2, f"isl: error: {line}"
    if isinstance(e, FileNotFoundError) and e.errno is None:  # raised by the kit with a message naming the file
        return 2, f"isl: error: {_one_line(e)}"
    return 1, f"isl: internal error: {type(e).__name__}: {_one_line(e)[:300]} (rerun with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Run ``isl ARGV``; returns the exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        debug = debug or env_flag("ISL_DEBUG")
        args = build_parser().parse_args(argv)
        configure_threads()  # once per process, before any tensor work
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _close_progress_bars()
        print("isl: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:
        _close_progress_bars()
        if debug:
            raise
        code, line = describe_error(e)
        print(line, file=sys.stderr)
        return code


def _close_progress_bars() -> None:
    """Close every open tqdm bar, so the error line stands alone as the last line of stderr.

    tqdm offers no public list of the open bars; ``tqdm._instances`` is the set ``tqdm.write`` itself uses.
    """
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
