"""Fusion in the source geometry (``malf-source``): each scan voxel follows the working grid's displacement into the
atlas's own label file. Checked against the working-grid vote where the two grids coincide, against a known shift,
against an atlas stored in another orientation, and on a scan finer than the working grid, where it keeps the
detail that resampling the working-grid vote loses."""

from __future__ import annotations

import runpy
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from isl_core.config import FusionConfig
from isl_core.data import to_source_geometry
from isl_core.fusion import SourceAtlas, fuse, fuse_in_source_geometry
from isl_core.register import RegistrationResult
from isl_core.transforms import to_onehot, warp

C = 3
SIZE = (12, 14, 10)


def _blobs(shape, centres, radius) -> np.ndarray:
    """Labels 1.. of balls of ``radius`` voxels at ``centres`` on a grid of ``shape``."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    labels = np.zeros(shape, dtype=np.int64)
    for value, centre in enumerate(centres, start=1):
        labels[((grid - np.reshape(centre, (3, 1, 1, 1))) ** 2).sum(0) <= radius**2] = value
    return labels


def _save(path, array, affine) -> str:
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return str(path)


def _result(images, labels, displacement) -> RegistrationResult:
    """What a registration returns, for atlases ``images`` (N,1,*S) and ``labels`` (N,*S) warped by ``displacement``."""
    onehot = warp(to_onehot(labels, C), displacement)
    return RegistrationResult(displacement=displacement, warped_images=warp(images, displacement),
                              warped_onehot=onehot, warped_labels=onehot.argmax(1),
                              folding_fraction=torch.zeros(labels.shape[0]))


def _scene(tmp_path, displacement, affine=None):
    """An inference scan on the working grid itself and two atlases whose label files are their working grids."""
    affine = np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine
    rng = np.random.default_rng(0)
    fixed = torch.rand(1, 1, *SIZE, generator=torch.Generator().manual_seed(1))
    labels = torch.from_numpy(np.stack([_blobs(SIZE, [(4, 5, 4), (8, 9, 6)], 2.5),
                                        _blobs(SIZE, [(5, 6, 5), (7, 8, 5)], 2.0)]))
    images = torch.from_numpy(rng.random((2, 1, *SIZE)).astype(np.float32))
    reference = {"affine": affine, "source_image": _save(tmp_path / "scan.nii.gz", fixed[0, 0].numpy(), affine)}
    sources = [SourceAtlas.from_case(_save(tmp_path / f"atlas{k}.nii.gz", labels[k].numpy().astype(np.uint8), affine),
                                     {"affine": affine}) for k in range(2)]
    return fixed, reference, sources, _result(images, labels, displacement), labels


@pytest.mark.parametrize("method", ["majority", "weighted"])
def test_on_the_working_grid_it_is_the_working_grid_vote(tmp_path, method):
    # a smooth displacement that keeps every sample inside the grid, where border and zero padding agree
    g = torch.Generator().manual_seed(2)
    displacement = torch.nn.functional.interpolate(torch.rand(2, 3, 3, 3, 3, generator=g) * 2 - 1, size=SIZE,
                                                   mode="trilinear", align_corners=True)
    fixed, reference, sources, result, _ = _scene(tmp_path, displacement)
    cfg = FusionConfig(method=method)
    on_grid = fuse(fixed, result, cfg)[0].argmax(0).numpy()
    inner = (slice(2, -2),) * 3  # away from the edges, where a sample may fall outside the label file
    source = fuse_in_source_geometry(fixed, reference, sources, result, cfg)
    assert source.shape == SIZE
    assert (source[inner] == on_grid[inner]).mean() > 0.99


def test_a_shift_is_followed_into_the_atlas(tmp_path):
    displacement = torch.zeros(2, 3, *SIZE)
    displacement[:, 0] = 2.0  # every voxel x reads the atlas at x + 2 along the first axis
    fixed, reference, sources, result, labels = _scene(tmp_path, displacement)
    out = fuse_in_source_geometry(fixed, reference, sources[:1], _result(result.warped_images[:1],
                                                                          labels[:1], displacement[:1]),
                                  FusionConfig(method="majority"))
    assert np.array_equal(out[:-2], labels[0].numpy()[2:])
    assert (out[-2:] == 0).all()  # read beyond the atlas's scan: background


def test_an_atlas_stored_in_another_orientation_gives_the_same_vote(tmp_path):
    displacement = torch.zeros(2, 3, *SIZE)
    fixed, reference, sources, result, labels = _scene(tmp_path, displacement)
    cfg = FusionConfig(method="majority")
    plain = fuse_in_source_geometry(fixed, reference, sources, result, cfg)
    # the same atlas written with its first axis reversed, which its affine says: the same anatomy in the world
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = SIZE[0] - 1
    affine = reference["affine"] @ flip
    flipped = [SourceAtlas.from_case(_save(tmp_path / f"flipped{k}.nii.gz",
                                           labels[k].numpy()[::-1].astype(np.uint8), affine),
                                     {"affine": reference["affine"]}) for k in range(2)]
    assert np.array_equal(fuse_in_source_geometry(fixed, reference, flipped, result, cfg), plain)


def test_a_finer_scan_keeps_the_atlas_detail_that_resampling_the_vote_loses(tmp_path):
    # the scan and the atlas's label file at 1 mm, the working grid at 2 mm: the same world, sampled twice as finely
    fine_shape, coarse = (24, 28, 20), (12, 14, 10)
    fine_affine = np.eye(4)
    work = np.diag([2.0, 2.0, 2.0, 1.0])
    work[:3, 3] = 0.5  # the centre of a 2 mm voxel over two 1 mm voxels
    fine_labels = _blobs(fine_shape, [(9, 11, 8), (15, 17, 12)], 3.7)
    coarse_labels = torch.from_numpy(fine_labels[::2, ::2, ::2].copy())[None]
    scan = _save(tmp_path / "scan.nii.gz", np.zeros(fine_shape, np.float32), fine_affine)
    reference = {"affine": work, "source_image": scan}
    atlas = SourceAtlas.from_case(_save(tmp_path / "atlas.nii.gz", fine_labels.astype(np.uint8), fine_affine),
                                  {"affine": work})
    displacement = torch.zeros(1, 3, *coarse)
    result = _result(torch.zeros(1, 1, *coarse), coarse_labels, displacement)
    cfg = FusionConfig(method="majority")
    source = fuse_in_source_geometry(torch.zeros(1, 1, *coarse), reference, [atlas], result, cfg)
    resampled = to_source_geometry(fuse(torch.zeros(1, 1, *coarse), result, cfg)[0], reference)
    inside = (slice(1, 23), slice(1, 27), slice(1, 19))  # the working grid spans the 1 mm voxels 1..22, 1..26, 1..18
    assert np.array_equal(source[inside], fine_labels[inside])
    assert not np.array_equal(resampled[inside], fine_labels[inside])


def test_its_footprint_is_that_of_every_other_methods_label_map(tmp_path):
    # a working grid inside a larger, finer scan: what lies beyond it is background for every method, over one footprint
    fine_shape, coarse = (30, 34, 26), (12, 14, 10)
    work = np.diag([2.0, 2.0, 2.0, 1.0])
    work[:3, 3] = 3.5
    scan = _save(tmp_path / "scan.nii.gz", np.zeros(fine_shape, np.float32), np.eye(4))
    reference = {"affine": work, "source_image": scan}
    organ = np.ones(fine_shape, dtype=np.uint8)  # an atlas that is organ wherever it has a voxel
    atlas = SourceAtlas.from_case(_save(tmp_path / "atlas.nii.gz", organ, np.eye(4)), {"affine": work})
    result = _result(torch.zeros(1, 1, *coarse), torch.ones(1, *coarse, dtype=torch.long), torch.zeros(1, 3, *coarse))
    source = fuse_in_source_geometry(torch.zeros(1, 1, *coarse), reference, [atlas], result, FusionConfig())
    organ_probs = torch.zeros(C, *coarse)
    organ_probs[1] = 1.0
    assert 0 < (source == 1).sum() < source.size
    assert np.array_equal(source == 1, to_source_geometry(organ_probs, reference) == 1)


def test_it_refuses_atlases_that_do_not_match_the_registration(tmp_path):
    fixed, reference, sources, result, _ = _scene(tmp_path, torch.zeros(2, 3, *SIZE))
    with pytest.raises(ValueError, match="1 source atlases for 2"):
        fuse_in_source_geometry(fixed, reference, sources[:1], result, FusionConfig())


def _run_table(methods: dict[str, list[float]], folds: list[int], seed: int | None = None) -> pd.DataFrame:
    """A per_case table of one organ per case: method -> Dice per case."""
    rows = [{"case": f"c{i}", "fold": folds[i], "method": m, "organ": "liver", "in_truth": True, "dice": d,
             "dice_grid": d} for m, values in methods.items() for i, d in enumerate(values)]
    table = pd.DataFrame(rows)
    return table if seed is None else table.assign(seed=seed)


def test_the_pairing_script_pairs_the_runs_and_refuses_other_cohorts():
    fusion_source = runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench" / "fusion_source.py"))[
        "fusion_source"]
    folds = [0, 0, 0, 1, 1, 1]
    malf = [0.50, 0.60, 0.55, 0.52, 0.58, 0.61]
    isl = {0: [0.56, 0.63, 0.60, 0.55, 0.64, 0.62], 1: [0.58, 0.65, 0.58, 0.57, 0.62, 0.66]}
    arms = pd.concat([_run_table({"baseline": malf, "malf": malf, "isl-mask-ema": isl[s]}, folds, seed=s)
                      for s in (0, 1)])
    source = [0.55, 0.66, 0.57, 0.56, 0.60, 0.65]
    fusion = _run_table({"baseline": malf, "malf": malf, "malf-source": source}, folds)
    out = fusion_source(arms, fusion)
    tests = {t["claim"]: t for t in out["tests"]}
    isl_mean = np.mean([isl[0], isl[1]], axis=0)
    assert np.isclose(tests["vs_fusion_source"]["delta"], np.mean(isl_mean - source))
    assert np.isclose(tests["source_vote_gain"]["delta"], np.mean(np.subtract(source, malf)))
    assert tests["vs_fusion_source"]["below"] == int((isl_mean < source).sum())
    assert out["seeds_of_isl"] == [0, 1] and out["n_cases"] == 6
    rounded = fusion.assign(dice=np.where(fusion["method"] == "malf", fusion["dice"] + 4e-4, fusion["dice"]))
    assert fusion_source(arms, rounded)["n_cases"] == 6  # another CPU's rounding of the same vote: paired
    moved = fusion.assign(dice=np.where(fusion["method"] == "malf", fusion["dice"] + 0.01, fusion["dice"]))
    with pytest.raises(SystemExit, match="malf differs"):
        fusion_source(arms, moved)
    with pytest.raises(SystemExit, match="folds"):
        fusion_source(arms, fusion.assign(fold=1 - fusion["fold"]))
