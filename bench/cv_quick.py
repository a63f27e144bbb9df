"""Wall-clock of the paper's protocol at the quick profile: a 24-case cross-validated experiment.

Makes (or reuses) a cohort of 24 labelled cases, runs ``isl experiment DATA --out OUT --folds 4 --profile quick``
with any further options passed through, and writes ``bench/results/cv_quick_<date>_<cpu>.json``: the total
wall-clock, the part spent training the fold baselines, the seconds per case, the machine (CPU model, cores, torch
threads, load average before and after) and the run's C1-C3 verdicts. The goal (issue "a fair test of the claims"):
about 30 minutes on 2 CPU cores. Run it on an otherwise idle machine; another heavy job on the same cores can
double the time. Example::

    python bench/cv_quick.py --data /tmp/cv-phantom --out /tmp/cv-bench -- --set refine.appearance=none

The benchmark of the issue "what makes ISL work" (every control arm, one seed)::

    python bench/cv_quick.py --data /tmp/cv-phantom --out /tmp/cv-arms -- --methods \
        baseline,malf,finetune-atlases,tent,pseudo-label,isl-intensity,isl-intensity-matched,isl-mask,isl-mask-ema
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from registration import device_name, device_slug  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _baseline_seconds(out: Path) -> float:
    """Seconds the fold baselines took, from their training logs (the rest of the run is inference cases)."""
    return sum(float(json.loads(h.read_text())["seconds"]) for h in out.glob("folds/*/baseline/history.json"))


def _seconds_per_seed(out: Path, start: float) -> dict[str, float] | None:
    """With --seeds: the wall-clock of each seed's whole experiment (baselines included), from the times its
    summary.json was written (the seeds run one after another)."""
    done = sorted((p.stat().st_mtime, p.parent.name) for p in out.glob("seeds/*/summary.json"))
    if not done:
        return None
    ends = [start] + [t for t, _ in done]
    return {seed: round(ends[i + 1] - ends[i], 1) for i, (_, seed) in enumerate(done)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a dataset folder with 24 labelled cases (made if missing)")
    ap.add_argument("--out", required=True, help="a fresh results folder")
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("extra", nargs="*", help="options passed to `isl experiment` (after --)")
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    if out.exists():
        sys.exit(f"{out}: exists; the benchmark times a run from scratch, give a fresh folder")
    if not (data / "dataset.json").is_file():
        subprocess.run([sys.executable, "-m", "isl_core.cli", "data", "synth", str(data), "--variation",
                        "inter-patient", "--n-train", "12", "--n-val", "12", "--seed", "2000", "--no-figure"],
                       check=True)
    load_before = os.getloadavg()
    cmd = [sys.executable, "-m", "isl_core.cli", "experiment", str(data), "--out", str(out), "--profile", "quick",
           "--folds", str(args.folds), "--device", "cpu", *args.extra]
    t0, start = time.perf_counter(), time.time()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    n = summary["protocol"]["n_cases"]
    baselines = _baseline_seconds(out)
    result = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["isl", *cmd[3:]]),
        "cpu": device_name(torch.device("cpu")), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "n_cases": n, "folds": args.folds, "wall_s": round(wall, 1), "baselines_s": round(baselines, 1),
        "cases_s_per_case": round((wall - baselines) / max(n, 1), 1),
        "goal_s": 1800,
        "seconds_per_seed": _seconds_per_seed(out, start),
        "mean_dice": {m: round(v["mean_dice"], 4) for m, v in summary["methods"].items()},
        "claims": {c: {k: v[k] for k in ("delta", "p_holm", "verdict")}
                   for c, v in summary.get("claims", {}).items() if isinstance(v, dict) and "verdict" in v},
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"cv_quick_{result['date']}_{device_slug(torch.device('cpu'), result['cpu'])}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
