"""Small matplotlib figures rendered to arrays: the embedding-gap projection and similarity plot.

Figures are drawn with the non-interactive Agg canvas, so nothing needs a display and concurrent
requests do not share a pyplot state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PROJECTIONS = ("PCA", "t-SNE")
KIND_STYLES = {
    "image": {"color": "#111111", "marker": "*", "s": 260},
    "text": {"color": "#1f77b4", "marker": "o", "s": 46},
    "visual": {"color": "#ff7f0e", "marker": "s", "s": 46},
    "dual": {"color": "#2ca02c", "marker": "^", "s": 56},
}


def project(embeddings: np.ndarray, method: str = "PCA", *, seed: int = 0) -> np.ndarray:
    """``N×D`` embeddings → ``N×2`` coordinates with PCA or t-SNE (cosine metric, fixed seed)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if method not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}; got {method!r}.")
    points = np.asarray(embeddings, dtype=np.float64)
    if len(points) < 3:
        raise ValueError(f"A 2-D projection needs at least 3 embeddings; got {len(points)}.")
    if method == "PCA":
        return PCA(n_components=2, random_state=seed).fit_transform(points)
    perplexity = float(min(30, max(2, (len(points) - 1) // 3)))
    return TSNE(
        n_components=2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed
    ).fit_transform(points)


def _to_array(figure: Figure) -> np.ndarray:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def embedding_scatter(
    coordinates: np.ndarray,
    kinds: Sequence[str],
    labels: Sequence[str],
    *,
    title: str,
) -> np.ndarray:
    """A 2-D scatter of image/text/visual/dual embeddings, prompts of one class joined by a line.

    Arguments:
        coordinates: ``N×2`` projected points.
        kinds: per point ``"image"``, ``"text"``, ``"visual"`` or ``"dual"``.
        labels: per point its class name (ignored for the image).
        title: the plot's title.
    """
    figure = Figure(figsize=(6.4, 5.2), dpi=90)
    axes = figure.add_subplot()
    kinds = list(kinds)
    by_class: dict[str, list[int]] = {}
    for index, (kind, label) in enumerate(zip(kinds, labels, strict=True)):
        if kind != "image":
            by_class.setdefault(label, []).append(index)
    for indices in by_class.values():
        axes.plot(*coordinates[indices].T, color="#bbbbbb", linewidth=0.8, zorder=1)
    for kind, style in KIND_STYLES.items():
        chosen = [index for index, k in enumerate(kinds) if k == kind]
        if chosen:
            axes.scatter(*coordinates[chosen].T, label=kind, zorder=2, **style)
    for label, indices in by_class.items():
        x, y = coordinates[indices].mean(axis=0)
        axes.annotate(label, (x, y), fontsize=7, alpha=0.8, ha="center")
    axes.set_title(title, fontsize=10)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    return _to_array(figure)


def similarity_plot(
    names: Sequence[str], similarities: dict[str, np.ndarray], *, title: str
) -> np.ndarray:
    """Grouped bars of each class's cosine similarity to the image, one bar per prompt kind.

    Arguments:
        names: the ``K`` class names.
        similarities: prompt kind (``"text"``, ``"visual"``, ``"dual"``) → ``K`` cosines.
        title: the plot's title.
    """
    count = len(names)
    figure = Figure(figsize=(max(6.4, 0.42 * count + 2), 4.0), dpi=90)
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(similarities))
    positions = np.arange(count)
    for offset, (kind, values) in enumerate(similarities.items()):
        axes.bar(
            positions + (offset - (len(similarities) - 1) / 2) * width,
            values,
            width,
            label=f"image–{kind} (mean {np.mean(values):.2f})",
            color=KIND_STYLES[kind]["color"],
        )
    axes.set_xticks(positions, list(names), rotation=45, ha="right", fontsize=8)
    axes.set_ylabel("cosine similarity to the image")
    axes.axhline(0, color="#444444", linewidth=0.6)
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return _to_array(figure)
