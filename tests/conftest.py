"""Shared fixtures: small synthetic cohorts written once per test session."""

from __future__ import annotations

import os

import pytest
from helpers import TINY_SIZE

# Two cores: one torch thread per test process keeps heavy tests from fighting over the cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")

SMALL_SIZE = (64, 64, 40)


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """4 training + 2 shifted validation phantoms at 64x64x40 (6x6x8 mm voxels)."""
    from isl_core.phantoms import CohortSpec, write_cohort

    out = tmp_path_factory.mktemp("cohort") / "small"
    return write_cohort(out, CohortSpec(n_train=4, n_val=2, n_test=1, size=SMALL_SIZE, seed=7))



@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """2 training, 1 validation, 1 test case at 32x32x24: enough for every input check, written in about a second."""
    from isl_core.phantoms import CohortSpec, write_cohort

    return write_cohort(tmp_path_factory.mktemp("tiny") / "ds", CohortSpec(n_train=2, n_val=1, n_test=1,
                                                                           size=TINY_SIZE, seed=3))


@pytest.fixture(scope="session")
def tiny_run(tiny_cohort, tmp_path_factory):
    """A run folder as `isl train` writes it, trained for one step (its numbers do not matter)."""
    from isl_core.config import get_profile
    from isl_core.data import dataset_fingerprint, load_cases, load_dataset
    from isl_core.outputs import claim
    from isl_core.segment import train_segmenter

    ds = load_dataset(tiny_cohort)
    profile = get_profile("ci", segment={"max_steps": 1})
    run = tmp_path_factory.mktemp("tiny") / "run"
    with claim(run):  # as `isl train` does: the folder's manifest lists what was written
        train_segmenter(load_cases(ds.training, profile.data), profile, ds.num_classes, ds.labels, out=run,
                        device="cpu", progress=False, dataset_fingerprint=dataset_fingerprint(ds))
    return run
