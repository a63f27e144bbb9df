"""Figures and the interactive slice viewer: what every notebook, report and the book shows.

``slices`` (slices with label overlays, case grids, the ipywidgets viewer), ``figures`` (the notebooks' and the
report's static figures) and ``diagram`` (the pipeline diagram). Import from here: ``from isl_core.viz import X``.
"""

from isl_core.viz.diagram import pipeline_figure
from isl_core.viz.figures import (
    appearance_figure,
    curves_figure,
    field_panel,
    jacobian_panel,
    label_row_figure,
    organ_dice_figure,
    overlay_figure,
    paired_figure,
    paired_lines_figure,
    per_organ_figure,
    probability_figure,
)
from isl_core.viz.slices import (
    ORGAN_COLOURS,
    best_slice,
    case_grid,
    cohort_figure,
    display_slice,
    label_cmap,
    label_colour,
    organ_legend,
    overlay,
    slice_viewer,
)

__all__ = [
    "ORGAN_COLOURS", "appearance_figure", "best_slice", "case_grid", "cohort_figure", "curves_figure", "display_slice",
    "field_panel", "jacobian_panel", "label_cmap", "label_colour", "label_row_figure", "organ_dice_figure",
    "organ_legend", "overlay", "overlay_figure", "paired_figure", "paired_lines_figure", "per_organ_figure",
    "pipeline_figure", "probability_figure", "slice_viewer",
]
