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


@pytest.mark.parametrize("force", [False, True])
def test_existing_folder_is_never_overwritten(tmp_path, force):
    from isl_core.outputs import OutputFolderError

    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(OutputFolderError, match=f"{tmp_path / 'mine.txt'}: the kit did not write"):
        write_cohort(tmp_path, CohortSpec(n_train=1, n_val=0, size=(24, 24, 16)), force=force)
    assert (tmp_path / "mine.txt").read_text() == "user data" and sorted(tmp_path.iterdir()) == [tmp_path / "mine.txt"]


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


def test_default_cohort_fingerprint_is_unchanged_by_the_new_knobs():
    from isl_core.phantoms import CohortSpec, Variation

    # cohorts written before the anatomy knobs existed must still be recognised (no forced regeneration)
    assert CohortSpec().fingerprint() == "0159a99eb596c2f8"
    assert CohortSpec(variation=Variation(elastic_mm=20.0)).fingerprint() != CohortSpec().fingerprint()


def _organ_centres(variation, n=6):
    import numpy as np

    from isl_core.phantoms import draw_subject

    centres = []
    for i in range(n):
        lab = draw_subject(np.random.default_rng(i), (48, 48, 32), None, variation)["label"]
        centres.append([np.argwhere(lab == k).mean(0) for k in (1, 2, 6, 11)])  # spleen, kidney, liver, pancreas
    return np.asarray(centres)  # (subjects, organs, 3) in voxels


def test_inter_patient_variation_moves_organs_more_than_the_default():
    from isl_core.phantoms import VARIATIONS

    spread = {name: float(_organ_centres(VARIATIONS[name]).std(0).mean()) for name in ("default", "inter-patient")}
    assert spread["inter-patient"] > 1.3 * spread["default"], spread


def test_sample_anatomy_cohort_deforms_the_template_and_shifts_its_protocol(tmp_path):
    import nibabel as nib
    import numpy as np

    from isl_core.data import load_dataset
    from isl_core.phantoms import CohortSpec, Variation, write_cohort

    # a one-case folder stands in for `isl data fetch sample` (the real CT needs the network)
    template = write_cohort(tmp_path / "template", CohortSpec(n_train=1, n_val=0, size=(48, 48, 32), seed=3))
    spec = CohortSpec(n_train=2, n_val=2, seed=1, anatomy="sample", sample_dir=str(template),
                      variation=Variation(elastic_mm=15.0))
    ds = load_dataset(write_cohort(tmp_path / "cohort", spec))
    tpl = np.asarray(nib.load(str(load_dataset(template).training[0].label)).dataobj)
    labels = [np.asarray(nib.load(str(c.label)).dataobj) for c in ds.training + ds.validation]
    assert all(lab.shape == tpl.shape and not np.array_equal(lab, tpl) for lab in labels)  # deformed
    assert all(set(np.unique(lab)) <= set(np.unique(tpl)) for lab in labels)  # no new label ids
    overlap = [np.mean((lab == 6) == (tpl == 6)) for lab in labels]
    assert min(overlap) > 0.8  # still the same anatomy

    def kidney_hu(case):
        image = nib.load(str(case.image)).get_fdata()
        return float(image[np.asarray(nib.load(str(case.label)).dataobj) == 2].mean())

    # training subjects carry venous enhancement, shifted inference subjects lose it
    assert min(kidney_hu(c) for c in ds.training) > max(kidney_hu(c) for c in ds.validation) + 40
    assert "sample anatomy" in ds.meta["name"]
