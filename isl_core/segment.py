"""Stage 1: initial segmentation learning — the baseline segmenter f0, its training, prediction and checkpoints.

The network is a MONAI 3D ``UNet`` or ``DynUNet`` sized by the profile. Training samples patches balanced on
foreground (``RandCropByPosNegLabeld`` in ``patches.PatchStream``), applies light augmentation, and optimises
``DiceCELoss`` with AdamW under a warm-up + cosine schedule, with gradient clipping and bf16 autocast where the
hardware computes bf16 natively (CUDA; CPUs with AVX-512 BF16 or AMX: :func:`has_native_bf16`). A
checkpoint holds only tensors and plain containers (``state_dict`` of net, optimiser and schedule, the step, the
history, the random state of the patch sampler and of the process), so a resumed training equals an uninterrupted
one and the checkpoint loads with ``torch.load(..., weights_only=True)``; ``config.json`` beside it rebuilds the
network.

Stage 3 fine-tunes a copy of this network; it reuses ``loss_function``, ``train_step`` and ``predict_proba``.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from isl_core.config import Profile, SegmentConfig
from isl_core.data import Case, Dataset, load_cases
from isl_core.patches import PatchStream, global_rng_state, set_global_rng_state
from isl_core.runtime import DatasetError, UserError, atomic_path, differences, read_json, resolve_device, write_json

CHECKPOINT = "checkpoint.pt"  # resumable training state, rewritten every `checkpoint_every` steps
MODEL = "model.pt"  # the final network weights
CONFIG = "config.json"  # profile + classes: all that is needed to rebuild the network
MONITORED_CASES = 2  # validation cases whose Dice a training run reports (watched only: no weight depends on them)


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


def has_native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively, so that autocast speeds the network up rather than slowing it.

    CUDA: the card supports bf16. CPU: AVX-512 BF16 or AMX (recent Xeons): there oneDNN's bf16 convolutions run
    about twice as fast as fp32 (``bench/unet_step.py``); a CPU without them emulates bf16 and gets slower, so it
    stays in fp32. torch has no public test of these CPU features; its private ones are read defensively.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return any(bool(getattr(cpu, name, lambda: False)()) for name in ("_is_avx512_bf16_supported",
                                                                          "_is_amx_tile_supported"))
    return False


def unet_dtype(device: torch.device | str, amp: bool) -> str:
    """The precision the segmenter computes in on ``device`` with ``segment.amp`` = ``amp``: "bf16" or "fp32"."""
    return "bf16" if amp and has_native_bf16(device) else "fp32"


def network_autocast(device: torch.device, enabled: bool):
    """The autocast context of the segmenter's forward pass: bf16 where :func:`unet_dtype` says so, else a no-op."""
    # bf16 needs no gradient scaler, which keeps the training step (and its checkpoint) simple
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=unet_dtype(device, enabled) == "bf16")


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               loss_fn: nn.Module, grad_clip: float = 1.0, amp: bool = True) -> float:
    """One optimisation step on a batch ``images`` (B,1,*S), ``labels`` (B,1,*S) or soft (B,C,*S) targets."""
    net.train()
    optimizer.zero_grad(set_to_none=True)
    with network_autocast(images.device, amp):
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
    images = torch.as_tensor(images)
    if images.ndim == 4:
        images = images[None]
    net.eval()
    with network_autocast(device, cfg.amp):
        logits = sliding_window_inference(images.to(device), roi_size=cfg.patch_size, sw_batch_size=cfg.sw_batch_size,
                                          predictor=net, overlap=cfg.sw_overlap, mode="gaussian")
    return torch.softmax(torch.as_tensor(logits).float(), dim=1)


def _schedule(cfg: SegmentConfig, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up from 1/W, then a cosine from 1 down to a 2 % floor.

    Hand-written because ``monai.optimizers.WarmupCosineSchedule`` cannot express it: its warm-up starts at
    ``warmup_multiplier`` + a step/W ramp (not (step + 1)/W) and its ``end_lr`` clamps the cosine instead of
    rescaling it onto [0.02, 1], so every learning rate (and the trained weights) would change.
    """
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(cfg.warmup_steps, 1)
        progress = (step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


@torch.no_grad()
def validation_dice(net: nn.Module, cases: Sequence[dict[str, Any]], cfg: SegmentConfig, num_classes: int,
                    device: torch.device) -> float:
    """Mean over labelled cases of the organ-averaged Dice on the working grid, for progress reports.

    The Dice rules are the results' (``evaluate.organ_metrics`` / ``mean_dice``): an organ absent from both maps
    is undefined and left out, one found on only one side scores 0, so a training curve and a results table
    measure the same thing. HD95 is skipped (slow, and not needed for a progress report).
    """
    import numpy as np

    from isl_core.metrics import mean_dice, organ_metrics

    organs = {k: str(k) for k in range(1, num_classes)}
    scores = []
    for c in cases:
        pred = predict_proba(net, c["image"], cfg, device).argmax(1)[0].cpu().numpy()
        truth = torch.as_tensor(c["label"])[0].long().cpu().numpy()
        scores.append(mean_dice(organ_metrics(pred, truth, organs, (1.0,) * truth.ndim, hd95=False)))
    defined = [s for s in scores if not math.isnan(s)]
    return float(np.mean(defined)) if defined else math.nan


@dataclass
class TrainState:
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_at: list[dict[str, Any]] = field(default_factory=list)  # {"step", "exact"} of every resume


def _save_checkpoint(out: Path, net, opt, sched, state: TrainState, patches: PatchStream) -> None:
    with atomic_path(out / CHECKPOINT) as tmp:
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "step": state.step, "seconds": state.seconds, "history": json.dumps(state.history),
                    "resumed_at": list(state.resumed_at),
                    "random": {"patches": patches.state(), "global": global_rng_state()}}, tmp)


def _torch_load(path: Path, device: torch.device | str, what: str) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into one message naming the file.

    PyTorch's own refusal of a file holding Python objects suggests ``weights_only=False``, i.e. running whatever
    code the file carries; the kit never does that, so the message says instead that this is not a kit file.
    """
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise DatasetError(f"{path}: not an isl-kit {what}: it holds Python objects besides tensors, which the kit "
                           "refuses to load (they could run code); use a file written by `isl train`") from None
    except (EOFError, RuntimeError, KeyError, ValueError, OSError) as e:
        raise DatasetError(f"{path}: unreadable {what} ({type(e).__name__}: {str(e)[:120] or 'empty file'}); it is "
                           "damaged or truncated: remove it (training restarts) or restore it") from None


def _load_state(module, state: Any, path: Path, what: str) -> None:
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{path}: the {what} does not fit the network of {path.parent / CONFIG} "
                           f"({str(e).splitlines()[0][:160]}); use the files of one run together") from None


def _load_checkpoint(path: Path, net, opt, sched, device) -> tuple[TrainState, dict[str, Any] | None]:
    """The training state of ``path`` (loaded into net, optimiser and schedule) and its random state (``None`` in
    a checkpoint of an older kit, which did not save it)."""
    ck = _torch_load(path, "cpu", "training checkpoint")
    if not isinstance(ck, dict) or not {"model", "optimizer", "scheduler", "step", "history"} <= set(ck):
        raise DatasetError(f"{path}: not an isl-kit training checkpoint (keys missing); remove it to restart")
    _load_state(net, ck["model"], path, "checkpoint")
    _load_state(opt, ck["optimizer"], path, "optimiser state")
    _load_state(sched, ck["scheduler"], path, "schedule state")
    state = TrainState(int(ck["step"]), json.loads(ck["history"]), float(ck.get("seconds", 0.0)),
                       [dict(r) for r in ck.get("resumed_at", [])])
    return state, ck.get("random")


def write_config(out: Path, profile: Profile, num_classes: int, labels: dict[int, str], **extra: Any) -> None:
    write_json(out / CONFIG, {"profile": profile.to_dict(), "num_classes": num_classes,
                              "labels": {str(k): v for k, v in labels.items()}, **extra})


class RunMismatchError(UserError):
    """A run folder holds a model of other settings (dataset, profile, seed, classes) than the ones asked for."""


def check_run_binding(out: str | Path, profile: Profile, num_classes: int, seed: int,
                      dataset_fingerprint: str | None = None) -> None:
    """Refuse a run folder whose ``config.json`` was written for another dataset, profile, class count or seed.

    Called before anything is written, so a refused command leaves the folder as it was. A folder without
    ``config.json`` is new (or empty) and binds to the settings of the run that starts in it.
    """
    path = Path(out) / CONFIG
    if not path.is_file():
        return
    old = read_json(path, "run configuration")
    if not isinstance(old, dict):
        raise DatasetError(f"{path}: not an isl-kit run configuration (a JSON {type(old).__name__})")
    new = json.loads(json.dumps({"profile": profile.to_dict(), "num_classes": num_classes, "seed": seed,
                                 "dataset_fingerprint": dataset_fingerprint}))  # tuples -> lists, as stored
    diffs = differences({k: old.get(k) for k in new}, new)
    if diffs:
        shown = ", ".join(diffs[:6]) + (f" and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise RunMismatchError(f"{path}: this run folder belongs to another run (different {shown}); "
                               "use another --out, or remove the folder to train afresh")


def model_fingerprint(run: str | Path) -> str:
    """Content hash of a trained model: ``model.pt``'s bytes plus what ``config.json`` says about its input and
    output (profile, classes, labels). The same model copied elsewhere has the same fingerprint; 32 hex chars."""
    run = Path(run)
    meta = read_json(run / CONFIG, "run configuration")
    h = hashlib.sha256()
    try:
        with open(run / MODEL, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    except FileNotFoundError:
        raise DatasetError(f"{run / MODEL}: not found; train a model with `isl train DATASET --out {run}`") from None
    keys = ("profile", "num_classes", "labels")
    h.update(json.dumps({k: meta.get(k) for k in keys} if isinstance(meta, dict) else meta, sort_keys=True).encode())
    return h.hexdigest()[:32]


def train_segmenter(train_cases: Sequence[dict[str, Any]], profile: Profile, num_classes: int,
                    labels: dict[int, str], out: str | Path | None = None,
                    val_cases: Sequence[dict[str, Any]] = (), device: str | torch.device = "auto", seed: int = 0,
                    progress: bool = True, on_step: Callable[[int], None] | None = None,
                    dataset_fingerprint: str | None = None) -> tuple[nn.Module, TrainState]:
    """Train the baseline segmenter on preprocessed cases; resumes from ``out/checkpoint.pt`` when present, to the
    same weights as an uninterrupted run (the checkpoint holds the patch sampler's and the global random state).

    A run folder is bound to its settings: ``out/config.json`` records the profile, classes, seed and
    ``dataset_fingerprint`` (``data.dataset_fingerprint``), and a folder made with others is refused
    (``RunMismatchError``) before anything is written. ``on_step(step)`` is called after every step (tests use it
    to simulate a killed run).
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
        check_run_binding(out, profile, num_classes, seed, dataset_fingerprint)
        out.mkdir(parents=True, exist_ok=True)
        write_config(out, profile, num_classes, labels, seed=seed, dataset_fingerprint=dataset_fingerprint)
    batches = PatchStream(train_cases, cfg, seed)
    if out is not None and (out / CHECKPOINT).is_file():
        state, random_state = _load_checkpoint(out / CHECKPOINT, net, opt, sched, device)
        _resume_random_state(batches, random_state, out / CHECKPOINT)
        state.resumed_at.append({"step": state.step, "exact": random_state is not None})
    loss_fn = loss_function()
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
            _save_checkpoint(out, net, opt, sched, state, batches)
        if on_step is not None:
            on_step(state.step)
    bar.close()
    if out is not None:
        save_segmenter(net, out / MODEL)
        write_json(out / "history.json", {"steps": state.step, "seconds": state.seconds, "history": state.history,
                                           "resumed_at": state.resumed_at, "unet_dtype": unet_dtype(device, cfg.amp)})
    return net, state


def train_baseline(ds: Dataset, train: Sequence[Case], profile: Profile, out: str | Path, seed: int = 0,
                   device: str | torch.device = "auto", progress: bool = True,
                   dataset_fingerprint: str | None = None) -> tuple[nn.Module, TrainState]:
    """f0 trained on ``train`` into the run folder ``out`` (resuming a half-trained one): the one baseline trainer
    of ``isl train``, an experiment's baselines (one per fold) and the notebooks.

    Training reports the Dice of the first ``MONITORED_CASES`` validation cases it does not train on; they are
    only watched (evaluation mode, no gradient, no random number drawn), so the weights are those of an unwatched
    run (tests/test_segment.py).
    """
    trained = {c.id for c in train}
    watched = [c for c in ds.validation if c.id not in trained][:MONITORED_CASES]
    return train_segmenter(load_cases(train, profile.data, ds.modality), profile, ds.num_classes, ds.labels, out=out,
                           val_cases=load_cases(watched, profile.data, ds.modality), device=device, seed=seed,
                           progress=progress, dataset_fingerprint=dataset_fingerprint)


def _resume_random_state(batches: PatchStream, random_state: dict[str, Any] | None, path: Path) -> None:
    """Put the patch sampler and the global generators where the checkpoint left them. An older checkpoint without
    them resumes with the sampler's fresh start (recorded in ``resumed_at`` as not exact)."""
    if random_state is None:
        return
    try:
        batches.restore(random_state["patches"])
        set_global_rng_state(random_state["global"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise DatasetError(f"{path}: its random state does not fit this training run ({type(e).__name__}: "
                           f"{str(e)[:120]}); remove it to restart the training") from None


class RunFolderError(UserError, FileNotFoundError):
    """A run folder lacks the files ``isl train`` writes."""


def save_segmenter(net: nn.Module, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(net.state_dict(), tmp)


def load_segmenter(run: str | Path, device: str | torch.device = "auto") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network from ``RUN/config.json`` and load ``RUN/model.pt`` (weights only)."""
    run = Path(run)
    if not (run / MODEL).is_file() or not (run / CONFIG).is_file():
        raise RunFolderError(f"{run}: no {MODEL} / {CONFIG}; train one with `isl train DATASET --out {run}`")
    meta = read_json(run / CONFIG, "run configuration")
    try:
        profile = Profile.from_dict(meta["profile"])
        num_classes = int(meta["num_classes"])
    except (TypeError, KeyError, ValueError) as e:
        raise DatasetError(f"{run / CONFIG}: not a valid run configuration ({type(e).__name__}: {e}); "
                           f"retrain with `isl train DATASET --out {run}`") from None
    device = resolve_device(device)
    net = build_network(profile.segment, num_classes).to(device)
    _load_state(net, _torch_load(run / MODEL, device, "model"), run / MODEL, "model")
    net.eval()
    meta["profile_obj"] = profile
    return net, meta
