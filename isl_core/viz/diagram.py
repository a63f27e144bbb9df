"""The method's pipeline diagram, drawn by the kit itself (shown by the book's front page and notebooks 00 and 03)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg") if matplotlib.get_backend().lower() in ("", "agg") else None
import matplotlib.pyplot as plt  # noqa: E402

from isl_core.viz.slices import _save  # noqa: E402

# The method at a glance (the book's front page, notebooks 00 and 03). Boxes and arrows are
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
