"""Several variants of the ISL loop on one inference image, with the work they have in common done once.

The loop itself is :func:`isl_core.refine.isl_rounds`, written once; it asks for each round's registration and
fine-tuning run. An experiment runs several variants on every inference case (intensity or mask supervision,
moving average on or off, another M0, the control arms), and many of their requests are equal: until mask
supervision starts (``refine.mask_from_round``) the ISL variants fine-tune identically, and the intensity
variants stay identical in every round. :func:`adapt_variants` steps all loops together, round by round, and
answers equal requests once. Two requests are equal when everything the answer depends on is:

* a registration: its settings, the mask M it follows (compared by content) and the alignment it starts from;
* a fine-tuning run: the network it starts from, its registration, what it learns from and M where it reads M.

A shared run predicts P at the union of the steps its variants ask for (predicting does not change the network),
and each loop folds its own M from the steps it asked for. This module holds only that bookkeeping; the results
equal what :func:`~isl_core.refine.adapt` computes for each variant alone (``tests/test_sharing.py``), and every
variant's ``seconds`` charges it the whole of the work it used, shared or not (of a shared run's predictions, the
ones it asked for).
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

from isl_core.config import Profile
from isl_core.finetune import Finetuner, new_finetuner, predictor
from isl_core.refine import (
    FinetuneRequest,
    ISLResult,
    Network,
    RegistrationRequest,
    RoundRecord,
    Variant,
    as_batch,
    isl_rounds,
    register_request,
    run_finetuning,
)
from isl_core.register import Atlases, RegistrationResult
from isl_core.runtime import resolve_device

__all__ = ["Variant", "adapt_variants"]


def _content(t: torch.Tensor | None) -> bytes | None:
    """A digest of a tensor's shape and bits: equal masks give equal work whichever variant holds them."""
    if t is None:
        return None
    t = t.detach().cpu().contiguous()
    return hashlib.blake2b(repr((t.shape, t.dtype)).encode() + t.numpy().tobytes(), digest_size=16).digest()


class _SharedWork:
    """The answers of one round's requests, each computed once and found by what it depends on."""

    def __init__(self, net0: nn.Module, x: torch.Tensor, atlases: Atlases, profile: Profile, num_classes: int,
                 device: torch.device, seed: int):
        self.net0, self.x, self.atlases = net0, x, atlases
        self.profile, self.num_classes, self.device, self.seed = profile, num_classes, device, seed
        self.registrations: dict[tuple, tuple[RegistrationRequest, RegistrationResult]] = {}
        self.tuners: dict[object, Finetuner] = {}  # Network -> the finetuner that trained it

    def registration(self, ask: RegistrationRequest) -> RegistrationResult:
        # the request is kept with its answer, so the objects whose ids form the key stay alive
        key = (repr(ask.config), _content(ask.target), id(ask.warm_from) if ask.warm_from is not None else None)
        if key not in self.registrations:
            self.registrations[key] = (ask, register_request(ask, self.x, self.atlases, self.num_classes,
                                                             self.device))
        return self.registrations[key][1]

    def finetune(self, asks: list[FinetuneRequest]) -> list[tuple]:
        """Answer one round's fine-tuning requests: each distinct run once, P at the union of its marks."""
        keys = [(ask.network, ask.target, id(ask.registration), _content(ask.mask)) for ask in asks]
        marks: dict[tuple, set[int]] = {}
        for key, ask in zip(keys, asks):
            marks.setdefault(key, set()).update(ask.marks)
        children: dict[object, list[tuple]] = {}  # network -> the distinct runs that start from it
        for key, ask in zip(keys, asks):
            parent = self._parent(ask)
            if key not in children.setdefault(parent, []):
                children[parent].append(key)
        answers: dict[tuple, tuple] = {}
        latest: dict[object, Finetuner] = {}
        for key, ask in zip(keys, asks):
            if key in answers:
                continue
            parent = self._parent(ask)
            children[parent].remove(key)
            if parent not in self.tuners:
                self.tuners[parent] = new_finetuner(self.net0, ask.target, self.profile, self.device, self.seed)
            # the last run to leave a network takes it over; the others take copies
            tuner = copy.deepcopy(self.tuners[parent]) if children[parent] else self.tuners.pop(parent)
            network = Network()
            answers[key] = (run_finetuning(tuner, ask, self.x, self.atlases, marks[key]), network)
            latest[network] = tuner
        # what the next round can start from: the networks just trained (the loops hold their registrations)
        self.tuners, self.registrations = latest, {}
        return [answers[key] for key in keys]

    @staticmethod
    def _parent(ask: FinetuneRequest) -> object:
        return ask.network if ask.network is not None else ("f0", ask.target == "entropy")


def adapt_variants(net0: nn.Module, image: torch.Tensor, atlases: Atlases, profile: Profile, num_classes: int,
                   variants: Mapping[str, Variant], intensity_registration: RegistrationResult | None = None,
                   probs0: tuple[torch.Tensor, float] | None = None, keep_history: bool = True,
                   keep_atlases: bool = False, device: str | torch.device = "auto", seed: int = 0,
                   on_round: Callable[[str, RoundRecord], None] | None = None) -> dict[str, ISLResult]:
    """Run several variants of the ISL loop on one inference image, computing every shared piece of work once.

    ``intensity_registration`` hands in an intensity alignment already computed (the ``malf`` baseline's) and
    ``probs0`` the baseline's P0 (C,*S) with the seconds it took (the experiment predicts it for ``baseline``).
    ``keep_history=False`` keeps only the final probabilities of each variant (memory at full size), and
    ``keep_atlases`` the training set of every round. Live copies of the network: one per distinct branch.
    """
    device = resolve_device(device)
    x = as_batch(image)
    work = _SharedWork(net0, x, atlases, profile, num_classes, device, seed)
    if probs0 is None:
        t0 = time.perf_counter()
        p0 = predictor(copy.deepcopy(net0).to(device), x, profile, device)()
        probs0 = (p0, time.perf_counter() - t0)
    loops = {name: isl_rounds(profile, v, probs0[0], probs0[1], intensity_registration, keep_history, keep_atlases)
             for name, v in variants.items()}
    steps = {name: next(loop) for name, loop in loops.items()}
    results: dict[str, ISLResult] = {}
    while steps:  # round by round: the registrations, then the fine-tuning runs, then the records
        asks = [n for n, s in steps.items() if isinstance(s, RegistrationRequest)]
        if asks:
            for n in asks:
                steps[n] = loops[n].send(work.registration(steps[n]))
            continue
        asks = [n for n, s in steps.items() if isinstance(s, FinetuneRequest)]
        if asks:
            for n, answer in zip(asks, work.finetune([steps[n] for n in asks])):
                steps[n] = loops[n].send(answer)
            continue
        for n in list(steps):
            if on_round is not None:
                on_round(n, steps[n])
            try:
                steps[n] = next(loops[n])
            except StopIteration as done:
                results[n] = done.value
                del steps[n]
    return {name: results[name] for name in variants}
