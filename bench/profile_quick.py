"""Where the quick experiment's time goes: one inference case per stage and per hot function, on this machine.

Three measurements, each cheap (a few minutes on 2 CPU cores in all):

1. **Baseline training**: ``--train-steps`` steps of Stage 1 exactly as ``train_segmenter`` runs them (patch
   loading and augmentation timed apart from the optimisation step), one validation pass; the stage's total is
   extrapolated to the profile's ``segment.max_steps`` and marked as such.
2. **One inference case, every default method** (``casework.CaseRunner`` as the experiment runs it, then the
   prediction resampled to the source geometry and evaluated), with timing wrappers around the hot functions:
   registration per call and per pyramid level (forward of the objective vs backward + Adam), LNCC, warping,
   smoothness, soft Dice, fine-tuning steps, sliding-window inference, appearance matching, fusion. Times are
   inclusive (a registration level contains its LNCC calls); the share is of the case's wall time.
3. **Operator level** (``torch.profiler``) of one intensity registration and of a few fine-tuning steps: the
   top operators by self time, and "outside torch operators" (the wall time less the operators' self time: Python,
   autograd bookkeeping, the dispatcher between operators).

The network is the one trained in step 1 (a few steps only): the case's cost does not depend on how good it is
(every stage runs a fixed number of steps). Writes ``bench/results/profile_quick_<cpu>.md`` and ``.json``::

    python bench/profile_quick.py                         # makes the demo cohort in a temporary folder
    python bench/profile_quick.py --data data/synth --train-steps 20
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from registration import device_name, device_slug  # noqa: E402

from isl_core import casework, data, lncc, losses, register, segment, transforms  # noqa: E402
from isl_core.config import DEFAULT_METHODS, get_profile  # noqa: E402
from isl_core.evaluate import evaluate_predictions  # noqa: E402
from isl_core.patches import PatchStream  # noqa: E402
from isl_core.register import Atlases  # noqa: E402
from isl_core.runtime import configure_threads, seed_everything, write_json, write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class Stopwatch:
    """Inclusive seconds and call counts per label, from wrappers installed around functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)
        self._undo: list[Callable[[], None]] = []

    def add(self, label: str, seconds: float) -> None:
        self.seconds[label] += seconds
        self.calls[label] += 1

    @contextlib.contextmanager
    def timing(self, label: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(label, time.perf_counter() - t0)

    def wrap(self, owner: Any, name: str, label: str) -> None:
        """Time every call of ``owner.name``, also where other kit modules imported it by name."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            with self.timing(label):
                return original(*args, **kwargs)

        targets = [owner] + [m for k, m in sys.modules.items() if k.startswith("isl_core") and m is not owner
                             and getattr(m, name, None) is original]
        for t in targets:
            setattr(t, name, timed)
            self._undo.append(lambda t=t: setattr(t, name, original))

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def level_wrapper(watch: Stopwatch) -> None:
    """Time ``register.optimise`` per pyramid level (field grid, steps): in all, objective forward, backward + Adam.

    A warm-started mask registration runs the finest level only, with fewer steps: it has rows of its own."""
    original = register.optimise

    def timed(objective, params, iterations, lr):
        grid = "x".join(map(str, params.shape[2:])) if params.ndim == 5 else "affine"
        label = f"level, field {grid}, {iterations} iterations"
        fwd = [0.0]

        def forward(p):
            t0 = time.perf_counter()
            out = objective(p)
            fwd[0] += time.perf_counter() - t0
            return out

        t0 = time.perf_counter()
        result = original(forward, params, iterations, lr)
        total = time.perf_counter() - t0
        watch.add(f"registration {label}", total)
        watch.add(f"registration {label}: objective forward", fwd[0])
        watch.add(f"registration {label}: backward + Adam", total - fwd[0])
        return result

    register.optimise = timed
    watch._undo.append(lambda: setattr(register, "optimise", original))


HOT = [  # (owner, attribute, label)
    (register, "register_atlases", "registration (register_atlases)"),
    (register.LevelObjective, "__call__", "  registration objective forward (all levels)"),
    (lncc.FastLNCC, "forward", "    LNCC forward"),
    (transforms, "sampling_grid", "    sampling grid (upsampled field)"),
    (transforms, "sample", "    warping (grid_sample) forward"),
    (losses, "smoothness", "    smoothness forward"),
    (losses.SoftDice, "__call__", "    soft Dice forward"),
    (transforms, "resize_volume", "  resize_volume (pyramid smoothing + resampling)"),
    (transforms, "warp", "  final warps (MONAI Warp)"),
    (transforms, "folding_fraction", "  folding fraction"),
    (segment, "train_step", "fine-tuning steps (train_step)"),
    (segment, "predict_proba", "sliding-window inference (predict_proba)"),
    (casework, "fuse", "fusion (malf)"),
    ("isl_core.appearance", "match_appearance", "appearance matching"),
    ("isl_core.appearance", "augment", "fine-tuning augmentation"),
    (data, "to_source_geometry", "resampling to the source geometry"),
    (data, "write_nifti", "writing predictions"),
]


def train_profile(cases, profile, num_classes: int, steps: int, watch: Stopwatch) -> torch.nn.Module:
    """``steps`` of Stage 1's loop (as ``segment.train_segmenter`` runs it) with loading timed apart."""
    cfg = profile.segment
    net = segment.build_network(cfg, num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = segment.loss_function()
    batches = PatchStream(cases, cfg, 0)
    for _ in range(steps):
        with watch.timing("baseline training: patch loading + augmentation"):
            images, lab = next(batches)
        with watch.timing("baseline training: optimisation step"):
            segment.train_step(net, opt, images, lab, loss_fn, cfg.grad_clip, cfg.amp)
    return net


def operator_table(fn: Callable[[], Any], top: int = 12) -> dict[str, Any]:
    """Top operators by self CPU time of ``fn()``, and the wall time spent outside any operator."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total_self = sum(e.self_cpu_time_total for e in events) / 1e6
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"wall_s": wall, "operators_self_s": total_self, "outside_operators_s": wall - total_self,
            "top": [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6} for e in rows]}


def make_cohort(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "isl_core.cli", "data", "synth", str(folder), "--no-figure"], check=True,
                   stdout=subprocess.DEVNULL)
    return folder


def run(data_dir: Path, profile_name: str, train_steps: int, op_steps: int) -> dict[str, Any]:
    profile = get_profile(profile_name)
    threads = configure_threads()
    ds = data.read_dataset_json(data_dir)
    watch = Stopwatch()
    seed_everything(0)
    with watch.timing("data loading + preprocessing (training cases)"):
        train = data.load_cases(ds.training, profile.data, ds.modality)
    net = train_profile(train, profile, ds.num_classes, train_steps, watch)
    with watch.timing("baseline training: one validation pass (1 case)"):
        segment.validation_dice(net, train[:1], profile.segment, ds.num_classes, torch.device("cpu"))
    atlases = Atlases.from_cases(train, profile.data.spacing)
    runner = casework.CaseRunner(net, atlases, profile, ds.num_classes, torch.device("cpu"), seed=0)
    case = ds.validation[0]
    for owner, name, label in HOT:
        watch.wrap(sys.modules[owner] if isinstance(owner, str) else owner, name, label)
    level_wrapper(watch)
    out = Path(tempfile.mkdtemp(prefix="profile_quick_"))
    t_case = time.perf_counter()
    try:
        with watch.timing("data loading + preprocessing (inference case)"):
            pre = data.load_cases([case], profile.data, ds.modality)[0]
        with watch.timing("all methods (CaseRunner.run)"):
            results = runner.run(pre["image"], list(DEFAULT_METHODS))
        for method, res in results.items():
            data.write_prediction(res.probs, pre, out / method / f"{case.id}.nii.gz")
            with watch.timing("evaluation (Dice, HD95)"):
                evaluate_predictions(out / method, [case], ds.labels, method)
    finally:
        case_wall = time.perf_counter() - t_case
        watch.restore()
    x = results and torch.as_tensor(pre["image"]).float()[None]
    intensity = register.RegisterConfig(**{**vars(profile.register), "supervision": "intensity"})
    reg_ops = operator_table(lambda: register.register_atlases(x, atlases, intensity, ds.num_classes, device="cpu"))
    cfg = profile.segment
    loss_fn, opt = segment.loss_function(), torch.optim.AdamW(net.parameters(), lr=1e-4)
    batch = torch.rand(profile.refine.batch_size, 1, *cfg.patch_size)
    labels = torch.randint(0, ds.num_classes, (profile.refine.batch_size, 1, *cfg.patch_size))
    ft_ops = operator_table(lambda: [segment.train_step(net, opt, batch, labels, loss_fn, cfg.grad_clip, cfg.amp)
                                     for _ in range(op_steps)])
    per_step = watch.seconds["baseline training: optimisation step"] / train_steps
    loading = watch.seconds["baseline training: patch loading + augmentation"] / train_steps
    validations = -(-cfg.max_steps // cfg.val_every)
    val_pass = watch.seconds["baseline training: one validation pass (1 case)"]
    return {
        "machine": device_name(torch.device("cpu")), "torch": torch.__version__, "threads": threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "profile": profile_name, "case": case.id,
        "unet_dtype": segment.unet_dtype("cpu", profile.segment.amp),
        "train_steps_measured": train_steps,
        "baseline_training_estimate_s": {
            "optimisation steps": per_step * cfg.max_steps, "patch loading + augmentation": loading * cfg.max_steps,
            "validation passes": val_pass * validations * len(ds.validation[:6]),
            "note": f"per-step times x {cfg.max_steps} steps; {validations} validation passes over the validation "
                    "cases (one case timed)"},
        "case_wall_s": case_wall,
        "stages": {k: {"seconds": watch.seconds[k], "calls": watch.calls[k]} for k in watch.seconds},
        "registration_operators": reg_ops, "finetune_operators": {**ft_ops, "steps": op_steps},
    }


def _row_order(label: str) -> tuple[int, str]:
    """Case rows as the pipeline runs them: loading, all methods, registration and its levels, the rest."""
    fixed = ["data loading + preprocessing (inference case)", "all methods (CaseRunner.run)"]
    fixed += [h[2] for h in HOT[:1]]
    if label in fixed:
        return fixed.index(label), ""
    if label.startswith("registration level"):
        return len(fixed), label
    hot = [h[2] for h in HOT]
    return (len(fixed) + 1 + hot.index(label), "") if label in hot else (len(fixed) + len(hot) + 2, label)


def markdown(r: dict[str, Any]) -> str:
    lines = [f"# Profile of one quick-experiment case ({r['profile']} profile)", "",
             f"Machine: {r['machine']}, torch {r['torch']} ({r['cpu_capability']}), {r['threads']} threads, "
             f"segmenter in {r.get('unet_dtype', 'fp32')}. "
             f"Case {r['case']}, the five default methods{'; code: ' + r['code'] if r.get('code') else ''}. "
             "Inclusive times (an indented row is part of the first "
             "less indented row above it; the level rows are part of the registration); share of the case's wall "
             "time. Measured on a shared machine: the shares matter more than the seconds.", "",
             f"## One inference case: {r['case_wall_s']:.1f} s", "", "| stage / function | calls | s | share |",
             "|---|---:|---:|---:|"]
    for label, v in sorted(r["stages"].items(), key=lambda kv: _row_order(kv[0])):
        if label.startswith("baseline training") or label.endswith("(training cases)"):
            continue
        share = 100 * v["seconds"] / r["case_wall_s"]
        lines.append(f"| {label.replace(' ', '&nbsp;', len(label) - len(label.lstrip()))} | {v['calls']} | "
                     f"{v['seconds']:.2f} | {share:.1f} % |")
    est = r["baseline_training_estimate_s"]
    lines += ["", f"## Baseline training ({r['train_steps_measured']} steps measured, extrapolated)", "",
              "| part | s (estimated for the whole stage) |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in est.items() if k != "note"]
    lines += ["", est["note"] + ".", ""]
    for key, title in (("registration_operators", "one intensity registration"),
                       ("finetune_operators", "fine-tuning steps")):
        ops = r[key]
        lines += [f"## Operators of {title} (torch.profiler)", "",
                  f"Wall {ops['wall_s']:.2f} s (profiler on), operators' self time {ops['operators_self_s']:.2f} s, "
                  f"outside any operator (Python, autograd, dispatch) {ops['outside_operators_s']:.2f} s.", "",
                  "| operator | calls | self s |", "|---|---:|---:|"]
        lines += [f"| {o['op']} | {o['calls']} | {o['self_s']:.3f} |" for o in ops["top"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, help="a dataset folder (default: the demo cohort, made in a temp folder)")
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--train-steps", type=int, default=20, help="baseline training steps measured")
    ap.add_argument("--op-steps", type=int, default=5, help="fine-tuning steps under torch.profiler")
    ap.add_argument("--out", type=Path, help="output stem (default bench/results/profile_<profile>_<cpu>)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data or make_cohort(Path(tmp) / "demo")
        result = run(data_dir, args.profile, args.train_steps, args.op_steps)
    stem = args.out or RESULTS / f"profile_{args.profile}_{device_slug(torch.device('cpu'), result['machine'])}"
    write_json(stem.with_suffix(".json"), result)
    text = markdown(result)
    write_text(stem.with_suffix(".md"), text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
