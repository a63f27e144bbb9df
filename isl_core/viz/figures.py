"""The static figures of the notebooks and of an experiment's report.

Each notebook figure returns the matplotlib figure (it shows inline in Jupyter and in notebooks executed headless)
and writes a file only when ``path`` is given; the report figures (``report.py`` writes the Markdown and calls
them) always write theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg") if matplotlib.get_backend().lower() in ("", "agg") else None
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from isl_core.config import BTCV_LABELS  # noqa: E402
from isl_core.viz.slices import _as_numpy, _save, best_slice, display_slice, organ_legend, overlay  # noqa: E402


def appearance_figure(subjects: Sequence[tuple[str, np.ndarray, np.ndarray]], organs: Sequence[int] = (6, 1, 2),
                      labels: dict[int, str] | None = None, window: tuple[float, float] = (-175, 250),
                      path: str | Path | None = None):
    """Domain shift at a glance: per (title, image, label) an axial slice, and the organs' intensity histograms.

    The histograms are drawn on one axis per organ so the reader sees how an organ's intensity distribution moves
    (and organs start to overlap) from one subject to the next.
    """
    labels = labels or BTCV_LABELS
    n = len(subjects)
    fig, axes = plt.subplots(2, max(n, len(organs)), figsize=(3.0 * max(n, len(organs)), 6.2), squeeze=False)
    for c, (title, image, lab) in enumerate(subjects):
        overlay(axes[0, c], image, None, 2, best_slice(lab), title, vmin=window[0], vmax=window[1])
    for c in range(n, axes.shape[1]):
        axes[0, c].set_axis_off()
    bins = np.linspace(window[0] - 100, window[1] + 100, 60)
    for c, organ in enumerate(organs):
        ax = axes[1, c]
        for title, image, lab in subjects:
            values = _as_numpy(image)[_as_numpy(lab) == organ]
            if values.size:
                ax.hist(values, bins=bins, histtype="step", density=True, label=title, linewidth=1.5)
        ax.set_title(labels.get(organ, str(organ)).replace("_", " "), fontsize=9)
        ax.set_xlabel("intensity (HU)", fontsize=8)
        ax.set_yticks([])
        ax.legend(fontsize=7)
    for c in range(len(organs), axes.shape[1]):
        axes[1, c].set_axis_off()
    fig.tight_layout()
    return _save(fig, path)


def probability_figure(image, probs, truth=None, organ: int = 6, axis: int = 2, index: int | None = None,
                       labels: dict[int, str] | None = None, title: str = "", path: str | Path | None = None):
    """What a segmenter outputs: the image, the truth, argmax(P), P of one organ, and the confidence max_k P_k."""
    labels = labels or BTCV_LABELS
    p = probs.detach().cpu().numpy() if hasattr(probs, "detach") else np.asarray(probs)
    p = p[0] if p.ndim == 5 else p
    pred = p.argmax(0)
    index = best_slice(truth if truth is not None else pred, axis) if index is None else index
    panels = 4 + (truth is not None)
    fig, axes = plt.subplots(1, panels, figsize=(2.9 * panels, 3.3), squeeze=False)
    ax = list(axes[0])
    overlay(ax[0], image, None, axis, index, "image")
    k = 1
    if truth is not None:
        overlay(ax[k], image, truth, axis, index, "ground truth", max(labels) + 1)
        k += 1
    overlay(ax[k], image, pred, axis, index, "prediction argmax(P)", max(labels) + 1)
    im = ax[k + 1].imshow(display_slice(p[organ], axis, index), cmap="magma", origin="lower", vmin=0, vmax=1)
    ax[k + 1].set_title(f"P({labels.get(organ, organ)})", fontsize=9)
    ax[k + 1].set_axis_off()
    fig.colorbar(im, ax=ax[k + 1], fraction=0.046)
    im = ax[k + 2].imshow(display_slice(p.max(0), axis, index), cmap="viridis", origin="lower", vmin=0, vmax=1)
    ax[k + 2].set_title("confidence max_k P_k", fontsize=9)
    ax[k + 2].set_axis_off()
    fig.colorbar(im, ax=ax[k + 2], fraction=0.046)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def field_panel(ax, displacement, spacing: Sequence[float] = (1.0, 1.0, 1.0), image=None, axis: int = 2,
                index: int | None = None, step: int = 3, title: str | None = None, vmax: float | None = None):
    """One displacement field (3,*S) in voxels: its magnitude in mm as a map, the in-plane part as arrows.

    Returns the image artist so callers can add a colour bar.
    """
    u = displacement.detach().cpu().numpy() if hasattr(displacement, "detach") else np.asarray(displacement)
    u = u[0] if u.ndim == 5 else u
    mm = u * np.asarray(spacing, dtype=np.float32).reshape(3, 1, 1, 1)
    index = u.shape[1 + axis] // 2 if index is None else index
    magnitude = np.sqrt((mm**2).sum(0))
    if image is not None:
        ax.imshow(display_slice(_as_numpy(image), axis, index), cmap="gray", origin="lower", vmin=0, vmax=1)
    art = ax.imshow(display_slice(magnitude, axis, index), cmap="inferno", origin="lower",
                    alpha=0.6 if image is not None else 1.0, vmin=0, vmax=vmax or float(magnitude.max()) or 1.0)
    plane = [a for a in range(3) if a != axis]  # the two in-plane axes: first -> horizontal, second -> vertical
    h, v = display_slice(u[plane[0]], axis, index), display_slice(u[plane[1]], axis, index)
    if axis != 0:
        h = -h  # the slice shows the patient's right on the left (display_slice): x grows leftwards on screen
    rows, cols = np.mgrid[0:h.shape[0]:step, 0:h.shape[1]:step]
    # arrows point from where a voxel of the fixed image samples the atlas: x -> x + u(x)
    ax.quiver(cols, rows, h[::step, ::step], v[::step, ::step], color="cyan", angles="xy", scale_units="xy",
              scale=1.0, width=0.004)
    ax.set_xlim(-0.5, h.shape[1] - 0.5)
    ax.set_ylim(-0.5, h.shape[0] - 0.5)
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return art


def jacobian_panel(ax, det, axis: int = 2, index: int | None = None, title: str | None = None):
    """det(Jacobian) (*S) on a diverging scale centred at 1: blue shrinks, red expands, black folds (det <= 0)."""
    from matplotlib.colors import TwoSlopeNorm

    d = _as_numpy(det)
    index = d.shape[axis] // 2 if index is None else index
    sl = display_slice(d, axis, index)
    art = ax.imshow(sl, cmap="coolwarm", origin="lower", norm=TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=2.0))
    folds = np.ma.masked_where(sl > 0, np.ones_like(sl))
    ax.imshow(folds, cmap="gray_r", origin="lower", vmin=0, vmax=1, interpolation="nearest")
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return art


def organ_dice_figure(table, title: str = "Per-organ Dice", ylabel: str = "Dice", path: str | Path | None = None,
                      differences: bool = False):
    """Grouped bars of a DataFrame with organs as rows and methods (or cases, rounds...) as columns.

    ``differences``: the values are gains (of either sign): the axis fits them, with a line at 0, instead of 0-1.
    """
    fig, ax = plt.subplots(figsize=(max(7.0, 0.75 * len(table) + 2) + 1.6, 3.6))  # + the legend's column
    table.plot.bar(ax=ax, width=0.8)
    if differences:
        ax.axhline(0.0, color="k", lw=0.8)
    else:
        ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_xticks(range(len(table)), [str(i).replace("_", " ") for i in table.index], rotation=40, ha="right",
                  fontsize=8)
    # Outside the axes, to the right: inside, it hid the tallest bars (Dice near 1 is the interesting part).
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def paired_figure(means, methods: Sequence[str], reference: str = "baseline", title: str = "",
                  path: str | Path | None = None):
    """Per-case organ-averaged Dice of the reference and each method: one grey line per case through them all.

    ``means`` is a wide DataFrame (cases x methods), e.g. ``case_means(per_case).pivot(index="case",
    columns="method", values="dice")``. A method's dot is green where it beats the reference on that case and red
    where it does not; blue diamonds are the means over cases.
    """
    cols = [reference, *[m for m in methods if m != reference]]
    fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 1.5, 3.6))
    xs = np.arange(len(cols))
    for _, row in means[cols].iterrows():
        vals = row.to_numpy(dtype=float)
        ax.plot(xs, vals, "-", color="0.55", alpha=0.5, lw=1)
        colours = ["k"] + ["tab:green" if v >= vals[0] else "tab:red" for v in vals[1:]]
        ax.scatter(xs, vals, c=colours, s=14, zorder=3)
    ax.plot(xs, means[cols].mean().to_numpy(dtype=float), "D-", color="tab:blue", ms=7, label="mean over cases",
            zorder=4)
    ax.set_xticks(xs, cols, rotation=20, fontsize=8)
    ax.set_ylabel("organ-averaged Dice per case")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def curves_figure(curves: dict[str, Sequence[float] | tuple[Sequence[float], Sequence[float]]],
                  xlabel: str = "update", ylabel: str = "organ-averaged Dice", title: str = "",
                  marks: Sequence[float] = (), path: str | Path | None = None):
    """Line plot of named sequences (e.g. Dice of M after every update, one line per beta).

    A value is either the y values (plotted at 0, 1, 2, ...) or a pair ``(xs, ys)``; ``marks`` draws vertical
    dotted lines (e.g. where a new round starts).
    """
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, values in curves.items():
        xs, ys = values if isinstance(values, tuple) else (range(len(values)), values)
        ax.plot(list(xs), list(ys), "o-", ms=3, label=name)
    for m in marks:
        ax.axvline(m, color="gray", ls=":", lw=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def label_row_figure(image, layers: Sequence[tuple[str, np.ndarray | None]], axis: int = 2, index: int | None = None,
                     labels: dict[int, str] | None = None, window: tuple[float, float] = (0, 1),
                     path: str | Path | None = None):
    """One slice of ``image`` with each (title, label map) of ``layers`` on top, side by side, and a legend."""
    labels = labels or BTCV_LABELS
    if index is None:
        first = next((lab for _, lab in layers if lab is not None), None)
        index = best_slice(first, axis) if first is not None else _as_numpy(image).shape[axis] // 2
    fig, axes = plt.subplots(1, len(layers), figsize=(2.8 * len(layers), 3.4), squeeze=False)
    present: set[int] = set()
    for ax, (title, lab) in zip(axes[0], layers):
        overlay(ax, image, lab, axis, index, title, max(labels) + 1, vmin=window[0], vmax=window[1])
        if lab is not None:
            present |= set(np.unique(_as_numpy(lab)).astype(int).tolist())
    organ_legend(fig, labels, present=sorted(present - {0}))
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------------------
# experiment report figures (report.py writes the Markdown and calls these)


def per_organ_figure(summary: dict, path: str | Path) -> None:
    """The report's grouped bars: each organ's mean Dice under each method of an experiment's ``summary.json``
    (``organ_dice_figure``: its legend stands beside the axes, where it hides no bar)."""
    import pandas as pd

    table = pd.DataFrame({m: s["per_organ_dice"] for m, s in summary["methods"].items()})
    plt.close(organ_dice_figure(table, title="Per-organ Dice by method", ylabel="mean Dice", path=path))


def paired_lines_figure(per_case, path: str | Path) -> None:
    """Each case's organ-averaged Dice under the baseline and each other method, joined by a line."""
    from isl_core.evaluate import case_means

    means = case_means(per_case).pivot(index="case", columns="method", values="dice")
    others = [m for m in means.columns if m != "baseline"]
    fig, axes = plt.subplots(1, len(others), figsize=(2.6 * len(others), 3.2), sharey=True, squeeze=False)
    for ax, m in zip(axes[0], others):
        for _, row in means.iterrows():
            up = row[m] >= row["baseline"]
            ax.plot([0, 1], [row["baseline"], row[m]], "-o", color="tab:green" if up else "tab:red", alpha=0.7)
        ax.set_xticks([0, 1], ["baseline", m], rotation=20, fontsize=8)
        ax.set_title(m, fontsize=9)
    axes[0, 0].set_ylabel("organ-averaged Dice per case")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def overlay_figure(out: str | Path, ds, methods: Sequence[str], case_id: str, path: str | Path) -> None:
    """One axial slice of one case: ground truth and every method's prediction (source geometry)."""
    import nibabel as nib

    case = ds.case(case_id)
    img = nib.as_closest_canonical(nib.load(str(case.image)))
    image = img.get_fdata(dtype=np.float32)
    layers = [("ground truth", case.label)]
    layers += [(m, Path(out) / "predictions" / m / f"{case_id}.nii.gz") for m in methods]
    layers = [(t, p) for t, p in layers if p is not None and Path(p).is_file()]
    truth = np.asarray(nib.as_closest_canonical(nib.load(str(case.label))).dataobj)
    z = int(np.argmax((truth > 0).sum(axis=(0, 1))))  # the slice with the most organ voxels
    fig, axes = plt.subplots(1, len(layers), figsize=(2.6 * len(layers), 3.0), squeeze=False)
    for ax, (title, p) in zip(axes[0], layers):
        lab = np.asarray(nib.as_closest_canonical(nib.load(str(p))).dataobj)
        overlay(ax, image, lab, axis=2, index=z, title=title, num_classes=ds.num_classes, vmin=-175, vmax=250)
    organ_legend(fig, ds.labels, present=sorted(set(np.unique(truth).tolist()) - {0}))
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    _save(fig, path)
    plt.close(fig)
