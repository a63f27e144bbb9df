"""Stage 3's fine-tuning: what the network learns from in one round, and one run of fine-tuning steps.

The ISL loop (:mod:`isl_core.refine`) decides *when* to fine-tune and what M becomes; this module knows *how*:

* the training set of a round: the deformed atlases with appearance matching (ISL and ``finetune-atlases``),
  the inference image with its own moving-average prediction as labels (``pseudo-label``), or the inference image
  alone (``tent``);
* the two objectives: Dice + cross-entropy against labels, or the entropy of the prediction (TENT, Wang et al.,
  ICLR 2021), which adapts only the per-channel scale and shift after every normalisation layer;
* :func:`finetune_run`: ``steps`` optimisation steps, predicting P = softmax(f(x*)) after each step in ``marks``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from isl_core.appearance import atlas_consensus, augment, match_appearance
from isl_core.config import Profile
from isl_core.register import Atlases, RegistrationResult
from isl_core.segment import loss_function, network_autocast, predict_proba, train_step

#: What the network learns from in Stage 3: the (deformed) atlases' labels, x*'s own moving-average prediction
#: (self-training), or the entropy of its prediction on x* (TENT).
Target = Literal["atlases", "pseudo-label", "entropy"]


def random_patches(images: torch.Tensor, labels: torch.Tensor, patch: tuple[int, ...], gen: torch.Generator,
                   foreground: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One random patch per sample (the same window for image and label); whole volumes when they fit.

    With probability ``foreground`` a sample's patch is centred on a random organ voxel of its label (as Stage 1's
    ``RandCropByPosNegLabeld`` does): uniform windows on a large grid would mostly miss the small organs.
    """
    size = images.shape[2:]
    if all(p >= s for p, s in zip(patch, size)):
        return images, labels
    if foreground <= 0:
        starts = [int(torch.randint(0, max(s - p, 0) + 1, (1,), generator=gen)) for s, p in zip(size, patch)]
        window = tuple(slice(st, st + min(p, s)) for st, p, s in zip(starts, patch, size))
        return images[(..., *window)], labels[(..., *window)]
    xs, ys = [], []
    for i in range(images.shape[0]):
        organ = torch.nonzero(labels[i, 0] > 0)
        if len(organ) and float(torch.rand((), generator=gen)) < foreground:
            centre = organ[int(torch.randint(0, len(organ), (1,), generator=gen))].tolist()
        else:
            centre = [int(torch.randint(0, s, (1,), generator=gen)) for s in size]
        starts = [min(max(c - p // 2, 0), max(s - p, 0)) for c, p, s in zip(centre, patch, size)]
        window = tuple(slice(st, st + min(p, s)) for st, p, s in zip(starts, patch, size))
        xs.append(images[(i, ..., *window)])
        ys.append(labels[(i, ..., *window)])
    return torch.stack(xs), torch.stack(ys)


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm)  # _NormBase covers batch and instance norm


def norm_scale_shift(net: nn.Module) -> list[nn.Parameter]:
    """TENT's parameters: the per-channel scale and shift of every normalisation layer of ``net``.

    MONAI's instance norm has none by default (``affine=False``). They are added at the identity (scale 1, shift 0),
    so the network still computes f0 exactly until TENT moves them; instance norm already normalises with the
    statistics of the image at hand, which is what TENT's test-batch statistics are for batch norm.
    """
    params = []
    for m in net.modules():
        if not isinstance(m, _NORMS):
            continue
        if getattr(m, "weight", None) is None:
            where = next(net.parameters())
            channels = m.num_features if hasattr(m, "num_features") else m.num_channels
            m.weight = nn.Parameter(torch.ones(channels, device=where.device, dtype=where.dtype))
            m.bias = nn.Parameter(torch.zeros(channels, device=where.device, dtype=where.dtype))
            m.affine = True
        params += [m.weight, m.bias]
    return params


def entropy_step(net: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, grad_clip: float,
                 amp: bool = True) -> float:
    """One TENT step: minimise the mean voxel-wise entropy of softmax(net(images)), in the precision of
    :func:`~isl_core.segment.train_step` (the network is the same; only the objective differs)."""
    net.train()
    optimizer.zero_grad(set_to_none=True)
    with network_autocast(images.device, amp):
        logits = net(images).float()
    entropy = -(torch.softmax(logits, 1) * torch.log_softmax(logits, 1)).sum(1).mean()
    entropy.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()
    return float(entropy.detach())


class Finetuner:
    """Fine-tunes one network, batch by batch, on a training set of images and labels.

    Its generator drives every random choice of the fine-tuning (batches, patches, augmentation, the noise of
    appearance matching), so two finetuners with the same seed and inputs train identically. ``objective``
    ``"entropy"`` (TENT) adapts only :func:`norm_scale_shift` with Adam and no weight decay (decay would pull the
    scales towards 0); the labels, then, only place the patches.
    """

    def __init__(self, net: nn.Module, profile: Profile, device: torch.device, seed: int,
                 objective: Literal["labels", "entropy"] = "labels"):
        self.net, self.profile, self.device, self.objective = net, profile, device, objective
        cfg = profile.refine
        if objective == "entropy":
            adapted = norm_scale_shift(net)
            for p in net.parameters():
                p.requires_grad_(False)
            for p in adapted:
                p.requires_grad_(True)
            self.opt = torch.optim.Adam(adapted, lr=cfg.lr)
        else:
            self.opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=profile.segment.weight_decay)
        self.loss_fn = loss_function()
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, images: torch.Tensor, labels: torch.Tensor, originals: tuple[torch.Tensor, torch.Tensor] | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.profile.refine
        n_orig = int(round(cfg.mix_original * cfg.batch_size)) if originals is not None else 0
        pick = torch.randint(0, images.shape[0], (cfg.batch_size - n_orig,), generator=self.gen)
        x, y = images[pick], labels[pick]
        if n_orig:
            pick_o = torch.randint(0, originals[0].shape[0], (n_orig,), generator=self.gen)
            x = torch.cat([x, originals[0][pick_o]])
            y = torch.cat([y, originals[1][pick_o]])
        seg = self.profile.segment
        share = seg.pos_neg_ratio / (seg.pos_neg_ratio + 1.0) if cfg.patch_sampling == "foreground" else 0.0
        x, y = random_patches(x, y[:, None], seg.patch_size, self.gen, share)
        return augment(x, self.gen, cfg).to(self.device), y.to(self.device)

    def step(self, images: torch.Tensor, labels: torch.Tensor,
             originals: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
        x, y = self.batch(images, labels, originals)
        seg = self.profile.segment
        if self.objective == "entropy":
            return entropy_step(self.net, self.opt, x, seg.grad_clip, seg.amp)
        return train_step(self.net, self.opt, x, y, self.loss_fn, seg.grad_clip, seg.amp)


def new_finetuner(net0: nn.Module, target: Target, profile: Profile, device: torch.device, seed: int) -> Finetuner:
    """A finetuner on a copy of ``net0`` (f0 itself is never touched) for the objective ``target`` needs."""
    objective = "entropy" if target == "entropy" else "labels"
    return Finetuner(copy.deepcopy(net0).to(device), profile, device, seed, objective)


def original_set(atlases: Atlases, profile: Profile) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The unwarped training cases that fine-tuning mixes into each batch (``refine.mix_original`` > 0)."""
    return (atlases.images, atlases.labels.long()) if profile.refine.mix_original > 0 else None


def predictor(net: nn.Module, x: torch.Tensor, profile: Profile, device: torch.device) -> Callable[[], torch.Tensor]:
    """A function returning P = softmax(net(x*)) (C,*S) on the CPU, for the network as it is when called."""
    return lambda: predict_proba(net, x, profile.segment, device)[0].cpu()


def inference_specific_set(reg: RegistrationResult, x: torch.Tensor, mask: torch.Tensor | None, profile: Profile,
                           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """D* of one round: the warped atlases (appearance-matched unless ``refine.appearance = "none"``) and labels.

    ``mask`` (M) is read only with ``refine.appearance_guide = "mask"``.
    """
    cfg = profile.refine
    warped_x, warped_y = reg.warped_images.detach().cpu(), reg.warped_labels.detach().cpu().long()
    if cfg.appearance == "match":
        onehot = reg.warped_onehot.detach().cpu()
        guide = mask if cfg.appearance_guide == "mask" else atlas_consensus(onehot, cfg.consensus_agree)
        warped_x = match_appearance(warped_x, onehot, x.cpu(), guide, gen)
    return warped_x, warped_y


def self_training_set(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x* with argmax(M) as its labels (1,1,*S), (1,*S): self-training, and TENT's patch placement.

    Each batch draws its own intensity augmentation of x*, so the network learns to give every augmented copy
    the labels of the moving-average estimate: augmentation consistency.
    """
    return x.detach().cpu(), mask.argmax(0)[None].long()


@dataclass(eq=False)
class FinetuneRun:
    """One round's fine-tuning: the set it trained on, its losses, P at its update steps and the seconds each
    prediction took, and the seconds of the fine-tuning itself (``finetune``, predictions excluded)."""

    trained_on: tuple[torch.Tensor, torch.Tensor]
    losses: list[float]
    probs_at: dict[int, torch.Tensor]
    predict_seconds: dict[int, float]
    seconds: dict[str, float]


def finetune_run(tuner: Finetuner, target: Target, registration: RegistrationResult | None, mask: torch.Tensor | None,
                 x: torch.Tensor, atlases: Atlases, steps: int, marks: set[int]) -> FinetuneRun:
    """Fine-tune ``tuner`` for ``steps`` steps; P after every step in ``marks``.

    ``target`` ``"atlases"`` trains on the registration's deformed atlases (mixed with the original set when
    ``refine.mix_original`` > 0); the others train on x* itself with argmax(``mask``) as labels.
    """
    profile = tuner.profile
    t0 = time.perf_counter()
    if target == "atlases":
        trained_on, originals = inference_specific_set(registration, x, mask, profile, tuner.gen), \
            original_set(atlases, profile)
    else:
        trained_on, originals = self_training_set(x, mask), None
    predict = predictor(tuner.net, x, profile, tuner.device)
    losses, probs_at, t_predict = [], {}, {}
    for step in range(1, steps + 1):
        losses.append(tuner.step(*trained_on, originals))
        if step in marks:
            t1 = time.perf_counter()
            probs_at[step] = predict()
            t_predict[step] = time.perf_counter() - t1
    return FinetuneRun(trained_on, losses, probs_at, t_predict,
                       {"finetune": time.perf_counter() - t0 - sum(t_predict.values())})
