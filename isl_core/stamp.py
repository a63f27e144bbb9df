"""The settings stamp of an experiment: what its results depend on, so that nothing stale or mixed is reported.

A stamp is a plain mapping: the dataset's content (``data.dataset_fingerprint``), the model by content (or
``"trained here"`` when the experiment trains its own baseline from the stamped dataset, profile and seed), the
profile, the seed and the cross-validation protocol. ``OUT/experiment.json`` holds the folder's stamp and every
``cases/CASE.json`` the stamp it was made with; ``runtime.differences`` names which settings two stamps disagree
on, so a refusal can say what changed. The methods are not part of it: adding a method to a folder is allowed, and
a case is redone when it lacks one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from isl_core.config import Profile
from isl_core.data import Dataset, dataset_fingerprint
from isl_core.segment import model_fingerprint

TRAINED_HERE = "trained here"  # the model stamp of a baseline the experiment trains itself


def make_stamp(ds: Dataset, profile: Profile, seed: int, model: str | None, folds: int | None,
               fold_seed: int) -> dict[str, Any]:
    """The settings every result of an experiment folder depends on (JSON-ready, a round trip leaves it equal)."""
    stamp = {"dataset": dataset_fingerprint(ds), "model": model_fingerprint(model) if model else TRAINED_HERE,
             "profile": profile.to_dict(), "seed": int(seed), "folds": folds,
             "fold_seed": int(fold_seed) if folds else None}
    return json.loads(json.dumps(stamp))  # tuples -> lists, as read back from disk


def stamp_id(stamp: Mapping[str, Any]) -> str:
    """A short hash of a stamp: equal stamps, equal ids."""
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
