"""Stage 2 acceptance tests: registration recovers known deformations, mask supervision survives a domain
shift, batching changes nothing, and the hand-written pieces (fast LNCC, fused warp, regularisers, Jacobian)
equal their references.

Volumes are tiny (32^3-48^3) so the file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from monai.losses import BendingEnergyLoss, DiffusionLoss, LocalNormalizedCrossCorrelationLoss

from isl_core.config import RegisterConfig
from isl_core.lncc import FastLNCC, _prefix_sums, box_sum_cumsum, box_sum_pool
from isl_core.register import (
    Atlases,
    affine_coords,
    affine_to_ddf,
    folding_fraction,
    jacobian_determinant,
    register_atlases,
    resize_field,
    resize_volume,
    sample,
    sampling_grid,
    smoothness,
    to_onehot,
    warp,
)

NUM_CLASSES = 4
ORGANS = (((0.35, 0.1, 0.2), (0.3, 0.35, 0.4)), ((-0.35, 0.15, -0.1), (0.25, 0.2, 0.3)),
          ((0.0, -0.3, 0.0), (0.15, 0.15, 0.5)))
INTENSITIES = (0.3, 0.6, 0.85, 0.45)  # body, organ 1, organ 2, organ 3


def phantom(size, intensities=INTENSITIES, seed=0, noise=0.02):
    """A body ellipsoid with three labelled ellipsoidal organs: image (1, 1, *size), labels (1, *size)."""
    g = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s) for s in size], indexing="ij"))

    def inside(centre, radii):
        c, r = torch.tensor(centre).view(3, 1, 1, 1), torch.tensor(radii).view(3, 1, 1, 1)
        return (((g - c) / r) ** 2).sum(0) < 1

    image = torch.zeros(size)
    image[inside((0, 0, 0), (0.85, 0.7, 0.85))] = intensities[0]
    labels = torch.zeros(size, dtype=torch.long)
    for k, (centre, radii) in enumerate(ORGANS, start=1):
        m = inside(centre, radii)
        labels[m], image[m] = k, intensities[k]
    image = image + noise * torch.randn(size, generator=torch.Generator().manual_seed(seed))
    return image.clamp(0, 1)[None, None], labels[None]


def smooth_field(size, amplitude, seed, n=1):
    """A smooth random displacement (n, 3, *size) in voxels with max |u| = amplitude."""
    coarse = torch.randn(n, 3, 4, 4, 4, generator=torch.Generator().manual_seed(seed))
    u = F.interpolate(coarse, size=size, mode="trilinear", align_corners=True)
    return u * amplitude / u.abs().amax()


def deform(image, labels, ddf):
    return warp(image, ddf), warp(to_onehot(labels, NUM_CLASSES), ddf).argmax(1)


def mean_dice(a, b):
    """Organ-averaged Dice of two label maps."""
    scores = [2 * ((a == c) & (b == c)).sum() / ((a == c).sum() + (b == c).sum()) for c in range(1, NUM_CLASSES)]
    return torch.stack(scores).mean().item()


# ------------------------------------------------------------------------------------------ acceptance


def test_recovers_known_deformation():
    size = (48, 48, 48)
    moving, moving_labels = phantom(size)
    fixed, fixed_labels = deform(*phantom(size, seed=1), smooth_field(size, 4.0, seed=1))
    before = mean_dice(moving_labels, fixed_labels)
    result = register_atlases(fixed, Atlases(moving, moving_labels), RegisterConfig(iterations=30, levels=2),
                              NUM_CLASSES, device="cpu")
    after = mean_dice(result.warped_labels, fixed_labels)
    assert after >= 0.85
    assert after > before + 0.08
    assert result.folding_fraction.item() < 0.01
    assert result.displacement.shape == (1, 3, *size)
    assert result.warped_onehot.sum(1).sub(1).abs().max() < 1e-4  # soft labels stay a partition of unity
    assert torch.equal(result.warped_labels, result.warped_onehot.argmax(1))
    assert len(result.loss_history) == 60 and result.seconds > 0
    # Registering on a half-resolution grid (the GPU profile's setting) still recovers the deformation,
    # and its displacement comes back on the input grid.
    half = register_atlases(fixed, Atlases(moving, moving_labels),
                            RegisterConfig(iterations=30, levels=2, image_scale=0.5),
                            NUM_CLASSES, device="cpu")
    assert half.displacement.shape == (1, 3, *size)
    assert mean_dice(half.warped_labels, fixed_labels) >= 0.85


def test_mask_supervision_beats_intensity_under_domain_shift():
    size = (40, 40, 40)
    moving, moving_labels = phantom(size)
    # Domain shift: organ 1 has the body's intensity (invisible), organ 2 turns darker than the body.
    shifted, _ = phantom(size, intensities=(0.3, 0.3, 0.15, 0.45), seed=5)
    fixed, fixed_labels = deform(shifted, moving_labels, smooth_field(size, 4.0, seed=3))
    target = to_onehot(fixed_labels, NUM_CLASSES)  # the true labels as the target mask M
    scores = {}
    for mode in ("intensity", "mask", "both"):
        cfg = RegisterConfig(supervision=mode, iterations=30, levels=2)
        result = register_atlases(fixed, Atlases(moving, moving_labels),
                                  cfg, NUM_CLASSES, target_mask=target, device="cpu")
        scores[mode] = mean_dice(result.warped_labels, fixed_labels)
    assert scores["mask"] > scores["intensity"] + 0.03
    assert scores["mask"] > 0.9
    assert scores["both"] > scores["intensity"] + 0.03


def test_warm_start_continues_from_the_previous_alignment():
    size = (40, 40, 40)
    moving, moving_labels = phantom(size)
    shifted, _ = phantom(size, intensities=(0.3, 0.3, 0.15, 0.45), seed=5)
    fixed, fixed_labels = deform(shifted, moving_labels, smooth_field(size, 4.0, seed=3))
    target = to_onehot(fixed_labels, NUM_CLASSES)
    first = register_atlases(fixed, Atlases(moving, moving_labels),
                             RegisterConfig(iterations=30, levels=2), NUM_CLASSES,
                             device="cpu")
    # zero steps from a previous alignment give it back (up to resampling the field to its grid and back)
    cfg = RegisterConfig(supervision="both", iterations=30, levels=2, warm_start_iterations=0)
    same = register_atlases(fixed, Atlases(moving, moving_labels), cfg, NUM_CLASSES, target_mask=target, device="cpu",
                            init_displacement=first.displacement)
    gap = (same.displacement - first.displacement).abs()
    assert gap.mean() < 0.05 and gap.max() < 0.5  # voxels
    assert same.loss_history == []
    # a few mask-supervised steps from there improve on the intensity alignment, at a fraction of the steps
    cfg.warm_start_iterations = 15
    warm = register_atlases(fixed, Atlases(moving, moving_labels), cfg, NUM_CLASSES, target_mask=target, device="cpu",
                            init_displacement=first.displacement)
    assert len(warm.loss_history) == 15
    assert mean_dice(warm.warped_labels, fixed_labels) > mean_dice(first.warped_labels, fixed_labels) + 0.02
    assert warm.folding_fraction.item() < 0.01


def test_batched_equals_single_registrations():
    size = (32, 32, 32)
    fixed, fixed_labels = phantom(size)
    ddf = smooth_field(size, 3.0, seed=7, n=3)
    moving, moving_labels = deform(fixed.repeat(3, 1, 1, 1, 1), fixed_labels.repeat(3, 1, 1, 1), ddf)
    cfg = RegisterConfig(supervision="both", iterations=15, levels=2, mask_grid="image")
    target = to_onehot(fixed_labels, NUM_CLASSES)
    batched = register_atlases(fixed, Atlases(moving, moving_labels),
                               cfg, NUM_CLASSES, target_mask=target, device="cpu")
    # atlas_chunk=1 registers the atlases one at a time: three single registrations.
    cfg.atlas_chunk = 1
    single = register_atlases(fixed, Atlases(moving, moving_labels), cfg, NUM_CLASSES, target_mask=target, device="cpu")
    assert single.displacement.flatten(1).abs().amax(1).min() > 0.5  # every atlas moved
    torch.testing.assert_close(single.displacement, batched.displacement, atol=1e-3, rtol=0)
    assert len(single.loss_history) == len(batched.loss_history) == 30
    alone = register_atlases(fixed, Atlases(moving[2:], moving_labels[2:]),
                             cfg, NUM_CLASSES, target_mask=target, device="cpu")
    torch.testing.assert_close(alone.displacement[0], batched.displacement[2], atol=1e-3, rtol=0)


def test_shared_organ_maps_change_no_bit(monkeypatch):
    import isl_core.register as reg

    size = (32, 32, 32)
    fixed, fixed_labels = phantom(size)
    moving, moving_labels = deform(fixed.repeat(3, 1, 1, 1, 1), fixed_labels.repeat(3, 1, 1, 1),
                                   smooth_field(size, 3.0, seed=7, n=3))
    target = to_onehot(fixed_labels, NUM_CLASSES) * 0.9 + 0.1 / NUM_CLASSES
    made = []
    real = reg.organ_maps
    monkeypatch.setattr(reg, "organ_maps", lambda *a: made.append(a[1:]) or real(*a))
    shared_atlases = Atlases(moving, moving_labels)
    first = register_atlases(fixed, Atlases(moving, moving_labels), RegisterConfig(iterations=5, levels=2), NUM_CLASSES,
                             device="cpu")
    settings = {  # affine stage (Dice on the image grid), two levels in chunks of 2, a warm start
        "affine": (RegisterConfig(supervision="both", iterations=4, levels=2, init="affine", affine_iterations=3,
                                  atlas_chunk=2), None),
        "warm": (RegisterConfig(supervision="mask", warm_start_iterations=4), first.displacement)}
    for cfg, init in settings.values():
        alone = register_atlases(fixed, Atlases(moving, moving_labels),
                                 cfg, NUM_CLASSES, target_mask=target, device="cpu",
                                 init_displacement=init)
        counts = []
        for _ in range(2):  # the first call makes the maps, the second reuses them
            shared = register_atlases(fixed, shared_atlases, cfg, NUM_CLASSES, target_mask=target,
                                      device="cpu", init_displacement=init)
            counts.append(len(made))
            assert torch.equal(shared.displacement, alone.displacement)
            assert torch.equal(shared.warped_labels, alone.warped_labels)
        assert counts[1] == counts[0]
    # kept: affine stage and 2 levels for each of 2 chunks, then the warm start's finest level for all atlases
    assert len(organ_keys := shared_atlases._maps) == 3 * 2 + 1, organ_keys.keys()
    # made atlas by atlas (memory), they are the bits a batch gives
    onehot = to_onehot(moving_labels, NUM_CLASSES)
    torch.testing.assert_close(reg.organ_maps(onehot, (24, 24, 24), (12, 12, 12)),
                               resize_volume(resize_volume(onehot, (24, 24, 24))[:, 1:], (12, 12, 12)), atol=0, rtol=0)


def test_running_out_of_memory_halves_the_atlas_chunk(monkeypatch):
    import isl_core.register as reg

    size = (16, 16, 16)
    fixed, fixed_labels = phantom(size)
    ddf = smooth_field(size, 2.0, seed=3, n=5)
    moving, moving_labels = deform(fixed.repeat(5, 1, 1, 1, 1), fixed_labels.repeat(5, 1, 1, 1), ddf)
    cfg = RegisterConfig(supervision="intensity", iterations=4, levels=1)
    real = reg._register_chunk
    sizes = []

    def small_device(fixed, moving, *args):  # a device on which at most 2 atlases fit
        sizes.append(moving.shape[0])
        if moving.shape[0] > 2:
            raise torch.OutOfMemoryError("simulated")
        return real(fixed, moving, *args)

    monkeypatch.setattr(reg, "_register_chunk", small_device)
    with pytest.warns(UserWarning, match="retrying with 2 atlases"):
        auto = register_atlases(fixed, Atlases(moving, moving_labels), cfg, NUM_CLASSES, device="cpu")
    assert sizes == [5, 2, 2, 1] and auto.atlas_chunk == 2  # 5 did not fit; then 2 + 2 + the last one
    cfg.atlas_chunk = 2
    asked = register_atlases(fixed, Atlases(moving, moving_labels), cfg, NUM_CLASSES, device="cpu")
    torch.testing.assert_close(auto.displacement, asked.displacement, atol=0, rtol=0)
    torch.testing.assert_close(auto.warped_onehot, asked.warped_onehot, atol=0, rtol=0)
    monkeypatch.setattr(reg, "_register_chunk", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("full")))
    cfg.atlas_chunk = 1
    with pytest.raises(torch.OutOfMemoryError):  # a single atlas that does not fit is the caller's problem
        register_atlases(fixed, Atlases(moving, moving_labels), cfg, NUM_CLASSES, device="cpu")


@pytest.mark.parametrize("kernel,shape", [(3, (2, 1, 9, 11, 13)), (5, (3, 2, 17, 8, 23)), (7, (1, 1, 31, 29, 19)),
                                          (9, (2, 1, 40, 12, 33)), (5, (1, 1, 3, 30, 4))])
def test_fast_lncc_equals_monai(kernel, shape):
    gen = torch.Generator().manual_seed(kernel)
    pred, target = torch.rand(shape, generator=gen), torch.rand(shape, generator=gen)
    for reduction in ("mean", "sum", "none"):
        ref = LocalNormalizedCrossCorrelationLoss(3, kernel, reduction=reduction)(pred, target)
        ours = FastLNCC(3, kernel, reduction=reduction)(pred, target)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4 if reduction == "sum" else 0)
    # Precomputed fixed-image statistics and a broadcast target give the same per-atlas values.
    fast = FastLNCC(3, kernel, reduction="batch")
    per_atlas = fast(pred, fast.target_stats(target[:1]))
    ref = LocalNormalizedCrossCorrelationLoss(3, kernel, reduction="none")(pred, target[:1].expand_as(pred))
    torch.testing.assert_close(per_atlas, ref.flatten(1).mean(1), atol=1e-4, rtol=0)
    # Both box-sum back ends agree (prefix sums on CPU, pooling on GPU).
    torch.testing.assert_close(box_sum_pool(pred, kernel), box_sum_cumsum(pred, kernel), atol=1e-3, rtol=1e-5)


def test_fast_lncc_2d_and_gradient():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.rand(2, 1, 15, 12, generator=gen), torch.rand(2, 1, 15, 12, generator=gen)
    ref = LocalNormalizedCrossCorrelationLoss(2, 5)(pred, target)
    torch.testing.assert_close(FastLNCC(2, 5)(pred, target), ref, atol=1e-4, rtol=0)
    # The hand-derived backward pass equals autograd through the plain formula (and hence MONAI's).
    p = torch.rand(2, 1, 7, 6, 9, dtype=torch.float64, generator=gen).requires_grad_(True)
    t = torch.rand(1, 1, 7, 6, 9, dtype=torch.float64, generator=gen)
    lncc = FastLNCC(3, 5, smooth_nr=1e-3, smooth_dr=0.05)  # a floor that is active in some windows
    weights = torch.rand(p.shape, dtype=torch.float64, generator=gen)
    g_fast = torch.autograd.grad((lncc.ncc(p, t, analytic=True) * weights).sum(), p)[0]
    g_ref = torch.autograd.grad((lncc.ncc(p, t, analytic=False) * weights).sum(), p)[0]
    torch.testing.assert_close(g_fast, g_ref, atol=1e-10, rtol=1e-8)
    monai = LocalNormalizedCrossCorrelationLoss(3, 5, smooth_nr=1e-3, smooth_dr=0.05)
    g_monai = torch.autograd.grad(monai(p, t.expand_as(p)), p)[0]
    g_ours = torch.autograd.grad(FastLNCC(3, 5, smooth_nr=1e-3, smooth_dr=0.05)(p, t), p)[0]
    torch.testing.assert_close(g_ours, g_monai, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("shape", [(2, 3, 17, 8, 23), (1, 1, 3, 30, 4), (2, 2, 11, 13), (1, 1, 6, 2, 1)])
def test_box_sums_equal_their_plain_references(shape):
    """The fast paths of the window sums keep the plain computations' results: prefix sums bit for bit, window
    sums to float rounding of a direct sum of shifted copies, on axes longer and shorter than the window."""
    x = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape)))
    for dim in range(2, x.ndim):
        assert torch.equal(_prefix_sums(x, dim), x.cumsum(dim))
    for kernel in (3, 5, 7):
        h = kernel // 2
        direct = x.double()
        for dim in range(2, x.ndim):
            n = direct.shape[dim]
            zeros = direct.new_zeros(*direct.shape[:dim], h, *direct.shape[dim + 1:])
            padded = torch.cat([zeros, direct, zeros], dim)
            direct = sum(padded.narrow(dim, j, n) for j in range(kernel))
        torch.testing.assert_close(box_sum_cumsum(x, kernel).double(), direct, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("smooth_nr", [0.0, 1e-3])
def test_analytic_lncc_forward_is_the_plain_formula_bit_for_bit(smooth_nr):
    gen = torch.Generator().manual_seed(3)
    p, t = torch.rand(3, 1, 12, 9, 10, generator=gen), torch.rand(1, 1, 12, 9, 10, generator=gen)
    p[..., :4, :, :] = 0.25  # flat windows: the variance floor is active there
    lncc = FastLNCC(3, 5, smooth_nr=smooth_nr, smooth_dr=0.01)
    stats = lncc.target_stats(t)
    assert torch.equal(lncc.ncc(p, stats, analytic=True), lncc.ncc(p, stats, analytic=False))


def test_jacobian_determinant_identity_and_affine():
    assert torch.allclose(jacobian_determinant(torch.zeros(2, 3, 6, 7, 8)), torch.ones(2, 6, 7, 8))
    a = torch.tensor([[1.2, 0.1, 0.0], [0.05, 0.9, -0.2], [0.0, 0.3, 1.1]])
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in (6, 7, 8)], indexing="ij"))
    u = torch.einsum("ij,jhwd->ihwd", a - torch.eye(3), grid) + torch.tensor([1.0, -2.0, 0.5]).view(3, 1, 1, 1)
    det = jacobian_determinant(u[None])
    torch.testing.assert_close(det, torch.full_like(det, torch.linalg.det(a).item()), atol=1e-4, rtol=0)
    # A reflection along one axis folds space everywhere.
    flip = torch.zeros(1, 3, 6, 7, 8)
    flip[0, 0] = -2 * grid[0]
    assert folding_fraction(flip).item() == 1.0
    assert folding_fraction(u[None]).item() == 0.0


# --------------------------------------------------------------------- pieces equal their references


def test_fused_sampling_equals_monai_warp():
    gen = torch.Generator().manual_seed(0)
    theta = torch.eye(3, 4).repeat(2, 1, 1) + 0.05 * torch.randn(2, 3, 4, generator=gen)
    field = torch.randn(2, 3, 12, 10, 14, generator=gen)
    size = (30, 26, 28)
    volume = torch.rand(2, 2, *size, generator=gen)
    fused = sample(volume, sampling_grid(affine_coords(theta, (12, 10, 14)), field, size))
    ref = warp(volume, affine_to_ddf(theta, size) + resize_field(field, size))
    torch.testing.assert_close(fused, ref, atol=1e-4, rtol=0)


def test_warp_convention_is_voxels_along_tensor_axes():
    volume = torch.rand(1, 1, 10, 12, 14)
    ddf = torch.zeros(1, 3, 10, 12, 14)
    ddf[:, 1] = 2.0  # sample two voxels further along W
    out = warp(volume, ddf)
    torch.testing.assert_close(out[..., :, :-2, :], volume[..., :, 2:, :])


def test_smoothness_equals_monai_losses():
    field = torch.randn(3, 3, 7, 9, 6, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bending = BendingEnergyLoss(reduction="none")(field).flatten(1).mean(1)
        diffusion = DiffusionLoss(reduction="none")(field).flatten(1).mean(1)
    torch.testing.assert_close(smoothness(field, 0.7, 0.2), 0.7 * bending + 0.2 * diffusion, atol=1e-4, rtol=1e-5)


def test_centre_of_mass_initialisation_alone_removes_a_translation():
    size = (32, 32, 32)
    image, labels = phantom(size)
    moving = torch.roll(image, shifts=(2, -3, 2), dims=(2, 3, 4))
    moving_labels = torch.roll(labels, shifts=(2, -3, 2), dims=(1, 2, 3))
    cfg = RegisterConfig(iterations=0, levels=1)
    result = register_atlases(image, Atlases(moving, moving_labels), cfg, NUM_CLASSES, device="cpu")
    torch.testing.assert_close(result.displacement.mean((2, 3, 4)), torch.tensor([[2.0, -3.0, 2.0]]), atol=0.2, rtol=0)
    assert mean_dice(result.warped_labels, labels) > 0.95 > mean_dice(moving_labels, labels)
    none = register_atlases(image, Atlases(moving, moving_labels), RegisterConfig(iterations=0, levels=1, init="none"),
                            NUM_CLASSES, device="cpu")
    assert none.displacement.abs().max() == 0


def test_affine_initialisation_and_monai_lncc_path_run():
    size = (24, 24, 24)
    image, labels = phantom(size)
    fixed, fixed_labels = deform(image, labels, affine_to_ddf(torch.tensor([[[1.1, 0, 0, 0.05], [0, 0.95, 0, 0],
                                                                              [0, 0, 1.0, 0]]]), size))
    cfg = RegisterConfig(init="affine", affine_iterations=15, iterations=3, levels=1, fast_lncc=False)
    result = register_atlases(fixed, Atlases(image, to_onehot(labels, NUM_CLASSES)), cfg, NUM_CLASSES, device="cpu")
    assert mean_dice(labels, fixed_labels) < 0.9
    assert mean_dice(result.warped_labels, fixed_labels) > 0.98


def test_bad_inputs_stop_with_a_clear_message():
    image, labels = phantom((16, 16, 16))
    with pytest.raises(ValueError, match="target_mask"):
        register_atlases(image, Atlases(image, labels), RegisterConfig(supervision="mask"), NUM_CLASSES, device="cpu")
    with pytest.raises(ValueError, match="RegisterConfig.supervision"):
        RegisterConfig(supervision="pixels")
    with pytest.raises(ValueError, match="do not match the images"):
        register_atlases(image, Atlases(image[..., :8], labels), RegisterConfig(), NUM_CLASSES, device="cpu")
    with pytest.raises(ValueError, match="label values"):
        register_atlases(image, Atlases(image, labels + 5), RegisterConfig(), NUM_CLASSES, device="cpu")


def test_bending_weight_in_millimetres_is_equally_stiff_on_every_grid():
    from isl_core.register import bending_scale

    cfg = RegisterConfig(reference_spacing_mm=16.0)
    # a grid of 33 voxels of 4 mm (128 mm) seen through a 9-voxel field (16 mm voxels): the weight as given
    assert bending_scale(cfg, (4.0, 4.0, 4.0), (9, 9, 9), (33, 33, 33)) == pytest.approx(1.0)
    # twice finer field voxels (8 mm): the bending energy in voxel units is 4x smaller per mm^2, so 4x the weight
    assert bending_scale(cfg, (4.0, 4.0, 4.0), (17, 17, 17), (33, 33, 33)) == pytest.approx(4.0)
    assert bending_scale(RegisterConfig(), (4.0, 4.0, 4.0), (17, 17, 17), (33, 33, 33)) == 1.0  # per voxel
    with pytest.raises(ValueError, match="needs the grid spacing"):
        bending_scale(cfg, None, (9, 9, 9), (33, 33, 33))
    # the same physical field costs the same bending energy on both grids once scaled
    x = torch.linspace(0, 128, 33)
    u_mm = 2.0 * torch.sin(x / 20.0)  # a smooth displacement in mm along the first axis

    def energy(field_voxels: int) -> float:
        step = 128 / (field_voxels - 1)
        u = torch.nn.functional.interpolate(u_mm.view(1, 1, -1), size=field_voxels, mode="linear",
                                            align_corners=True).view(-1) / step  # in voxels of that field
        field = torch.zeros(1, 3, field_voxels, field_voxels, field_voxels)
        field[0, 0] = u.view(-1, 1, 1)
        return float(smoothness(field, 1.0, 0.0)) * bending_scale(cfg, (4.0, 4.0, 4.0), (field_voxels,) * 3,
                                                                   (33, 33, 33))

    assert energy(17) == pytest.approx(energy(33), rel=0.05)
