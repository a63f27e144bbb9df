"""Time one whole ISL adaptation of one inference case, stage by stage, on the available device.

A case of paper-like size by default: 24 atlases at 128x128x96 (after preprocessing), 14 classes, the ``paper``
profile's rounds and fine-tuning steps. Atlases and the inference image are synthetic phantoms resampled to the
grid (the timing does not depend on the anatomy). The same run also times

- one registration iteration against the memory-bandwidth floor (``bench/registration.py``'s definition,
  with the copy bandwidth measured here), and
- the naive path as reference: the same adaptation with MONAI's LNCC (``fast_lncc=False``).

Writes ``bench/results/isl_case_<date>_<device>.json`` and prints a short table last. Examples::

    python bench/isl_case.py                                   # paper-like size on the best device
    python bench/isl_case.py --profile quick --atlases 12 --shape 48 48 32 --device cpu
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from registration import _rss_mb, copy_bandwidth_gbs, device_name, device_slug, floor_bytes, sync  # noqa: E402

from isl_core.config import get_profile  # noqa: E402
from isl_core.phantoms import ShiftSpec, draw_subject  # noqa: E402
from isl_core.refine import adapt  # noqa: E402
from isl_core.register import Atlases, LevelObjective, affine_coords, optimise, to_onehot  # noqa: E402
from isl_core.runtime import atomic_path, resolve_device  # noqa: E402
from isl_core.segment import build_network  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def make_case(atlases: int, shape: tuple[int, int, int], seed: int = 0):
    """Phantom atlases (N,1,*shape) in [0,1], labels (N,*shape), one shifted inference image (1,1,*shape)."""
    rng = np.random.default_rng(seed)
    size = (64, 64, 40)  # drawn small, then resized: drawing at 128^3 would dominate the benchmark's set-up

    def resized(subj):
        img = torch.from_numpy(np.clip((subj["image"] + 175) / 425, 0, 1))[None, None].float()
        lab = torch.from_numpy(subj["label"].astype(np.int64))[None, None].float()
        return (F.interpolate(img, size=shape, mode="trilinear", align_corners=True)[0],
                F.interpolate(lab, size=shape, mode="nearest")[0, 0].long())

    pairs = [resized(draw_subject(rng, size, None)) for _ in range(min(atlases, 6))]
    pairs = [pairs[i % len(pairs)] for i in range(atlases)]  # repeat: only the count matters for timing
    x, _ = resized(draw_subject(rng, size, ShiftSpec.scaled(1.0)))
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]), x[None]


def warm_up(profile, net0, x, images, labels, device, supervision: str) -> None:
    """One tiny untimed adaptation per LNCC path: the first call on a device pays one-off costs (CUDA context,
    kernel selection, allocator growth) that are not part of adapting a case."""
    for fast in (True, False):
        tiny = copy.deepcopy(profile)
        tiny.register.fast_lncc = fast
        tiny.register.iterations, tiny.register.warm_start_iterations, tiny.register.affine_iterations = 2, 1, 1
        tiny.refine.rounds, tiny.refine.finetune_steps = 2, 2
        adapt(net0, x, Atlases(images, labels, tiny.data.spacing), tiny, 14, supervision=supervision, ema=True,
              keep_atlases=False, device=device, seed=0)
    sync(device)


def results_path(date: str, slug: str, stem: str = "isl_case") -> Path:
    """``<stem>_<date>_<device>.json``; a later run the same day gets the time appended (nothing is overwritten)."""
    path = RESULTS / f"{stem}_{date}_{slug}.json"
    return path if not path.exists() else RESULTS / f"{stem}_{date}_{slug}_{time.strftime('%H%M%S')}.json"


def write(path: Path, record: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def time_adaptation(profile, net0, x, images, labels, device, supervision: str) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    res = adapt(net0, x, Atlases(images, labels, profile.data.spacing), profile, 14, supervision=supervision,
                ema=True, keep_atlases=False, device=device, seed=0)
    sync(device)
    total = time.perf_counter() - t0
    out = {"seconds": round(total, 2), **{f"{k}_seconds": round(v, 2) for k, v in res.seconds.items()
                                          if k != "total"}}
    if device.type == "cuda":
        out["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    out["peak_host_memory_mb"] = _rss_mb("VmHWM")
    return out


def time_iteration(profile, x, images, labels, device, iters: int, fast: bool) -> float:
    cfg = dataclasses.replace(profile.register, supervision="both", fast_lncc=fast)
    onehot = to_onehot(labels.to(device), 14)
    size = tuple(x.shape[2:])
    field_shape = tuple(max(4, round(s * cfg.field_scale)) for s in size)
    obj = LevelObjective(x.to(device), images.to(device), onehot, onehot[:1], cfg, field_size=field_shape)
    base = affine_coords(torch.eye(3, 4, device=device).repeat(images.shape[0], 1, 1), field_shape)
    field = torch.zeros(images.shape[0], 3, *field_shape, device=device)
    optimise(lambda f: obj(f, base), field, 3, cfg.lr)
    sync(device)
    t0 = time.perf_counter()
    optimise(lambda f: obj(f, base), field, iters, cfg.lr)
    sync(device)
    return (time.perf_counter() - t0) / iters


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="paper")
    p.add_argument("--atlases", type=int, default=24)
    p.add_argument("--shape", type=int, nargs=3, default=(128, 128, 96))
    p.add_argument("--device", default="auto")
    p.add_argument("--supervision", default="both", choices=("intensity", "mask", "both"))
    p.add_argument("--iters", type=int, default=20, help="timed registration iterations for the floor ratio")
    p.add_argument("--no-naive", action="store_true", help="skip the naive (MONAI LNCC) reference run")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    shape = tuple(args.shape)
    profile = get_profile(args.profile)
    profile.register.image_scale = 1.0  # the grid given here *is* the registration grid
    profile.segment.patch_size = tuple(min(a, b) for a, b in zip(profile.segment.patch_size, shape))
    images, labels, x = make_case(args.atlases, shape)
    net0 = build_network(profile.segment, 14).to(device)
    name = device_name(device)
    record = {"device": name, "device_type": device.type, "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "profile": profile.name, "atlases": args.atlases,
              "shape": list(shape), "classes": 14, "rounds": profile.refine.rounds,
              "finetune_steps": profile.refine.finetune_steps, "supervision": args.supervision,
              "registration_iterations": profile.register.iterations, "levels": profile.register.levels}

    warm_up(profile, net0, x, images, labels, device, args.supervision)
    fast = time_adaptation(profile, net0, x, images, labels, device, args.supervision)
    record["isl_case_seconds"] = fast["seconds"]
    record["breakdown"] = fast
    bw = copy_bandwidth_gbs(device)
    per_iter = time_iteration(profile, x, images, labels, device, args.iters, fast=True)
    nbytes = floor_bytes(args.atlases, shape, "both", 14, profile.register.field_scale, profile.register.mask_grid)
    record.update(copy_bandwidth_gbs=round(bw, 2), registration_seconds_per_100_iter=round(100 * per_iter, 3),
                  bytes_per_iter=nbytes, bandwidth_floor_ratio=round(per_iter / (nbytes / (bw * 1e9)), 1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = results_path(record["date"], device_slug(device, name))
    write(path, record)  # the kit's figures are kept even if the naive run is cut short (a time limit, memory)
    if not args.no_naive:
        naive = copy.deepcopy(profile)
        naive.register.fast_lncc = False
        slow = time_adaptation(naive, net0, x, images, labels, device, args.supervision)
        record["naive"] = {"isl_case_seconds": slow["seconds"], "breakdown": slow,
                           "registration_seconds_per_100_iter": round(
                               100 * time_iteration(profile, x, images, labels, device, args.iters, fast=False), 3)}
        write(path, record)
    print(f"\nISL adaptation of one case on {name} ({args.atlases} atlases at {'x'.join(map(str, shape))}, "
          f"{profile.refine.rounds} rounds x {profile.refine.finetune_steps} fine-tuning steps)")
    print(f"{'path':8s} {'total s':>8s} {'registr. s':>10s} {'finetune s':>10s} {'infer s':>8s} {'s/100 it':>9s}")
    rows = [("fast", fast, record["registration_seconds_per_100_iter"])]
    if "naive" in record:
        rows.append(("naive", record["naive"]["breakdown"], record["naive"]["registration_seconds_per_100_iter"]))
    for label, b, it in rows:
        print(f"{label:8s} {b['seconds']:8.1f} {b['registration_seconds']:10.1f} {b['finetune_seconds']:10.1f} "
              f"{b['inference_seconds']:8.1f} {it:9.2f}")
    print(f"bandwidth floor ratio (fast registration iteration): {record['bandwidth_floor_ratio']}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
