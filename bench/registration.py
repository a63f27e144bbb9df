"""Time batched registration iterations and compare them with the memory-bandwidth floor.

One "iteration" is exactly what ``isl_core.register`` does per Adam step on one pyramid level: build the
sampling grid from the low-resolution field, warp all atlases (image and/or organ one-hot), evaluate LNCC
and/or soft Dice against the fixed image / target mask, add the regularisers, backpropagate, Adam step.
The script times it for N atlases on a given registration grid, once with the fast LNCC and once with
MONAI's ``LocalNormalizedCrossCorrelationLoss`` (same quantity, same variance floor), and appends one JSON
line per configuration to ``bench/results/registration_<device>.jsonl``.

The floor: the bytes one iteration *must* move are the inputs it has to read at least once (moving images,
moving organ one-hot, fixed-image window statistics, target mask) plus the field and its Adam state (read
and written). A perfectly fused kernel would take ``bytes / copy bandwidth``; ``bandwidth_floor_ratio`` is
how many times slower the real iteration is. The copy bandwidth (read + write bytes per second of a large
``copy_``) is measured in the same run on the same device.

Examples::

    python bench/registration.py --atlases 8 --shape 64 64 48 --iters 20 --supervision both
    python bench/registration.py --atlases 24 --shape 128 128 96 --iters 100 --supervision both --device cuda
    python bench/registration.py --atlases 12 --shape 64 64 48 --iters 60 --full --levels 2   # whole call

Each configuration runs in a fresh process, so that ``peak_memory_mb`` on CPU (peak resident memory above
what the process held before building the problem, from /proc's VmHWM after resetting it) belongs to that
configuration alone; on CUDA it is
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from isl_core.config import RegisterConfig
from isl_core.register import Atlases, LevelObjective, affine_coords, optimise, register_atlases, to_onehot, warp
from isl_core.runtime import atomic_path, resolve_device

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(dev: torch.device, name: str) -> str:
    return f"{dev.type}-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _rss_mb(field: str) -> float | None:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process in MiB, from /proc (Linux); None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so the peak below belongs to the measurement, not
    # to the import of torch and MONAI.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def copy_bandwidth_gbs(dev: torch.device, megabytes: int | None = None, repeats: int = 5) -> float:
    """Best-of-``repeats`` (read + write) bytes per second of a large tensor copy, in GB/s."""
    megabytes = megabytes or (1024 if dev.type == "cuda" else 128)
    src = torch.ones(megabytes * 2**20 // 4, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def floor_bytes(atlases: int, shape: tuple[int, int, int], supervision: str, classes: int, field_scale: float,
                mask_grid: str) -> int:
    """Bytes an ideal (fully fused) iteration must move; see the module docstring."""
    field_shape = [max(4, round(s * field_scale)) for s in shape]
    voxels = shape[0] * shape[1] * shape[2]
    field_voxels = field_shape[0] * field_shape[1] * field_shape[2]
    mask_voxels = field_voxels if mask_grid == "field" else voxels
    floats = 7 * atlases * 3 * field_voxels  # field, gradient, Adam's two moments: read and/or written
    if supervision in ("intensity", "both"):
        floats += atlases * voxels + 3 * voxels  # moving images; fixed image and its two window statistics
    if supervision in ("mask", "both"):
        floats += (atlases + 1) * (classes - 1) * mask_voxels  # organ one-hot of every atlas; target mask
    return 4 * floats


def make_problem(atlases: int, shape: tuple[int, int, int], classes: int, dev: torch.device, seed: int = 0):
    """Smooth random images and labels; atlases are the fixed image under random smooth deformations."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def smooth_noise(n: int, channels: int) -> torch.Tensor:
        coarse = torch.rand(n, channels, *[max(2, s // 8) for s in shape], generator=gen).to(dev)
        return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)

    fixed = smooth_noise(1, 1)
    labels = (smooth_noise(1, 1)[:, 0] * classes).long().clamp_(0, classes - 1)
    ddf = (smooth_noise(atlases, 3) - 0.5) * 6.0  # up to +-3 voxels
    moving = warp(fixed.expand(atlases, -1, -1, -1, -1), ddf)
    onehot = warp(to_onehot(labels.expand(atlases, -1, -1, -1), classes), ddf)
    target = to_onehot(labels, classes)
    return fixed, moving, onehot, target


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs one configuration (in its own process) and returns its JSON record."""
    dev = torch.device(spec["device"])
    shape = tuple(spec["shape"])
    n = spec["atlases"]
    cfg = RegisterConfig(supervision=spec["supervision"], fast_lncc=spec["lncc"] == "fast",
                         iterations=spec["iters"], levels=spec["levels"], lncc_kernel=spec["kernel"],
                         mask_grid=spec["mask_grid"], image_scale=spec["image_scale"])
    _reset_peak_rss()
    rss_before = _rss_mb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        mem_before = torch.cuda.memory_allocated(dev)
    fixed, moving, onehot, target = make_problem(n, shape, spec["classes"], dev)
    record: dict[str, Any] = {}
    if spec["full"]:
        labels = onehot.argmax(1)
        register_atlases(fixed, Atlases(moving[:1], labels[:1]), dataclasses.replace(cfg, iterations=2),
                         spec["classes"], target_mask=target, device=dev)  # warm-up (allocator, kernels)
        sync(dev)
        t0 = time.perf_counter()
        result = register_atlases(fixed, Atlases(moving, labels), cfg, spec["classes"], target_mask=target, device=dev)
        sync(dev)
        seconds = time.perf_counter() - t0
        record.update(mode="full_call", seconds_total=round(seconds, 3), levels=cfg.levels, image_scale=cfg.image_scale,
                      mean_folding_fraction=float(result.folding_fraction.mean()))
    else:
        field_shape = tuple(max(4, round(s * cfg.field_scale)) for s in shape)
        objective = LevelObjective(fixed, moving, onehot, target, cfg, field_size=field_shape)
        base = affine_coords(torch.eye(3, 4, device=dev).repeat(n, 1, 1), field_shape)
        field = torch.zeros(n, 3, *field_shape, device=dev)
        field, _ = optimise(lambda f: objective(f, base), field, spec["warmup"], cfg.lr)
        sync(dev)
        t0 = time.perf_counter()
        optimise(lambda f: objective(f, base), field, spec["iters"], cfg.lr)
        sync(dev)
        seconds = time.perf_counter() - t0
        per_iter = seconds / spec["iters"]
        nbytes = floor_bytes(n, shape, cfg.supervision, spec["classes"], cfg.field_scale, cfg.mask_grid)
        record.update(mode="iteration", seconds_per_100_iter=round(100 * per_iter, 4), bytes_per_iter=nbytes,
                      bandwidth_floor_ratio=round(per_iter / (nbytes / (spec["copy_bandwidth_gbs"] * 1e9)), 1))
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(dev) - mem_before) / 2**20
    else:
        peak = (_rss_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024) - rss_before
    record.update(peak_memory_mb=round(peak, 1), iters_timed=spec["iters"])
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--atlases", type=int, default=8)
    p.add_argument("--shape", type=int, nargs=3, default=(64, 64, 48), metavar=("H", "W", "D"),
                   help="registration grid")
    p.add_argument("--iters", type=int, default=20, help="timed iterations (per level with --full)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--supervision", choices=("intensity", "mask", "both"), default="both")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    p.add_argument("--lncc", nargs="+", choices=("fast", "monai"), default=["fast", "monai"])
    p.add_argument("--classes", type=int, default=14, help="classes incl. background (BTCV: 14)")
    p.add_argument("--kernel", type=int, default=5, help="LNCC window")
    p.add_argument("--mask-grid", choices=("field", "image"), default=RegisterConfig.mask_grid,
                   help="grid of the soft Dice term (RegisterConfig.mask_grid)")
    p.add_argument("--full", action="store_true", help="time a whole register_atlases call instead")
    p.add_argument("--levels", type=int, default=2, help="pyramid levels for --full")
    p.add_argument("--image-scale", type=float, default=1.0, help="RegisterConfig.image_scale for --full")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--in-process", action="store_true", help="no child process (debugging; CPU memory less exact)")
    args = p.parse_args(argv)

    dev = resolve_device(args.device)
    name = device_name(dev)
    bandwidth = copy_bandwidth_gbs(dev)
    print(f"device: {name} ({dev}); copy bandwidth {bandwidth:.1f} GB/s; torch threads {torch.get_num_threads()}")
    records = []
    for lncc in args.lncc:
        spec = dict(device=str(dev), atlases=args.atlases, shape=list(args.shape), supervision=args.supervision,
                    lncc=lncc, iters=args.iters, warmup=args.warmup, classes=args.classes, kernel=args.kernel,
                    full=args.full, levels=args.levels, mask_grid=args.mask_grid, copy_bandwidth_gbs=bandwidth,
                    image_scale=args.image_scale)
        if args.in_process:
            rec = measure(spec)
        else:
            with mp.get_context("spawn").Pool(1) as pool:
                rec = pool.apply(measure, (spec,))
        rec = {"device": name, "device_type": dev.type, "atlases": args.atlases, "shape": list(args.shape),
               "supervision": args.supervision, "lncc": lncc, **rec, "copy_bandwidth_gbs": round(bandwidth, 2),
               "classes": args.classes, "lncc_kernel": args.kernel, "mask_grid": args.mask_grid,
               "field_scale": RegisterConfig.field_scale, "torch": torch.__version__,
               "threads": torch.get_num_threads(),
               "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
               "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        records.append(rec)
        if rec["mode"] == "iteration":
            print(f"{lncc:5s}: {rec['seconds_per_100_iter']:.3f} s / 100 iterations, "
                  f"{rec['bandwidth_floor_ratio']}x the bandwidth floor, peak {rec['peak_memory_mb']} MB")
        else:
            print(f"{lncc:5s}: whole call {rec['seconds_total']:.2f} s ({args.levels} levels x {args.iters} "
                  f"iterations), peak {rec['peak_memory_mb']} MB")
    # Append, never overwrite: earlier runs stay in the file; the write is atomic (temporary file + rename).
    out = args.out_dir / f"registration_{device_slug(dev, name)}.jsonl"
    old = out.read_text() if out.exists() else ""
    with atomic_path(out) as tmp:
        tmp.write_text(old + "".join(json.dumps(r) + "\n" for r in records))
    print(f"appended {len(records)} line(s) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
