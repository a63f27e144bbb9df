"""Deterministic case selection and train/validation splits, and the kit's one K-fold assignment.

Case selection orders by sha256 of a salted case id rather than by a random generator: the result is the same on
every machine, Python and NumPy version, and does not depend on the order files happen to be listed in.

K-fold cross-validation has one home, :func:`assign_folds`: ``isl data fetch --folds K --fold I --seed S`` and
``isl experiment --folds K --fold-seed S`` (``isl_core.folds``, which imports it from here: ``data_download`` sits
below ``isl_core`` and imports nothing from it) put every case in the same fold. It deals a seeded NumPy
permutation of the sorted ids, the assignment the committed claims runs (docs/claims_runs/) were made with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

from data_download.errors import FetchError
from data_download.sources import MONAI_BTCV_TRAINING, MONAI_BTCV_VALIDATION


def hash_order(case_ids: Iterable[str], salt: str) -> list[str]:
    """``case_ids`` sorted by sha256(salt + id): a fixed pseudo-random permutation."""
    return sorted(case_ids, key=lambda c: (hashlib.sha256(f"{salt}{c}".encode()).hexdigest(), c))


def select_cases(case_ids: Iterable[str], n: int, salt: str) -> list[str]:
    """The first ``n`` ids in ``hash_order``, returned sorted by id."""
    ids = list(case_ids)
    if n > len(ids):
        raise FetchError(f"asked for {n} cases but the archive holds only {len(ids)}; lower --n-cases")
    return sorted(hash_order(ids, salt)[:n])


#: The K-fold dealing of :func:`assign_folds`, recorded in a fetched folder's split (dataset.json, the marker).
KFOLD_ASSIGNMENT = "numpy-permutation"


def assign_folds(case_ids: Sequence[str], k: int, seed: int = 0) -> dict[str, int]:
    """case id -> fold in ``0..k-1``: a seeded permutation of the sorted ids, dealt round robin (sizes differ <= 1).

    The permutation is NumPy's ``default_rng(seed)`` (PCG64), whose streams NumPy keeps from release to release in
    practice but does not promise; tests/test_folds.py checks the committed claims runs' folds, so a change shows.
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("case ids must be unique to be assigned to folds")
    if not 2 <= k <= len(ids):
        raise ValueError(f"--folds {k}: needs 2 <= K <= the number of labelled cases ({len(ids)})")
    order = np.random.default_rng(seed).permutation(len(ids))
    return {ids[j]: i % k for i, j in enumerate(order)}


def kfold_split(case_ids: Sequence[str], folds: int, fold: int, seed: int) -> tuple[list[str], list[str]]:
    """Fold ``fold`` of a ``folds``-fold cross-validation: (training ids, validation ids), each sorted.

    The validation ids are the cases :func:`assign_folds` puts in ``fold``, so the K validation sets partition the
    cases, their sizes differ by at most one, and ``isl experiment --folds`` infers the same cases in that fold.
    """
    if folds < 2:
        raise FetchError(f"--folds must be at least 2 (got {folds})")
    if not 0 <= fold < folds:
        raise FetchError(f"--fold must be in 0..{folds - 1} for --folds {folds} (got {fold})")
    if folds > len(case_ids):
        raise FetchError(f"--folds {folds} is more than the {len(case_ids)} cases; use fewer folds")
    try:
        assignment = assign_folds(case_ids, folds, seed)
    except ValueError as e:
        raise FetchError(f"cannot split the cases into folds: {e}") from None
    validation = sorted(c for c, f in assignment.items() if f == fold)
    training = sorted(c for c, f in assignment.items() if f != fold)
    return training, validation


def monai_btcv_split(case_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """The 24/6 split of MONAI's BTCV tutorials; every one of its 30 cases must be present."""
    missing = sorted(set(MONAI_BTCV_TRAINING + MONAI_BTCV_VALIDATION) - set(case_ids))
    if missing:
        raise FetchError(f"the MONAI BTCV split needs cases {', '.join(missing)}, which are not in the archive; "
                         "use the complete RawData.zip (or --folds K for a split over the cases present)")
    return list(MONAI_BTCV_TRAINING), list(MONAI_BTCV_VALIDATION)


def split_request(source: str, folds: int | None, fold: int, seed: int, n_cases: int | None) -> dict:
    """The split a fetch will write, as a plain dict (stored in dataset.json and compared on re-runs)."""
    if source == "sample":
        return {"method": "single-case"}
    if source == "btcv" and folds is None:
        return {"method": "monai-btcv-tutorial"}
    # "assignment" names the fold dealing, so a folder fetched with the older sha256-order folds is not taken as this
    req: dict = {"method": "kfold", "folds": 5 if folds is None else folds, "fold": fold, "seed": seed,
                 "assignment": KFOLD_ASSIGNMENT}
    if source == "msd-pancreas":
        req["n_cases"] = n_cases
    return req


def apply_split(request: dict, case_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """(training ids, validation ids) for a ``split_request`` over the converted cases."""
    method = request["method"]
    if method == "single-case":
        return sorted(case_ids), []
    if method == "monai-btcv-tutorial":
        return monai_btcv_split(case_ids)
    return kfold_split(sorted(case_ids), request["folds"], request["fold"], request["seed"])
