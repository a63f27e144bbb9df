"""Time the demo's experiment for an earlier commit and for this working tree, back to back, in one run.

Shared machines are noisy: an absolute time measured today cannot be set against one measured last week, but two
runs made one after the other on the same machine can. This script sets up the named commit's ``isl_core`` in a
temporary folder (``git archive``; the current ``.venv`` runs it, with ``PYTHONPATH`` pointing there), makes the
demo cohort once (``isl data synth`` defaults, with this tree's code: both versions read the same files), and runs
``isl experiment DATA --profile P`` (the five default methods, baseline training included) for both, alternating
``--repeats`` times (reference first, then this tree; then the other way round on the next repeat, so a slow phase
of the machine does not always hit the same side). It reports the median time ratio (this tree / reference) and
each method's mean-Dice change, prints them and writes ``bench/results/compare_<commit>_<profile>_<date>.json``::

    python bench/compare_commit.py 6f24a62                    # the acceptance check: quick profile (about 20 min)
    python bench/compare_commit.py 6f24a62 --profile smoke --synth "--n-train 3 --n-val 1"   # the machinery
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PACKAGES = ("isl_core", "data_download")  # what the kit imports from its own tree


def export_commit(commit: str, dest: Path) -> str:
    """Unpack the kit's packages of ``commit`` into ``dest``; returns the full commit hash."""
    full = subprocess.run(["git", "rev-parse", "--verify", f"{commit}^{{commit}}"], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", "--format=tar", full, *PACKAGES], cwd=REPO, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return full


def working_tree_state() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *PACKAGES], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    return head + (" + uncommitted changes" if dirty else "")


def isl(code_root: Path, *args: str, log: Path) -> float:
    """Seconds ``isl ARGS`` took with the kit of ``code_root``; its output goes to ``log``."""
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    t0 = time.perf_counter()
    with log.open("a") as out:
        subprocess.run([sys.executable, "-m", "isl_core.cli", *args], cwd=code_root, env=env, check=True,
                       stdout=out, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def mean_dice(summary_path: Path) -> dict[str, float]:
    methods = json.loads(summary_path.read_text())["methods"]
    return {m: v["mean_dice"] for m, v in methods.items()}


def compare(commit: str, profile: str, repeats: int, work: Path, synth_args: list[str]) -> dict[str, Any]:
    ref_root = work / "reference"
    ref_root.mkdir()
    full = export_commit(commit, ref_root)
    data = work / "demo"
    log = work / "isl.log"
    isl(REPO, "data", "synth", str(data), "--no-figure", *synth_args, log=log)
    sides = {"reference": ref_root, "working tree": REPO}
    seconds: dict[str, list[float]] = {k: [] for k in sides}
    load: dict[str, list[float]] = {k: [] for k in sides}  # 1-minute load average as each run starts: context
    dice: dict[str, dict[str, float]] = {}
    for rep in range(repeats):
        order = list(sides) if rep % 2 == 0 else list(sides)[::-1]
        for side in order:
            out = work / f"{side.replace(' ', '_')}_{rep}"
            load[side].append(os.getloadavg()[0])
            seconds[side].append(isl(sides[side], "experiment", str(data), "--out", str(out), "--profile", profile,
                                     log=log))
            dice.setdefault(side, mean_dice(out / "summary.json"))
            print(f"repeat {rep + 1}/{repeats}: {side}: {seconds[side][-1]:.1f} s", flush=True)
    ratios = [new / ref for ref, new in zip(seconds["reference"], seconds["working tree"])]
    return {
        "reference_commit": full, "working_tree": working_tree_state(), "profile": profile, "repeats": repeats,
        "cohort": "isl data synth defaults" + (f" with {' '.join(synth_args)}" if synth_args else ""),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": _cpu_name(), "cores": len(os.sched_getaffinity(0)), "load_average_1min_at_start": load,
        "seconds": seconds, "time_ratio_median": statistics.median(ratios), "time_ratios": ratios,
        "mean_dice": dice,
        "mean_dice_change": {m: dice["working tree"][m] - dice["reference"][m] for m in dice["reference"]},
    }


def _cpu_name() -> str:
    sys.path.insert(0, str(REPO / "bench"))
    import torch
    from registration import device_name

    return device_name(torch.device("cpu"))


def report(r: dict[str, Any]) -> str:
    lines = [f"reference {r['reference_commit'][:10]} vs working tree {r['working_tree'][:10]}, "
             f"profile {r['profile']}, {r['cohort']}, {r['machine']} ({r['cores']} cores), {r['repeats']} repeat(s)",
             "seconds: " + "; ".join(f"{k} {', '.join(f'{s:.1f}' for s in v)}" for k, v in r["seconds"].items()),
             "load average as each run started: " + "; ".join(
                 f"{k} {', '.join(f'{x:.1f}' for x in v)}" for k, v in r["load_average_1min_at_start"].items()),
             f"time ratio (working tree / reference, median): {r['time_ratio_median']:.3f}",
             "mean Dice (reference -> working tree, change):"]
    for m, d in r["mean_dice_change"].items():
        lines.append(f"  {m:<20} {r['mean_dice']['reference'][m]:.4f} -> {r['mean_dice']['working tree'][m]:.4f} "
                     f"({d:+.4f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("commit", help="the reference commit, e.g. 6f24a62")
    ap.add_argument("--profile", default="quick", help="isl experiment --profile (smoke for a fast check)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per side, alternating the order (default 1)")
    ap.add_argument("--synth", default="", help="options for isl data synth, e.g. '--n-train 3 --n-val 1' for a "
                    "machinery check (default: the demo cohort, which the acceptance figure is about)")
    ap.add_argument("--keep", type=Path, help="keep the runs' folders here instead of a temporary folder")
    args = ap.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=False)
        result = compare(args.commit, args.profile, args.repeats, args.keep, args.synth.split())
    else:
        with tempfile.TemporaryDirectory(prefix="compare_commit_") as tmp:
            result = compare(args.commit, args.profile, args.repeats, Path(tmp), args.synth.split())
    day = datetime.date.today().isoformat()
    path = RESULTS / f"compare_{result['reference_commit'][:7]}_{args.profile}_{day}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))
    print(f"written: {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
