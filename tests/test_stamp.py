"""The settings stamp: what it holds, when two stamps are the same, and how a difference is named."""

from __future__ import annotations

import json
import shutil

import pytest

from isl_core.config import get_profile
from isl_core.data import dataset_fingerprint, load_dataset
from isl_core.runtime import differences
from isl_core.segment import RunMismatchError, check_run_binding
from isl_core.stamp import TRAINED_HERE, make_stamp, stamp_id


def test_stamp_holds_what_results_depend_on_and_survives_a_round_trip(tiny_cohort, tiny_run, tmp_path):
    ds = load_dataset(tiny_cohort)
    stamp = make_stamp(ds, get_profile("ci"), 3, None, None, 7)
    assert stamp["model"] == TRAINED_HERE and stamp["seed"] == 3 and stamp["profile"]["name"] == "ci"
    assert stamp["folds"] is None and stamp["fold_seed"] is None  # no folds: the fold seed means nothing
    assert json.loads(json.dumps(stamp)) == stamp
    assert stamp_id(stamp) == stamp_id(json.loads(json.dumps(stamp))) and len(stamp_id(stamp)) == 16
    assert make_stamp(ds, get_profile("ci"), 3, None, 4, 7)["fold_seed"] == 7
    # a model is stamped by content: a copy elsewhere is the same model
    copy = shutil.copytree(tiny_run, tmp_path / "copy")
    with_model = make_stamp(ds, get_profile("ci"), 3, str(tiny_run), None, 0)
    assert with_model["model"] == make_stamp(ds, get_profile("ci"), 3, str(copy), None, 0)["model"] != TRAINED_HERE
    assert stamp_id(with_model) != stamp_id(stamp)


def test_differences_name_each_setting_with_its_values(tiny_cohort):
    ds = load_dataset(tiny_cohort)
    old = make_stamp(ds, get_profile("ci"), 0, None, None, 0)
    new = make_stamp(ds, get_profile("ci", refine={"beta": 0.5}, segment={"lr": 0.01}), 1, None, None, 0)
    new["dataset"] = "0" * 32
    assert differences(old, old) == []
    beta, lr = old["profile"]["refine"]["beta"], old["profile"]["segment"]["lr"]
    assert differences(old, new) == ["dataset (its dataset.json or image/label files changed)",
                                     f"profile.refine.beta ({beta!r} -> 0.5)",
                                     f"profile.segment.lr ({lr!r} -> 0.01)", "seed (0 -> 1)"]
    quick = make_stamp(ds, get_profile("quick"), 0, None, None, 0)
    named = differences(old, quick)
    assert named and all(d.startswith("profile.") for d in named)
    assert not any(d.startswith("profile.name ") for d in named)  # the fields say more than the profile's name
    renamed = json.loads(json.dumps(old))
    renamed["profile"]["name"] = "mine"  # the same fields under another name: the name is the difference
    assert differences(old, renamed) == ["profile.name ('ci' -> 'mine')"]


def test_a_run_folder_names_what_differs_as_the_stamp_does(tiny_cohort, tiny_run):
    ds = load_dataset(tiny_cohort)
    profile = get_profile("ci", segment={"max_steps": 1})
    with pytest.raises(RunMismatchError, match=r"different profile\.segment\.max_steps \(1 -> 2\), seed \(0 -> 5\)"):
        check_run_binding(tiny_run, get_profile("ci", segment={"max_steps": 2}), ds.num_classes, 5,
                          dataset_fingerprint(ds))
    with pytest.raises(RunMismatchError, match=r"dataset_fingerprint \(its dataset\.json"):
        check_run_binding(tiny_run, profile, ds.num_classes, 0, "0" * 32)
