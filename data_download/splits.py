"""Deterministic case selection and train/validation splits.

Orders come from sha256 of a salted case id rather than from a random generator: the result is the same on
every machine, Python and NumPy version, and does not depend on the order files happen to be listed in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

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


def kfold_split(case_ids: Sequence[str], folds: int, fold: int, seed: int) -> tuple[list[str], list[str]]:
    """Fold ``fold`` of a ``folds``-fold cross-validation: (training ids, validation ids), each sorted.

    Cases are dealt round-robin in ``hash_order`` (salt from ``seed``), so fold sizes differ by at most one
    and the K validation sets partition the cases.
    """
    if folds < 2:
        raise FetchError(f"--folds must be at least 2 (got {folds})")
    if not 0 <= fold < folds:
        raise FetchError(f"--fold must be in 0..{folds - 1} for --folds {folds} (got {fold})")
    if folds > len(case_ids):
        raise FetchError(f"--folds {folds} is more than the {len(case_ids)} cases; use fewer folds")
    order = hash_order(case_ids, f"isl-kit:kfold:{seed}:")
    validation = sorted(order[fold::folds])
    training = sorted(set(case_ids) - set(validation))
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
    req: dict = {"method": "kfold", "folds": 5 if folds is None else folds, "fold": fold, "seed": seed}
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
