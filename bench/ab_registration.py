"""Registration of an earlier commit against this working tree's, interleaved in one process (A B A B ...).

For measuring one change to the registration's hot path on a shared, noisy machine: both versions run the same
registrations of one demo-cohort case alternately, so a slow phase of the machine hits both, and the figure is the
median of the per-pair time ratios (this tree / reference). It also reports how far the results moved (largest
displacement difference, in voxels): 0 for a change that keeps every bit. The reference's ``isl_core`` is
unpacked from git into a temporary folder and imported under another name (``isl_ref``)::

    python bench/ab_registration.py 6f24a62 --data data/synth --pairs 5
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_commit import export_commit  # noqa: E402

from isl_core import data, register  # noqa: E402
from isl_core.config import get_profile  # noqa: E402
from isl_core.runtime import configure_threads  # noqa: E402


def reference_package(commit: str, folder: Path):
    """``isl_core`` of ``commit`` importable as ``isl_ref`` (its imports of itself renamed)."""
    export_commit(commit, folder)
    (folder / "isl_core").rename(folder / "isl_ref")
    for py in (folder / "isl_ref").rglob("*.py"):
        py.write_text(re.sub(r"\bisl_core\b", "isl_ref", py.read_text()))
    sys.path.insert(0, str(folder))
    return importlib.import_module("isl_ref.register")


def cases(data_dir: Path, profile_name: str):
    profile = get_profile(profile_name)
    ds = data.read_dataset_json(data_dir)
    train = data.load_cases(ds.training, profile.data, ds.modality)
    image = torch.as_tensor(data.load_cases(ds.validation[:1], profile.data, ds.modality)[0]["image"]).float()
    return profile, ds.num_classes, train, image[None]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("commit")
    ap.add_argument("--data", type=Path, required=True, help="a dataset folder (e.g. the demo cohort)")
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--pairs", type=int, default=5)
    args = ap.parse_args(argv)
    configure_threads()
    profile, num_classes, train, x = cases(args.data, args.profile)
    with tempfile.TemporaryDirectory() as tmp:
        ref = reference_package(args.commit, Path(tmp))
        sides = {"reference": ref, "working tree": register}
        atlases = {k: m.Atlases.from_cases(train, profile.data.spacing) for k, m in sides.items()}
        mask = torch.softmax(torch.randn(1, num_classes, *x.shape[2:], generator=torch.Generator().manual_seed(0)), 1)
        intensity = dataclasses.replace(profile.register, supervision="intensity")
        both = dataclasses.replace(profile.register, supervision="both")

        def run(side: str):
            m = sides[side]
            r1 = m.register_atlases(x, atlases[side], intensity, num_classes, device="cpu")
            r2 = m.register_atlases(x, atlases[side], both, num_classes, target_mask=mask,
                                    init_displacement=r1.displacement, device="cpu")
            return r1.displacement, r2.displacement

        run("reference"), run("working tree")  # warm-up (organ maps, caches)
        seconds: dict[str, list[float]] = {k: [] for k in sides}
        out = {}
        for pair in range(args.pairs):
            for side in (list(sides) if pair % 2 == 0 else list(sides)[::-1]):
                t0 = time.perf_counter()
                out[side] = run(side)
                seconds[side].append(time.perf_counter() - t0)
    ratios = [b / a for a, b in zip(seconds["reference"], seconds["working tree"])]
    diff = max(float((a - b).abs().max()) for a, b in zip(out["reference"], out["working tree"]))
    print(f"one intensity + one warm-started mask registration ({args.profile} profile, {len(train)} atlases), "
          f"{torch.get_num_threads()} threads")
    for side, s in seconds.items():
        print(f"  {side:<13} median {statistics.median(s):.2f} s  ({', '.join(f'{v:.2f}' for v in s)})")
    print(f"  time ratio (working tree / reference), median of {args.pairs} pairs: {statistics.median(ratios):.3f}")
    print(f"  largest displacement difference: {diff:.3g} voxels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
