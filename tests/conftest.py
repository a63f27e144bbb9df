"""Shared fixtures: small synthetic cohorts written once per test session."""

from __future__ import annotations

import os

import pytest

# Two cores: one torch thread per test process keeps heavy tests from fighting over the cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")

SMALL_SIZE = (64, 64, 40)


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """4 training + 2 shifted validation phantoms at 64x64x40 (6x6x8 mm voxels)."""
    from isl_core.phantoms import CohortSpec, write_cohort

    out = tmp_path_factory.mktemp("cohort") / "small"
    return write_cohort(out, CohortSpec(n_train=4, n_val=2, n_test=1, size=SMALL_SIZE, seed=7))
