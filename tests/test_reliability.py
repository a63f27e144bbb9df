"""Nothing lost, nothing stale: regression tests of the reliability promises of the `isl` command and the data
boundary (orientation in evaluate, run folders bound to their settings, prediction folders bound to their model,
resumable synth, file permissions, resource caps, dataset paths)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from isl_core import cli
from isl_core.config import get_profile
from isl_core.data import DatasetError, dataset_fingerprint, load_case, load_dataset
from isl_core.evaluate import evaluate_predictions, organ_metrics
from isl_core.runtime import write_json


@pytest.fixture
def ds_copy(tiny_cohort, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_cohort, tmp_path / "ds", copy_function=shutil.copy2))


# ------------------------------------------------------------------------------------ evaluate in world space
def _label(ds: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    img = nib.load(str(ds / "labelsTr" / "synth_val_000.nii.gz"))
    return img, np.asarray(img.dataobj).astype(np.int64)


@pytest.mark.parametrize("codes", [("L", "A", "S"), ("A", "R", "S"), ("S", "L", "P")])
def test_evaluate_compares_a_reoriented_prediction_in_world_space(ds_copy, tmp_path, codes):
    """A perfect prediction stored in another orientation is the same map in world space: Dice 1, not the
    voxel-by-voxel score of mirrored anatomy that `isl evaluate` used to report."""
    from nibabel import orientations as ornt

    img, truth = _label(ds_copy)
    transform = ornt.ornt_transform(ornt.io_orientation(img.affine), ornt.axcodes2ornt(codes))
    moved = ornt.apply_orientation(truth, transform).astype(np.uint8)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    nib.save(nib.Nifti1Image(moved, img.affine @ ornt.inv_ornt_aff(transform, truth.shape)),
             str(pred_dir / "synth_val_000.nii.gz"))
    ds = load_dataset(ds_copy)
    spacing = img.header.get_zooms()[:3]
    if moved.shape == truth.shape:  # the old voxel-by-voxel comparison: the failure this test guards against
        naive = organ_metrics(moved, truth, ds.labels, spacing, hd95=False)["dice"].mean()
        assert naive < 0.9
    table = evaluate_predictions(pred_dir, ds.validation, ds.labels, "flipped", hd95=False)
    present = table[table["in_truth"]]
    assert len(present) >= 5 and (present["dice"] == 1.0).all()


def test_evaluate_refuses_a_prediction_on_another_grid_naming_both_files(ds_copy, tmp_path):
    img, truth = _label(ds_copy)
    shifted = img.affine.copy()
    shifted[0, 3] += 7.0  # same orientation, another origin: not the same map in world space
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    nib.save(nib.Nifti1Image(truth.astype(np.uint8), shifted), str(pred_dir / "synth_val_000.nii.gz"))
    ds = load_dataset(ds_copy)
    with pytest.raises(DatasetError) as err:
        evaluate_predictions(pred_dir, ds.validation, ds.labels, "shifted")
    assert "pred/synth_val_000.nii.gz" in str(err.value) and "labelsTr/synth_val_000.nii.gz" in str(err.value)


# ------------------------------------------------------------------------------------ run folders are bound
def _config(run: Path) -> tuple[bytes, int]:
    path = run / "config.json"
    return path.read_bytes(), path.stat().st_mtime_ns


def test_train_refuses_a_run_folder_of_another_profile_before_writing(tiny_cohort, tiny_run, tmp_path, capsys):
    """Used to overwrite config.json with the new profile and then fail on a size mismatch."""
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    before = _config(run)
    rc = cli.main(["train", str(tiny_cohort), "--out", str(run), "--profile", "quick"])
    err = capsys.readouterr().err
    assert rc == 2 and "config.json" in err and "profile" in err, err
    assert _config(run) == before


def test_train_refuses_another_seed_or_dataset(tiny_cohort, tiny_run, tmp_path):
    from isl_core.segment import RunMismatchError, check_run_binding

    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    before = _config(run)
    profile = get_profile("ci", segment={"max_steps": 1})
    ds = load_dataset(tiny_cohort)
    check_run_binding(run, profile, ds.num_classes, 0, dataset_fingerprint(ds))  # its own settings: accepted
    with pytest.raises(RunMismatchError, match="seed"):
        check_run_binding(run, profile, ds.num_classes, 1, dataset_fingerprint(ds))
    # the same dataset path, regenerated (here: one file rewritten) is another dataset
    other = Path(shutil.copytree(tiny_cohort, tmp_path / "ds2", copy_function=shutil.copy2))
    label = other / "labelsTr" / "synth_train_000.nii.gz"
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    assert dataset_fingerprint(load_dataset(other)) != dataset_fingerprint(ds)
    with pytest.raises(RunMismatchError, match="dataset_fingerprint"):
        check_run_binding(run, profile, ds.num_classes, 0, dataset_fingerprint(load_dataset(other)))
    assert _config(run) == before


def test_dataset_fingerprint_survives_a_copy_and_sees_a_change(tiny_cohort, tmp_path):
    copy = Path(shutil.copytree(tiny_cohort, tmp_path / "copy", copy_function=shutil.copy2))
    assert dataset_fingerprint(load_dataset(copy)) == dataset_fingerprint(load_dataset(tiny_cohort))
    doc = json.loads((copy / "dataset.json").read_text())
    doc["validation"] = []
    (copy / "dataset.json").write_text(json.dumps(doc))
    assert dataset_fingerprint(load_dataset(copy)) != dataset_fingerprint(load_dataset(tiny_cohort))


# ------------------------------------------------------------------------------------ predictions are bound
def test_predict_never_passes_another_models_predictions_as_its_own(tiny_cohort, tiny_run, tmp_path, capsys):
    from isl_core.segment import model_fingerprint

    img = str(tiny_cohort / "imagesTr" / "synth_val_000.nii.gz")
    out = tmp_path / "pred"
    assert cli.main(["predict", str(tiny_run), img, "--out", str(out)]) == 0
    first = (out / "synth_val_000.nii.gz").read_bytes()
    assert cli.main(["predict", str(tiny_run), img, "--out", str(out)]) == 0  # same model: resumes (skips)
    assert "skip" in capsys.readouterr().out
    copy = Path(shutil.copytree(tiny_run, tmp_path / "copy"))
    assert model_fingerprint(copy) == model_fingerprint(tiny_run)  # by content, not by path
    assert cli.main(["predict", str(copy), img, "--out", str(out)]) == 0
    other = Path(shutil.copytree(tiny_run, tmp_path / "other"))
    state = torch.load(other / "model.pt", weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, other / "model.pt")
    capsys.readouterr()
    assert cli.main(["predict", str(other), img, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "another model" in err and str(out) in err
    assert (out / "synth_val_000.nii.gz").read_bytes() == first
    assert cli.main(["predict", str(other), img, "--out", str(out), "--force"]) == 0
    stamp = json.loads((out / "isl_predictions.json").read_text())
    assert stamp["model_fingerprint"] == model_fingerprint(other)


# ------------------------------------------------------------------------------------ synth resumes
def test_interrupted_synth_resumes_to_the_same_cohort(tmp_path, monkeypatch, capsys):
    from isl_core import data

    argv = ["data", "synth", "", "--size", "16", "16", "12", "--n-train", "2", "--n-val", "2", "--no-figure"]
    whole = tmp_path / "whole"
    assert cli.main([*argv[:2], str(whole), *argv[3:]]) == 0
    real, calls = data.write_nifti, []

    def killed_after_five(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "write_nifti", killed_after_five)
    part = tmp_path / "part"
    assert cli.main([*argv[:2], str(part), *argv[3:]]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert not (part / "dataset.json").exists() and not (part / "phantom_spec.json").exists()
    monkeypatch.setattr(data, "write_nifti", real)
    calls.clear()
    assert cli.main([*argv[:2], str(part), *argv[3:]]) == 0
    for f in sorted(whole.rglob("*.nii.gz")):
        a, b = nib.load(str(f)), nib.load(str(part / f.relative_to(whole)))
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)), f
    assert json.loads((part / "phantom_spec.json").read_text()) == json.loads((whole / "phantom_spec.json").read_text())
    assert not (part / "phantom_spec.partial.json").exists()
    # an interrupted cohort of other settings is not silently mixed with this one
    (part / "phantom_spec.json").unlink()
    write_json(part / "phantom_spec.partial.json", {"fingerprint": "other"})  # as a run of other settings wrote it
    assert cli.main([*argv[:2], str(part), *argv[3:]]) == 2
    assert "interrupted cohort of other settings" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ permissions, caps, paths
def test_written_files_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644


def test_forged_header_fails_before_reading_voxels(ds_copy):
    import gzip

    path = ds_copy / "imagesTr" / "synth_train_000.nii.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[40:56] = np.array([3, 1000, 1000, 1000, 1, 1, 1, 1], dtype="<i2").tobytes()
    path.write_bytes(gzip.compress(bytes(raw)))
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match="synth_train_000.nii.gz: the header declares shape"):
            load_dataset(ds_copy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20, peak  # the 4 GB volume was never allocated


def test_label_id_cap_is_clear_and_configurable(ds_copy, monkeypatch):
    doc = json.loads((ds_copy / "dataset.json").read_text())
    doc["labels"]["100000"] = "stray"
    (ds_copy / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="label id 100000 is outside 0..255"):
        load_dataset(ds_copy, validate=False)
    monkeypatch.setenv("ISL_MAX_LABEL_ID", "100000")
    assert load_dataset(ds_copy, validate=False).num_classes == 100001


def test_paths_outside_the_dataset_folder_need_permission(ds_copy, monkeypatch):
    outside = ds_copy.parent / "elsewhere"
    outside.mkdir()
    shutil.move(ds_copy / "imagesTr" / "synth_train_000.nii.gz", outside / "synth_train_000.nii.gz")
    doc = json.loads((ds_copy / "dataset.json").read_text())
    doc["training"][0]["image"] = "../elsewhere/synth_train_000.nii.gz"
    (ds_copy / "dataset.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="leads outside the dataset folder"):
        load_dataset(ds_copy)
    assert load_dataset(ds_copy, allow_outside=True).training[0].image == outside / "synth_train_000.nii.gz"
    monkeypatch.setenv("ISL_ALLOW_EXTERNAL_PATHS", "1")
    assert len(load_dataset(ds_copy).training) == 2


# ------------------------------------------------------------------------------------ one home per behaviour
def test_load_case_returns_plain_tensors_and_the_affine(tiny_cohort):
    ds = load_dataset(tiny_cohort)
    case = load_case(ds.validation[0], get_profile("ci").data)
    assert type(case["image"]) is torch.Tensor and type(case["label"]) is torch.Tensor
    assert case["affine"].shape == (4, 4) and case["affine"].dtype == torch.float64


def test_validation_dice_follows_the_results_rules():
    """A hallucinated organ scores 0 (MONAI's ignore_empty would drop it), an organ absent from both is left out."""
    from isl_core.evaluate import mean_dice
    from isl_core.segment import validation_dice

    cfg = get_profile("ci").segment
    truth = torch.zeros(1, *cfg.patch_size)
    truth[0, 5:20, 5:20, 5:15] = 1
    pred = truth[0].clone().long()
    pred[30:40, 30:40, 20:30] = 2  # organ 2 exists only in the prediction

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(pred, 4).permute(3, 0, 1, 2)[None].float().expand(len(x), -1, -1,
                                                                                                  -1, -1) * 10

    got = validation_dice(Fixed(), [{"image": torch.zeros(1, *cfg.patch_size), "label": truth}], cfg, 4, "cpu")
    expected = mean_dice(organ_metrics(pred.numpy(), truth[0].long().numpy(), {1: "a", 2: "b", 3: "c"},
                                       (1.0, 1.0, 1.0), hd95=False))
    assert got == pytest.approx(0.5) and got == pytest.approx(expected)
