import pytest
import torch
import torch.nn.functional as F

from ovseg.methods.blocks import CostEmbedding, convolved_cost_volume, cosine_cost_volume


def test_cost_volume_is_the_cosine_of_every_pixel_with_every_class():
    image = torch.randn(2, 8, 3, 4)
    classes = torch.randn(5, 8)
    cost = cosine_cost_volume(image, classes)
    assert cost.shape == (2, 5, 3, 4)
    expected = F.cosine_similarity(image[1, :, 2, 3], classes[4], dim=0)
    torch.testing.assert_close(cost[1, 4, 2, 3], expected)
    assert cost.abs().max() <= 1 + 1e-6


def test_cost_volume_keeps_the_template_axis():
    cost = cosine_cost_volume(torch.randn(1, 8, 3, 3), torch.randn(4, 7, 8))
    assert cost.shape == (1, 4, 7, 3, 3)


def test_per_image_class_embeddings():
    image = torch.randn(2, 8, 3, 3)
    per_image = torch.randn(2, 4, 7, 8)
    cost = cosine_cost_volume(image, per_image, per_image=True)
    assert cost.shape == (2, 4, 7, 3, 3)
    torch.testing.assert_close(cost[1], cosine_cost_volume(image[1:], per_image[1])[0])
    assert cosine_cost_volume(image, torch.randn(2, 4, 8), per_image=True).shape == (2, 4, 3, 3)


def test_cost_volume_errors_name_the_shapes():
    with pytest.raises(ValueError, match="Embedding sizes differ"):
        cosine_cost_volume(torch.randn(1, 8, 2, 2), torch.randn(3, 9))
    with pytest.raises(ValueError, match="B×K×D or B×K×M×D"):
        cosine_cost_volume(torch.randn(1, 8, 2, 2), torch.randn(3, 8), per_image=True)


@pytest.mark.parametrize("num_classes", [1, 20, 171])
def test_cost_embedding_works_for_any_number_of_classes(num_classes):
    layer = CostEmbedding(in_channels=7, out_channels=16)
    embedded = layer(torch.randn(2, num_classes, 7, 6, 6))
    assert embedded.shape == (2, num_classes, 16, 6, 6)


def test_cost_embedding_applies_the_same_conv_to_every_class():
    layer = CostEmbedding(in_channels=3, out_channels=4, kernel_size=3)
    cost = torch.randn(1, 2, 3, 5, 5)
    cost[0, 1] = cost[0, 0]
    embedded = layer(cost)
    torch.testing.assert_close(embedded[0, 0], embedded[0, 1])


@pytest.mark.parametrize(
    ("prompts", "outputs", "dim", "folded"),
    [(5, 3, 6, True), (2, 8, 64, False)],
)
def test_convolved_cost_volume_is_the_conv_of_the_cosine_volume(
    monkeypatch, prompts, outputs, dim, folded
):
    """Folded into the prototypes or not (whichever is cheaper), the result is the conv of every
    class slice of the cosine volume, borders included."""
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(prompts, outputs, 3, padding=1)
    features = torch.randn(2, dim, 7, 9)
    prototypes = torch.randn(2, 3, prompts, dim)
    volume = cosine_cost_volume(features, prototypes, per_image=True)
    expected = conv(volume.flatten(0, 1)).unflatten(0, (2, 3))
    if folded:  # the volume is never built

        def unbuilt(*args, **kwargs):
            raise AssertionError("the folded form builds no cost volume")

        monkeypatch.setattr("ovseg.methods.blocks.cosine_cost_volume", unbuilt)
    convolved = convolved_cost_volume(conv, features, prototypes)
    assert convolved.shape == (2, 3, outputs, 7, 9)
    torch.testing.assert_close(convolved, expected, atol=1e-4, rtol=0)
