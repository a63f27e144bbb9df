"""Stage 3: inference-specific learning (ISL) for one inference image x*.

    f <- copy of f0 ;  P <- softmax(f(x*)) ;  M <- P            (or an initial mask given by the caller)
    for r = 1..R:
        D* <- every training case deformed onto x*  (Stage 2; mask supervision uses M as the target)
        fine-tune f on D*; every ``ema_every`` steps and at the end of the round:
            P <- softmax(f(x*)) ;  M <- beta * M + (1 - beta) * P     (moving average on)
        at the end of the round without the moving average:  M <- P
    final segmentation: argmax(M) (moving average on) or argmax(P) (off)

Why a moving average: a single fine-tuning round can overfit the warped atlases and flip a prediction;
averaging the probability maps over the learning process keeps what is stable. Why update it *during* the
rounds: with only one update per round, M keeps most of the baseline's errors (``docs/paper_reconstruction.md``).

``f0`` is never modified: every inference case adapts its own copy. ``adapt`` runs one variant of the loop;
``adapt_variants`` runs several on the same image and does the work they have in common once.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from isl_core.config import Profile
from isl_core.register import AtlasOrgans, RegistrationResult, register_atlases
from isl_core.runtime import resolve_device
from isl_core.segment import loss_function, predict_proba, train_step


@dataclass
class RoundRecord:
    """What one round produced (kept on the CPU so notebooks can show how the estimate evolves)."""

    round: int
    target_mask: torch.Tensor | None  # M used as the registration target in this round (C,*S); these three are
    probs: torch.Tensor | None  # P at the end of the round (C,*S)                None with keep_history=False
    mask: torch.Tensor | None  # M at the end of the round (C,*S)
    warped_images: torch.Tensor | None  # (N,1,*S)
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
    """Fine-tuning steps after which the moving average is updated: every ``every`` steps and the last one."""
    marks = set(range(every, steps + 1, every)) if every > 0 else set()
    return marks | {steps}


def _noise_sigma(images: torch.Tensor) -> torch.Tensor:
    """Per-volume noise level: robust std (MAD) of the residual after a 3x3x3 mean filter, (B,1,...)."""
    smooth = torch.nn.functional.avg_pool3d(images, 3, stride=1, padding=1, count_include_pad=False)
    resid = (images - smooth).flatten(1)
    mad = (resid - resid.median(dim=1, keepdim=True).values).abs().median(dim=1).values
    return (1.4826 * mad * (27 / 26) ** 0.5).view(-1, *([1] * (images.ndim - 1)))


def match_appearance(warped_images: torch.Tensor, warped_onehot: torch.Tensor, image: torch.Tensor,
                     mask: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Give the warped atlases the inference image's appearance: organ intensities and noise level.

    The atlases carry the *training* cohort's appearance (contrast phase, dose); deformation alone makes
    them match x* in shape only. For every class k the atlas intensities inside its (warped) label are
    shifted by ``mean(x* | M_k) - mean(atlas_i | y_i = k)``, where the current mask estimate M tells where class
    k lies in x*; then noise is added up to x*'s noise level. As M improves over the rounds, so does the
    match. (A kit extension beyond the paper's abstract; ``refine.appearance = "none"`` turns it off.)

    Shapes: warped_images (N,1,*S), warped_onehot (N,C,*S), image (1,1,*S), mask (C,*S) or (1,C,*S).
    """
    m = mask.reshape(1, -1, *image.shape[2:]).to(image)
    w = warped_onehot.to(warped_images)
    target_mean = (m * image).flatten(2).sum(-1) / m.flatten(2).sum(-1).clamp_min(1e-3)  # (1,C)
    atlas_mean = (w * warped_images).flatten(2).sum(-1) / w.flatten(2).sum(-1).clamp_min(1e-3)  # (N,C)
    present = (m.flatten(2).sum(-1) > 1.0) & (w.flatten(2).sum(-1) > 1.0)  # both sides must show the class
    shift = torch.where(present, target_mean - atlas_mean, torch.zeros_like(atlas_mean))  # (N,C)
    out = warped_images + (w * shift[..., None, None, None]).sum(1, keepdim=True)
    extra = (_noise_sigma(image) ** 2 - _noise_sigma(warped_images) ** 2).clamp_min(0).sqrt()
    noise = torch.randn(out.shape, generator=gen).to(out) if gen is not None else torch.randn_like(out)
    return (out + extra * noise).clamp(0, 1)


def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light intensity augmentation on the device: scale, shift and gamma per sample, plus noise.

    Warped atlases all share the training cohort's appearance; jittering it keeps the fine-tuned network
    from tying organ identity to one exact intensity.
    """
    b = images.shape[0]
    shape = (b,) + (1,) * (images.ndim - 1)
    rand = torch.rand((4, *shape), generator=gen).to(images.device)
    gamma = 0.8 + 0.45 * rand[0]
    out = images.clamp(0, 1) ** gamma * (0.9 + 0.2 * rand[1]) + (rand[2] - 0.5) * 0.1
    noise = torch.randn(images.shape, generator=gen).to(images.device) * 0.03 * rand[3]
    return out + noise


def _random_patches(images: torch.Tensor, labels: torch.Tensor, patch: tuple[int, ...], gen: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One random patch per sample (the same window for image and label); whole volumes when they fit."""
    size = images.shape[2:]
    if all(p >= s for p, s in zip(patch, size)):
        return images, labels
    starts = [int(torch.randint(0, max(s - p, 0) + 1, (1,), generator=gen)) for s, p in zip(size, patch)]
    window = tuple(slice(st, st + min(p, s)) for st, p, s in zip(starts, patch, size))
    return images[(..., *window)], labels[(..., *window)]


class Finetuner:
    """Fine-tunes one network on an inference-specific training set, batch by batch."""

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
        x, y = _random_patches(x, y[:, None], self.profile.segment.patch_size, self.gen)
        return _augment(x, self.gen).to(self.device), y.to(self.device)

    def step(self, images, labels, originals=None) -> float:
        x, y = self.batch(images, labels, originals)
        return train_step(self.net, self.opt, x, y, self.loss_fn, self.profile.segment.grad_clip,
                          self.profile.segment.amp)


def reg_cfg_for_round(reg_cfg, r: int, mask_from_round: int):
    """The registration settings of round ``r``: mask supervision only once M is worth following.

    M0 is the baseline's own prediction, wrong exactly where ISL should help; aligning atlases to it in the
    first round drags them onto the baseline's errors (measured: docs/paper_reconstruction.md). Rounds before
    ``mask_from_round`` therefore align intensities only.
    """
    if reg_cfg.supervision == "intensity" or r >= mask_from_round:
        return reg_cfg
    cfg = copy.deepcopy(reg_cfg)
    cfg.supervision = "intensity"
    return cfg


def _predictor(net: nn.Module, x: torch.Tensor, profile: Profile, device: torch.device):
    return lambda: predict_proba(net, x, profile.segment, device)[0].cpu()


def _as_batch(image: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(image).as_subclass(torch.Tensor).float()
    return x[None] if x.ndim == 4 else x


def _deformed_set(reg: RegistrationResult, x: torch.Tensor, target: torch.Tensor, profile: Profile,
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The inference-specific training set of one round: warped atlases (appearance-matched) and labels."""
    warped_x, warped_y = reg.warped_images.detach().cpu(), reg.warped_labels.detach().cpu().long()
    if profile.refine.appearance == "match":
        onehot = reg.warped_onehot.detach().cpu()
        guide = target if profile.refine.appearance_guide == "mask" else atlas_consensus(onehot)
        warped_x = match_appearance(warped_x, onehot, x.cpu(), guide, gen)
    return warped_x, warped_y


def atlas_consensus(warped_onehot: torch.Tensor, agree: float = 0.5) -> torch.Tensor:
    """Where at least a fraction ``agree`` of the warped atlases put class k: a (C,*S) 0/1 map on x*'s grid.

    The appearance guide that does not depend on the segmenter: it shows where the registered atlases place
    each organ in x*, which is right for the organs registration aligns well even when P is wrong there.
    """
    return (warped_onehot.float().mean(0) >= agree).float()


def _finetune(tuner: Finetuner, warped_x, warped_y, originals, steps: int, marks: set[int], predict
              ) -> tuple[list[float], dict[int, torch.Tensor], float, float]:
    """Fine-tune ``steps`` steps; P after every step in ``marks``. Returns losses, P by step, seconds (ft, inf)."""
    losses, probs_at, t_inf, t0 = [], {}, 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        losses.append(tuner.step(warped_x, warped_y, originals))
        if step in marks:
            t1 = time.perf_counter()
            probs_at[step] = predict()
            t_inf += time.perf_counter() - t1
    if steps == 0:
        t1 = time.perf_counter()
        probs_at[0] = predict()
        t_inf += time.perf_counter() - t1
    return losses, probs_at, time.perf_counter() - t0 - t_inf, t_inf


def _follow(mask: torch.Tensor, probs_at: dict[int, torch.Tensor], marks: set[int], ema: bool, beta: float
            ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """M after one round: folded over P at ``marks`` (moving average on) or the last P (off); P; every M."""
    updates = []
    for step in sorted(k for k in probs_at if k in marks or k == max(probs_at)):
        mask = ema_update(mask, probs_at[step], beta) if ema else probs_at[step]
        updates.append(mask.clone())
    return mask, probs_at[max(probs_at)], updates


def _marks(profile: Profile, ema: bool) -> set[int]:
    return _update_steps(profile.refine.finetune_steps, profile.refine.ema_every if ema else 0)


def update_schedule(profile: Profile, ema: bool) -> list[int]:
    """The fine-tuning steps, counted over all rounds, at which ``ISLResult.mask_updates`` records M.

    The first entry is 0 (M0, before any fine-tuning). With the moving average M is updated every
    ``refine.ema_every`` steps and at the end of each round; without it, M = P at the end of each round.
    """
    steps, within = profile.refine.finetune_steps, sorted(_marks(profile, ema))
    return [0] + [r * steps + k for r in range(profile.refine.rounds) for k in within]


def _originals(atlas_images, atlas_labels, profile: Profile, mix_original: bool):
    return (atlas_images, atlas_labels.long()) if (mix_original or profile.refine.mix_original > 0) else None


@dataclass(eq=False)
class Variant:
    """One ISL method's choices: how the atlases are aligned, how M follows P, where M starts."""

    supervision: str | None = None  # "intensity" | "mask" | "both"; None: the profile's register.supervision
    ema: bool | None = None  # moving average of the predicted mask (off: M <- P); None: the profile's refine.ema
    beta: float | None = None  # None: the profile's refine.beta
    initial_mask: torch.Tensor | None = None  # M0 (C,*S); None: M0 = P0

    def resolved(self, profile: Profile) -> Variant:
        """This variant with every unset choice taken from ``profile``."""
        return Variant(self.supervision or profile.register.supervision,
                       profile.refine.ema if self.ema is None else self.ema,
                       profile.refine.beta if self.beta is None else self.beta, self.initial_mask)


@dataclass
class _Branch:
    """A variant's state between rounds; the keys name the inputs its next round depends on."""

    variant: Variant
    mask: torch.Tensor  # M
    mask_key: tuple  # what M was computed from
    tuner_key: tuple  # which fine-tuning path the network went through
    reg_key: tuple | None  # the previous round's registration (a warm start for the next)
    result: ISLResult
    charged: set = field(default_factory=set)  # registrations already counted in its seconds (reused ones cost once)


def _registration_key(round_cfg, branch: _Branch) -> tuple:
    """Registrations with equal keys are equal: intensity alignment ignores M, mask alignment follows it."""
    if round_cfg.supervision == "intensity":
        return ("intensity",)
    warm = branch.reg_key if branch.reg_key is not None and round_cfg.warm_start_iterations > 0 else None
    return (round_cfg.supervision, branch.mask_key, warm)


@dataclass
class _Run:
    """One fine-tuning run: the deformed atlases it trained on, its losses, P at its update steps, seconds."""

    deformed: tuple[torch.Tensor, torch.Tensor]
    losses: list[float]
    probs_at: dict[int, torch.Tensor]
    seconds: dict[str, float]


class _SharedWork:
    """The registrations and fine-tuning runs of one inference image, each computed once and found by its key.

    A registration key names what the alignment depends on (``_registration_key``); a run key is (the run the
    network comes from, the registration, the appearance guide). Only what the next round can use is kept.
    """

    def __init__(self, net0: nn.Module, x: torch.Tensor, atlas_images, atlas_labels, profile: Profile,
                 num_classes: int, originals, device: torch.device, seed: int, organs: AtlasOrgans | None):
        self.x, self.images, self.labels, self.originals = x, atlas_images, atlas_labels, originals
        self.organs = organs if organs is not None else AtlasOrgans(atlas_labels)
        self.profile, self.num_classes, self.device = profile, num_classes, device
        self.tuners: dict[tuple, Finetuner] = {("f0",): Finetuner(copy.deepcopy(net0).to(device), profile, device,
                                                                  seed)}  # f0 itself is never touched
        self.registrations: dict[tuple, tuple[RegistrationResult, float]] = {}
        self.runs: dict[tuple, _Run] = {}
        self.pending: dict[tuple, set[tuple]] = {}  # network -> runs of this round that still have to start from it

    def predict_p0(self) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        return _predictor(self.tuners[("f0",)].net, self.x, self.profile, self.device)(), time.perf_counter() - t0

    def registration(self, key: tuple, round_cfg, target: torch.Tensor) -> tuple[RegistrationResult, float]:
        if key not in self.registrations:
            t0 = time.perf_counter()
            mask_supervised = round_cfg.supervision != "intensity"
            warm = key[-1] if mask_supervised else None
            reg = register_atlases(self.x, self.images, self.labels, round_cfg, self.num_classes,
                                   target_mask=target[None] if mask_supervised else None, device=self.device,
                                   init_displacement=None if warm is None else self.registrations[warm][0].displacement,
                                   organs=self.organs)
            self.registrations[key] = (reg, time.perf_counter() - t0)
        return self.registrations[key]

    def start_round(self, run_keys) -> None:
        self.runs = {}
        self.pending = {}
        for key in run_keys:
            self.pending.setdefault(key[0], set()).add(key)

    def run(self, key: tuple, reg: RegistrationResult, target: torch.Tensor, marks: set[int]) -> _Run:
        if key not in self.runs:
            parent = key[0]
            self.pending[parent].discard(key)
            # the last run to leave a network takes it over; the others take copies
            tuner = self.tuners.pop(parent) if not self.pending[parent] else copy.deepcopy(self.tuners[parent])
            cfg = self.profile.refine
            t0 = time.perf_counter()
            deformed = _deformed_set(reg, self.x, target, self.profile, tuner.gen)
            t_set = time.perf_counter() - t0
            losses, probs_at, t_ft, t_inf = _finetune(tuner, *deformed, self.originals, cfg.finetune_steps, marks,
                                                      _predictor(tuner.net, self.x, self.profile, self.device))
            self.tuners[key] = tuner
            self.runs[key] = _Run(deformed, losses, probs_at, {"finetune": t_ft + t_set, "inference": t_inf})
        return self.runs[key]

    def end_round(self, reg_keys) -> None:
        """Keep what the next round can use: the networks just trained, this round's registrations (warm
        starts) and the intensity alignment (the same in every round)."""
        keep = set(reg_keys) | {("intensity",)}
        self.registrations = {k: v for k, v in self.registrations.items() if k in keep}
        self.tuners = {k: v for k, v in self.tuners.items() if k in self.runs}


def _plan(branches: dict[str, _Branch], profile: Profile, r: int) -> dict[str, tuple]:
    """variant -> (registration settings of round r, registration key, run key)."""
    cfg, plan = profile.refine, {}
    for name, b in branches.items():
        reg_cfg = copy.deepcopy(profile.register)
        reg_cfg.supervision = b.variant.supervision
        round_cfg = reg_cfg_for_round(reg_cfg, r, cfg.mask_from_round)
        reg_key = _registration_key(round_cfg, b)
        guide = b.mask_key if cfg.appearance == "match" and cfg.appearance_guide == "mask" else None
        plan[name] = (round_cfg, reg_key, (b.tuner_key, reg_key, guide))
    return plan


def _advance(b: _Branch, r: int, run: _Run, run_key: tuple, reg: RegistrationResult, reg_key: tuple,
             t_reg: float, profile: Profile, keep_history: bool, keep_atlases: bool) -> RoundRecord:
    """Fold M from the run's predictions; record the round in the branch's result."""
    v, target = b.variant, b.mask
    b.mask, probs, updates = _follow(b.mask, run.probs_at, _marks(profile, v.ema), v.ema, v.beta)
    # without the moving average M is the run's last P, whatever M was before
    b.mask_key = ("M", b.mask_key, run_key, v.beta) if v.ema else ("P", run_key)
    b.tuner_key, b.reg_key = run_key, reg_key
    seconds = {"registration": 0.0 if reg_key in b.charged else t_reg, **run.seconds}
    b.charged.add(reg_key)
    for k, value in seconds.items():
        b.result.seconds[k] += value
    b.result.final_probs = b.mask if v.ema else probs
    if keep_history:
        b.result.mask_updates += updates
    record = RoundRecord(r, target if keep_history else None, probs.clone() if keep_history else None,
                         b.mask.clone() if keep_history else None,
                         run.deformed[0] if keep_atlases else None, run.deformed[1] if keep_atlases else None,
                         reg.folding_fraction.detach().cpu(), run.losses, seconds)
    b.result.rounds.append(record)
    return record


def adapt_variants(net0: nn.Module, image: torch.Tensor, atlas_images: torch.Tensor, atlas_labels: torch.Tensor,
                   profile: Profile, num_classes: int, variants: Mapping[str, Variant],
                   intensity_registration: RegistrationResult | None = None, mix_original: bool = False,
                   keep_atlases: bool = False, keep_history: bool = True, device: str | torch.device = "auto",
                   seed: int = 0, on_round: Callable[[str, RoundRecord], None] | None = None,
                   probs0: tuple[torch.Tensor, float] | None = None,
                   atlas_organs: AtlasOrgans | None = None) -> dict[str, ISLResult]:
    """Run several ISL variants on one inference image, computing every shared piece of work once.

    Each round of each variant needs a registration and a fine-tuning run. Two variants need the *same*
    registration when both align intensities (intensity alignment ignores M) or when both follow the same M;
    they need the same fine-tuning run when, in addition, their networks went through the same earlier runs
    and the appearance matching reads the same guide. Until mask supervision starts (``mask_from_round``),
    isl-intensity, isl-mask, their moving-average versions and the MALF-initialised variant all fine-tune
    identically; isl-intensity and isl-intensity-ema stay identical in every round. Such work is keyed by what
    it depends on and done once; a run predicts P at the union of the sharing variants' update steps, and each
    variant folds its own M from those predictions (predicting does not change the network). The results
    are what every variant computes alone (``tests/test_refine.py`` checks it); ``adapt`` is the one-variant
    case. Every variant's ``seconds`` charges it the whole of the work it used, shared or not.

    ``intensity_registration`` hands in an intensity alignment already computed (the ``malf`` baseline's), and
    ``probs0`` the baseline's P0 (C,*S) with the seconds it took (the experiment predicts it for ``baseline``),
    and ``atlas_organs`` an :class:`~isl_core.register.AtlasOrgans` of ``atlas_labels`` kept between cases (one
    is made per call otherwise): the atlases' organ maps as mask-supervised registration resamples them.
    ``keep_history=False`` keeps only the final probabilities of each variant (memory at full size), and
    ``keep_atlases`` the deformed atlases of every round. Live copies of the network: one per distinct branch.
    """
    device = resolve_device(device)
    x = _as_batch(image)
    work = _SharedWork(net0, x, atlas_images, atlas_labels, profile, num_classes,
                       _originals(atlas_images, atlas_labels, profile, mix_original), device, seed, atlas_organs)
    if intensity_registration is not None:
        work.registrations[("intensity",)] = (intensity_registration, intensity_registration.seconds)
    probs0, t_p0 = probs0 if probs0 is not None else work.predict_p0()
    branches = {}
    for name, v in variants.items():
        v = v.resolved(profile)
        start = probs0 if v.initial_mask is None else torch.as_tensor(v.initial_mask).float().cpu()
        mask_key = ("P0",) if v.initial_mask is None else ("M0", id(v.initial_mask))
        result = ISLResult(probs0=probs0.clone(), final_probs=probs0,
                           mask_updates=[start.clone()] if keep_history else [],
                           seconds={"inference": t_p0, "registration": 0.0, "finetune": 0.0})
        branches[name] = _Branch(v, start.clone(), mask_key, ("f0",), None, result)

    for r in range(1, profile.refine.rounds + 1):
        plan = _plan(branches, profile, r)
        marks: dict[tuple, set[int]] = {}  # a shared run predicts P wherever one of its variants updates M
        for name, (_, _, run_key) in plan.items():
            marks.setdefault(run_key, set()).update(_marks(profile, branches[name].variant.ema))
        work.start_round(marks)
        for name, (round_cfg, reg_key, run_key) in plan.items():
            b = branches[name]
            reg, t_reg = work.registration(reg_key, round_cfg, b.mask)
            run = work.run(run_key, reg, b.mask, marks[run_key])
            record = _advance(b, r, run, run_key, reg, reg_key, t_reg, profile, keep_history, keep_atlases)
            if on_round is not None:
                on_round(name, record)
        work.end_round(reg_key for _, reg_key, _ in plan.values())

    for b in branches.values():
        b.result.seconds["total"] = sum(b.result.seconds.values())
    return {name: b.result for name, b in branches.items()}


def adapt(net0: nn.Module, image: torch.Tensor, atlas_images: torch.Tensor, atlas_labels: torch.Tensor,
          profile: Profile, num_classes: int, supervision: str | None = None, ema: bool | None = None,
          beta: float | None = None, initial_mask: torch.Tensor | None = None,
          intensity_registration: RegistrationResult | None = None, mix_original: bool = False,
          keep_atlases: bool = True, device: str | torch.device = "auto", seed: int = 0,
          on_round: Callable[[RoundRecord], None] | None = None) -> ISLResult:
    """Run ISL on one inference image ``image`` (1,*S) with atlases (N,1,*S) / (N,*S) on the same grid.

    ``supervision``, ``ema`` and ``beta`` override the profile (``profile.register.supervision``,
    ``profile.refine.ema``, ``profile.refine.beta``). ``initial_mask`` replaces M0 = P0 (the
    ``isl-mask-ema-malf`` variant). ``intensity_registration`` reuses an intensity alignment already computed.
    Several variants on one image: :func:`adapt_variants` shares their common work.
    """
    variant = Variant(supervision, ema, beta, initial_mask)
    results = adapt_variants(net0, image, atlas_images, atlas_labels, profile, num_classes, {"isl": variant},
                             intensity_registration=intensity_registration, mix_original=mix_original,
                             keep_atlases=keep_atlases, device=device, seed=seed,
                             on_round=None if on_round is None else (lambda _, record: on_round(record)))
    return results["isl"]
