"""Stage 3: inference-specific learning (ISL) for one inference image x*: the paper's loop, in :func:`isl_rounds`.

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

The loop is written once, as a generator: it *asks* for each round's registration and fine-tuning run (a
:class:`RegistrationRequest`, a :class:`FinetuneRequest`) and does everything else itself: which registration a
round needs, the moving average, the seconds each variant is charged, the record of every round. :func:`adapt`
answers the requests directly for one variant; :func:`isl_core.sharing.adapt_variants` steps several loops
together and answers equal requests once (same results, checked by the tests). The control arms of the
experiment are variants of this same loop (:class:`Variant`): fine-tuning on the atlases in their own geometry,
self-training on x*'s own prediction, TENT, and intensity alignment at mask supervision's budget.

``f0`` is never modified: every inference case adapts its own copy.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import torch
from torch import nn

from isl_core.config import Profile, RegisterConfig
from isl_core.finetune import Finetuner, FinetuneRun, Target, finetune_run, new_finetuner, predictor
from isl_core.register import Atlases, RegistrationResult, identity_registration, register_atlases
from isl_core.runtime import resolve_device


@dataclass(eq=False)
class Variant:
    """One method's choices: how the atlases are aligned, what the network learns from, how M follows P."""

    supervision: str | None = None  # "intensity" | "mask" | "both" | "none" (atlases in their own geometry);
    #                                 None: the profile's register.supervision
    ema: bool | None = None  # moving average of the predicted mask (off: M <- P); None: the profile's refine.ema
    beta: float | None = None  # None: the profile's refine.beta
    initial_mask: torch.Tensor | None = None  # M0 (C,*S); None: M0 = P0
    target: Target = "atlases"  # what Stage 3 learns from (isl_core.finetune.Target)
    matched_budget: bool = False  # intensity alignment refined, from mask_from_round on, for as many warm-started
    #                               steps as mask supervision gets (C2 at a matched registration budget)

    def resolved(self, profile: Profile) -> Variant:
        """This variant with every unset choice taken from ``profile``; inconsistent choices raise ValueError."""
        v = dataclasses.replace(self, supervision=self.supervision or profile.register.supervision,
                                ema=profile.refine.ema if self.ema is None else self.ema,
                                beta=profile.refine.beta if self.beta is None else self.beta)
        if v.target != "atlases" and v.supervision != "none":
            raise ValueError(f"a variant that learns from {v.target!r} registers nothing: use supervision='none'")
        if v.matched_budget and v.supervision != "intensity":
            raise ValueError("matched_budget refines intensity alignment: use supervision='intensity'")
        return v


@dataclass
class RoundRecord:
    """What one round produced (kept on the CPU so notebooks can show how the estimate evolves)."""

    round: int
    target_mask: torch.Tensor | None  # M at the start of the round, the registration target (C,*S); this and
    probs: torch.Tensor | None  # P at the end of the round (C,*S)                 the next are None when the
    mask: torch.Tensor | None  # M at the end of the round (C,*S)                   history is not kept
    warped_images: torch.Tensor | None  # (N,1,*S) the inference-specific training set, if kept
    warped_labels: torch.Tensor | None  # (N,*S)
    folding_fraction: torch.Tensor  # (N,); empty when the round registered nothing
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


# ---------------------------------------------------------------------------------------------- the requests


@dataclass(eq=False)
class RegistrationRequest:
    """Deform every atlas onto x* with ``config`` (None: leave them in their own geometry), following ``target``
    (M, for mask supervision) and starting from ``warm_from``'s displacement when given."""

    config: RegisterConfig | None
    target: torch.Tensor | None
    warm_from: RegistrationResult | None


@dataclass(eq=False)
class Network:
    """Names the network a fine-tuning run left behind, so the next round can continue from it."""


@dataclass(eq=False)
class FinetuneRequest:
    """Fine-tune, from ``network`` (None: f0), on what ``target`` names, predicting P after each step in ``marks``.

    ``registration`` gives the deformed atlases (target ``"atlases"``); ``mask`` is M where the run reads it (the
    appearance guide, the pseudo-labels), otherwise None. The answer is a :class:`FinetuneRun` plus the
    :class:`Network` it produced.
    """

    network: Network | None
    target: Target
    registration: RegistrationResult | None
    mask: torch.Tensor | None
    marks: frozenset[int]


def _registration_request(profile: Profile, v: Variant, r: int, mask: torch.Tensor,
                          previous: RegistrationResult | None) -> RegistrationRequest:
    """Round ``r``'s registration: none, the intensity alignment, or a warm-startable one following M."""
    if v.supervision == "none":
        return RegistrationRequest(None, None, None)
    cfg = round_registration(profile, v.supervision, r)
    refines = cfg.supervision != "intensity" or (v.matched_budget and r >= profile.refine.mask_from_round)
    if not refines:
        return RegistrationRequest(cfg, None, None)
    warm = previous if previous is not None and cfg.warm_start_iterations > 0 else None
    return RegistrationRequest(cfg, mask if cfg.supervision != "intensity" else None, warm)


def _reads_mask(profile: Profile, v: Variant) -> bool:
    """Whether a round's fine-tuning reads M: as pseudo-labels, TENT's patch places, or the appearance guide."""
    guide = profile.refine.appearance == "match" and profile.refine.appearance_guide == "mask"
    return v.target != "atlases" or guide


Step = RegistrationRequest | FinetuneRequest | RoundRecord


def isl_rounds(profile: Profile, variant: Variant, probs0: torch.Tensor, seconds0: float,
               intensity_registration: RegistrationResult | None = None, keep_history: bool = True,
               keep_atlases: bool = True) -> Generator[Step, object, ISLResult]:
    """The ISL loop of one variant, from P0 (C,*S) predicted in ``seconds0``; returns its :class:`ISLResult`.

    Yields a :class:`RegistrationRequest` or :class:`FinetuneRequest` whenever it needs one (send the answer:
    a ``RegistrationResult``, or a ``(FinetuneRun, Network)``), and every round's :class:`RoundRecord` (send None).
    An alignment that does not follow M (intensity, or none) is asked for once and reused in every round;
    ``intensity_registration`` hands in one already computed. ``keep_history=False`` keeps only the final
    probabilities; ``keep_atlases`` the training set of every round.
    """
    v, cfg = variant.resolved(profile), profile.refine
    marks = frozenset(update_marks(profile, v.ema))
    mask = probs0.clone() if v.initial_mask is None else torch.as_tensor(v.initial_mask).float().cpu().clone()
    result = ISLResult(probs0=probs0.clone(), final_probs=probs0, mask_updates=[mask.clone()] if keep_history else [],
                       seconds={"inference": seconds0, "registration": 0.0, "finetune": 0.0})
    reused = {"intensity": intensity_registration} if intensity_registration is not None else {}
    charged: set[str] = set()  # reused alignments already in this variant's seconds (each costs once)
    previous, network, probs = None, None, probs0

    for r in range(1, cfg.rounds + 1):
        target = mask
        # Stage 2: deform every atlas onto x* (alignment that ignores M is computed once and reused)
        reg, fresh = None, False
        if v.target == "atlases":
            ask = _registration_request(profile, v, r, mask, previous)
            if ask.target is None and ask.warm_from is None:  # follows nothing that changes: one for every round
                fixed = "none" if ask.config is None else ask.config.supervision
                if fixed not in reused:
                    reused[fixed] = yield ask
                reg, fresh = reused[fixed], fixed not in charged
                charged.add(fixed)
            else:
                reg, fresh = (yield ask), True
            previous = reg
        # Stage 3: fine-tune, then fold every new P into M
        run, network = yield FinetuneRequest(network, v.target, reg, mask if _reads_mask(profile, v) else None, marks)
        for step in sorted(k for k in run.probs_at if k in marks):
            mask = ema_update(mask, run.probs_at[step], v.beta) if v.ema else run.probs_at[step]
            if keep_history:
                result.mask_updates.append(mask.clone())
        probs = run.probs_at[max(run.probs_at)]

        # each variant is charged the predictions it asked for, not those a shared run made for another variant
        seconds = {"registration": reg.seconds if fresh else 0.0, "finetune": run.seconds["finetune"],
                   "inference": sum(t for k, t in run.predict_seconds.items() if k in marks)}
        for k, value in seconds.items():
            result.seconds[k] += value
        kept = run.trained_on if keep_atlases else (None, None)
        folding = reg.folding_fraction.detach().cpu() if reg is not None else torch.zeros(0)
        record = RoundRecord(r, target if keep_history else None, probs.clone() if keep_history else None,
                             mask.clone() if keep_history else None, *kept, folding, run.losses, seconds)
        result.rounds.append(record)
        yield record

    result.final_probs = mask if v.ema else probs
    result.seconds["total"] = sum(result.seconds.values())
    return result


# ---------------------------------------------------------------------------------------------- answering them


def register_request(ask: RegistrationRequest, x: torch.Tensor, atlases: Atlases, num_classes: int,
                     device: torch.device) -> RegistrationResult:
    """The registration a :class:`RegistrationRequest` asks for."""
    if ask.config is None:
        return identity_registration(atlases, num_classes, device)
    warm = ask.warm_from.displacement if ask.warm_from is not None else None
    target = ask.target[None] if ask.target is not None else None
    return register_atlases(x, atlases, ask.config, num_classes, target_mask=target, init_displacement=warm,
                            device=device)


def run_finetuning(tuner: Finetuner, ask: FinetuneRequest, x: torch.Tensor, atlases: Atlases,
                   marks: set[int] | frozenset[int] | None = None) -> FinetuneRun:
    """The fine-tuning run a :class:`FinetuneRequest` asks for, on ``tuner`` (P at ``marks``, default the ask's)."""
    return finetune_run(tuner, ask.target, ask.registration, ask.mask, x, atlases,
                        tuner.profile.refine.finetune_steps, set(ask.marks if marks is None else marks))


def drive(loop: Generator[Step, object, ISLResult], answer: Callable[[RegistrationRequest | FinetuneRequest], object],
          on_round: Callable[[RoundRecord], None] | None = None) -> ISLResult:
    """Run one loop to its end, answering each request with ``answer``."""
    step = next(loop)
    while True:
        if isinstance(step, RoundRecord):
            if on_round is not None:
                on_round(step)
            reply = None
        else:
            reply = answer(step)
        try:
            step = loop.send(reply)
        except StopIteration as done:
            return done.value


def as_batch(image: torch.Tensor) -> torch.Tensor:
    """An inference image (1,*S) or (1,1,*S) as a float batch of one (1,1,*S)."""
    x = torch.as_tensor(image).float()
    return x[None] if x.ndim == 4 else x


def adapt(net0: nn.Module, image: torch.Tensor, atlases: Atlases, profile: Profile, num_classes: int,
          supervision: str | None = None, ema: bool | None = None, beta: float | None = None,
          initial_mask: torch.Tensor | None = None, intensity_registration: RegistrationResult | None = None,
          keep_atlases: bool = True, device: str | torch.device = "auto", seed: int = 0,
          on_round: Callable[[RoundRecord], None] | None = None, variant: Variant | None = None) -> ISLResult:
    """Run ISL on one inference image ``image`` (1,*S) with ``atlases`` on the same grid.

    ``supervision``, ``ema`` and ``beta`` override the profile (``register.supervision``, ``refine.ema``,
    ``refine.beta``); ``variant`` gives every choice at once instead (a control arm, for example).
    ``initial_mask`` replaces M0 = P0 (the ``isl-mask-ema-malf`` variant).
    ``intensity_registration`` reuses an intensity alignment already computed (the ``malf`` baseline's).
    ``on_round(record)`` is called after every round.
    """
    given = [n for n, v in (("supervision", supervision), ("ema", ema), ("beta", beta), ("initial_mask", initial_mask))
             if v is not None]
    if variant is not None and given:  # one of the two would be silently ignored
        raise ValueError(f"adapt: give the choices either as variant= or as {', '.join(given)}=, not both "
                         "(dataclasses.replace(variant, ...) changes a variant)")
    variant = variant or Variant(supervision, ema, beta, initial_mask)
    device = resolve_device(device)
    x = as_batch(image)
    tuners: list[Finetuner] = []  # the one network this variant fine-tunes, round after round

    def answer(ask):
        if isinstance(ask, RegistrationRequest):
            return register_request(ask, x, atlases, num_classes, device)
        if not tuners:
            tuners.append(new_finetuner(net0, ask.target, profile, device, seed))
        return run_finetuning(tuners[0], ask, x, atlases), Network()

    t0 = time.perf_counter()
    probs0 = predictor(copy.deepcopy(net0).to(device), x, profile, device)()  # f0 may live on another device
    loop = isl_rounds(profile, variant, probs0, time.perf_counter() - t0, intensity_registration,
                      keep_atlases=keep_atlases)
    return drive(loop, answer, on_round)
