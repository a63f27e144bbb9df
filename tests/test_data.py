"""The dataset contract: validation messages name the file; preprocessing and the way back to the source grid."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from isl_core.config import DataConfig
from isl_core.data import DatasetError, load_case, load_dataset, to_source_geometry, write_prediction


@pytest.fixture
def cohort(small_cohort, tmp_path):
    """A private copy of the small cohort that a test may break."""
    dst = tmp_path / "ds"
    shutil.copytree(small_cohort, dst)
    return dst


def _edit_json(folder, fn):
    path = folder / "dataset.json"
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _raises_naming(folder, fragment, what):
    with pytest.raises(DatasetError) as err:
        load_dataset(folder)
    msg = str(err.value)
    assert fragment in msg, msg
    assert what in msg, msg
    return msg


def test_valid_cohort_loads(small_cohort):
    ds = load_dataset(small_cohort)
    assert [c.id for c in ds.training] == [f"synth_train_{i:03d}" for i in range(4)]
    assert ds.num_classes == 14 and len(ds.validation) == 2 and len(ds.test) == 1
    assert ds.test[0].label is None


def test_missing_dataset_json(tmp_path):
    with pytest.raises(DatasetError, match="dataset.json: not found"):
        load_dataset(tmp_path)


def test_missing_file(cohort):
    (cohort / "labelsTr" / "synth_train_001.nii.gz").unlink()
    _raises_naming(cohort, "labelsTr/synth_train_001.nii.gz", "not found")


def test_unreadable_file(cohort):
    path = cohort / "imagesTr" / "synth_train_002.nii.gz"
    path.write_bytes(path.read_bytes()[:500])  # a truncated download
    _raises_naming(cohort, "imagesTr/synth_train_002.nii.gz", "unreadable")


def test_shape_mismatch(cohort):
    path = cohort / "labelsTr" / "synth_train_000.nii.gz"
    lab = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj)[:, :, :-2], lab.affine), path)
    _raises_naming(cohort, "labelsTr/synth_train_000.nii.gz", "shape")


def test_affine_mismatch(cohort):
    path = cohort / "labelsTr" / "synth_val_000.nii.gz"
    lab = nib.load(path)
    affine = lab.affine.copy()
    affine[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj), affine), path)
    _raises_naming(cohort, "labelsTr/synth_val_000.nii.gz", "affine")


def test_nan_voxels(cohort):
    path = cohort / "imagesTr" / "synth_train_003.nii.gz"
    img = nib.load(path)
    data = img.get_fdata(dtype=np.float32)
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), path)
    _raises_naming(cohort, "imagesTr/synth_train_003.nii.gz", "NaN")


def test_undeclared_label(cohort):
    _edit_json(cohort, lambda d: d["labels"].pop("13"))
    _raises_naming(cohort, "labelsTr/synth_train_000.nii.gz", "not declared")


def test_declared_but_absent_label_is_fine(cohort):
    _edit_json(cohort, lambda d: d["labels"].update({"14": "duodenum"}))
    assert load_dataset(cohort).labels[14] == "duodenum"


def test_empty_training(cohort):
    _edit_json(cohort, lambda d: d.update(training=[]))
    _raises_naming(cohort, "dataset.json", "'training' list is empty")


def test_duplicated_case_id(cohort):
    _edit_json(cohort, lambda d: d["validation"].append(d["training"][0]))
    _raises_naming(cohort, "dataset.json", "synth_train_000")


def test_preprocessing_gives_the_common_grid(small_cohort):
    ds = load_dataset(small_cohort, validate=False)
    cfg = DataConfig(spacing=(8.0, 8.0, 10.0), shape=(48, 48, 32))
    case = load_case(ds.training[0], cfg)
    assert tuple(case["image"].shape) == (1, 48, 48, 32)
    assert tuple(case["label"].shape) == (1, 48, 48, 32)
    assert 0.0 <= float(case["image"].min()) and float(case["image"].max()) <= 1.0
    assert np.allclose(np.abs(np.diag(np.asarray(case["affine"]))[:3]), (8.0, 8.0, 10.0))
    assert set(torch.unique(case["label"]).tolist()) <= set(range(14))


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("flip", [False, True])
def test_prediction_back_in_source_geometry(small_cohort, tmp_path, flip):
    """A one-hot of the preprocessed label, written back, overlays the source label (also for an LPS source)."""
    ds = load_dataset(small_cohort, validate=False)
    case = ds.training[1]
    if flip:  # store the case in LPS orientation: the kit must undo it on the way back
        for src in (case.image, case.label):
            img = nib.load(src)
            lps = nib.orientations.ornt_transform(nib.io_orientation(img.affine), [[0, -1], [1, -1], [2, 1]])
            nib.save(img.as_reoriented(lps), tmp_path / src.name.replace(".nii.gz", "_lps.nii.gz"))
        case = type(case)(case.id, tmp_path / case.image.name.replace(".nii.gz", "_lps.nii.gz"),
                          tmp_path / case.label.name.replace(".nii.gz", "_lps.nii.gz"), "training")
    cfg = DataConfig(spacing=(4.0, 4.0, 5.0), shape=(96, 96, 64))  # the phantom's own grid: no resampling loss
    pre = load_case(case, cfg)
    onehot = torch.nn.functional.one_hot(pre["label"][0].long(), 14).permute(3, 0, 1, 2).float()
    back = to_source_geometry(onehot, pre)
    src = nib.load(case.label)
    truth = np.asarray(src.dataobj)
    assert back.shape == truth.shape
    for organ in (1, 6, 8):
        assert _dice(back == organ, truth == organ) > 0.97
    out = write_prediction(onehot, pre, tmp_path / "pred.nii.gz")
    written = nib.load(out)
    assert written.shape == src.shape and np.allclose(written.affine, src.affine)


def test_a_body_longer_than_the_common_grid_is_cut_with_a_warning(small_cohort):
    import warnings

    from isl_core.config import DataConfig
    from isl_core.data import load_case, load_dataset

    case = load_dataset(small_cohort).training[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the profile's own grid holds the whole body: no warning
        load_case(case, DataConfig())
    with pytest.warns(UserWarning, match=r"are cut off.*data\.shape"):
        out = load_case(case, DataConfig(shape=(48, 48, 16)))
    assert tuple(out["image"].shape[1:]) == (48, 48, 16)
