"""The pieces: the sources table, splits, safe extraction, NRRD geometry, mask merging and label remapping."""

from __future__ import annotations

import argparse
import tarfile

import fabricate as fab
import numpy as np
import pytest

from data_download.cli import add_fetch_arguments, options_from_args
from data_download.convert_hanseg import merge_masks, read_nrrd, resample_mask
from data_download.convert_sample import remap
from data_download.errors import FetchError
from data_download.extract import Member, is_appledouble, safe_extract, unsafe_reason
from data_download.labels import BTCV_LABELS
from data_download.sources import HANSEG_OARS, SOURCES, TOTALSEG_TO_BTCV
from data_download.splits import hash_order, kfold_split, monai_btcv_split, select_cases


def test_sources_table_is_complete_and_consistent():
    assert set(SOURCES) == {"btcv", "hanseg", "msd-pancreas", "sample"}
    for s in SOURCES.values():
        assert s.algorithm in ("md5", "sha256")
        assert len(s.checksum) == {"md5": 32, "sha256": 64}[s.algorithm]
        assert s.labels[0] == "background" and s.licence and s.citation and s.size > 0
    assert dict(SOURCES["btcv"].labels) == BTCV_LABELS
    assert len(HANSEG_OARS) == len(set(HANSEG_OARS)) == 30 and list(HANSEG_OARS) == sorted(HANSEG_OARS)
    # every BTCV organ has exactly one TotalSegmentator class
    assert sorted(TOTALSEG_TO_BTCV.values()) == list(range(1, 14))


def test_monai_btcv_split_is_24_6():
    cases = [f"img{i:04d}" for i in (*range(1, 11), *range(21, 41))]
    train, val = monai_btcv_split(cases)
    assert len(train) == 24 and val == [f"img{i:04d}" for i in range(35, 41)]
    with pytest.raises(FetchError, match="img0040"):
        monai_btcv_split(cases[:-1])


def test_kfold_partitions_and_is_deterministic():
    ids = [f"c{i}" for i in range(42)]
    vals = [kfold_split(ids, 5, f, seed=0)[1] for f in range(5)]
    assert sorted(sum(vals, [])) == sorted(ids)
    assert sorted(len(v) for v in vals) == [8, 8, 8, 9, 9]
    assert kfold_split(ids, 5, 2, seed=0) == kfold_split(list(reversed(ids)), 5, 2, seed=0)
    assert kfold_split(ids, 5, 2, seed=0) != kfold_split(ids, 5, 2, seed=1)
    with pytest.raises(FetchError, match="--fold"):
        kfold_split(ids, 5, 5, seed=0)


def test_selection_is_fixed_by_the_ids():
    ids = [f"pancreas_{i:03d}" for i in range(281)]
    a = select_cases(ids, 210, "salt:")
    assert a == select_cases(list(reversed(ids)), 210, "salt:") and len(set(a)) == 210
    assert hash_order(ids, "salt:")[:210] != ids[:210]  # not simply the first ids
    with pytest.raises(FetchError, match="--n-cases"):
        select_cases(ids, 300, "salt:")


@pytest.mark.parametrize("member, bad", [
    (Member("a/b.nii.gz", 1, "file"), False),
    (Member("./a/b", 1, "file"), False),
    (Member("/etc/passwd", 1, "file"), True),
    (Member("C:/x", 1, "file"), True),
    (Member("a/../../x", 1, "file"), True),
    (Member("a\\..\\..\\x", 1, "file"), True),
    (Member("a/link", 0, "symlink", "b"), True),
    (Member("a/hard", 0, "hardlink", "b"), True),
    (Member("a/fifo", 0, "other"), True),
])
def test_unsafe_members(member, bad):
    assert (unsafe_reason(member) is not None) == bad


def test_appledouble_names():
    assert is_appledouble("Task07_Pancreas/imagesTr/._pancreas_001.nii.gz")
    assert is_appledouble("__MACOSX/HaN-Seg/x")
    assert not is_appledouble("Task07_Pancreas/imagesTr/pancreas_001.nii.gz")


def test_safe_extract_filters_and_skips_appledouble(tmp_path):
    archive = fab.make_msd_tar(tmp_path / "t.tar", n_cases=3)
    written = safe_extract(archive, tmp_path / "x", include=lambda n: "/labelsTr/" in n or "/imagesTr/" in n)
    names = sorted(p.name for p in written)
    assert len(names) == 6 and not any(n.startswith("._") for n in names)


def test_safe_extract_refuses_before_writing_anything(tmp_path):
    archive = fab.make_traversal_tar(tmp_path / "t.tar")
    with pytest.raises(FetchError, match="refused"):
        safe_extract(archive, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_damaged_archive_is_reported(tmp_path):
    good = fab.make_msd_tar(tmp_path / "t.tar", n_cases=3)
    bad = tmp_path / "bad.tar"
    bad.write_bytes(good.read_bytes()[:700])
    with pytest.raises(FetchError, match="bad.tar"):
        safe_extract(bad, tmp_path / "x")
    assert tarfile.is_tarfile(good)


def test_read_nrrd_lps_to_ras_and_4d_segmentations(tmp_path):
    import nrrd

    p = tmp_path / "s.seg.nrrd"
    data = np.zeros((2, 3, 4, 5), np.uint8)
    data[1, 0, 0, 0] = 1
    nrrd.write(str(p), data, {"space": "left-posterior-superior", "space origin": np.array([1.0, 2.0, 3.0]),
                              "space directions": np.array([[np.nan] * 3, [2, 0, 0], [0, 2, 0], [0, 0, 3.0]]),
                              "kinds": ["list", "domain", "domain", "domain"]})
    mask, affine = read_nrrd(p)
    assert mask.shape == (3, 4, 5) and mask[0, 0, 0]
    assert np.allclose(affine, [[-2, 0, 0, -1], [0, -2, 0, -2], [0, 0, 3, 3], [0, 0, 0, 1]])


def test_resample_mask_paste_and_general_paths():
    ct_affine = np.diag([1.0, 1.0, 2.0, 1.0])
    small = np.ones((2, 2, 2), bool)
    shifted = ct_affine.copy()
    shifted[:3, 3] = [3, 4, 2]  # voxel (3, 4, 1) of the CT
    out = resample_mask(small, shifted, (6, 6, 4), ct_affine)
    assert np.argwhere(out).min(0).tolist() == [3, 4, 1] and out.sum() == 8
    # a mask at half the spacing goes through nearest-neighbour resampling
    fine = np.ones((4, 4, 4), bool)
    out = resample_mask(fine, np.diag([0.5, 0.5, 1.0, 1.0]), (6, 6, 4), ct_affine)
    assert out[:2, :2, :2].all() and not out[3:].any()


def test_merge_smaller_organ_wins_ties_to_lower_id():
    shape = (4, 4, 4)
    big, small = np.zeros(shape, bool), np.zeros(shape, bool)
    big[:3, :3, :3] = True
    small[1, 1, 1] = True
    label, lost = merge_masks({"Brainstem": big, "Pituitary": small}, shape)
    ids = {n: i + 1 for i, n in enumerate(HANSEG_OARS)}
    assert label[1, 1, 1] == ids["Pituitary"] and lost == {"Brainstem": 1}
    a, b = np.zeros(shape, bool), np.zeros(shape, bool)
    a[0, 0, :2] = b[0, 0, 1:3] = True  # same size: the lower id keeps the shared voxel
    label, _ = merge_masks({"Parotid_R": a, "Parotid_L": b}, shape)
    assert label[0, 0, 1] == ids["Parotid_L"]


def test_remap_totalsegmentator_to_btcv():
    seg = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 52, 63, 64, 90, 117], dtype=np.uint8)
    assert remap(seg).tolist() == [0, 1, 2, 3, 4, 6, 7, 11, 12, 13, 5, 8, 9, 10, 0, 0]


@pytest.mark.parametrize("seed_first", [True, False])
def test_add_fetch_arguments_leaves_seed_to_the_caller(seed_first):
    parser = argparse.ArgumentParser()
    if seed_first:
        parser.add_argument("--seed", type=int, default=42)
    add_fetch_arguments(parser)
    if not seed_first:  # isl adds --seed/--device after the fetch arguments: no conflict either way
        parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(["hanseg", "--out", "x", "--folds", "3", "--fold", "2"])
    opts = options_from_args(args)
    assert (opts.seed, opts.folds, opts.fold, opts.source) == (42, 3, 2, "hanseg")
    assert "msd-pancreas" in parser.format_help()
    bare = argparse.ArgumentParser()
    add_fetch_arguments(bare)
    assert options_from_args(bare.parse_args(["sample", "--out", "x"])).seed == 0


def test_isl_data_fetch_parses():
    from isl_core.cli import build_parser

    args = build_parser().parse_args(["data", "fetch", "msd-pancreas", "--out", "x", "--seed", "3", "--n-cases", "20"])
    opts = options_from_args(args)
    assert (opts.source, opts.seed, opts.n_cases) == ("msd-pancreas", 3, 20)
