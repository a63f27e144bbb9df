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
