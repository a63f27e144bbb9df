"""Tests for isl_core.evaluate: every expected number is computed by hand in the test, not by the code under test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import ttest_rel, wilcoxon

from isl_core import evaluate as ev
from isl_core import runtime

LABELS = {0: "background", 1: "liver", 2: "spleen", 3: "kidney", 4: "gallbladder"}
ISO = (1.0, 1.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Dice


def test_dice_of_two_boxes_is_exact():
    truth = np.zeros((10, 10, 8), dtype=np.uint8)
    pred = np.zeros_like(truth)
    truth[0:4, 0:5, 0:6] = 1  # |A| = 4*5*6 = 120
    pred[2:7, 1:5, 0:3] = 1  # |B| = 5*4*3 = 60 ; A n B = [2:4, 1:5, 0:3] -> 2*4*3 = 24
    truth[8:10, 8:10, 6:8] = 2  # spleen: identical in both -> Dice 1
    pred[8:10, 8:10, 6:8] = 2
    df = ev.organ_metrics(pred, truth, {1: "liver", 2: "spleen"}, ISO, hd95=False)

    assert list(df.columns) == ev.ORGAN_COLUMNS
    assert list(df["organ"]) == ["liver", "spleen"]
    assert df.loc[0, "dice"] == pytest.approx(2 * 24 / (120 + 60), abs=1e-6)
    assert df.loc[1, "dice"] == pytest.approx(1.0, abs=1e-6)
    assert df["hd95_mm"].isna().all()  # hd95=False skips the distances
    assert ev.mean_dice(df) == pytest.approx((2 * 24 / 180 + 1.0) / 2, abs=1e-6)


def test_torch_input_with_channel_axis_and_float_labels():
    truth = torch.zeros(1, 6, 6, 6)
    truth[0, 1:3, 1:3, 1:3] = 1.0  # 8 voxels
    pred = torch.zeros(1, 6, 6, 6)
    pred[0, 2:4, 1:3, 1:3] = 1.0  # 8 voxels, overlap 4
    df = ev.organ_metrics(pred, truth, {1: "liver"}, ISO)
    assert df.loc[0, "dice"] == pytest.approx(2 * 4 / 16, abs=1e-6)
    assert df.loc[0, "hd95_mm"] == pytest.approx(1.0, abs=1e-6)  # one-voxel shift, isotropic 1 mm


def test_bad_inputs_stop_with_a_clear_message():
    a = np.zeros((4, 4, 4), dtype=np.int16)
    with pytest.raises(ValueError, match="shape"):
        ev.organ_metrics(a, np.zeros((4, 4, 5), dtype=np.int16), {1: "liver"}, ISO)
    b = a.copy()
    b[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"\[7\]"):
        ev.organ_metrics(b, a, {1: "liver"}, ISO)
    with pytest.raises(ValueError, match="non-integer"):
        ev.organ_metrics(a + 0.5, a, {1: "liver"}, ISO)
    with pytest.raises(ValueError, match="spatial axes"):
        ev.organ_metrics(np.zeros((3, 4, 4, 4)), a, {1: "liver"}, ISO)  # one-hot is refused


# ---------------------------------------------------------------------------------------------------------------
# HD95 in millimetres


def _sphere(shape, spacing, radius_mm):
    """A ball that is round in millimetres (so it spans more voxels along the fine axes)."""
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    centre = [(n // 2) * s for n, s in zip(shape, spacing)]
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius_mm**2


SPACING = (0.8, 1.5, 3.0)
SHAPE = (48, 32, 24)


@pytest.mark.parametrize(("axis", "k"), [(2, 2), (0, 2)])
def test_hd95_of_shifted_sphere_equals_shift_in_mm(axis, k):
    """Ball of radius 12 mm shifted by k voxels along one axis: HD95 = k * spacing[axis].

    Why exactly (not ~0.95 of it): every surface voxel of the shifted ball is a surface voxel of the original one
    translated by t, so no surface distance exceeds |t|; and the voxelised ball has flat caps (about 15 % of its surface
    voxels for axis 2, 13 % for axis 0) that sit exactly |t| from the other surface, so the 95th percentile
    lands on the maximum. A smooth, finely sampled ball would give a bit less than |t| (see the next test).
    The axis-0 case also proves the spacing is applied in array-axis order (1.6 mm, not 6 mm).
    """
    ball = _sphere(SHAPE, SPACING, 12.0)
    shifted = np.roll(ball, k, axis=axis)
    assert not ball[[0, -1]].any() and not shifted[..., [0, -1]].any()  # the roll did not wrap around
    truth = ball.astype(np.uint8)
    pred = shifted.astype(np.uint8)
    df = ev.organ_metrics(pred, truth, {1: "liver"}, SPACING)
    assert df.loc[0, "hd95_mm"] == pytest.approx(k * SPACING[axis], rel=1e-3)


def test_hausdorff_max_is_the_shift_and_hd95_is_monai_definition():
    """Larger shift (5 slices = 15 mm): the plain Hausdorff distance is still exactly the shift (argument above),
    and HD95 equals an independent brute-force reading of MONAI's definition: surface = mask XOR erosion,
    distances between voxel centres in mm, max of the two directed 95th percentiles."""
    from scipy.ndimage import binary_erosion
    from scipy.spatial import cKDTree

    ball = _sphere(SHAPE, SPACING, 12.0)
    shifted = np.roll(ball, 5, axis=2)
    assert ev.hausdorff_mm(shifted, ball, SPACING, percentile=None) == pytest.approx(15.0, rel=1e-6)

    scale = np.asarray(SPACING)
    sa = np.argwhere(ball ^ binary_erosion(ball)) * scale
    sb = np.argwhere(shifted ^ binary_erosion(shifted)) * scale
    d_ab = cKDTree(sb).query(sa)[0]
    d_ba = cKDTree(sa).query(sb)[0]
    expected = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    got = ev.hausdorff_mm(shifted, ball, SPACING)
    assert got == pytest.approx(expected, rel=1e-5)
    assert got <= 15.0 + 1e-6


# ---------------------------------------------------------------------------------------------------------------
# absent organs


def test_absent_organ_excluded_and_one_sided_organ_counts_zero():
    truth = np.zeros((12, 12, 12), dtype=np.int64)
    pred = np.zeros_like(truth)
    truth[0:4, 0:4, 0:4] = 1  # liver: 64 voxels
    pred[0:4, 0:4, 0:2] = 1  # 32 voxels inside -> Dice 2*32/96 = 2/3
    truth[6:9, 6:9, 6:9] = 2  # spleen only in truth (missed) -> 0
    pred[9:12, 0:3, 9:12] = 3  # kidney only in prediction (hallucinated) -> 0
    # gallbladder (4) in neither -> undefined, excluded
    df = ev.organ_metrics(pred, truth, LABELS, ISO).set_index("organ")

    assert list(df.index) == ["liver", "spleen", "kidney", "gallbladder"]  # background skipped
    assert df.loc["liver", "dice"] == pytest.approx(2 / 3, abs=1e-6)
    assert df.loc["spleen", "dice"] == 0.0 and df.loc["kidney", "dice"] == 0.0
    assert math.isnan(df.loc["gallbladder", "dice"])
    assert df.loc["liver", "hd95_mm"] == pytest.approx(2.0, abs=1e-6)  # top face of the cube is 2 slices off
    assert df[["hd95_mm"]].loc[["spleen", "kidney", "gallbladder"]].isna().all().all()  # undefined -> NaN
    assert df["in_truth"].tolist() == [True, True, False, False]
    assert df["in_pred"].tolist() == [True, False, True, False]
    assert ev.mean_dice(df) == pytest.approx((2 / 3 + 0 + 0) / 3, abs=1e-6)  # 3 organs, not 4


def test_mean_dice_nan_when_no_organ_defined():
    empty = np.zeros((5, 5, 5), dtype=np.uint8)
    df = ev.organ_metrics(empty, empty, LABELS, ISO)
    assert df["dice"].isna().all()
    assert math.isnan(ev.mean_dice(df))


# ---------------------------------------------------------------------------------------------------------------
# paired tests


def _per_case(base_means, isl_means, extra_isl_case=False):
    """Two organs per case: liver carries the signal, spleen is identical (so the organ average is (liver+0.8)/2),
    gallbladder is NaN (absent) and must not disturb the average."""
    rows = []
    for i, (b, m) in enumerate(zip(base_means, isl_means)):
        for method, v in (("baseline", b), ("isl", m)):
            rows.append({"case": f"c{i:02d}", "method": method, "organ": "liver", "dice": 2 * v - 0.8, "hd95_mm": 3.0})
            rows.append({"case": f"c{i:02d}", "method": method, "organ": "spleen", "dice": 0.8, "hd95_mm": 1.0})
            rows.append(
                {"case": f"c{i:02d}", "method": method, "organ": "gallbladder", "dice": np.nan, "hd95_mm": np.nan}
            )
    if extra_isl_case:  # a case only one method has: must be left out of the pairing
        rows.append({"case": "zz", "method": "isl", "organ": "liver", "dice": 0.1, "hd95_mm": 9.0})
    return pd.DataFrame(rows)


BASE = np.array([0.70, 0.72, 0.65, 0.80, 0.75, 0.60, 0.68, 0.71])
DIFF = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08])  # all positive, distinct magnitudes


def test_paired_tests_known_sample():
    res = ev.paired_tests(_per_case(BASE, BASE + DIFF), "isl", "baseline")
    assert res["n_cases"] == 8
    assert res["test"] == "wilcoxon"
    assert res["delta_mean_dice"] == pytest.approx(0.045, abs=1e-9)  # (0.01 + ... + 0.08) / 8
    # exact two-sided signed-rank test, all 8 differences positive: p = 2 / 2**8
    assert res["p_value"] == pytest.approx(2 / 2**8, rel=1e-9)
    assert res["p_value"] == pytest.approx(wilcoxon(BASE + DIFF, BASE).pvalue, rel=1e-9)
    assert res["t_p_value"] == pytest.approx(ttest_rel(BASE + DIFF, BASE).pvalue, rel=1e-6)


def test_paired_tests_pair_by_case_id_when_shuffled():
    rng = np.random.default_rng(0)
    isl = BASE + np.array([0.03, -0.01, 0.05, 0.02, -0.02, 0.04, 0.01, 0.06])
    df = _per_case(BASE, isl, extra_isl_case=True)
    shuffled = df.iloc[rng.permutation(len(df))].reset_index(drop=True)
    res = ev.paired_tests(shuffled, "isl", "baseline")
    assert res["n_cases"] == 8  # "zz" has no baseline partner
    assert res["delta_mean_dice"] == pytest.approx(np.mean(isl - BASE), abs=1e-9)
    assert res["p_value"] == pytest.approx(wilcoxon(isl, BASE).pvalue, rel=1e-9)
    assert res["t_p_value"] == pytest.approx(ttest_rel(isl, BASE).pvalue, rel=1e-6)
    # a wrong pairing (e.g. by row order after the shuffle) would give another delta/p; check it is not order-bound
    assert ev.paired_tests(df, "isl", "baseline")["p_value"] == pytest.approx(res["p_value"], rel=1e-12)


def test_paired_tests_degenerate_samples_do_not_crash():
    same = ev.paired_tests(_per_case(BASE, BASE), "isl", "baseline")
    assert same["delta_mean_dice"] == pytest.approx(0.0, abs=1e-12)
    assert same["p_value"] == 1.0 and same["t_p_value"] == 1.0  # identical on every case

    one = ev.paired_tests(_per_case(BASE[:1], BASE[:1] + 0.1), "isl", "baseline")
    assert one["n_cases"] == 1
    assert one["delta_mean_dice"] == pytest.approx(0.1, abs=1e-9)
    assert math.isnan(one["p_value"]) and math.isnan(one["t_p_value"])  # nothing to test with one pair

    with pytest.raises(ValueError, match="not in per_case"):
        ev.paired_tests(_per_case(BASE, BASE), "malf", "baseline")


def test_paired_tests_table_one_row_per_other_method():
    df = _per_case(BASE, BASE + DIFF)
    malf = df[df["method"] == "baseline"].assign(method="malf")
    malf.loc[malf["organ"] == "liver", "dice"] -= 0.02  # organ average drops by 0.01 in every case
    table = ev.paired_tests_table(pd.concat([df, malf]), reference="baseline")
    assert list(table["method"]) == ["isl", "malf"]
    assert table.set_index("method").loc["malf", "delta_mean_dice"] == pytest.approx(-0.01, abs=1e-9)
    assert table.set_index("method").loc["isl", "n_cases"] == 8


# ---------------------------------------------------------------------------------------------------------------
# summary and output


def test_summarize_ignores_nan_per_organ():
    df = pd.DataFrame(
        [
            {"case": "a", "method": "isl", "organ": "liver", "dice": 0.9},
            {"case": "a", "method": "isl", "organ": "gallbladder", "dice": np.nan},  # absent in case a
            {"case": "b", "method": "isl", "organ": "liver", "dice": 0.7},
            {"case": "b", "method": "isl", "organ": "gallbladder", "dice": 0.3},
            {"case": "a", "method": "baseline", "organ": "liver", "dice": 0.5},
            {"case": "a", "method": "baseline", "organ": "gallbladder", "dice": np.nan},
        ]
    )
    s = ev.summarize(df)
    assert list(s) == ["isl", "baseline"]
    assert s["isl"]["per_organ_dice"]["liver"] == pytest.approx(0.8)
    assert s["isl"]["per_organ_dice"]["gallbladder"] == pytest.approx(0.3)  # NaN of case a ignored, not 0
    # case a averages 0.9 (one organ defined), case b (0.7 + 0.3) / 2 = 0.5 -> mean 0.7
    assert s["isl"]["mean_dice"] == pytest.approx(0.7)
    assert s["isl"]["n_cases"] == 2
    assert math.isnan(s["baseline"]["per_organ_dice"]["gallbladder"])
    assert "mean_hd95_mm" not in s["isl"]  # no hd95 column, no hd95 summary
    safe = json.loads(json.dumps(runtime.json_safe(s), allow_nan=False))
    assert safe["baseline"]["per_organ_dice"]["gallbladder"] is None


def test_duplicate_rows_are_refused():
    df = _per_case(BASE[:2], BASE[:2])
    with pytest.raises(ValueError, match="duplicate"):
        ev.summarize(pd.concat([df, df.iloc[:1]]))


def test_seeds_are_averaged_per_case_after_the_organ_average():
    rows = []
    # case a, seed 0: liver 0.9, gallbladder undefined (organ average 0.9); seed 1: liver 0.7, gallbladder 0.3
    for seed, liver, gb in ((0, 0.9, np.nan), (1, 0.7, 0.3)):
        rows += [{"case": "a", "method": "isl", "organ": "liver", "dice": liver, "seed": seed},
                 {"case": "a", "method": "isl", "organ": "gallbladder", "dice": gb, "seed": seed},
                 {"case": "b", "method": "isl", "organ": "liver", "dice": 0.6, "seed": seed},
                 {"case": "b", "method": "isl", "organ": "gallbladder", "dice": 0.4, "seed": seed}]
    df = pd.DataFrame(rows)
    means = ev.case_means(df).set_index("case")["dice"]
    assert means["a"] == pytest.approx((0.9 + 0.5) / 2)  # per seed first: not (0.9 + 0.7 + 0.3) / 3
    assert means["b"] == pytest.approx(0.5)
    s = ev.summarize(df)["isl"]
    assert s["mean_dice"] == pytest.approx((0.7 + 0.5) / 2) and s["n_cases"] == 2
    assert s["per_organ_dice"]["liver"] == pytest.approx((0.8 + 0.6) / 2)  # case a's seeds first: 0.8
    assert s["per_organ_dice"]["gallbladder"] == pytest.approx((0.3 + 0.4) / 2)
    one = df[df["seed"] == 1]
    assert ev.summarize(one) == ev.summarize(one.drop(columns="seed"))  # one seed: as without the column
    with pytest.raises(ValueError, match="duplicate"):
        ev.summarize(pd.concat([df, df.iloc[:1]]))


def test_grid_dice_scores_the_argmax_of_the_probabilities_against_the_grid_label():
    grid_label = torch.zeros((1, 6, 6, 4))
    grid_label[0, 0:4, 0:3, :] = 1  # liver: 12 voxels a slice
    grid_label[0, 4:6, 4:6, :] = 2  # spleen
    probs = torch.zeros((5, 6, 6, 4))
    probs[0] = 0.5
    probs[1, 0:4, 0:2, :] = 0.9  # liver predicted on 8 of its 12 voxels a slice, nothing outside
    probs[2, 4:6, 4:6, :] = 0.9  # spleen exact
    rows = pd.DataFrame({"case": "c", "method": "m", "organ": ["liver", "spleen", "kidney", "gallbladder"],
                         "dice": [0.1, 0.2, np.nan, np.nan]})
    out = ev.with_grid_dice(rows, probs, grid_label, LABELS)
    assert out["dice"].tolist()[:2] == [0.1, 0.2]  # the source-geometry column is left alone
    assert out["dice_grid"].tolist()[:2] == pytest.approx([2 * 8 / (8 + 12), 1.0])
    assert out["dice_grid"][2:].isna().all()  # absent from both: undefined, as in the source scoring


def test_write_csv_atomic_roundtrip(tmp_path: Path):
    truth = np.zeros((6, 6, 6), dtype=np.uint8)
    truth[1:3, 1:3, 1:3] = 1
    df = ev.evaluate_case(truth, truth, LABELS, ISO, case="c01", method="baseline")
    assert list(df.columns) == ev.PER_CASE_COLUMNS
    out = tmp_path / "res" / "per_case.csv"
    runtime.write_csv(df, out)
    back = pd.read_csv(out)
    assert back["dice"].tolist()[0] == pytest.approx(1.0)
    assert back["dice"].isna().sum() == 3  # the three absent organs stay NaN, not 0
    assert "NaN" in out.read_text()

    class Broken(pd.DataFrame):
        def to_csv(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError):
        runtime.write_csv(Broken(df), out)
    pd.testing.assert_frame_equal(pd.read_csv(out), back)  # old result intact
    assert sorted(p.name for p in out.parent.iterdir()) == ["per_case.csv"]  # no temporary file left behind
