"""Stage 3: inference-specific learning (ISL) for one inference image x*: the paper's loop, in :func:`adapt`.

    f <- copy of f0 ;  P0 <- softmax(f(x*)) ;  M <- P0            (or an initial mask given by the caller)
    for r = 1..R:
        D* <- every training case deformed onto x*  (Stage 2; from round ``mask_from_round`` on, mask
              supervision pulls the atlases' labels onto M)
        fine-tune f on D*; every ``ema_every`` steps and at the end of the round:
            P <- softmax(f(x*)) ;  M <- beta * M + (1 - beta) * P     (moving average on)
        at the end of the round without the moving average:  M <- P
    final segmentation: argmax(M) (moving average on) or argmax(P) (off)

What M feeds back into: the next round's registration target (mask supervision), the appearance guide when
``refine.appearance_guide = "mask"``, and the final segmentation (moving average on).

Why a moving average: a single fine-tuning round can overfit the warped atlases and flip a prediction;
averaging the probability maps over the learning process keeps what is stable. Why update it *during* the
rounds: with only one update per round, M keeps most of the baseline's errors (``docs/paper_reconstruction.md``).

``f0`` is never modified: every inference case adapts its own copy. Running several variants of the loop on
the same image shares their common work: :func:`isl_core.sharing.adapt_variants` (same results, checked
against :func:`adapt` by the tests).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from isl_core.appearance import atlas_consensus, augment, match_appearance
from isl_core.config import Profile, RegisterConfig
from isl_core.register import Atlases, RegistrationResult, register_atlases
from isl_core.runtime import resolve_device
from isl_core.segment import loss_function, predict_proba, train_step


@dataclass
class RoundRecord:
    """What one round produced (kept on the CPU so notebooks can show how the estimate evolves)."""

    round: int
    target_mask: torch.Tensor | None  # M at the start of the round, the registration target (C,*S); this and
    probs: torch.Tensor | None  # P at the end of the round (C,*S)                 the next are None when the
    mask: torch.Tensor | None  # M at the end of the round (C,*S)                   history is not kept
    warped_images: torch.Tensor | None  # (N,1,*S) the inference-specific training set, if kept
    warped_labels: torch.Tensor | None  # (N,*S)
    folding_fraction: torch.Tensor  # (N,)
    finetune_losses: list[float]
    seconds: dict[str, float]


@dataclass
class ISLResult:
    probs0: torch.Tensor  # baseline P = softmax(f0(x*)) (C,*S)
    final_probs: torch.Tensor  # M (moving average on) or P (off) after the last round (C,*S)
    rounds: list[RoundRecord] = field(default_factory=list)
    mask_updates: list[torch.Tensor] = field(default_factory=list)  # M after every update (C,*S), if kept
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def labels(self) -> torch.Tensor:
        return self.final_probs.argmax(0)


def ema_update(mask: torch.Tensor, probs: torch.Tensor, beta: float) -> torch.Tensor:
    """The moving average of the predicted mask: ``M <- beta * M + (1 - beta) * P``."""
    return beta * mask + (1.0 - beta) * probs


def _update_steps(steps: int, every: int) -> set[int]:
    """Fine-tuning steps after which M is updated: every ``every`` steps (0: never) and the last one."""
    marks = set(range(every, steps + 1, every)) if every > 0 else set()
    return marks | {steps}


def update_marks(profile: Profile, ema: bool) -> set[int]:
    """The steps of one round after which M is updated: with the moving average every ``refine.ema_every``
    steps and the last; without it only the last (M <- P)."""
    return _update_steps(profile.refine.finetune_steps, profile.refine.ema_every if ema else 0)


def update_schedule(profile: Profile, ema: bool) -> list[int]:
    """The fine-tuning steps, counted over all rounds, at which ``ISLResult.mask_updates`` records M.

    The first entry is 0 (M0, before any fine-tuning).
    """
    steps, within = profile.refine.finetune_steps, sorted(update_marks(profile, ema))
    return [0] + [r * steps + k for r in range(profile.refine.rounds) for k in within]


def round_registration(profile: Profile, supervision: str, r: int) -> RegisterConfig:
    """The registration settings of round ``r``: mask supervision only once M is worth following.

    M0 is the baseline's own prediction, wrong exactly where ISL should help; aligning atlases to it in the
    first round drags them onto the baseline's errors (measured: docs/paper_reconstruction.md). Rounds before
    ``refine.mask_from_round`` therefore align intensities only.
    """
    follows_mask = supervision != "intensity" and r >= profile.refine.mask_from_round
    return dataclasses.replace(profile.register, supervision=supervision if follows_mask else "intensity")


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


class Finetuner:
    """Fine-tunes one network on an inference-specific training set, batch by batch.

    Its generator drives every random choice of the fine-tuning (batches, patches, augmentation, the noise of
    appearance matching), so two finetuners with the same seed and inputs train identically.
    """

    def __init__(self, net: nn.Module, profile: Profile, device: torch.device, seed: int):
        self.net, self.profile, self.device = net, profile, device
        cfg = profile.refine
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
        return train_step(self.net, self.opt, x, y, self.loss_fn, self.profile.segment.grad_clip,
                          self.profile.segment.amp)


def original_set(atlases: Atlases, profile: Profile) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The unwarped training cases that fine-tuning mixes into each batch (``refine.mix_original`` > 0)."""
    return (atlases.images, atlases.labels.long()) if profile.refine.mix_original > 0 else None


def predictor(net: nn.Module, x: torch.Tensor, profile: Profile, device: torch.device) -> Callable[[], torch.Tensor]:
    """A function returning P = softmax(net(x*)) (C,*S) on the CPU, for the network as it is when called."""
    return lambda: predict_proba(net, x, profile.segment, device)[0].cpu()


def inference_specific_set(reg: RegistrationResult, x: torch.Tensor, mask: torch.Tensor, profile: Profile,
                           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """D* of one round: the warped atlases (appearance-matched unless ``refine.appearance = "none"``) and labels."""
    cfg = profile.refine
    warped_x, warped_y = reg.warped_images.detach().cpu(), reg.warped_labels.detach().cpu().long()
    if cfg.appearance == "match":
        onehot = reg.warped_onehot.detach().cpu()
        guide = mask if cfg.appearance_guide == "mask" else atlas_consensus(onehot, cfg.consensus_agree)
        warped_x = match_appearance(warped_x, onehot, x.cpu(), guide, gen)
    return warped_x, warped_y


def as_batch(image: torch.Tensor) -> torch.Tensor:
    """An inference image (1,*S) or (1,1,*S) as a float batch of one (1,1,*S)."""
    x = torch.as_tensor(image).float()
    return x[None] if x.ndim == 4 else x


def adapt(net0: nn.Module, image: torch.Tensor, atlases: Atlases, profile: Profile, num_classes: int,
          supervision: str | None = None, ema: bool | None = None, beta: float | None = None,
          initial_mask: torch.Tensor | None = None, intensity_registration: RegistrationResult | None = None,
          keep_atlases: bool = True, device: str | torch.device = "auto", seed: int = 0,
          on_round: Callable[[RoundRecord], None] | None = None) -> ISLResult:
    """Run ISL on one inference image ``image`` (1,*S) with ``atlases`` on the same grid.

    ``supervision``, ``ema`` and ``beta`` override the profile (``register.supervision``, ``refine.ema``,
    ``refine.beta``). ``initial_mask`` replaces M0 = P0 (the ``isl-mask-ema-malf`` variant).
    ``intensity_registration`` reuses an intensity alignment already computed (the ``malf`` baseline's).
    ``on_round(record)`` is called after every round.
    """
    cfg = profile.refine
    supervision = supervision or profile.register.supervision
    ema = cfg.ema if ema is None else ema
    beta = cfg.beta if beta is None else beta
    device = resolve_device(device)
    x = as_batch(image)
    tuner = Finetuner(copy.deepcopy(net0).to(device), profile, device, seed)  # f0 itself is never touched
    predict = predictor(tuner.net, x, profile, device)
    originals, marks = original_set(atlases, profile), update_marks(profile, ema)

    # Stage 1's estimate: P0 and the initial mask M0
    t0 = time.perf_counter()
    probs = predict()
    result = ISLResult(probs0=probs.clone(), final_probs=probs,
                       seconds={"inference": time.perf_counter() - t0, "registration": 0.0, "finetune": 0.0})
    mask = probs.clone() if initial_mask is None else torch.as_tensor(initial_mask).float().cpu().clone()
    result.mask_updates.append(mask.clone())
    intensity_reg, charged_intensity, previous = intensity_registration, False, None

    for r in range(1, cfg.rounds + 1):
        target = mask
        seconds = {"registration": 0.0, "finetune": 0.0, "inference": 0.0}
        # Stage 2: deform every atlas onto x*. Intensity alignment ignores M, so it is computed once; mask
        # supervision follows M, starting from the previous round's alignment when warm starts are on.
        round_cfg = round_registration(profile, supervision, r)
        if round_cfg.supervision == "intensity":
            if intensity_reg is None:
                intensity_reg = register_atlases(x, atlases, round_cfg, num_classes, device=device)
            reg = intensity_reg
            seconds["registration"] = 0.0 if charged_intensity else reg.seconds
            charged_intensity = True
        else:
            warm = previous.displacement if previous is not None and round_cfg.warm_start_iterations > 0 else None
            reg = register_atlases(x, atlases, round_cfg, num_classes, target_mask=mask[None],
                                   init_displacement=warm, device=device)
            seconds["registration"] = reg.seconds
        previous = reg

        # Stage 3: fine-tune on the inference-specific set D*, folding every new P into M
        t0 = time.perf_counter()
        warped_x, warped_y = inference_specific_set(reg, x, mask, profile, tuner.gen)
        losses = []
        for step in range(1, cfg.finetune_steps + 1):
            losses.append(tuner.step(warped_x, warped_y, originals))
            if step in marks:
                t1 = time.perf_counter()
                probs = predict()
                seconds["inference"] += time.perf_counter() - t1
                mask = ema_update(mask, probs, beta) if ema else probs
                result.mask_updates.append(mask.clone())
        seconds["finetune"] = time.perf_counter() - t0 - seconds["inference"]

        record = RoundRecord(r, target, probs.clone(), mask.clone(), warped_x if keep_atlases else None,
                             warped_y if keep_atlases else None, reg.folding_fraction.detach().cpu(), losses, seconds)
        result.rounds.append(record)
        for k, v in seconds.items():
            result.seconds[k] += v
        if on_round is not None:
            on_round(record)

    result.final_probs = mask if ema else probs
    result.seconds["total"] = sum(result.seconds.values())
    return result
