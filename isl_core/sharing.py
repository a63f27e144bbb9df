"""Several ISL variants on one inference image, with the work they have in common done once.

:func:`isl_core.refine.adapt` is the paper's loop for one variant. An experiment runs several variants
(intensity or mask supervision, moving average on or off, another M0) on every inference case, and much of
their work is the same: until mask supervision starts (``refine.mask_from_round``) they all fine-tune
identically, and the intensity variants stay identical in every round. :func:`adapt_variants` keys each
registration and fine-tuning run by what it depends on and computes it once:

* a registration by its supervision, the mask M it follows and the alignment it warm-starts from (intensity
  alignment ignores M, so one serves every round);
* a fine-tuning run by the run its network comes from, its registration and the appearance guide.

A shared run predicts P at the union of its variants' update steps (predicting does not change the network),
and each variant folds its own M from those predictions. The results equal what :func:`~isl_core.refine.adapt`
computes for each variant alone (``tests/test_sharing.py`` checks it), and every variant's ``seconds`` charges
it the whole of the work it used, shared or not.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from isl_core.config import Profile
from isl_core.refine import (
    Finetuner,
    ISLResult,
    RoundRecord,
    as_batch,
    ema_update,
    inference_specific_set,
    original_set,
    predictor,
    round_registration,
    update_marks,
)
from isl_core.register import Atlases, RegistrationResult, register_atlases
from isl_core.runtime import resolve_device


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
    return losses, probs_at, time.perf_counter() - t0 - t_inf, t_inf


def _follow(mask: torch.Tensor, probs_at: dict[int, torch.Tensor], marks: set[int], ema: bool, beta: float
            ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """M after one round: folded over P at ``marks`` (moving average on) or the last P (off); P; every M."""
    updates = []
    for step in sorted(k for k in probs_at if k in marks):
        mask = ema_update(mask, probs_at[step], beta) if ema else probs_at[step]
        updates.append(mask.clone())
    return mask, probs_at[max(probs_at)], updates


class _SharedWork:
    """The registrations and fine-tuning runs of one inference image, each computed once and found by its key.

    Only what the next round can use is kept.
    """

    def __init__(self, net0: nn.Module, x: torch.Tensor, atlases: Atlases, profile: Profile, num_classes: int,
                 device: torch.device, seed: int):
        self.x, self.atlases, self.originals = x, atlases, original_set(atlases, profile)
        self.profile, self.num_classes, self.device = profile, num_classes, device
        self.tuners: dict[tuple, Finetuner] = {("f0",): Finetuner(copy.deepcopy(net0).to(device), profile, device,
                                                                  seed)}  # f0 itself is never touched
        self.registrations: dict[tuple, RegistrationResult] = {}
        self.runs: dict[tuple, _Run] = {}
        self.pending: dict[tuple, set[tuple]] = {}  # network -> runs of this round that still have to start from it

    def predict_p0(self) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        return predictor(self.tuners[("f0",)].net, self.x, self.profile, self.device)(), time.perf_counter() - t0

    def registration(self, key: tuple, round_cfg, target: torch.Tensor) -> RegistrationResult:
        if key not in self.registrations:
            mask_supervised = round_cfg.supervision != "intensity"
            warm = self.registrations[key[-1]].displacement if mask_supervised and key[-1] is not None else None
            self.registrations[key] = register_atlases(self.x, self.atlases, round_cfg, self.num_classes,
                                                       target_mask=target[None] if mask_supervised else None,
                                                       init_displacement=warm, device=self.device)
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
            t0 = time.perf_counter()
            deformed = inference_specific_set(reg, self.x, target, self.profile, tuner.gen)
            t_set = time.perf_counter() - t0
            losses, probs_at, t_ft, t_inf = _finetune(tuner, *deformed, self.originals,
                                                      self.profile.refine.finetune_steps, marks,
                                                      predictor(tuner.net, self.x, self.profile, self.device))
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
        round_cfg = round_registration(profile, b.variant.supervision, r)
        reg_key = _registration_key(round_cfg, b)
        guide = b.mask_key if cfg.appearance == "match" and cfg.appearance_guide == "mask" else None
        plan[name] = (round_cfg, reg_key, (b.tuner_key, reg_key, guide))
    return plan


def _advance(b: _Branch, r: int, run: _Run, run_key: tuple, reg: RegistrationResult, reg_key: tuple,
             profile: Profile, keep_history: bool, keep_atlases: bool) -> RoundRecord:
    """Fold M from the run's predictions; record the round in the branch's result."""
    v, target = b.variant, b.mask
    b.mask, probs, updates = _follow(b.mask, run.probs_at, update_marks(profile, v.ema), v.ema, v.beta)
    # without the moving average M is the run's last P, whatever M was before
    b.mask_key = ("M", b.mask_key, run_key, v.beta) if v.ema else ("P", run_key)
    b.tuner_key, b.reg_key = run_key, reg_key
    seconds = {"registration": 0.0 if reg_key in b.charged else reg.seconds, **run.seconds}
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


def adapt_variants(net0: nn.Module, image: torch.Tensor, atlases: Atlases, profile: Profile, num_classes: int,
                   variants: Mapping[str, Variant], intensity_registration: RegistrationResult | None = None,
                   probs0: tuple[torch.Tensor, float] | None = None, keep_history: bool = True,
                   keep_atlases: bool = False, device: str | torch.device = "auto", seed: int = 0,
                   on_round: Callable[[str, RoundRecord], None] | None = None) -> dict[str, ISLResult]:
    """Run several ISL variants on one inference image, computing every shared piece of work once.

    ``intensity_registration`` hands in an intensity alignment already computed (the ``malf`` baseline's) and
    ``probs0`` the baseline's P0 (C,*S) with the seconds it took (the experiment predicts it for ``baseline``).
    ``keep_history=False`` keeps only the final probabilities of each variant (memory at full size), and
    ``keep_atlases`` the deformed atlases of every round. Live copies of the network: one per distinct branch.
    """
    device = resolve_device(device)
    x = as_batch(image)
    work = _SharedWork(net0, x, atlases, profile, num_classes, device, seed)
    if intensity_registration is not None:
        work.registrations[("intensity",)] = intensity_registration
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
            marks.setdefault(run_key, set()).update(update_marks(profile, branches[name].variant.ema))
        work.start_round(marks)
        for name, (round_cfg, reg_key, run_key) in plan.items():
            b = branches[name]
            reg = work.registration(reg_key, round_cfg, b.mask)
            run = work.run(run_key, reg, b.mask, marks[run_key])
            record = _advance(b, r, run, run_key, reg, reg_key, profile, keep_history, keep_atlases)
            if on_round is not None:
                on_round(name, record)
        work.end_round(reg_key for _, reg_key, _ in plan.values())

    for b in branches.values():
        b.result.seconds["total"] = sum(b.result.seconds.values())
    return {name: b.result for name, b in branches.items()}
