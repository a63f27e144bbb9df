"""Where a training step of the segmenter goes, layer by layer, and what the memory layout changes.

The UNet's optimisation steps are more than half of the quick experiment's time on a CPU (baseline training and
fine-tuning; ``bench/profile_quick.py``). This script times one profile's training step (the kit's ``train_step``
on a random batch of the profile's patch size and the cohort's 14 classes) three ways, all in one process:

1. ``torch.profiler`` over a few steps, operators grouped by input shape: the heaviest (operator, shape) pairs in
   milliseconds per step, so a layer that dominates shows up by its shape;
2. the segmenter's last convolution alone, classes -> classes at the patch's full resolution (MONAI's UNet with
   residual units ends in one), forward and backward, in torch's default layout and in ``channels_last_3d``, and
   the same with 16 channels (a multiple of the AVX2 / AVX-512 vector width);
3. whole steps of the plain network against the whole network in ``channels_last_3d``, alternated, as the median
   time ratio;
4. whole steps in bf16 autocast against fp32 (the same network, alternated), as the median time ratio. bf16 is
   forced here even on a CPU without AVX-512 BF16 / AMX, where the kit keeps fp32 (``segment.unet_dtype``): the
   ratio there shows why.

Parts 1-3 use the kit's own precision on this CPU (``unet_dtype`` in the results file).

Writes ``bench/results/unet_step_<profile>_<device>.json``. Run it on an idle machine (a minute at ``quick``)::

    python bench/unet_step.py --profile quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from isl_core.config import BTCV_LABELS, get_profile
from isl_core.runtime import configure_threads
from isl_core.segment import build_network, loss_function, train_step, unet_dtype

sys.path.insert(0, str(Path(__file__).resolve().parent))
from registration import device_name, device_slug  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NUM_CLASSES = len(BTCV_LABELS)


def _net(profile, channels_last: bool):
    torch.manual_seed(0)
    net = build_network(profile.segment, NUM_CLASSES)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    return net, torch.optim.Adam(net.parameters(), 1e-3)


def heaviest_operators(profile, batch, steps: int, top: int) -> list[dict]:
    """(operator, input shapes) pairs by self CPU time, in ms per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    net, opt = _net(profile, False)
    loss = loss_function()
    for _ in range(2):
        train_step(net, opt, *batch, loss)
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            train_step(net, opt, *batch, loss)
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"operator": e.key, "input_shapes": str(e.input_shapes)[:160], "calls_per_step": e.count / steps,
             "ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 2),
             "share": round(e.self_cpu_time_total / total, 4)} for e in events[:top]]


def last_convolution(size: tuple[int, ...], channels: int, channels_last: bool, repeats: int) -> dict[str, float]:
    """Forward and backward ms of a 3x3x3 convolution channels -> channels on a batch of 2 at ``size``."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(channels, channels, 3, padding=1)
    x = torch.randn(2, channels, *size)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last_3d), x.to(memory_format=torch.channels_last_3d)
    x.requires_grad_()
    forward = backward = 0.0
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        y = conv(x)
        t1 = time.perf_counter()
        y.backward(torch.ones_like(y))
        t2 = time.perf_counter()
        if i >= 2:  # two warm-up repeats: oneDNN picks and caches its kernels
            forward, backward = forward + t1 - t0, backward + t2 - t1
    return {"forward_ms": round(forward / repeats * 1e3, 1), "backward_ms": round(backward / repeats * 1e3, 1)}


def layout_ratio(profile, batch, pairs: int) -> dict[str, float]:
    """Median time ratio channels_last_3d / plain over alternated whole training steps."""
    plain, last = _net(profile, False), _net(profile, True)
    loss = loss_function()
    images, labels = batch
    images_last = images.contiguous(memory_format=torch.channels_last_3d)
    for _ in range(2):
        train_step(*plain, images, labels, loss)
        train_step(*last, images_last, labels, loss)
    a, b = [], []
    for _ in range(pairs):
        t0 = time.perf_counter()
        train_step(*plain, images, labels, loss)
        t1 = time.perf_counter()
        train_step(*last, images_last, labels, loss)
        t2 = time.perf_counter()
        a.append(t1 - t0)
        b.append(t2 - t1)
    return {"plain_ms": round(statistics.median(a) * 1e3, 1), "channels_last_ms": round(statistics.median(b) * 1e3, 1),
            "median_ratio": round(statistics.median(y / x for x, y in zip(a, b)), 3), "pairs": pairs}


def precision_ratio(profile, batch, pairs: int) -> dict[str, float]:
    """Median time ratio bf16 autocast / fp32 over alternated whole training steps of one network."""
    from isl_core import segment

    net, opt = _net(profile, False)
    loss = loss_function()
    native, segment.has_native_bf16 = segment.has_native_bf16, lambda device: True  # bf16 on any CPU, here only
    try:
        for amp in (False, True, False, True):
            train_step(net, opt, *batch, loss, amp=amp)
        fp32, bf16 = [], []
        for _ in range(pairs):
            t0 = time.perf_counter()
            train_step(net, opt, *batch, loss, amp=False)
            t1 = time.perf_counter()
            train_step(net, opt, *batch, loss, amp=True)
            t2 = time.perf_counter()
            fp32.append(t1 - t0)
            bf16.append(t2 - t1)
    finally:
        segment.has_native_bf16 = native
    return {"fp32_ms": round(statistics.median(fp32) * 1e3, 1), "bf16_ms": round(statistics.median(bf16) * 1e3, 1),
            "median_ratio": round(statistics.median(y / x for x, y in zip(fp32, bf16)), 3), "pairs": pairs,
            "cpu_has_native_bf16": native(torch.device("cpu"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--steps", type=int, default=5, help="profiled steps")
    ap.add_argument("--pairs", type=int, default=8, help="alternated whole steps per layout")
    args = ap.parse_args()
    threads = configure_threads()
    profile = get_profile(args.profile)
    size = tuple(profile.segment.patch_size)
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(profile.segment.batch_size, 1, *size, generator=gen),
             torch.randint(0, NUM_CLASSES, (profile.segment.batch_size, 1, *size), generator=gen))
    result = {
        "date": datetime.date.today().isoformat(), "device": device_name(torch.device("cpu")), "threads": threads,
        "torch": torch.__version__, "profile": args.profile, "patch": list(size),
        "unet_dtype": unet_dtype("cpu", profile.segment.amp),
        "batch": profile.segment.batch_size, "classes": NUM_CLASSES,
        "heaviest_operators": heaviest_operators(profile, batch, args.steps, top=12),
        "last_convolution": {f"{c} channels, {'channels_last_3d' if cl else 'default layout'}":
                             last_convolution(size, c, cl, repeats=8)
                             for c in (NUM_CLASSES, 16) for cl in (False, True)},
        "whole_step_channels_last": layout_ratio(profile, batch, args.pairs),
        "whole_step_bf16": precision_ratio(profile, batch, args.pairs),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"unet_step_{args.profile}_{device_slug(torch.device('cpu'), result['device'])}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    for row in result["heaviest_operators"]:
        print(f"{row['ms_per_step']:7.1f} ms {row['share']:6.1%}  {row['operator']:32s} {row['input_shapes'][:70]}")
    for name, t in result["last_convolution"].items():
        print(f"last convolution, {name}: forward {t['forward_ms']} ms, backward {t['backward_ms']} ms")
    print("whole step, channels_last_3d / plain:", result["whole_step_channels_last"])
    print("whole step, bf16 autocast / fp32:", result["whole_step_bf16"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
