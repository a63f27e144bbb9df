"""Peak memory of one ISL adaptation at paper size: does the ``paper`` profile fit a 16 GB card?

Memory does not depend on how many iterations a stage runs, only on the tensors one iteration holds, so this
runs the paper profile's adaptation (24 atlases at 128x128x96, 14 classes, all pyramid levels, mask + intensity
supervision, warm-started later rounds, the DynUNet fine-tuned on batches of warped atlases, sliding-window
inference) with every iteration count cut to 2. It reports the peak of each stage alone and (on a GPU, or with
``--whole``) of the whole adaptation:

- on a GPU, ``torch.cuda.max_memory_allocated`` (what the tensors need; the CUDA context adds about 0.5 GB);
- on the CPU, the peak resident memory of the process (Linux: VmHWM, reset per stage), which includes the
  libraries (about 1 GB) and the allocator's slack: a proxy for the GPU figure, not the same quantity.

Writes ``bench/results/paper_memory_<date>_<device>.json`` and prints a short table. Example::

    python bench/paper_memory.py --device cpu
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from isl_case import make_case, results_path, write  # noqa: E402
from registration import _rss_mb, device_name, device_slug, sync  # noqa: E402

from isl_core.appearance import atlas_consensus, match_appearance  # noqa: E402
from isl_core.config import get_profile  # noqa: E402
from isl_core.finetune import Finetuner  # noqa: E402
from isl_core.refine import adapt  # noqa: E402
from isl_core.register import Atlases, register_atlases  # noqa: E402
from isl_core.runtime import resolve_device  # noqa: E402
from isl_core.segment import build_network, predict_proba  # noqa: E402


def reset_peak(device: torch.device) -> None:
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:  # Linux: "5" resets the peak resident set size (VmHWM) to the current one
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mb(device: torch.device) -> dict[str, float | None]:
    sync(device)
    out: dict[str, float | None] = {"peak_host_memory_mb": _rss_mb("VmHWM")}
    if device.type == "cuda":
        out["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def short_profile(iterations: int):
    """The paper profile with every iteration count cut to ``iterations`` (memory per iteration unchanged)."""
    prof = get_profile("paper")
    reg = prof.register
    reg.iterations = reg.warm_start_iterations = reg.affine_iterations = iterations
    prof.refine.finetune_steps, prof.refine.ema_every = iterations, iterations
    return prof


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--atlases", type=int, default=24)
    p.add_argument("--shape", type=int, nargs=3, default=(128, 128, 96))
    p.add_argument("--device", default="auto")
    p.add_argument("--iterations", type=int, default=2, help="iterations per stage (memory does not depend on it)")
    p.add_argument("--whole", action=argparse.BooleanOptionalAction, default=None,
                   help="also the whole adaptation, every round (default: on a GPU only; on 2 CPU cores it takes "
                        "about half an hour)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    prof = short_profile(args.iterations)
    images, labels, x = make_case(args.atlases, tuple(args.shape))
    net0 = build_network(prof.segment, 14).to(device).eval()
    stages: dict[str, dict] = {}

    def stage(name, fn):
        reset_peak(device)
        t0 = time.perf_counter()
        value = fn()
        stages[name] = {"seconds": round(time.perf_counter() - t0, 1), **peak_mb(device)}
        print(f"[paper_memory] {name}: {stages[name]}", flush=True)
        return value

    probs = stage("inference (sliding window)", lambda: predict_proba(net0, x, prof.segment, device)[0].cpu())
    cfg = dataclasses.replace(prof.register, supervision="both")
    atlases = Atlases(images, labels, prof.data.spacing)
    reg = stage("registration (all levels, mask + intensity)",
                lambda: register_atlases(x, atlases, cfg, 14, target_mask=probs[None], device=device))

    warped_x, warped_y, onehot = reg.warped_images.cpu(), reg.warped_labels.cpu().long(), reg.warped_onehot.cpu()
    del reg  # the adaptation keeps only the round's deformed set on the host while it fine-tunes

    def finetune():
        nonlocal warped_x
        gen = torch.Generator().manual_seed(0)
        warped_x = match_appearance(warped_x, onehot, x.cpu(), atlas_consensus(onehot), gen)
        tuner = Finetuner(copy.deepcopy(net0), prof, device, seed=0)
        originals = (images, labels.long()) if prof.refine.mix_original > 0 else None
        for _ in range(prof.refine.finetune_steps):
            tuner.step(warped_x, warped_y, originals)

    stage("fine-tuning (appearance matching + steps)", finetune)
    if args.whole if args.whole is not None else device.type == "cuda":
        stage("whole adaptation", lambda: adapt(net0, x, atlases, prof, 14, supervision="both", ema=True,
                                                keep_atlases=False, device=device, seed=0))
    name = device_name(device)
    record = {"device": name, "date": datetime.date.today().isoformat(),
              "atlases": args.atlases, "shape": list(args.shape), "profile": "paper",
              "iterations_per_stage": args.iterations, "rounds": prof.refine.rounds,
              "finetune_batch": prof.refine.batch_size, "patch_size": list(prof.segment.patch_size),
              "stages": stages, "torch": torch.__version__, "threads": torch.get_num_threads()}
    path = results_path(record["date"], device_slug(device, name), stem="paper_memory")
    write(path, record)
    key = "peak_gpu_memory_mb" if device.type == "cuda" else "peak_host_memory_mb"
    print(f"\n{record['device']}: paper profile, {args.atlases} atlases at {'x'.join(map(str, args.shape))}")
    print(f"{'stage':<46} {'peak (GB)':>10} {'seconds':>8}")
    for name, s in stages.items():
        print(f"{name:<46} {s[key] / 1024 if s[key] else float('nan'):>10.2f} {s['seconds']:>8.1f}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
