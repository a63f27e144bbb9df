"""Slices of a volume with label overlays, the case grids, and the ipywidgets slice viewer.

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
from isl_core.runtime import atomic_path, env_flag  # noqa: E402

# One colour per BTCV organ id. The hues are from Paul Tol's colour-blind-safe schemes and Okabe & Ito's palette
# (https://personal.sron.nl/~pault/, https://jfly.uni-koeln.de/color/), assigned so that organs that touch in the
# abdomen (and in the phantoms) stay far apart also for a deuteranope; tests/test_viz.py measures it with
# colorspacious (CAM02-UCS distances after a simulated deuteranopia). The name is what the notebooks' text uses.
ORGAN_COLOURS: dict[int, tuple[str, str]] = {
    1: ("#332288", "indigo"),  # spleen
    2: ("#228833", "green"),  # right kidney
    3: ("#AA4499", "purple"),  # left kidney
    4: ("#44AA99", "teal"),  # gallbladder
    5: ("#999933", "olive"),  # esophagus
    6: ("#0072B2", "blue"),  # liver
    7: ("#99DDFF", "light blue"),  # stomach
    8: ("#882255", "wine"),  # aorta
    9: ("#CC79A7", "pink"),  # inferior vena cava
    10: ("#FFAABB", "light pink"),  # portal and splenic vein
    11: ("#D55E00", "vermilion"),  # pancreas
    12: ("#E69F00", "orange"),  # right adrenal gland
    13: ("#F0E442", "yellow"),  # left adrenal gland
}
LABEL_ALPHA = 0.55  # the overlay's opacity over the grey image


def label_colour(k: int) -> tuple[float, float, float, float]:
    """RGBA of label id ``k`` (opaque): the organ palette for 1-13, tab20 beyond (other datasets' extra labels)."""
    from matplotlib.colors import to_rgba

    if k in ORGAN_COLOURS:
        return to_rgba(ORGAN_COLOURS[k][0])
    return tuple(plt.get_cmap("tab20")((k - 1) % 20))


def label_cmap(num_classes: int = 14) -> ListedColormap:
    """Background transparent, every organ its ``label_colour`` (stable per label id) at ``LABEL_ALPHA``."""
    table = np.zeros((max(num_classes, 2), 4))
    for k in range(1, max(num_classes, 2)):
        table[k] = label_colour(k)
        table[k, 3] = LABEL_ALPHA
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
    _save(fig, path, dpi=80)
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


#: Set (to 1) while notebooks run headless (``isl reproduce``, the notebook tests): the viewer then draws its first
#: view as a static figure. Widgets in a headless run can stall the notebook client (an intermittent hang of
#: nbclient with ipywidgets' comm messages), and a saved widget displays nothing without its JavaScript.
STATIC_VIEWER_ENV = "ISL_STATIC_VIEWER"


def slice_viewer(image, labels=None, prediction=None, num_classes: int = 14, window: tuple[float, float] = (0, 1)):
    """An ipywidgets viewer: image with label and prediction overlays, a slice slider and an axis choice.

    Returns the widget box; in a headless run (``$ISL_STATIC_VIEWER`` set) it shows the middle axial slice as a
    static figure instead and returns that figure.
    """
    image = _as_numpy(image)
    layers = {"labels": labels, "prediction": prediction}
    layers = {k: _as_numpy(v) for k, v in layers.items() if v is not None}

    def figure(axis: int, index: int):
        fig, axes = plt.subplots(1, 1 + len(layers), figsize=(3.2 * (1 + len(layers)), 3.4), squeeze=False)
        overlay(axes[0, 0], image, None, axis, index, "image", vmin=window[0], vmax=window[1])
        for a, (name, lab) in zip(axes[0, 1:], layers.items()):
            overlay(a, image, lab, axis, index, name, num_classes, vmin=window[0], vmax=window[1])
        return fig

    if env_flag(STATIC_VIEWER_ENV):
        fig = figure(2, image.shape[2] // 2)
        fig.suptitle("slice viewer (static in a headless run; interactive in JupyterLab)", fontsize=9)
        plt.show()
        return fig

    import ipywidgets as w
    from IPython.display import display

    axis = w.Dropdown(options=[("axial", 2), ("coronal", 1), ("sagittal", 0)], value=2, description="view")
    index = w.IntSlider(value=image.shape[2] // 2, min=0, max=image.shape[2] - 1, description="slice")
    out = w.Output()

    def draw(*_):
        index.max = image.shape[axis.value] - 1
        with out:
            out.clear_output(wait=True)
            figure(axis.value, index.value)
            plt.show()

    axis.observe(draw, names="value")
    index.observe(draw, names="value")
    draw()
    box = w.VBox([w.HBox([axis, index]), out])
    display(box)
    return box


def _save(fig, path: str | Path | None, dpi: int = 90):
    # through atomic_path: a figure is complete or absent, and recorded in its output folder's manifest
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=Path(path).suffix.lstrip(".") or None)
    return fig


def best_slice(labels, axis: int = 2) -> int:
    """Index along ``axis`` of the slice with the most organ (non-zero) voxels; the middle if there are none."""
    lab = _as_numpy(labels)
    counts = (lab > 0).sum(axis=tuple(a for a in range(3) if a != axis))
    return int(np.argmax(counts)) if counts.max() > 0 else lab.shape[axis] // 2
