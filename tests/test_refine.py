"""The ISL loop with stubbed stages: the moving-average sequence equals the formula; f0 stays untouched."""

import pytest
import torch
from helpers import loop_profile

from isl_core import finetune, refine
from isl_core.appearance import atlas_consensus
from isl_core.config import get_profile
from isl_core.register import Atlases, RegistrationResult

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

    def fake_register(x, atlases, cfg, num_classes, target_mask=None, init_displacement=None, device="auto"):
        assert isinstance(atlases, Atlases)
        calls["register"].append((cfg.supervision, None if target_mask is None else target_mask.clone()))
        calls.setdefault("warm", []).append(init_displacement is not None)
        return RegistrationResult(torch.zeros(N, 3, *S), torch.zeros(N, 1, *S), torch.zeros(N, C, *S),
                                  torch.zeros(N, *S, dtype=torch.long), torch.zeros(N))

    def fake_step(net, opt, x, y, loss_fn, clip, amp):
        with torch.no_grad():
            net.w += 1.0  # visible change of the adapted copy
        calls["steps"] += 1
        return 0.0

    monkeypatch.setattr(finetune, "predict_proba", fake_predict)
    monkeypatch.setattr(refine, "register_atlases", fake_register)
    monkeypatch.setattr(finetune, "train_step", fake_step)
    return calls




def _run(monkeypatch, ema, supervision="mask", **kw):
    gen = torch.Generator().manual_seed(0)
    preds = [torch.softmax(torch.randn(C, *S, generator=gen), 0) for _ in range(20)]
    calls = _stub_stages(monkeypatch, preds)
    net0 = _Net()
    p = loop_profile(**kw)
    atlases = Atlases(torch.rand(N, 1, *S), torch.zeros(N, *S, dtype=torch.long))
    res = refine.adapt(net0, torch.rand(1, *S), atlases, p, C, supervision=supervision, ema=ema, device="cpu")
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


def test_atlas_consensus_marks_where_most_atlases_agree():
    labels = torch.tensor([[0, 1, 1, 2], [0, 1, 2, 2], [1, 1, 2, 2]])  # 3 atlases, 4 voxels
    onehot = torch.nn.functional.one_hot(labels, 3).permute(0, 2, 1).float()  # (N, C, voxels)
    guide = atlas_consensus(onehot)
    assert guide.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]]


def test_round_registration_follows_the_mask_from_its_round():
    p = loop_profile(mask_from_round=2)
    assert refine.round_registration(p, "both", 1).supervision == "intensity"
    assert refine.round_registration(p, "both", 2).supervision == "both"
    assert refine.round_registration(p, "intensity", 3).supervision == "intensity"
    assert p.register.supervision == "intensity"  # the profile itself is not changed


def test_augmentation_ranges_come_from_the_settings():
    from isl_core.appearance import augment

    p = get_profile("ci")
    x = torch.full((64, 1, 2, 2, 2), 0.5)
    p.refine.augment_noise = 0.0
    p.refine.augment_gamma, p.refine.augment_scale, p.refine.augment_shift = (1.0, 1.0), (2.0, 2.0), 0.0
    torch.testing.assert_close(augment(x, torch.Generator().manual_seed(0), p.refine), torch.ones_like(x))
    p.refine.augment_scale, p.refine.augment_shift = (1.0, 1.0), 0.1
    out = augment(x, torch.Generator().manual_seed(0), p.refine)
    assert float(out.min()) >= 0.4 - 1e-6 and float(out.max()) <= 0.6 + 1e-6 and float(out.std()) > 0.02


def test_a_typo_in_a_refine_setting_is_refused():
    with pytest.raises(ValueError, match="RefineConfig.appearance"):
        get_profile("ci").refine.appearance = "mtach"


def test_foreground_patches_find_a_small_organ():
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(40, 1, 64, 64, 64, dtype=torch.long)
    labels[:, :, 50:54, 8:12, 30:34] = 1  # a small organ far from the centre
    images = torch.rand(40, 1, 64, 64, 64)
    _, uniform = finetune.random_patches(images, labels, (16, 16, 16), gen, foreground=0.0)
    x, balanced = finetune.random_patches(images, labels, (16, 16, 16), gen, foreground=1.0)
    assert x.shape == (40, 1, 16, 16, 16) and balanced.shape == (40, 1, 16, 16, 16)
    assert bool((balanced > 0).flatten(1).any(1).all())  # every balanced patch holds the organ
    assert float((uniform > 0).flatten(1).any(1).float().mean()) < 0.3
    whole = finetune.random_patches(images, labels, (64, 64, 64), gen, foreground=1.0)
    assert whole[0] is images  # a patch as large as the grid is the whole volume, with no random draw
