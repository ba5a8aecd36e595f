import numpy as np
import pytest
from PIL import Image

from ovseg.viz import (
    changed_pixels,
    class_color,
    draw_pseudo_prompts,
    draw_window_routing,
    embedding_scatter,
    label_image,
    project,
    similarity_plot,
)
from ovseg.viz.drawing import CHANGED_COLOUR, QUERY_COLOUR


def test_label_png_keeps_class_indices_losslessly(tmp_path):
    labels = np.array([[0, 1], [2, 255]])
    label_image(labels, 256).save(tmp_path / "small.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "small.png")), labels)
    big = np.array([[0, 846], [300, 5]])
    label_image(big, 847).save(tmp_path / "big.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "big.png")), big)


def test_changed_pixels_marks_exactly_the_relabelled_pixels():
    image = np.full((4, 4, 3), 100, dtype=np.uint8)
    before = np.zeros((4, 4), dtype=np.int64)
    after = before.copy()
    after[1, 2] = 3
    drawn = changed_pixels(image, before, after)
    assert tuple(drawn[1, 2]) == CHANGED_COLOUR
    assert (drawn[0, 0] == 60).all()  # grey, darkened
    with pytest.raises(ValueError, match="must match"):
        changed_pixels(image, before[:2], after[:2])


def test_pseudo_prompts_are_drawn_where_the_grid_says():
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    regions = np.zeros((2, 4, 4), dtype=bool)
    regions[0, :2, :2] = True  # top-left quarter
    regions[1, 3, 3] = True
    points = np.array([[0, 0], [3, 3]])
    boxes = np.array([[0, 0, 1, 1], [3, 3, 3, 3]])  # inclusive corner cells
    drawn = draw_pseudo_prompts(image, regions, points, boxes)
    assert drawn.shape == image.shape
    assert drawn[20:28, 20:28].any()  # inside region 1, away from the point
    assert not drawn[40:44, 8:12].any()  # no region, no box, no point there
    first = np.array(class_color("region 0"))
    assert np.abs(drawn[8, 8].astype(int) - first).sum() < 20  # the point of region 1


def test_window_routing_highlights_the_query_and_its_routed_windows():
    image = np.full((64, 64, 3), 200, dtype=np.uint8)
    drawn = draw_window_routing(image, (4, 4), query=0, routed=[5, 15])
    assert tuple(drawn[0, 8]) == QUERY_COLOUR  # the query window's outline
    assert tuple(drawn[40, 40]) == (110, 110, 110)  # window 10 is not routed: dimmed grey
    routed = drawn[60, 60]  # window 15 is routed: yellow tint
    assert routed[0] > routed[2] and routed[1] > routed[2]


def test_projections_are_two_dimensional_and_reproducible(rng):
    points = rng.normal(size=(40, 16))
    for method in ("PCA", "t-SNE"):
        first, second = project(points, method), project(points, method)
        assert first.shape == (40, 2)
        np.testing.assert_allclose(first, second)
    with pytest.raises(ValueError, match="projection must be"):
        project(points, "umap")
    with pytest.raises(ValueError, match="at least 3"):
        project(points[:2])


def test_figures_render_to_rgb_arrays(rng):
    coordinates = rng.normal(size=(7, 2))
    kinds = ["image", "text", "text", "visual", "visual", "dual", "dual"]
    labels = ["image", "cat", "dog", "cat", "dog", "cat", "dog"]
    scatter = embedding_scatter(coordinates, kinds, labels, title="gap")
    bars = similarity_plot(
        ["cat", "dog"], {"text": np.array([0.2, 0.3]), "visual": np.array([0.7, 0.6])}, title="s"
    )
    for figure in (scatter, bars):
        assert figure.ndim == 3 and figure.shape[2] == 3 and figure.dtype == np.uint8
        assert figure.std() > 10  # something was drawn
