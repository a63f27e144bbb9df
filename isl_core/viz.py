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


def _slice(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    # transpose so that the first array axis runs left-right and the image's "up" is anterior/superior
    return np.take(vol, index, axis=axis).T


def overlay(ax, image, labels=None, axis: int = 2, index: int | None = None, title: str | None = None,
            num_classes: int = 14, vmin: float = 0.0, vmax: float = 1.0) -> None:
    """Draw one slice of ``image`` with ``labels`` on top (labels may be None)."""
    image = _as_numpy(image)
    index = image.shape[axis] // 2 if index is None else index
    ax.imshow(_slice(image, axis, index), cmap="gray", origin="lower", vmin=vmin, vmax=vmax,
              interpolation="nearest")
    if labels is not None:
        lab = _as_numpy(labels).astype(int)
        ax.imshow(_slice(lab, axis, index), cmap=label_cmap(num_classes), origin="lower", vmin=0,
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


def case_grid(rows: Sequence[tuple[str, np.ndarray, np.ndarray | None]], axis_slices: Sequence[tuple[int, float]]
              = ((2, 0.55), (1, 0.5)), labels: dict[int, str] | None = None, window: tuple[float, float] = (0, 1),
              path: str | Path | None = None):
    """A figure with one row per (title, image, labels) and one column per (axis, relative position)."""
    labels = labels or BTCV_LABELS
    fig, axes = plt.subplots(len(rows), 2 * len(axis_slices), figsize=(3.0 * 2 * len(axis_slices),
                                                                      3.0 * len(rows) + 0.6), squeeze=False)
    for r, (title, image, lab) in enumerate(rows):
        image = _as_numpy(image)
        for c, (axis, rel) in enumerate(axis_slices):
            idx = int(rel * (image.shape[axis] - 1))
            overlay(axes[r, 2 * c], image, None, axis, idx, f"{title}" if c == 0 else None, vmin=window[0],
                    vmax=window[1])
            overlay(axes[r, 2 * c + 1], image, lab, axis, idx, "labels" if c == 0 else None,
                    num_classes=max(labels) + 1, vmin=window[0], vmax=window[1])
    organ_legend(fig, labels)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
    return fig


def cohort_figure(dataset_dir: str | Path, path: str | Path | None = None):
    """A training case and a shifted inference case of a dataset folder, with their labels (raw HU, windowed)."""
    import nibabel as nib

    from isl_core.data import read_dataset_json

    ds = read_dataset_json(dataset_dir)
    rows = []
    for title, case in (("training case", ds.training[0]), ("inference case (shifted)",
                                                            (ds.validation or ds.training)[0])):
        img = nib.as_closest_canonical(nib.load(str(case.image)))
        lab = nib.as_closest_canonical(nib.load(str(case.label))) if case.label else None
        rows.append((f"{title}: {case.id}", img.get_fdata(dtype=np.float32),
                     None if lab is None else np.asarray(lab.dataobj)))
    return case_grid(rows, labels=ds.labels, window=(-175, 250), path=path)


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
