"""Figures follow the radiological convention: the patient's right (RAS +x) on the viewer's left."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.quiver import Quiver  # noqa: E402

from isl_core.viz import display_slice, field_panel  # noqa: E402


def _x_ramp(shape=(6, 5, 4)) -> np.ndarray:
    return np.broadcast_to(np.arange(shape[0], dtype=float)[:, None, None], shape).copy()


def test_axial_and_coronal_slices_show_the_patients_right_on_the_left():
    vol = _x_ramp()  # value = x index: larger is further to the patient's right
    for axis in (1, 2):
        plane = display_slice(vol, axis, 1)
        assert plane.shape[1] == vol.shape[0]  # columns run along x
        assert plane[0, 0] == vol.shape[0] - 1 and plane[0, -1] == 0


def test_sagittal_slices_keep_anterior_on_the_right():
    vol = np.broadcast_to(np.arange(5, dtype=float)[None, :, None], (6, 5, 4)).copy()  # value = y (anterior)
    plane = display_slice(vol, 0, 2)
    assert plane[0, 0] == 0 and plane[0, -1] == 4


def test_displacement_arrows_follow_the_flipped_display():
    u = np.zeros((3, 6, 6, 4), dtype=np.float32)
    u[0] = 1.0  # every voxel samples one voxel towards the patient's right
    fig, ax = plt.subplots()
    field_panel(ax, u, index=2, step=2)
    arrows = next(c for c in ax.get_children() if isinstance(c, Quiver))
    assert np.all(arrows.U < 0)  # right is drawn on the left: the arrows point left
    plt.close(fig)


def test_the_slice_viewer_is_a_static_figure_in_a_headless_run(monkeypatch):
    import matplotlib.pyplot as plt
    import numpy as np

    from isl_core.viz import slice_viewer
    from isl_core.viz.slices import STATIC_VIEWER_ENV

    image = np.random.default_rng(0).random((12, 10, 8))
    labels = (image > 0.5).astype(np.uint8)
    monkeypatch.setenv(STATIC_VIEWER_ENV, "1")
    fig = slice_viewer(image, labels)
    assert isinstance(fig, plt.Figure) and len(fig.axes) == 2  # the image and its labels, middle axial slice
    plt.close(fig)
    monkeypatch.delenv(STATIC_VIEWER_ENV)
    box = slice_viewer(image, labels)  # interactive: a widget box with the view and slice controls
    assert type(box).__name__ == "VBox"
    plt.close("all")


# ------------------------------------------------------------------------------------------ the label palette

# Organs that touch: in the phantoms (label pairs 1-2 voxels apart in drawn subjects, measured with
# isl_core.phantoms.draw_subject on seeds 0-2, with and without the shift) and in real abdominal CT (aorta / vena
# cava, liver / esophagus), plus spleen / right kidney, which stand side by side in every figure legend.
ADJACENT = [(1, 3), (1, 7), (1, 10), (1, 11), (1, 13), (2, 6), (2, 9), (3, 10), (3, 11), (3, 13), (4, 6), (5, 8),
            (6, 7), (6, 9), (6, 10), (6, 11), (6, 12), (7, 11), (8, 10), (8, 11), (8, 13), (9, 12), (10, 11), (8, 9),
            (5, 6), (1, 2), (5, 7)]
MIN_ADJACENT = 20.0  # CAM02-UCS distance; about 1-2 units is the smallest difference people notice
MIN_ANY = 12.0


def _ucs(colours, deuteranope: bool):
    """CAM02-UCS coordinates of sRGB colours, as seen by everyone or by a deuteranope (Machado et al. 2009,
    severity 100, as implemented by colorspacious)."""
    from colorspacious import cspace_convert

    rgb = np.asarray(colours, float)[:, :3]
    if deuteranope:
        rgb = np.clip(cspace_convert(rgb, {"name": "sRGB1+CVD", "cvd_type": "deuteranomaly", "severity": 100},
                                     "sRGB1"), 0, 1)
    return cspace_convert(rgb, "sRGB1", "CAM02-UCS")


def _distances(colours: dict[int, tuple], deuteranope: bool) -> dict[tuple[int, int], float]:
    keys = sorted(colours)
    ucs = dict(zip(keys, _ucs([colours[k] for k in keys], deuteranope)))
    return {(a, b): float(np.linalg.norm(ucs[a] - ucs[b])) for a in keys for b in keys if a < b}


def test_organs_that_touch_differ_also_for_red_green_colour_blindness():
    from isl_core.viz import ORGAN_COLOURS, label_colour

    assert sorted(ORGAN_COLOURS) == list(range(1, 14))
    colours = {k: label_colour(k) for k in ORGAN_COLOURS}
    for deuteranope in (False, True):
        d = _distances(colours, deuteranope)
        close = {p: round(d[p], 1) for p in ADJACENT if d[p] < MIN_ADJACENT}
        assert not close, f"touching organs look alike (deuteranope={deuteranope}): {close}"
    close = {p: round(v, 1) for p, v in _distances(colours, False).items() if v < MIN_ANY}
    assert not close, f"organs whose colours are hard to tell apart in a legend: {close}"
    names = [name for _, name in ORGAN_COLOURS.values()]
    assert len(set(names)) == len(names)


def test_the_palette_check_catches_the_old_tab20_palette():
    """The test above fails on the palette it replaced (tab20 by label id): spleen / right kidney and others."""
    old = {k: plt.get_cmap("tab20")((k - 1) % 20) for k in range(1, 14)}
    d = _distances(old, True)
    assert min(d[p] for p in ADJACENT) < MIN_ADJACENT


def test_overlays_and_legends_use_the_palette():
    from matplotlib.colors import to_rgba

    from isl_core.viz import ORGAN_COLOURS, label_cmap

    cmap = label_cmap(14)
    for k, (hex_colour, _) in ORGAN_COLOURS.items():
        assert np.allclose(cmap(k)[:3], to_rgba(hex_colour)[:3])
    assert cmap(0)[3] == 0


def test_report_per_organ_legend_hides_no_bar(tmp_path, monkeypatch):
    """The report's per-organ figure (README) puts its legend beside the axes, not over the stomach's bars."""
    from isl_core.viz import figures

    summary = {"methods": {m: {"per_organ_dice": {"liver": 0.97, "stomach": 0.95, "spleen": 0.9}}
                           for m in ("baseline", "malf", "isl-mask", "isl-mask-ema", "isl-intensity")}}
    drawn = []
    original = figures.organ_dice_figure
    monkeypatch.setattr(figures, "organ_dice_figure", lambda *a, **k: drawn.append(original(*a, **k)) or drawn[-1])
    figures.per_organ_figure(summary, tmp_path / "per_organ.png")
    fig = drawn[0]
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1
    assert (tmp_path / "per_organ.png").is_file()
