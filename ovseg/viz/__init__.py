"""Drawing: colour palettes, label overlays, legends and heatmaps."""

from ovseg.viz.overlay import class_palette, colorize, heatmap, legend_entries, overlay

__all__ = ["class_palette", "colorize", "heatmap", "legend_entries", "overlay"]
