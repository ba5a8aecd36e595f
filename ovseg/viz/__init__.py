"""Drawing: colour palettes, label overlays, legends, heatmaps, prompt drawings and figures."""

from ovseg.viz.drawing import (
    changed_pixels,
    draw_pseudo_prompts,
    draw_window_routing,
    label_image,
)
from ovseg.viz.figures import PROJECTIONS, embedding_scatter, project, similarity_plot
from ovseg.viz.overlay import class_color, class_palette, colorize, heatmap, legend_entries, overlay

__all__ = [
    "PROJECTIONS",
    "changed_pixels",
    "class_color",
    "class_palette",
    "colorize",
    "draw_pseudo_prompts",
    "draw_window_routing",
    "embedding_scatter",
    "heatmap",
    "label_image",
    "legend_entries",
    "overlay",
    "project",
    "similarity_plot",
]
