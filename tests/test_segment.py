"""Stage 1: the baseline segmenter learns, checkpoints rebuild it, a killed training resumes."""

import dataclasses
import json

import pytest
import torch

from isl_core import segment
from isl_core.config import get_profile
from isl_core.data import load_cases, load_dataset
from isl_core.finetune import entropy_step
from isl_core.runtime import resolve_device
from isl_core.segment import (
    CHECKPOINT,
    build_network,
    load_segmenter,
    loss_function,
    predict_proba,
    train_segmenter,
    train_step,
    unet_dtype,
    validation_dice,
)


@pytest.fixture(scope="module")
def cases(small_cohort):
    ds = load_dataset(small_cohort, validate=False)
    p = get_profile("ci")
    return ds, load_cases(ds.training, p.data), p


class _Killed(Exception):
    pass


def _conv_dtypes(net: torch.nn.Module, run) -> set[torch.dtype]:
    """The dtypes the network's convolutions computed in while ``run()`` ran."""
    seen: set[torch.dtype] = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype)) for m in net.modules()
             if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("native", [True, False])
def test_the_network_computes_in_bf16_only_where_the_hardware_has_it(monkeypatch, native):
    # forced both ways, so that each branch runs on any CPU (autocast works everywhere; it is only slow without
    # the hardware); what the real CPU has decides the default of every run (unet_dtype in summary.json)
    monkeypatch.setattr(segment, "has_native_bf16", lambda device: native)
    p = get_profile("ci")
    torch.manual_seed(0)
    net = build_network(p.segment, 3)
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    x, y = torch.randn(2, 1, 16, 16, 16), torch.randint(0, 3, (2, 1, 16, 16, 16))
    expected = {torch.bfloat16} if native else {torch.float32}
    assert unet_dtype("cpu", True) == ("bf16" if native else "fp32") and unet_dtype("cpu", False) == "fp32"
    assert _conv_dtypes(net, lambda: train_step(net, opt, x, y, loss_function(), amp=True)) == expected
    assert _conv_dtypes(net, lambda: train_step(net, opt, x, y, loss_function(), amp=False)) == {torch.float32}
    assert _conv_dtypes(net, lambda: entropy_step(net, opt, x, 1.0, amp=True)) == expected  # TENT: the same rule
    probs = predict_proba(net, x[:1], p.segment, "cpu")
    assert _conv_dtypes(net, lambda: predict_proba(net, x[:1], p.segment, "cpu")) == expected
    assert probs.dtype == torch.float32  # the probabilities leave the network in fp32 either way
    assert all(param.dtype == torch.float32 for param in net.parameters())  # weights and optimiser stay fp32


def test_auto_device_is_cpu_here():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type in (expected, "mps")


@pytest.mark.slow
def test_ci_profile_learns_the_training_distribution(cases, tmp_path, monkeypatch):
    ds, train, p = cases
    net, state = train_segmenter(train, p, ds.num_classes, ds.labels, out=tmp_path / "run", device="cpu",
                                 progress=False)
    assert state.step == p.segment.max_steps
    dice = validation_dice(net, train, p.segment, ds.num_classes, torch.device("cpu"))
    # Chance (a random label per voxel) gives about twice an organ's volume fraction, under 0.04 here; an all-
    # background prediction gives 0. Measured: 0.107 after the ci profile's 60 steps on these 4 cases.
    assert dice > 0.06, dice
    # the saved model rebuilds from config.json and predicts the same probabilities
    net2, meta = load_segmenter(tmp_path / "run", "cpu")
    assert meta["num_classes"] == 14
    x = train[0]["image"]
    torch.testing.assert_close(predict_proba(net, x, p.segment, "cpu"), predict_proba(net2, x, p.segment, "cpu"))
    probs = predict_proba(net2, x, p.segment, "cpu")
    torch.testing.assert_close(probs.sum(1), torch.ones_like(probs[:, 0]))
    # bf16 (the fast path on CPUs with AVX-512 BF16 / AMX) against fp32 (the plain reference) on the trained
    # network: the same organs, probabilities within bf16's rounding
    amp_off = dataclasses.replace(p.segment, amp=False)
    monkeypatch.setattr(segment, "has_native_bf16", lambda device: True)
    fast, plain = predict_proba(net2, x, p.segment, "cpu"), predict_proba(net2, x, amp_off, "cpu")
    agree = (fast.argmax(1) == plain.argmax(1)).float().mean()
    assert agree > 0.99 and (fast - plain).abs().mean() < 0.01, (agree, (fast - plain).abs().mean())


def test_killed_training_resumes_from_its_checkpoint(cases, tmp_path):
    ds, train, p = cases
    p.segment.max_steps, p.segment.checkpoint_every, p.segment.val_every = 6, 2, 100
    out = tmp_path / "run"

    def kill_at_3(step):
        if step == 3:
            raise _Killed

    with pytest.raises(_Killed):
        train_segmenter(train[:2], p, ds.num_classes, ds.labels, out=out, device="cpu", progress=False,
                        on_step=kill_at_3)
    ck = torch.load(out / CHECKPOINT, weights_only=True)
    assert int(ck["step"]) == 2  # the last checkpoint before the kill
    steps_run = []
    _, state = train_segmenter(train[:2], p, ds.num_classes, ds.labels, out=out, device="cpu", progress=False,
                               on_step=steps_run.append)
    assert steps_run == [3, 4, 5, 6]  # continued, did not restart
    assert state.step == 6 and len(state.history) == 6
    history = json.loads((out / "history.json").read_text())
    assert history["steps"] == 6
