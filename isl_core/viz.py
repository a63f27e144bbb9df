"""Figures and the interactive slice viewer: what every notebook and report shows.

Colours come from one label colour table (``label_cmap``) so an organ has the same colour everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg") if matplotlib.get_backend().lower() in ("", "agg") else None
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from isl_core.config import BTCV_LABELS  # noqa: E402


def label_cmap(num_classes: int = 14) -> ListedColormap:
    """Background transparent, organs from tab20 (stable per label id)."""
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, 20))
    table = np.zeros((max(num_classes, 2), 4))
    for k in range(1, max(num_classes, 2)):
        table[k] = colours[(k - 1) % 20]
        table[k, 3] = 0.55
    return ListedColormap(table)


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    while x.ndim > 3:
        x = x[0]
    return x


_PLANES = ("sagittal", "coronal", "axial")  # the slice through array axis 0, 1, 2 of a RAS volume


def display_slice(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    """One slice of a RAS volume, laid out for ``imshow(origin="lower")`` in the radiological convention.

    Rows run posterior->anterior (axial) or inferior->superior (coronal, sagittal). Axial and coronal
    slices show the patient's right on the viewer's left, as CT is read; sagittal slices show anterior right.
    """
    plane = np.take(vol, index, axis=axis).T
    return plane[:, ::-1] if axis != 0 else plane


def overlay(ax, image, labels=None, axis: int = 2, index: int | None = None, title: str | None = None,
            num_classes: int = 14, vmin: float = 0.0, vmax: float = 1.0) -> None:
    """Draw one slice of ``image`` with ``labels`` on top (labels may be None)."""
    image = _as_numpy(image)
    index = image.shape[axis] // 2 if index is None else index
    ax.imshow(display_slice(image, axis, index), cmap="gray", origin="lower", vmin=vmin, vmax=vmax,
              interpolation="nearest")
    if labels is not None:
        lab = _as_numpy(labels).astype(int)
        ax.imshow(display_slice(lab, axis, index), cmap=label_cmap(num_classes), origin="lower", vmin=0,
                  vmax=max(num_classes, 2) - 1, interpolation="nearest")
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def organ_legend(fig, labels: dict[int, str] | None = None, present: Sequence[int] | None = None) -> None:
    labels = labels or BTCV_LABELS
    cmap = label_cmap(max(labels) + 1)
    keys = [k for k in sorted(labels) if k != 0 and (present is None or k in present)]
    handles = [Patch(color=cmap(k), label=labels[k].replace("_", " ")) for k in keys]
    fig.legend(handles=handles, loc="lower center", ncol=min(7, len(handles)), fontsize=8, frameon=False)


def _plane_aspect(spacing: Sequence[float], axis: int) -> float:
    """imshow aspect (row height / column width) of a ``display_slice`` through ``axis`` for voxel ``spacing``."""
    cols, rows = (a for a in range(3) if a != axis)  # display_slice transposes: rows are the later array axis
    return float(spacing[rows]) / float(spacing[cols])


def case_grid(rows: Sequence[tuple[str, np.ndarray, np.ndarray | None]], axis_slices: Sequence[tuple[int, float]]
              = ((2, 0.55), (1, 0.5)), labels: dict[int, str] | None = None, window: tuple[float, float] = (0, 1),
              path: str | Path | None = None, spacing: Sequence[float] | Sequence[Sequence[float]] | None = None):
    """A figure with one row per (title, image, labels) and one column per (axis, relative position).

    ``spacing``: voxel size in mm, one (sx, sy, sz) for every row or one per row, so that anisotropic voxels
    (CT slices are often thicker than the in-plane pixels) are drawn in their true proportions; None: isotropic.
    Each row is a subfigure with its own title above it, so long titles never run into the neighbouring panel's.
    """
    labels = labels or BTCV_LABELS
    if spacing is None or np.ndim(spacing) == 1:
        spacing = [spacing or (1.0, 1.0, 1.0)] * len(rows)
    if len(spacing) != len(rows) or any(len(s) < 3 for s in spacing):
        raise ValueError(f"case_grid: spacing must be one (sx, sy, sz) or one per row ({len(rows)}), got {spacing}")
    ncols = 2 * len(axis_slices)
    fig = plt.figure(figsize=(2.8 * ncols, 3.1 * len(rows) + 0.7), layout="constrained")
    subfigs = np.atleast_1d(fig.subfigures(len(rows) + 1, 1, height_ratios=[3.1] * len(rows) + [0.5]))
    for sub, (title, image, lab), row_spacing in zip(subfigs, rows, spacing):
        image = _as_numpy(image)
        sub.suptitle(title, fontsize=10, fontweight="bold")
        axes = sub.subplots(1, ncols, squeeze=False)[0]
        for c, (axis, rel) in enumerate(axis_slices):
            idx = int(rel * (image.shape[axis] - 1))
            plane = _PLANES[axis]
            overlay(axes[2 * c], image, None, axis, idx, plane, vmin=window[0], vmax=window[1])
            overlay(axes[2 * c + 1], image, lab, axis, idx, f"{plane} + labels", num_classes=max(labels) + 1,
                    vmin=window[0], vmax=window[1])
            for ax in axes[2 * c: 2 * c + 2]:
                ax.set_aspect(_plane_aspect(row_spacing, axis))
    organ_legend(subfigs[-1], labels)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
    return fig


def cohort_figure(dataset_dir: str | Path, path: str | Path | None = None):
    """A training case and a shifted inference case of a dataset folder, with their labels (raw HU, windowed)."""
    import nibabel as nib

    from isl_core.data import read_dataset_json

    ds = read_dataset_json(dataset_dir)
    rows, spacing = [], []
    for title, case in (("training case", ds.training[0]), ("inference case (shifted)",
                                                            (ds.validation or ds.training)[0])):
        img = nib.as_closest_canonical(nib.load(str(case.image)))
        lab = nib.as_closest_canonical(nib.load(str(case.label))) if case.label else None
        rows.append((f"{title}: {case.id}", img.get_fdata(dtype=np.float32),
                     None if lab is None else np.asarray(lab.dataobj)))
        spacing.append(img.header.get_zooms()[:3])
    return case_grid(rows, labels=ds.labels, window=(-175, 250), path=path, spacing=spacing)


def slice_viewer(image, labels=None, prediction=None, num_classes: int = 14, window: tuple[float, float] = (0, 1)):
    """An ipywidgets viewer: image with label and prediction overlays, a slice slider and an axis choice."""
    import ipywidgets as w
    from IPython.display import display

    image = _as_numpy(image)
    layers = {"labels": labels, "prediction": prediction}
    layers = {k: _as_numpy(v) for k, v in layers.items() if v is not None}
    axis = w.Dropdown(options=[("axial", 2), ("coronal", 1), ("sagittal", 0)], value=2, description="view")
    index = w.IntSlider(value=image.shape[2] // 2, min=0, max=image.shape[2] - 1, description="slice")
    out = w.Output()

    def draw(*_):
        index.max = image.shape[axis.value] - 1
        with out:
            out.clear_output(wait=True)
            fig, axes = plt.subplots(1, 1 + len(layers), figsize=(3.2 * (1 + len(layers)), 3.4), squeeze=False)
            overlay(axes[0, 0], image, None, axis.value, index.value, "image", vmin=window[0], vmax=window[1])
            for a, (name, lab) in zip(axes[0, 1:], layers.items()):
                overlay(a, image, lab, axis.value, index.value, name, num_classes, vmin=window[0], vmax=window[1])
            plt.show()

    axis.observe(draw, names="value")
    index.observe(draw, names="value")
    draw()
    box = w.VBox([w.HBox([axis, index]), out])
    display(box)
    return box


# ------------------------------------------------------------------------------------------ notebook figures
# Static figures of the numbered notebooks: each returns the matplotlib figure (it shows inline in Jupyter and
# in notebooks executed headless) and never writes files unless ``path`` is given.


def _save(fig, path: str | Path | None):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
    return fig


def best_slice(labels, axis: int = 2) -> int:
    """Index along ``axis`` of the slice with the most organ (non-zero) voxels; the middle if there are none."""
    lab = _as_numpy(labels)
    counts = (lab > 0).sum(axis=tuple(a for a in range(3) if a != axis))
    return int(np.argmax(counts)) if counts.max() > 0 else lab.shape[axis] // 2


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


def organ_dice_figure(table, title: str = "Per-organ Dice", ylabel: str = "Dice", path: str | Path | None = None):
    """Grouped bars of a DataFrame with organs as rows and methods (or cases, rounds...) as columns."""
    fig, ax = plt.subplots(figsize=(max(7.0, 0.75 * len(table) + 2) + 1.6, 3.6))  # + the legend's column
    table.plot.bar(ax=ax, width=0.8)
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


# ------------------------------------------------------------------------------------------ pipeline diagram
# The method at a glance, drawn by the kit itself (the book's and the notebooks' diagram). Boxes and arrows are
# placed by hand in axes coordinates: matplotlib has no graph layout, and a fixed layout keeps the figure stable.

_STAGE_COLOURS = {"input": "#eeeeee", "stage1": "#dbe9f6", "stage2": "#fde4c8", "stage3": "#d9f0d3",
                  "output": "#f3d9ec"}


def _box(ax, xy: tuple[float, float], text: str, colour: str, width: float = 0.2, height: float = 0.2) -> None:
    from matplotlib.patches import FancyBboxPatch

    x, y = xy
    ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height, boxstyle="round,pad=0.01",
                                facecolor=colour, edgecolor="#444444", linewidth=1.0))
    ax.text(x, y, text, ha="center", va="center", fontsize=8.5, wrap=True)


def _arrow(ax, start: tuple[float, float], end: tuple[float, float], text: str = "", rad: float = 0.0,
           text_offset: tuple[float, float] = (0.0, 0.03)) -> None:
    ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "-|>", "color": "#333333", "lw": 1.3,
                                                      "connectionstyle": f"arc3,rad={rad}"})
    if text:
        mid = ((start[0] + end[0]) / 2 + text_offset[0], (start[1] + end[1]) / 2 + text_offset[1])
        ax.text(*mid, text, ha="center", va="bottom", fontsize=7.5, style="italic")


def pipeline_figure(path: str | Path | None = None):
    """The ISL pipeline: Stage 1 (initial segmenter) -> Stage 2 (registration) -> Stage 3 (refinement), the
    rounds loop with the moving-average inference mask, and the final arg-max. Returns the matplotlib figure."""
    fig, ax = plt.subplots(figsize=(11.0, 4.6))
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(0, 1)
    ax.set_axis_off()
    c = _STAGE_COLOURS
    _box(ax, (0.11, 0.84), "training cases\n(images + organ labels)", c["input"], height=0.14)
    _box(ax, (0.11, 0.22), "one inference image $x^*$\n(a shifted domain)", c["input"], height=0.14)
    _box(ax, (0.11, 0.53), "Stage 1\ninitial segmentation\nlearning: train $f_0$\n"
         "$P = \\mathrm{softmax}(f_0(x^*))$\n$M = P$", c["stage1"], height=0.26)
    _box(ax, (0.42, 0.53), "Stage 2\ndeform every training case\nonto $x^*$: intensity similarity\n"
         "+ Dice to the mask $M$\n+ $\\lambda \\cdot$ smoothness", c["stage2"], width=0.22, height=0.26)
    _box(ax, (0.72, 0.53), "Stage 3\nfine-tune a copy of $f$ on the\ninference-specific set $D^*$\n"
         "$P = \\mathrm{softmax}(f(x^*))$\n$M = \\beta M + (1 - \\beta) P$", c["stage3"], width=0.22, height=0.26)
    _box(ax, (0.93, 0.22), "final\nsegmentation\n$\\arg\\max\\, M$", c["output"], width=0.12, height=0.16)
    _arrow(ax, (0.11, 0.77), (0.11, 0.66))
    _arrow(ax, (0.11, 0.29), (0.11, 0.40))
    _arrow(ax, (0.21, 0.53), (0.31, 0.53), "$f_0$, mask $M$")
    _arrow(ax, (0.21, 0.84), (0.40, 0.66), "atlases", text_offset=(0.03, 0.0))
    _arrow(ax, (0.53, 0.53), (0.61, 0.53), "$D^*$", text_offset=(0.0, 0.015))
    # The loop of rounds r = 1..R: Stage 3's new mask M goes back to guide Stage 2's alignment.
    _arrow(ax, (0.72, 0.40), (0.42, 0.40), rad=-0.5)
    ax.text(0.57, 0.06, "repeat for rounds r = 1..R: the moving average of $M$ ($\\beta$)\n"
            "guides the next round's alignment (off: $M = P$)", ha="center", va="center", fontsize=8,
            style="italic")
    _arrow(ax, (0.80, 0.40), (0.90, 0.30), "after round R", text_offset=(0.04, 0.0))
    ax.set_title("Inference-specific learning (Chen et al., Medical Physics 2025): the pipeline", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------------------
# experiment report figures (report.py writes the Markdown and calls these)


def per_organ_figure(summary: dict, path: str | Path) -> None:
    """Grouped bars: each organ's mean Dice under each method of an experiment's ``summary.json``."""
    import pandas as pd

    table = pd.DataFrame({m: s["per_organ_dice"] for m, s in summary["methods"].items()})
    ax = table.plot.bar(figsize=(max(8, 0.8 * len(table)), 4), width=0.8)
    ax.set_ylabel("mean Dice")
    ax.set_ylim(0, 1)
    ax.set_title("Per-organ Dice by method")
    ax.legend(fontsize=8, ncol=min(4, table.shape[1]))
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=90)
    plt.close(ax.figure)


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
    fig.savefig(path, dpi=90)
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
    fig.savefig(path, dpi=90)
    plt.close(fig)
