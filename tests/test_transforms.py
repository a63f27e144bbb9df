"""Stage 2's spatial transforms against displacements whose effect is known in closed form."""

from __future__ import annotations

import pytest
import torch

from isl_core.transforms import (
    affine_coords,
    affine_to_ddf,
    centre_of_mass_affine,
    folding_fraction,
    jacobian_determinant,
    resize_field,
    sample,
    sampling_grid,
    to_onehot,
    warp,
)

SIZE = (9, 11, 13)


def _volume(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 1, *SIZE, generator=torch.Generator().manual_seed(seed))


def _coordinates(size=SIZE) -> torch.Tensor:
    """(1, 3, *size): each voxel's own index along each axis."""
    return torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in size], indexing="ij"))[None]


def test_a_whole_voxel_displacement_moves_the_image_by_that_many_voxels():
    vol = _volume()
    ddf = torch.zeros(1, 3, *SIZE)
    ddf[:, 0], ddf[:, 2] = 2.0, -1.0  # sample 2 voxels further along H and 1 voxel back along D
    moved = warp(vol, ddf)
    torch.testing.assert_close(moved[..., :-2, :, 1:], vol[..., 2:, :, :-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(moved[..., -1, :, 1:], vol[..., -1, :, :-1], atol=1e-5, rtol=0)  # border: the edge


def test_an_affine_and_a_field_compose_into_the_known_displacement():
    """sampling_grid(affine, low-resolution field) samples where the dense displacement affine + field says."""
    shift = torch.tensor([0.25, -0.5, 0.0])  # normalised units: (size - 1) / 2 voxels per unit
    theta = torch.eye(3, 4)[None].clone()
    theta[0, :, 3] = shift
    ddf = affine_to_ddf(theta, SIZE)
    voxels = shift * torch.tensor([(s - 1) / 2 for s in SIZE])  # 1 voxel along H, -2.5 along W
    torch.testing.assert_close(ddf, voxels.view(1, 3, 1, 1, 1).expand_as(ddf), atol=1e-5, rtol=0)
    coarse = (5, 6, 7)
    field = torch.randn(1, 3, *coarse, generator=torch.Generator().manual_seed(1))
    vol = _volume(2)
    fused = sample(vol, sampling_grid(affine_coords(theta, coarse), field, SIZE))
    dense = warp(vol, ddf + resize_field(field, SIZE))
    torch.testing.assert_close(fused, dense, atol=1e-4, rtol=0)


def test_resizing_a_field_rescales_it_to_the_new_voxels():
    one_voxel = torch.ones(1, 3, 5, 5, 5)
    resized = resize_field(one_voxel, (9, 9, 3))
    assert resized.shape == (1, 3, 9, 9, 3)
    torch.testing.assert_close(resized[:, 0], torch.full((1, 9, 9, 3), 2.0))  # (9 - 1) / (5 - 1)
    torch.testing.assert_close(resized[:, 2], torch.full((1, 9, 9, 3), 0.5))  # (3 - 1) / (5 - 1)


def test_jacobian_of_a_scaling_and_of_a_mirroring():
    x = _coordinates()
    scaled = jacobian_determinant(0.5 * x)  # x -> 1.5 x: volumes grow by 1.5 ** 3
    torch.testing.assert_close(scaled, torch.full_like(scaled, 1.5**3), atol=1e-5, rtol=0)
    assert folding_fraction(0.5 * x).item() == 0.0
    mirrored = -2.0 * x  # x -> -x: orientation reversed everywhere
    assert folding_fraction(mirrored).item() == 1.0
    with pytest.raises(ValueError, match=r"\(N, 3, H, W, D\)"):
        jacobian_determinant(x[:, :2])


def test_centre_of_mass_alignment_finds_a_known_shift():
    fixed = torch.zeros(1, 1, *SIZE)
    fixed[..., 2:5, 3:6, 4:8] = 1.0
    moving = torch.roll(fixed, shifts=(2, -1, 3), dims=(2, 3, 4))
    ddf = affine_to_ddf(centre_of_mass_affine(fixed, moving, threshold=0.5), SIZE)
    torch.testing.assert_close(ddf[0, :, 0, 0, 0], torch.tensor([2.0, -1.0, 3.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(warp(moving, ddf), fixed, atol=1e-5, rtol=0)  # and the warp undoes it


def test_onehot_round_trip_and_refusals():
    labels = torch.randint(0, 4, (2, *SIZE), generator=torch.Generator().manual_seed(3))
    onehot = to_onehot(labels, 4)
    assert onehot.shape == (2, 4, *SIZE) and onehot.dtype == torch.float32
    assert torch.equal(onehot.argmax(1), labels) and torch.equal(onehot.sum(1), torch.ones(2, *SIZE))
    assert torch.equal(to_onehot(onehot, 4), onehot)  # one-hot input passes through
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        to_onehot(labels, 3)
    with pytest.raises(ValueError, match="channels"):
        to_onehot(onehot, 5)
