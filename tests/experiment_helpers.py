"""A tiny cohort and a tiny profile for the experiment tests (folds, claims, Dask): seconds per case on 2 cores."""

from __future__ import annotations

from pathlib import Path

from isl_core.config import Profile, get_profile

TINY_METHODS = ["baseline", "malf", "isl-mask-ema"]


def tiny_cohort(path: Path, seed: int = 3) -> Path:
    """6 labelled phantoms at 32x32x24 (4 training, 2 validation): 2 folds of 3 cases."""
    from isl_core.phantoms import CohortSpec, write_cohort

    return write_cohort(path, CohortSpec(n_train=4, n_val=2, n_test=0, size=(32, 32, 24), seed=seed))


def tiny_profile() -> Profile:
    """The ci profile cut to a few steps: every stage runs (mask supervision in round 2), the numbers mean nothing."""
    return get_profile("ci", segment={"max_steps": 4, "val_every": 4, "checkpoint_every": 4},
                       register={"iterations": 3, "warm_start_iterations": 2},
                       refine={"finetune_steps": 1, "ema_every": 1})
