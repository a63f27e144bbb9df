import json

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from isl_core.config import BTCV_LABELS
from isl_core.phantoms import CohortSpec, ShiftSpec, draw_subject, write_cohort


def test_cohort_is_a_decathlon_dataset(small_cohort):
    doc = json.loads((small_cohort / "dataset.json").read_text())
    assert {int(k): v for k, v in doc["labels"].items()} == BTCV_LABELS
    train = load_decathlon_datalist(str(small_cohort / "dataset.json"), True, "training")
    val = load_decathlon_datalist(str(small_cohort / "dataset.json"), True, "validation")
    assert len(train) == 4 and len(val) == 2
    for item in train + val:
        img, lab = nib.load(item["image"]), nib.load(item["label"])
        assert img.shape == lab.shape == (64, 64, 40)
        assert np.allclose(img.affine, lab.affine)
    assert (small_cohort / "deformations" / "synth_train_000.npz").is_file()


def test_subject_has_the_abdominal_organs_with_ct_values():
    subj = draw_subject(np.random.default_rng(3), (64, 64, 40), None)
    present = set(np.unique(subj["label"]).tolist())
    assert present >= {0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13} - {4}
    image, label = subj["image"], subj["label"]
    assert image.min() < -900  # air around the body
    assert 60 < np.median(image[label == 6]) < 170  # liver in the venous phase
    assert np.median(image[label == 8]) > np.median(image[label == 11])  # contrast-filled aorta vs pancreas


def test_domain_shift_changes_contrast_and_noise():
    rng = np.random.default_rng
    plain = draw_subject(rng(5), (64, 64, 40), None)
    shifted = draw_subject(rng(5), (64, 64, 40), ShiftSpec.scaled(1.0))
    liver_plain = np.median(plain["image"][plain["label"] == 6])
    liver_shift = np.median(shifted["image"][shifted["label"] == 6])
    assert liver_plain - liver_shift > 30  # non-contrast liver is darker
    air = (slice(0, 4), slice(0, 4), slice(None))
    assert shifted["image"][air].std() > 1.5 * plain["image"][air].std()


def test_same_seed_same_cohort(tmp_path):
    spec = CohortSpec(n_train=1, n_val=1, size=(32, 32, 24), seed=11)
    a = write_cohort(tmp_path / "a", spec)
    b = write_cohort(tmp_path / "b", spec)
    c = write_cohort(tmp_path / "c", CohortSpec(n_train=1, n_val=1, size=(32, 32, 24), seed=12))
    name = "imagesTr/synth_val_000.nii.gz"
    assert np.array_equal(nib.load(a / name).get_fdata(), nib.load(b / name).get_fdata())
    assert not np.array_equal(nib.load(a / name).get_fdata(), nib.load(c / name).get_fdata())


def test_existing_folder_is_never_overwritten(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    try:
        write_cohort(tmp_path, CohortSpec(n_train=1, n_val=0, size=(24, 24, 16)))
    except FileExistsError as e:
        assert str(tmp_path) in str(e) and "--force" in str(e)
    else:
        raise AssertionError("an existing folder was overwritten")
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_organs_lie_on_the_anatomical_side_of_the_ras_affine():
    # RAS: world +x is the patient's right, where the liver, the right kidney and the IVC belong
    subj = draw_subject(np.random.default_rng(7), (64, 64, 40), None)
    idx = np.indices(subj["label"].shape).reshape(3, -1)
    world_x = (subj["affine"][:3, :3] @ idx + subj["affine"][:3, 3:])[0]
    flat = subj["label"].reshape(-1)

    def mean_x(label: int) -> float:
        return float(world_x[flat == label].mean())

    for right, left in ((6, 1), (2, 3), (12, 13), (9, 8)):  # liver/spleen, kidneys, adrenals, IVC/aorta
        assert mean_x(right) > 0 > mean_x(left), (BTCV_LABELS[right], BTCV_LABELS[left])


@pytest.mark.parametrize("field, value", [("n_train", 0), ("n_val", -1), ("shift", float("nan")), ("size", (0, 8, 8)),
                                          ("size", (8, 8))])
def test_cohort_spec_refuses_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"CohortSpec.{field}"):
        CohortSpec(**{field: value})
