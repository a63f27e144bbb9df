"""Checks of the notebooks' implement-it exercises: each tells the learner whether their function is right.

Every notebook has one exercise in which the learner writes a piece of the method; the cell after it (tagged
``check``) calls one function from here with the learner's function (``None`` while it is not written). A check
prints one line starting with ``correct:`` (and returns nothing, so a notebook shows that line once) or raises
:class:`CheckFailed` with a message that says what went wrong and what to look at. The reference answers come from
the kit's own code wherever the kit has that piece (``metrics.dice_score``, ``transforms.jacobian_determinant``,
``claims.bootstrap_ci``, scipy's Wilcoxon test), so a check and the kit cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np


class CheckFailed(AssertionError):
    """The learner's implementation is not right yet; the message says why."""


def _require(fn: Callable | None, name: str, signature: str) -> Callable:
    if not callable(fn):
        raise CheckFailed(f"`{name}` is not defined yet: write `def {name}{signature}:` in the cell above, run that "
                          "cell, then run this one again.")
    return fn


def _call(fn: Callable, name: str, *args: Any) -> Any:
    try:
        return fn(*args)
    except CheckFailed:
        raise
    except Exception as e:  # the learner's code may raise anything; say where it broke
        raise CheckFailed(f"`{name}` raised {type(e).__name__}: {e}") from e


def _correct(message: str) -> None:
    print(f"correct: {message}")


def _same(got: Any, want: float, tol: float = 1e-6) -> bool:
    try:
        got = float(got)
    except (TypeError, ValueError):
        return False
    return (math.isnan(got) and math.isnan(want)) or (not math.isnan(want) and abs(got - want) <= tol)


# ------------------------------------------------------------------------------------------ 00: the CT window


def check_unit_window(fn: Callable | None) -> None:
    """Notebook 00: ``to_unit_window(hu, low, high)`` maps HU in [low, high] linearly to [0, 1] and clips."""
    fn = _require(fn, "to_unit_window", "(hu, low=-175.0, high=250.0)")
    hu = np.array([-1000.0, -175.0, 0.0, 37.5, 250.0, 1200.0], np.float32)
    want = np.clip((hu + 175.0) / 425.0, 0.0, 1.0)
    got = np.asarray(_call(fn, "to_unit_window", hu, -175.0, 250.0), dtype=float)
    if got.shape != hu.shape:
        raise CheckFailed(f"`to_unit_window` returned shape {got.shape} for an input of shape {hu.shape}: it must "
                          "work voxel by voxel (numpy arithmetic on the whole array).")
    if got[0] < 0 or got[-1] > 1:
        raise CheckFailed("values outside the window must be clipped: air (-1000 HU) gives 0 and bone (1200 HU) "
                          f"gives 1, yours gave {got[0]:.3f} and {got[-1]:.3f} (np.clip).")
    if not np.allclose(got, want, atol=1e-5):
        raise CheckFailed(f"for HU {hu.tolist()} expected {np.round(want, 3).tolist()}, got "
                          f"{np.round(got, 3).tolist()}: subtract `low`, then divide by the width `high - low`.")
    _correct("the window maps -175 HU to 0, 250 HU to 1, and clips what lies outside.")


# ------------------------------------------------------------------------------------------ 01: Dice of one organ


def check_organ_dice(fn: Callable | None) -> None:
    """Notebook 01: ``organ_dice(pred, truth, k)``: Dice of label ``k``, NaN if absent from both, 0 if from one."""
    from isl_core.metrics import dice_score

    fn = _require(fn, "organ_dice", "(pred, truth, k)")
    truth = np.zeros((6, 6, 3), int)
    truth[1:4, 1:4] = 6
    pred = truth.copy()
    pred[1, 1:4] = 0  # part of the liver missed
    pred[4:6, 4:6, 1] = 4  # a gallbladder the case does not have
    cases = [(6, "an organ found in both (overlapping in part)"), (4, "an organ in the prediction only"),
             (1, "an organ absent from both")]
    for k, what in cases:
        want = dice_score(pred == k, truth == k)
        got = _call(fn, "organ_dice", pred, truth, k)
        if not _same(got, want):
            hint = {4: "present on one side only is Dice 0 (a missed or invented organ is an error)",
                    1: "absent from both is undefined: return float('nan'), not 0 or 1, so averages leave it out",
                    6: "Dice = 2 |A and B| / (|A| + |B|) with A = (pred == k), B = (truth == k)"}[k]
            raise CheckFailed(f"for {what} (label {k}) expected {want}, got {got}: {hint}.")
    got = _call(fn, "organ_dice", truth, truth, 6)
    if not _same(got, 1.0):
        raise CheckFailed(f"a perfect prediction must score 1, yours scored {got}.")
    _correct("overlap, an organ on one side only (0) and an organ on neither side (NaN) all as the kit "
                    "scores them.")


# ------------------------------------------------------------------------------------------ 02: folding count


def _reference_folding(u: np.ndarray) -> int:
    import torch

    from isl_core.transforms import jacobian_determinant

    return int((jacobian_determinant(torch.from_numpy(u)[None]) <= 0).sum())


def check_folding_count(fn: Callable | None) -> None:
    """Notebook 02: ``count_folding(u)``: voxels where det(I + grad u) <= 0, ``u`` of shape (3, H, W, D)."""
    fn = _require(fn, "count_folding", "(u)")
    shape = (3, 10, 9, 8)
    x = np.indices(shape[1:], dtype=np.float32)
    rng = np.random.default_rng(0)
    smooth = np.zeros(shape, np.float32)
    smooth[0] = 1.8 * np.sin(x[0] / 1.6) * np.cos(x[1] / 3.0)  # folds where d u_x / d x < -1
    fields = [("the zero field (no deformation)", np.zeros(shape, np.float32)),
              ("a uniform shift of 2 voxels", np.full(shape, 2.0, np.float32)),
              ("a mirror along x (u_x = -2 x)", np.stack([-2.0 * x[0], 0 * x[1], 0 * x[2]])),
              ("a wavy field that folds in places", smooth),
              ("a random field", rng.normal(0, 0.6, shape).astype(np.float32))]
    for what, u in fields:
        want = _reference_folding(u)
        got = _call(fn, "count_folding", u)
        if isinstance(got, float) and 0 < got < 1 and want > 1:
            raise CheckFailed(f"`count_folding` returned {got}, a share: return the number of voxels.")
        try:
            got_int = int(got)
        except (TypeError, ValueError):
            raise CheckFailed(f"`count_folding` must return a number of voxels, got {got!r}") from None
        if got_int != want:
            hint = ("the identity is part of the map: det(I + grad u), not det(grad u)" if what.startswith("the zero")
                    or what.startswith("a uniform") else
                    "np.gradient(u[i]) gives d u_i / d x, d u_i / d y, d u_i / d z (central differences, one-sided "
                    "at the borders); fold where the determinant is <= 0")
            raise CheckFailed(f"for {what}: expected {want} folding voxels of {u[0].size}, got {got_int}: {hint}.")
    _correct("the folding count agrees with the kit's Jacobian determinant on five fields.")


# ------------------------------------------------------------------------------------------ 03: the moving average


def check_moving_average(fn: Callable | None) -> None:
    """Notebook 03: ``moving_average(M, P, beta)`` returns beta M + (1 - beta) P and leaves M unchanged."""
    fn = _require(fn, "moving_average", "(M, P, beta)")
    rng = np.random.default_rng(1)
    M = rng.dirichlet(np.ones(3), size=(4, 4)).transpose(2, 0, 1)  # (C, H, W), sums to 1 over classes
    P = rng.dirichlet(np.ones(3), size=(4, 4)).transpose(2, 0, 1)
    before = M.copy()
    for beta in (0.0, 0.7, 1.0):
        got = np.asarray(_call(fn, "moving_average", M, P, beta), dtype=float)
        if not np.array_equal(M, before):
            raise CheckFailed("`moving_average` changed M in place: return a new array (M itself is the previous "
                              "estimate, which the caller may still need).")
        want = beta * M + (1 - beta) * P
        if not np.allclose(got, want):
            swapped = np.allclose(got, (1 - beta) * M + beta * P)
            raise CheckFailed(f"with beta = {beta} the result differs from beta M + (1 - beta) P"
                              + (": beta weighs the past (M), 1 - beta the newest prediction (P)." if swapped else
                                 "."))
    _correct("beta = 0 gives P, beta = 1 keeps M, and beta = 0.7 mixes them; M is left as it was.")


# ------------------------------------------------------------------------------------------ 04: Wilcoxon's floor


def check_smallest_wilcoxon_p(fn: Callable | None) -> None:
    """Notebook 04: ``smallest_p(n)``: the smallest two-sided p of the exact Wilcoxon signed-rank test on n cases."""
    from scipy.stats import wilcoxon

    fn = _require(fn, "smallest_p", "(n)")
    for n in (3, 5, 6, 11, 15):
        want = float(wilcoxon(np.arange(1.0, n + 1), method="exact").pvalue)  # every case gained: the extreme
        got = _call(fn, "smallest_p", n)
        if not _same(got, want, 1e-9):
            hint = ("one-sided: the test is two-sided, so double it" if _same(got, want / 2, 1e-9) else
                    "under the null hypothesis each of the 2^n sign patterns is equally likely; the most extreme "
                    "outcome (all n differences of one sign) has 2 such patterns, one per sign")
            raise CheckFailed(f"for n = {n} cases expected p = {want:.6f} (scipy's exact test), got {got}: {hint}.")
    _correct("the smallest two-sided Wilcoxon p-value is 2 / 2^n: 0.0625 for 5 cases, 0.031 for 6.")


# ------------------------------------------------------------------------------------------ 05: memory of beta


def check_half_life(fn: Callable | None) -> None:
    """Notebook 05: ``updates_until_half(beta)``: the fewest updates after which P0's weight in M is below 1/2."""
    fn = _require(fn, "updates_until_half", "(beta)")
    for beta in (0.0, 0.3, 0.5, 0.8, 0.9, 0.95):
        want = 1 if beta < 0.5 else math.floor(math.log(0.5) / math.log(beta)) + 1
        got = _call(fn, "updates_until_half", beta)
        if got != want:
            hint = ("after n updates M = beta^n P0 + (terms of the later P's): find the smallest n with beta^n < 1/2"
                    if beta > 0 else "with beta = 0 the first update replaces M by P: P0's weight is then 0")
            raise CheckFailed(f"for beta = {beta} expected {want} update(s), got {got}: {hint}.")
    _correct("P0's weight beta^n falls below a half after 1 update at beta 0.3 and after 14 at beta 0.95.")


# ------------------------------------------------------------------------------------------ 06: paired bootstrap


def check_paired_bootstrap(fn: Callable | None) -> None:
    """Notebook 06: ``paired_bootstrap(a, b, n_resamples, seed)``: the 95 % percentile interval of mean(a - b)."""
    from isl_core.claims import bootstrap_ci

    fn = _require(fn, "paired_bootstrap", "(a, b, n_resamples=2000, seed=0)")
    rng = np.random.default_rng(3)
    b = rng.uniform(0.5, 0.8, 24)
    a = b + rng.normal(0.02, 0.03, 24)
    got = _call(fn, "paired_bootstrap", a, b, 4000, 0)
    try:
        lo, hi = (float(v) for v in got)
    except (TypeError, ValueError):
        raise CheckFailed(f"`paired_bootstrap` must return (low, high), got {got!r}") from None
    want_lo, want_hi = bootstrap_ci(a - b, n_resamples=20000, seed=0)
    width = want_hi - want_lo
    mean = float(np.mean(a - b))
    if not lo <= mean <= hi:
        raise CheckFailed(f"the interval ({lo:.4f}, {hi:.4f}) does not contain the mean difference {mean:.4f}: "
                          "resample the *differences* a - b (pairs stay together), take the mean of each resample.")
    if abs(lo - want_lo) > 0.15 * width or abs(hi - want_hi) > 0.15 * width:
        hint = ("it is too wide: resampling a and b separately forgets the pairing" if hi - lo > 1.3 * width else
                "it is too narrow or shifted: draw n cases *with replacement* from the n differences and take the "
                "2.5th and 97.5th percentiles of the resampled means")
        raise CheckFailed(f"expected about ({want_lo:.4f}, {want_hi:.4f}), got ({lo:.4f}, {hi:.4f}): {hint}.")
    _correct(f"the interval ({lo:.3f}, {hi:.3f}) agrees with the kit's bootstrap (claims.bootstrap_ci).")


# ------------------------------------------------------------------------------------------ 07: TENT's objective


def check_mean_entropy(fn: Callable | None) -> None:
    """Notebook 07: ``mean_entropy(probs)``: the mean over voxels of -sum_c p_c log p_c (nats), probs (C, *spatial)."""
    fn = _require(fn, "mean_entropy", "(probs)")
    rng = np.random.default_rng(7)
    cases = {"a uniform prediction over 4 classes": np.full((4, 3, 5), 0.25),
             "a one-hot prediction": np.eye(3)[rng.integers(0, 3, (4, 6))].transpose(2, 0, 1),
             "random class probabilities": rng.dirichlet(np.ones(5), size=(6, 7)).transpose(2, 0, 1)}
    for what, probs in cases.items():
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(probs > 0, -probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0)
        want = float(terms.sum(axis=0).mean())
        got = _call(fn, "mean_entropy", probs.copy())
        if not _same(got, want, 1e-4):  # loose enough for log(p + 1e-6) instead of leaving out p = 0
            c = probs.shape[0]
            if _same(got, -want, 1e-4) and want > 0:
                hint = "the sign: entropy is -sum p log p, which is never negative"
            elif _same(got, want / c, 1e-4):
                hint = "sum over the classes (axis 0), then average over the voxels; you averaged over the classes too"
            elif _same(got, want / np.log(2), 1e-4):
                hint = "use the natural logarithm (nats), not log2"
            elif _same(got, math.nan):
                hint = "0 log 0 counts as 0: leave out (or clip) the zero probabilities before taking the log"
            else:
                hint = "the entropy of one voxel is -sum over classes of p log p; then take the mean over the voxels"
            raise CheckFailed(f"for {what} expected {want:.4f} nats, got {got}: {hint}.")
    _correct("log 4 = 1.386 nats for a uniform prediction over 4 classes, 0 for a one-hot one, and the mean over "
             "voxels for random probabilities.")


CHECKS: dict[str, Callable[[Callable | None], None]] = {
    "00": check_unit_window, "01": check_organ_dice, "02": check_folding_count, "03": check_moving_average,
    "04": check_smallest_wilcoxon_p, "05": check_half_life, "06": check_paired_bootstrap,
    "07": check_mean_entropy}
"""Each numbered notebook's check, by the notebook's number."""
