"""Several ISL variants together (``sharing.adapt_variants``) against the plain loop (``refine.adapt``) run alone.

The plain loop is the independent reference: it does not use the sharing scheduler, so these tests compare two
implementations of the method, with a real tiny network and real registrations.
"""

import torch
from helpers import real_loop_setup

from isl_core import finetune, refine, sharing
from isl_core.sharing import Variant

C, N = 3, 2




def _tiny_real_setup(guide="atlases"):
    """A real tiny network and real registrations: sharing must hold for the actual computations."""
    p, net0, x, atlases = real_loop_setup(C, N)
    p.refine.appearance_guide = guide
    size = x.shape[1:]
    malf_like = torch.softmax(torch.randn(C, *size), 0)
    variants = {"intensity": Variant("intensity", False, 0.6),
                "intensity-ema": Variant("intensity", True, 0.6),
                "both": Variant("both", False, 0.6), "both-ema": Variant("both", True, 0.6),
                "both-ema-init": Variant("both", True, 0.6, malf_like)}
    return p, net0, x, atlases, variants


def _counting(monkeypatch):
    counts = {"steps": 0, "registrations": 0}
    step, register = finetune.train_step, refine.register_atlases

    def counted_step(*a, **k):
        counts["steps"] += 1
        return step(*a, **k)

    def counted_register(*a, **k):
        counts["registrations"] += 1
        return register(*a, **k)

    monkeypatch.setattr(finetune, "train_step", counted_step)
    monkeypatch.setattr(refine, "register_atlases", counted_register)
    return counts


def test_variants_run_together_get_what_each_computes_alone(monkeypatch):
    p, net0, x, atlases, variants = _tiny_real_setup()
    counts = _counting(monkeypatch)
    together = sharing.adapt_variants(net0, x, atlases, p, C, variants, device="cpu", seed=3)
    # round 1 (intensity alignment for all): one registration, one fine-tuning run for all five variants;
    # round 2: the intensity variants share one run, the three mask-following variants register and run apiece
    assert counts == {"steps": 5 * 4, "registrations": 1 + 3}
    # each variant is charged what it would cost alone: the intensity alignment reused in round 2 costs once
    seconds = [r.seconds["registration"] for r in together["intensity"].rounds]
    assert seconds[0] > 0 and seconds[1] == 0 and together["both"].rounds[1].seconds["registration"] > 0
    counts.update(steps=0, registrations=0)
    for name, v in variants.items():
        alone = refine.adapt(net0, x, atlases, p, C, supervision=v.supervision, ema=v.ema, beta=v.beta,
                             initial_mask=v.initial_mask, device="cpu", seed=3)
        got = together[name]
        assert len(alone.mask_updates) == len(got.mask_updates) == (5 if v.ema else 3)
        for a, b in zip(alone.mask_updates, got.mask_updates):
            assert torch.equal(a, b)  # bit for bit: same arithmetic in the same order
        assert torch.equal(alone.final_probs, got.final_probs)
        assert [r.finetune_losses for r in alone.rounds] == [r.finetune_losses for r in got.rounds]
    assert counts == {"steps": 10 * 4, "registrations": 2 * 1 + 3 * 2}  # alone, nothing is shared


def test_a_mask_guided_appearance_keeps_variants_with_other_masks_apart(monkeypatch):
    # with the appearance read under M, the variant that starts from another M0 fine-tunes on other images
    p, net0, x, atlases, variants = _tiny_real_setup(guide="mask")
    counts = _counting(monkeypatch)
    sharing.adapt_variants(net0, x, atlases, p, C, {k: variants[k] for k in ("both-ema", "both-ema-init")},
                          device="cpu", seed=3)
    assert counts == {"steps": 4 * 4, "registrations": 1 + 2}


def test_history_can_be_dropped_without_changing_the_result():
    p, net0, x, atlases, variants = _tiny_real_setup()
    kept = sharing.adapt_variants(net0, x, atlases, p, C, {"v": variants["both-ema"]}, device="cpu", seed=3)
    lean = sharing.adapt_variants(net0, x, atlases, p, C, {"v": variants["both-ema"]}, keep_history=False,
                                 device="cpu", seed=3)
    assert lean["v"].mask_updates == [] and lean["v"].rounds[0].mask is None
    torch.testing.assert_close(kept["v"].final_probs, lean["v"].final_probs)




def test_each_variant_is_charged_only_the_predictions_it_asked_for(monkeypatch):
    # a clock that advances one second per reading: every prediction of a fine-tuning run then takes exactly 1 s
    ticks = iter(range(10**6))
    monkeypatch.setattr(finetune.time, "perf_counter", lambda: float(next(ticks)))
    p, net0, x, atlases, variants = _tiny_real_setup()
    both = {k: variants[k] for k in ("intensity", "intensity-ema")}  # one shared run per round, P at steps 2 and 4
    together = sharing.adapt_variants(net0, x, atlases, p, C, both, device="cpu", seed=3)
    assert [r.seconds["inference"] for r in together["intensity"].rounds] == [1.0, 1.0]  # M <- P after step 4
    assert [r.seconds["inference"] for r in together["intensity-ema"].rounds] == [2.0, 2.0]  # updates at 2 and 4
