"""The control arms of the experiment do what their names say, on a real tiny network and real registrations.

``finetune-atlases`` never registers and trains on the atlases as they are; ``tent`` changes only the normalisation
layers' scale and shift; ``pseudo-label`` trains on x* with its own moving-average prediction; ``isl-intensity-
matched`` spends exactly the registration steps of ``isl-mask``, with the intensity term only. Run together
(``sharing.adapt_variants``) every arm gets what it gets alone (``refine.adapt``), bit for bit.
"""

import copy

import torch
from helpers import real_loop_setup

from isl_core import finetune, refine, sharing
from isl_core.casework import LOOP_METHODS
from isl_core.refine import Variant

C, N, SIZE = 3, 2, (16, 16, 16)


def _setup(appearance="match"):
    p, net0, x, atlases = real_loop_setup(C, N, SIZE)
    p.refine.appearance = appearance
    p.register.supervision_mask = "both"
    return p, net0, x, atlases


def _arms(p):
    """The experiment's loop methods, with "mask" resolved as CaseRunner resolves it (initial masks left out)."""
    out = {}
    for name, v in LOOP_METHODS.items():
        if name != "isl-mask-ema-malf":
            out[name] = Variant(p.register.supervision_mask if v.supervision == "mask" else v.supervision, v.ema,
                                v.beta, None, v.target, v.matched_budget)
    return out


def _spy_registrations(monkeypatch):
    calls = []
    register = refine.register_atlases

    def spy(x, atlases, cfg, num_classes, target_mask=None, init_displacement=None, device="auto"):
        res = register(x, atlases, cfg, num_classes, target_mask=target_mask, init_displacement=init_displacement,
                       device=device)
        calls.append({"supervision": cfg.supervision, "warm": init_displacement is not None,
                      "steps": len(res.loss_history)})
        return res

    monkeypatch.setattr(refine, "register_atlases", spy)
    return calls


def test_every_arm_gets_together_what_it_gets_alone():
    p, net0, x, atlases = _setup()
    arms = _arms(p)
    together = sharing.adapt_variants(net0, x, atlases, p, C, arms, device="cpu", seed=4)
    for name, v in arms.items():
        alone = refine.adapt(net0, x, atlases, p, C, variant=v, device="cpu", seed=4)
        got = together[name]
        assert len(alone.mask_updates) == len(got.mask_updates)
        assert all(torch.equal(a, b) for a, b in zip(alone.mask_updates, got.mask_updates)), name
        assert torch.equal(alone.final_probs, got.final_probs), name
        assert [r.finetune_losses for r in alone.rounds] == [r.finetune_losses for r in got.rounds], name
    # the arms really differ from each other and from the baseline
    finals = {n: r.final_probs for n, r in together.items()}
    assert not torch.equal(finals["tent"], together["tent"].probs0)
    assert not torch.equal(finals["finetune-atlases"], finals["isl-mask-ema"])
    assert not torch.equal(finals["pseudo-label"], finals["finetune-atlases"])


def test_the_atlas_arm_never_registers_and_trains_on_the_atlases_as_they_are(monkeypatch):
    p, net0, x, atlases = _setup(appearance="none")
    calls = _spy_registrations(monkeypatch)
    res = refine.adapt(net0, x, atlases, p, C, variant=LOOP_METHODS["finetune-atlases"], device="cpu")
    assert calls == []
    for r in res.rounds:
        assert torch.equal(r.warped_images, atlases.images) and torch.equal(r.warped_labels, atlases.labels)
        assert r.seconds["registration"] == 0 and len(r.finetune_losses) == p.refine.finetune_steps


def test_self_training_arms_train_on_x_alone_for_the_same_steps(monkeypatch):
    p, net0, x, atlases = _setup()
    calls = _spy_registrations(monkeypatch)
    for name in ("pseudo-label", "tent"):
        res = refine.adapt(net0, x, atlases, p, C, variant=LOOP_METHODS[name], device="cpu")
        assert [len(r.finetune_losses) for r in res.rounds] == [p.refine.finetune_steps] * p.refine.rounds
        first = res.rounds[0]
        assert torch.equal(first.warped_images, x[None]) and first.warped_images.shape[0] == 1
        # the labels are argmax of M at the start of the round (round 1: P0)
        assert torch.equal(first.warped_labels[0], res.probs0.argmax(0))
    assert calls == []


def test_tent_adapts_only_the_normalisation_scale_and_shift():
    p, net0, x, atlases = _setup()
    tuner = finetune.new_finetuner(net0, "entropy", p, torch.device("cpu"), seed=0)
    with torch.no_grad():  # added at the identity: the network still computes f0
        assert torch.equal(tuner.net.eval()(x[None]), copy.deepcopy(net0).eval()(x[None]))
    adapted = {id(q) for q in finetune.norm_scale_shift(tuner.net)}
    assert adapted and {id(q) for g in tuner.opt.param_groups for q in g["params"]} == adapted
    before = {k: v.clone() for k, v in tuner.net.state_dict().items()}
    run = finetune.finetune_run(tuner, "entropy", None, torch.softmax(torch.randn(C, *SIZE), 0), x[None], atlases, 4,
                               {4})
    assert run.losses[-1] < run.losses[0]  # the entropy goes down
    moved = {k for k, v in tuner.net.state_dict().items() if not torch.equal(v, before[k])}
    norm_layers = [n for n, m in tuner.net.named_modules() if isinstance(m, finetune._NORMS)]
    norms = {k for k in before if any(k.startswith(n + ".") for n in norm_layers)}
    assert moved and moved <= norms
    assert all(torch.equal(v, net0.state_dict()[k]) for k, v in tuner.net.state_dict().items() if k not in norms)


def test_the_matched_arm_spends_the_registration_steps_of_isl_mask(monkeypatch):
    p, net0, x, atlases = _setup()
    calls = _spy_registrations(monkeypatch)
    refine.adapt(net0, x, atlases, p, C, variant=Variant("both", ema=False), device="cpu")
    mask_calls = list(calls)
    calls.clear()
    refine.adapt(net0, x, atlases, p, C, variant=LOOP_METHODS["isl-intensity-matched"], device="cpu")
    assert [c["steps"] for c in calls] == [c["steps"] for c in mask_calls]
    assert [c["warm"] for c in calls] == [c["warm"] for c in mask_calls] == [False, True]
    assert [c["supervision"] for c in calls] == ["intensity", "intensity"]
    assert [c["supervision"] for c in mask_calls] == ["intensity", "both"]
    calls.clear()  # plain intensity alignment registers once and reuses it
    refine.adapt(net0, x, atlases, p, C, variant=LOOP_METHODS["isl-intensity"], device="cpu")
    assert len(calls) == 1


def test_adapt_refuses_a_variant_together_with_single_choices():
    """Either every choice at once (variant=) or the profile's with overrides, never both: one would be ignored."""
    import pytest

    with pytest.raises(ValueError, match="either as variant= or as ema=, not both"):
        refine.adapt(None, torch.zeros(1, 4, 4, 4), None, None, 2, ema=True, variant=LOOP_METHODS["tent"])
