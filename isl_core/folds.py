"""Which cases an experiment infers and with which baseline: the single split or K-fold cross-validation.

The paper infers every labelled case once. ``folds=K`` pools every labelled case of ``training`` and
``validation``, deals them into K folds by a seeded permutation of the *sorted* case ids (so the assignment depends
on the seed and the ids only, not on their order in dataset.json), and for each fold trains a baseline on the other
folds, which also serve as the fold's atlases. Without folds the dataset's own split is used: the training cases
train the baseline and serve as atlases, the validation and test cases are inferred.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data_download.splits import assign_folds
from isl_core.data import Case, Dataset, DatasetError

__all__ = ["Fold", "assign_folds", "baseline_dir", "case_seeds", "plan_folds"]


@dataclass
class Fold:
    """One baseline and the cases it serves: trained on (and registering) ``train``, inferring ``infer``."""

    index: int | None  # None: the dataset's own split
    train: list[Case]
    infer: list[Case]


def baseline_dir(out: str | Path, fold: int | None = None) -> Path:
    """Where a results folder keeps the baseline of the single split (``fold`` None) or of fold ``fold``.

    The one name of that folder: the experiment trains there, and the notebooks' shared baseline is the single
    split's of their working folder.
    """
    return Path(out) / ("baseline" if fold is None else f"folds/{fold}/baseline")


def plan_folds(ds: Dataset, folds: int | None, fold_seed: int = 0, cases: Sequence[str] | None = None) -> list[Fold]:
    """The folds of an experiment; ``cases`` restricts what is inferred (never what trains a baseline)."""
    if folds is None:
        infer = ds.validation + ds.test
        if not infer:
            raise DatasetError(f"{ds.root / 'dataset.json'}: no 'validation' or 'test' cases to run the methods on; "
                               "add some, or use --folds K to infer every labelled case by cross-validation")
        plan = [Fold(None, list(ds.training), infer)]
    else:
        pool = ds.training + ds.validation
        try:
            assignment = assign_folds([c.id for c in pool], folds, fold_seed)
        except ValueError as e:
            raise DatasetError(f"{ds.root / 'dataset.json'}: {e}") from None
        plan = [Fold(f, [c for c in pool if assignment[c.id] != f],
                     sorted((c for c in pool if assignment[c.id] == f), key=lambda c: c.id)) for f in range(folds)]
    if cases:
        known = {c.id for f in plan for c in f.infer}
        missing = sorted(set(cases) - known)
        if missing:
            what = "labelled case" if folds else "validation/test case"
            raise DatasetError(f"{ds.root / 'dataset.json'}: --cases names no {what} {missing}")
        for f in plan:
            f.infer = [c for c in f.infer if c.id in cases]
    return plan


def case_seeds(ds: Dataset, folds: int | None, seed: int) -> dict[str, int]:
    """The seed each inferred case runs with: fixed by the case, not by the order or the worker that runs it.

    The single split keeps the kit's historical choice (``seed + position in validation + test``), so its numbers
    do not change; cross-validation uses the position among the sorted labelled ids.
    """
    if folds is None:
        return {c.id: seed + i for i, c in enumerate(ds.validation + ds.test)}
    return {cid: seed + i for i, cid in enumerate(sorted(c.id for c in ds.training + ds.validation))}
