"""Command line of the fetcher, shared by ``python -m data_download`` and ``isl data fetch``.

``isl`` builds its own sub-parser and calls ``add_fetch_arguments`` on it, then ``run_fetch`` with the parsed
namespace. ``--seed`` (the fold assignment's seed) belongs to the caller: ``isl`` adds ``--seed`` and ``--device``
to every subcommand, and ``build_parser`` adds ``--seed`` for ``python -m data_download``; ``run_fetch`` reads
``args.seed`` when it exists (default 0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_download.download import human_bytes
from data_download.errors import FetchError
from data_download.fetch import SYNAPSE_TOKEN_ENV, FetchOptions, fetch
from data_download.sources import SOURCE_NAMES, SOURCES


def sources_epilog() -> str:
    lines = ["sources:"]
    for s in SOURCES.values():
        size = f"{'' if s.size_exact else '~'}{human_bytes(s.size)}"
        lines.append(f"  {s.name:<13} {size:>9}  {s.licence.split(' (')[0]}")
    lines += [
        "",
        f"btcv needs a Synapse account: export {SYNAPSE_TOKEN_ENV} (and pip install synapseclient), or pass the",
        "RawData.zip you downloaded in a browser with --from-file. The token is never read from the command line.",
        "--url, --md5 and --sha256 point a source at a mirror (or a test server) and pin its checksum; a --url alone",
        "keeps the published checksum, so a mirror must serve the identical file.",
    ]
    return "\n".join(lines)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (argparse names the option in its error)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    return value


def _add(parser: argparse.ArgumentParser, *flags: str, **kwargs) -> None:
    # the caller's parser may already define a shared flag (isl adds --seed to every subcommand)
    if not any(f in parser._option_string_actions for f in flags):
        parser.add_argument(*flags, **kwargs)


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the fetch arguments (positional SOURCE, --out, ...) to ``parser``; ``--seed`` is the caller's."""
    parser.add_argument("source", choices=SOURCE_NAMES, metavar="SOURCE",
                        help=f"dataset to fetch: {', '.join(SOURCE_NAMES)}")
    _add(parser, "--out", required=True, type=Path, metavar="DIR",
         help="dataset folder to create (dataset.json, imagesTr/, labelsTr/, LICENSE.txt, CITATION.txt)")
    _add(parser, "--from-file", type=Path, metavar="PATH",
         help="use an archive you already downloaded (e.g. RawData.zip for btcv) instead of downloading")
    _add(parser, "--cache", type=Path, metavar="DIR",
         help="where archives are downloaded and kept (default: OUT/../.isl-cache, emptied after success)")
    _add(parser, "--keep-archive", action="store_true", help="keep the downloaded archive after conversion")
    _add(parser, "--dry-run", action="store_true", help="print what would happen; download and write nothing")
    _add(parser, "--force", action="store_true",
         help="rebuild a dataset folder the kit made (another source or split); a folder it did not make is never "
              "replaced")
    _add(parser, "--folds", type=int, metavar="K",
         help="K-fold cross-validation split (btcv default: MONAI 24/6; hanseg/msd-pancreas default: 5 folds)")
    _add(parser, "--fold", type=int, default=0, metavar="I", help="which fold is the validation set (0-based)")
    _add(parser, "--n-cases", type=int, metavar="N",
         help="msd-pancreas: how many of the 281 labelled cases to use (default 210, our assumption for the paper)")
    _add(parser, "--url", metavar="URL", help="download from this URL instead (a mirror, or a local test server)")
    _add(parser, "--md5", metavar="HEX", help="expect this md5 instead of the one in sources.py")
    _add(parser, "--sha256", metavar="HEX", help="expect this sha256 instead of the one in sources.py")
    _add(parser, "--retries", type=non_negative_int, default=5, metavar="N",
         help="retries without progress before giving up (0 or more; default 5)")
    _add(parser, "--no-progress", action="store_true", help="no progress bars (default: shown on a terminal)")
    if parser.epilog is None:
        parser.epilog = sources_epilog()
        parser.formatter_class = argparse.RawDescriptionHelpFormatter


def options_from_args(args: argparse.Namespace) -> FetchOptions:
    """Build ``FetchOptions`` from a namespace; missing attributes take their defaults."""
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    return FetchOptions(
        source=args.source, out=Path(args.out), from_file=get("from_file"), url=get("url"), md5=get("md5"),
        sha256=get("sha256"), cache=get("cache"), keep_archive=bool(get("keep_archive", False)),
        dry_run=bool(get("dry_run", False)), force=bool(get("force", False)), folds=get("folds"),
        fold=get("fold", 0) or 0, seed=get("seed", 0) or 0, n_cases=get("n_cases"), retries=get("retries", 5),
        progress=False if get("no_progress", False) else None,
    )


def run_fetch(args: argparse.Namespace, prog: str = "isl") -> int:
    """Run a fetch from parsed arguments; return the exit status (0 done, 2 failed, 130 interrupted).

    A failure is one line on stderr, ``PROG: error: ...``, as argparse words its own errors.
    """
    try:
        fetch(options_from_args(args))
    except FetchError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; a partial download is kept in the cache: run the same command again to resume",
              file=sys.stderr)
        return 130
    return 0


def build_parser(prog: str = "python -m data_download") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Fetch, verify and convert a dataset into an isl-kit dataset folder.")
    add_fetch_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run_fetch(parser.parse_args(argv), parser.prog)
