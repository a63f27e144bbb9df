"""Stage 1: initial segmentation learning — the baseline segmenter f0, its training, prediction and checkpoints.

The network is a MONAI 3D ``UNet`` or ``DynUNet`` sized by the profile. Training samples patches balanced on
foreground (``RandCropByPosNegLabeld``), applies light augmentation, and optimises ``DiceCELoss`` with AdamW
under a warm-up + cosine schedule, with gradient clipping and bf16 autocast on CUDA. A checkpoint holds
only tensors and plain containers (``state_dict`` of net, optimiser and schedule, the step, the history),
so it loads with ``torch.load(..., weights_only=True)``; ``config.json`` beside it rebuilds the network.

Stage 3 fine-tunes a copy of this network; it reuses ``loss_function``, ``train_step`` and ``predict_proba``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from isl_core.config import Profile, SegmentConfig
from isl_core.runtime import atomic_path, resolve_device, write_json

CHECKPOINT = "checkpoint.pt"  # resumable training state, rewritten every `checkpoint_every` steps
MODEL = "model.pt"  # the final network weights
CONFIG = "config.json"  # profile + classes: all that is needed to rebuild the network


def build_network(cfg: SegmentConfig, num_classes: int, in_channels: int = 1) -> nn.Module:
    """The 3D segmenter named by ``cfg.arch`` (``unet`` or ``dynunet``)."""
    from monai.networks.nets import DynUNet, UNet

    if cfg.arch == "unet":
        return UNet(spatial_dims=3, in_channels=in_channels, out_channels=num_classes, channels=cfg.channels,
                    strides=cfg.strides, num_res_units=cfg.num_res_units, dropout=cfg.dropout, norm="instance")
    if cfg.arch == "dynunet":
        n = len(cfg.strides) + 1
        return DynUNet(spatial_dims=3, in_channels=in_channels, out_channels=num_classes,
                       kernel_size=[3] * n, strides=[1, *cfg.strides], upsample_kernel_size=list(cfg.strides),
                       filters=list(cfg.channels[:n]), norm_name="instance", res_block=cfg.num_res_units > 0,
                       dropout=cfg.dropout or None)
    raise ValueError(f"unknown segmenter arch {cfg.arch!r}; choose 'unet' or 'dynunet'")


def loss_function() -> nn.Module:
    """Dice + cross-entropy on logits vs integer labels (the nnU-Net / MONAI default for organ segmentation)."""
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)


def _autocast(device: torch.device, enabled: bool):
    # bf16 needs no gradient scaler, which keeps the training step (and its checkpoint) simple
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               loss_fn: nn.Module, grad_clip: float = 1.0, amp: bool = True) -> float:
    """One optimisation step on a batch ``images`` (B,1,*S), ``labels`` (B,1,*S) or soft (B,C,*S) targets."""
    net.train()
    optimizer.zero_grad(set_to_none=True)
    with _autocast(images.device, amp):
        logits = net(images)
    loss = loss_fn(logits.float(), labels)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def predict_proba(net: nn.Module, images: torch.Tensor, cfg: SegmentConfig, device: str | torch.device = "auto"
                  ) -> torch.Tensor:
    """Softmax class probabilities (N,C,*S) for images (N,1,*S) or (1,*S), by sliding-window inference."""
    from monai.inferers import sliding_window_inference

    device = resolve_device(device)
    images = torch.as_tensor(images).as_subclass(torch.Tensor)
    if images.ndim == 4:
        images = images[None]
    net.eval()
    with _autocast(device, cfg.amp):
        logits = sliding_window_inference(images.to(device), roi_size=cfg.patch_size, sw_batch_size=cfg.sw_batch_size,
                                          predictor=net, overlap=cfg.sw_overlap, mode="gaussian")
    return torch.softmax(torch.as_tensor(logits).float(), dim=1)


def _train_transform(cfg: SegmentConfig):
    """Random patch sampling balanced on foreground plus light, laterality-preserving augmentation."""
    from monai import transforms as mt

    keys = ["image", "label"]
    steps = [mt.RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=cfg.patch_size,
                                       pos=cfg.pos_neg_ratio, neg=1.0, num_samples=cfg.num_samples,
                                       allow_smaller=True),
             mt.SpatialPadd(keys=keys, spatial_size=cfg.patch_size)]
    if cfg.augment:
        # no flips: left and right organs (kidneys, adrenals) carry different labels
        steps += [
            mt.RandAffined(keys=keys, prob=0.3, rotate_range=(0.1, 0.1, 0.1), scale_range=(0.1, 0.1, 0.1),
                           mode=("bilinear", "nearest"), padding_mode="zeros"),
            mt.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            mt.RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
            mt.RandAdjustContrastd(keys="image", gamma=(0.8, 1.25), prob=0.3),
            mt.RandGaussianNoised(keys="image", std=0.02, prob=0.3),
        ]
    return mt.Compose(steps)


def _batches(cases: Sequence[dict[str, Any]], cfg: SegmentConfig, seed: int):
    """An endless stream of (images, labels) batches of patches from preprocessed cases."""
    from monai.data import DataLoader, Dataset

    plain = [{"image": c["image"].as_tensor() if hasattr(c["image"], "as_tensor") else c["image"],
              "label": c["label"].as_tensor() if hasattr(c["label"], "as_tensor") else c["label"]} for c in cases]
    ds = Dataset(plain, transform=_train_transform(cfg))
    ds_transform = ds.transform
    if hasattr(ds_transform, "set_random_state"):
        ds_transform.set_random_state(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(ds, batch_size=min(cfg.batch_size, len(plain)), shuffle=True, num_workers=0,
                        generator=gen, drop_last=False)
    while True:
        for batch in loader:
            # MONAI's transforms return MetaTensors; the network needs none of their metadata, so it computes
            # on plain tensors like every other stage of the kit (measured: same losses, same step time on the CPU)
            yield batch["image"].as_subclass(torch.Tensor), batch["label"].as_subclass(torch.Tensor)


def _schedule(cfg: SegmentConfig, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(cfg.warmup_steps, 1)
        progress = (step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


@torch.no_grad()
def validation_dice(net: nn.Module, cases: Sequence[dict[str, Any]], cfg: SegmentConfig, num_classes: int,
                    device: torch.device) -> float:
    """Organ-averaged Dice over labelled cases (organs absent from both are ignored), for progress reports."""
    from monai.metrics import DiceMetric

    metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=True)
    for c in cases:
        probs = predict_proba(net, c["image"], cfg, device)
        pred = torch.nn.functional.one_hot(probs.argmax(1), num_classes).permute(0, 4, 1, 2, 3)
        truth = torch.nn.functional.one_hot(torch.as_tensor(c["label"]).as_subclass(torch.Tensor)[0].long().to(
            device)[None], num_classes).permute(0, 4, 1, 2, 3)
        metric(pred, truth)
    return float(metric.aggregate().item())


@dataclass
class TrainState:
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def _save_checkpoint(out: Path, net, opt, sched, state: TrainState) -> None:
    with atomic_path(out / CHECKPOINT) as tmp:
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "step": state.step, "seconds": state.seconds,
                    "history": json.dumps(state.history)}, tmp)


def _load_checkpoint(path: Path, net, opt, sched, device) -> TrainState:
    ck = torch.load(path, map_location=device, weights_only=True)
    net.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    return TrainState(int(ck["step"]), json.loads(ck["history"]), float(ck.get("seconds", 0.0)))


def write_config(out: Path, profile: Profile, num_classes: int, labels: dict[int, str], **extra: Any) -> None:
    write_json(out / CONFIG, {"profile": profile.to_dict(), "num_classes": num_classes,
                              "labels": {str(k): v for k, v in labels.items()}, **extra})


def train_segmenter(train_cases: Sequence[dict[str, Any]], profile: Profile, num_classes: int,
                    labels: dict[int, str], out: str | Path | None = None,
                    val_cases: Sequence[dict[str, Any]] = (), device: str | torch.device = "auto", seed: int = 0,
                    progress: bool = True, on_step: Callable[[int], None] | None = None
                    ) -> tuple[nn.Module, TrainState]:
    """Train the baseline segmenter on preprocessed cases; resumes from ``out/checkpoint.pt`` when present.

    ``on_step(step)`` is called after every step (tests use it to simulate a killed run).
    Returns the trained network (on ``device``) and its training state (steps, loss/Dice history).
    """
    from tqdm.auto import tqdm

    from isl_core.runtime import seed_everything

    cfg = profile.segment
    device = resolve_device(device)
    seed_everything(seed)
    net = build_network(cfg, num_classes).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg, cfg.max_steps))
    state = TrainState()
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_config(out, profile, num_classes, labels, seed=seed)
        if (out / CHECKPOINT).is_file():
            state = _load_checkpoint(out / CHECKPOINT, net, opt, sched, device)
    loss_fn = loss_function()
    batches = _batches(train_cases, cfg, seed + state.step)  # a resumed run draws fresh patches
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="train f0", disable=not progress, leave=False)
    t0 = time.perf_counter() - state.seconds
    while state.step < cfg.max_steps:
        images, lab = next(batches)
        loss = train_step(net, opt, images.to(device), lab.to(device), loss_fn, cfg.grad_clip, cfg.amp)
        sched.step()
        state.step += 1
        record: dict[str, float] = {"step": state.step, "loss": loss}
        if val_cases and (state.step % cfg.val_every == 0 or state.step == cfg.max_steps):
            record["val_dice"] = validation_dice(net, val_cases, cfg, num_classes, device)
        state.history.append(record)
        bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k != "step"})
        bar.update(1)
        state.seconds = time.perf_counter() - t0
        if out is not None and (state.step % cfg.checkpoint_every == 0 or state.step == cfg.max_steps):
            _save_checkpoint(out, net, opt, sched, state)
        if on_step is not None:
            on_step(state.step)
    bar.close()
    if out is not None:
        save_segmenter(net, out / MODEL)
        write_json(out / "history.json", {"steps": state.step, "seconds": state.seconds, "history": state.history})
    return net, state


def save_segmenter(net: nn.Module, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(net.state_dict(), tmp)


def load_segmenter(run: str | Path, device: str | torch.device = "auto") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network from ``RUN/config.json`` and load ``RUN/model.pt`` (weights only)."""
    run = Path(run)
    if not (run / MODEL).is_file() or not (run / CONFIG).is_file():
        raise FileNotFoundError(f"{run}: no {MODEL} / {CONFIG}; train one with `isl train DATASET --out {run}`")
    meta = json.loads((run / CONFIG).read_text())
    profile = Profile.from_dict(meta["profile"])
    device = resolve_device(device)
    net = build_network(profile.segment, meta["num_classes"]).to(device)
    net.load_state_dict(torch.load(run / MODEL, map_location=device, weights_only=True))
    net.eval()
    meta["profile_obj"] = profile
    return net, meta
