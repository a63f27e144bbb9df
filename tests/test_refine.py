"""The ISL loop with stubbed stages: the moving-average sequence equals the formula; f0 stays untouched."""

import torch

from isl_core import refine
from isl_core.config import get_profile
from isl_core.register import RegistrationResult

C, S, N = 3, (8, 8, 8), 2


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.w * x


def _stub_stages(monkeypatch, predictions):
    calls = {"register": [], "steps": 0}

    def fake_predict(net, x, cfg, device):
        calls.setdefault("predict", []).append(1)
        return preds_iter(len(calls["predict"]) - 1)[None]

    preds_iter = predictions.__getitem__

    def fake_register(x, imgs, labs, cfg, num_classes, target_mask=None, device="auto", init_displacement=None,
                      organs=None):
        assert organs is not None and organs.labels is labs  # one AtlasOrgans per atlas set, for every registration
        calls["register"].append((cfg.supervision, None if target_mask is None else target_mask.clone()))
        calls.setdefault("warm", []).append(init_displacement is not None)
        return RegistrationResult(torch.zeros(N, 3, *S), torch.zeros(N, 1, *S), torch.zeros(N, C, *S),
                                  torch.zeros(N, *S, dtype=torch.long), torch.zeros(N))

    def fake_step(net, opt, x, y, loss_fn, clip, amp):
        with torch.no_grad():
            net.w += 1.0  # visible change of the adapted copy
        calls["steps"] += 1
        return 0.0

    monkeypatch.setattr(refine, "predict_proba", fake_predict)
    monkeypatch.setattr(refine, "register_atlases", fake_register)
    monkeypatch.setattr(refine, "train_step", fake_step)
    return calls


def _profile(rounds=2, steps=6, every=3, beta=0.6, mask_from_round=1):
    p = get_profile("ci")
    p.refine.mask_from_round = mask_from_round
    p.refine.rounds, p.refine.finetune_steps, p.refine.ema_every, p.refine.beta = rounds, steps, every, beta
    p.refine.batch_size = 1
    return p


def _run(monkeypatch, ema, supervision="mask", **kw):
    gen = torch.Generator().manual_seed(0)
    preds = [torch.softmax(torch.randn(C, *S, generator=gen), 0) for _ in range(20)]
    calls = _stub_stages(monkeypatch, preds)
    net0 = _Net()
    p = _profile(**kw)
    res = refine.adapt(net0, torch.rand(1, *S), torch.rand(N, 1, *S), torch.zeros(N, *S, dtype=torch.long), p, C,
                       supervision=supervision, ema=ema, device="cpu")
    return res, preds, calls, net0, p


def test_moving_average_sequence_equals_the_formula(monkeypatch):
    res, preds, calls, net0, p = _run(monkeypatch, ema=True)
    beta = p.refine.beta
    # P0, then updates after steps 3 and 6 of each of the two rounds: 4 updates
    expected = [preds[0]]
    for k in range(1, 5):
        expected.append(beta * expected[-1] + (1 - beta) * preds[k])
    assert len(res.mask_updates) == 5
    assert refine.update_schedule(p, ema=True) == [0, 3, 6, 9, 12]  # where each entry of mask_updates was taken
    for got, want in zip(res.mask_updates, expected):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(res.final_probs, expected[-1])
    # round r registers onto the mask M as it stood at the start of the round
    torch.testing.assert_close(calls["register"][0][1][0], expected[0])
    torch.testing.assert_close(calls["register"][1][1][0], expected[2])
    assert calls["steps"] == 12
    assert float(net0.w.detach()) == 0.0  # f0 is never modified


def test_without_moving_average_the_final_mask_is_the_last_prediction(monkeypatch):
    res, preds, calls, _, p = _run(monkeypatch, ema=False)
    assert len(res.mask_updates) == 3  # P0, then one M = P per round
    assert refine.update_schedule(p, ema=False) == [0, 6, 12]
    torch.testing.assert_close(res.final_probs, preds[2])
    torch.testing.assert_close(calls["register"][1][1][0], preds[1])


def test_mask_supervision_waits_for_its_round(monkeypatch):
    _, _, calls, _, p = _run(monkeypatch, ema=True, supervision="mask", mask_from_round=2)
    assert [s for s, _ in calls["register"]] == ["intensity", "mask"]
    assert calls["register"][0][1] is None and calls["register"][1][1] is not None
    # the ci profile warm-starts later rounds: round 2 starts from round 1's alignment
    assert p.register.warm_start_iterations > 0 and calls["warm"] == [False, True]


def test_intensity_supervision_passes_no_target(monkeypatch):
    _, _, calls, _, _ = _run(monkeypatch, ema=True, supervision="intensity")
    # intensity alignment ignores M, so the first round's registration serves every round
    assert [(s, t) for s, t in calls["register"]] == [("intensity", None)]


def test_update_schedule():
    assert refine._update_steps(10, 4) == {4, 8, 10}
    assert refine._update_steps(10, 0) == {10}
    assert refine._update_steps(9, 3) == {3, 6, 9}


def _tiny_real_setup(guide="atlases"):
    """A real tiny network and real registrations: sharing must hold for the actual computations."""
    from isl_core.segment import build_network

    torch.manual_seed(0)
    p = _profile(rounds=2, steps=4, every=2, mask_from_round=2)
    p.refine.appearance_guide = guide
    p.segment.channels, p.segment.strides, p.segment.patch_size = (4, 8), (2,), (16, 16, 16)
    p.register.iterations, p.register.levels, p.register.warm_start_iterations = 3, 1, 2
    size = (16, 16, 16)
    net0 = build_network(p.segment, C)
    x = torch.rand(1, *size)
    images, labels = torch.rand(N, 1, *size), torch.randint(0, C, (N, *size))
    malf_like = torch.softmax(torch.randn(C, *size), 0)
    variants = {"intensity": refine.Variant("intensity", False, 0.6),
                "intensity-ema": refine.Variant("intensity", True, 0.6),
                "both": refine.Variant("both", False, 0.6), "both-ema": refine.Variant("both", True, 0.6),
                "both-ema-init": refine.Variant("both", True, 0.6, malf_like)}
    return p, net0, x, images, labels, variants


def _counting(monkeypatch):
    counts = {"steps": 0, "registrations": 0}
    step, register = refine.train_step, refine.register_atlases

    def counted_step(*a, **k):
        counts["steps"] += 1
        return step(*a, **k)

    def counted_register(*a, **k):
        counts["registrations"] += 1
        return register(*a, **k)

    monkeypatch.setattr(refine, "train_step", counted_step)
    monkeypatch.setattr(refine, "register_atlases", counted_register)
    return counts


def test_variants_run_together_get_what_each_computes_alone(monkeypatch):
    p, net0, x, images, labels, variants = _tiny_real_setup()
    counts = _counting(monkeypatch)
    together = refine.adapt_variants(net0, x, images, labels, p, C, variants, device="cpu", seed=3)
    # round 1 (intensity alignment for all): one registration, one fine-tuning run for all five variants;
    # round 2: the intensity variants share one run, the three mask-following variants register and run apiece
    assert counts == {"steps": 5 * 4, "registrations": 1 + 3}
    # each variant is charged what it would cost alone: the intensity alignment reused in round 2 costs once
    seconds = [r.seconds["registration"] for r in together["intensity"].rounds]
    assert seconds[0] > 0 and seconds[1] == 0 and together["both"].rounds[1].seconds["registration"] > 0
    counts.update(steps=0, registrations=0)
    for name, v in variants.items():
        alone = refine.adapt(net0, x, images, labels, p, C, supervision=v.supervision, ema=v.ema, beta=v.beta,
                             initial_mask=v.initial_mask, device="cpu", seed=3)
        got = together[name]
        assert len(alone.mask_updates) == len(got.mask_updates) == (5 if v.ema else 3)
        for a, b in zip(alone.mask_updates, got.mask_updates):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(alone.final_probs, got.final_probs, atol=1e-5, rtol=1e-4)
        assert [r.finetune_losses for r in alone.rounds] == [r.finetune_losses for r in got.rounds]
    assert counts == {"steps": 10 * 4, "registrations": 2 * 1 + 3 * 2}  # alone, nothing is shared


def test_a_mask_guided_appearance_keeps_variants_with_other_masks_apart(monkeypatch):
    # with the appearance read under M, the variant that starts from another M0 fine-tunes on other images
    p, net0, x, images, labels, variants = _tiny_real_setup(guide="mask")
    counts = _counting(monkeypatch)
    refine.adapt_variants(net0, x, images, labels, p, C, {k: variants[k] for k in ("both-ema", "both-ema-init")},
                          device="cpu", seed=3)
    assert counts == {"steps": 4 * 4, "registrations": 1 + 2}


def test_history_can_be_dropped_without_changing_the_result():
    p, net0, x, images, labels, variants = _tiny_real_setup()
    kept = refine.adapt_variants(net0, x, images, labels, p, C, {"v": variants["both-ema"]}, device="cpu", seed=3)
    lean = refine.adapt_variants(net0, x, images, labels, p, C, {"v": variants["both-ema"]}, keep_history=False,
                                 device="cpu", seed=3)
    assert lean["v"].mask_updates == [] and lean["v"].rounds[0].mask is None
    torch.testing.assert_close(kept["v"].final_probs, lean["v"].final_probs)


def test_atlas_consensus_marks_where_most_atlases_agree():
    labels = torch.tensor([[0, 1, 1, 2], [0, 1, 2, 2], [1, 1, 2, 2]])  # 3 atlases, 4 voxels
    onehot = torch.nn.functional.one_hot(labels, 3).permute(0, 2, 1).float()  # (N, C, voxels)
    guide = refine.atlas_consensus(onehot)
    assert guide.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]]
