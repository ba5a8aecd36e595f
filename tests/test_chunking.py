"""Classes in chunks give the same results as all classes at once."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ovseg.methods.chunking import (
    UPSAMPLE_CHUNK,
    class_slices,
    pad_class_subsets,
    per_class,
    resize_logits,
    scatter_class_subsets,
    upsample_logits,
    upsampled_argmax,
    write_classes,
)


def test_class_slices_cut_as_split_does():
    assert class_slices(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert class_slices(4, 4) == [slice(0, 4)]
    assert class_slices(0, 3) == []
    with pytest.raises(ValueError, match="at least one class"):
        class_slices(3, 0)


def test_write_classes_fills_the_buffer_it_allocates():
    parts = [torch.full((2, 2, 3), float(i)) for i in range(3)]
    buffer = None
    for index, part in zip(class_slices(5, 2), parts, strict=False):
        buffer = write_classes(buffer, part[:, : index.stop - index.start], index, 5)
    assert buffer.shape == (2, 5, 3)
    assert buffer[0, :, 0].tolist() == [0, 0, 1, 1, 2]


@pytest.mark.parametrize("grad", [True, False])
def test_per_class_equals_the_module_on_all_classes(grad):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3, padding=1)
    x = torch.randn(2, 7, 4, 5, 5)
    whole = conv(x.flatten(0, 1)).unflatten(0, (2, 7))
    with torch.set_grad_enabled(grad):
        chunked = per_class(conv, x, 3)
    assert chunked.requires_grad == grad
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_upsampling_in_chunks_is_the_same_with_and_without_autograd():
    torch.manual_seed(0)
    logits = torch.randn(1, UPSAMPLE_CHUNK + 5, 6, 6)
    with torch.no_grad():
        written = upsample_logits(logits, (17, 13))
    concatenated = upsample_logits(logits.requires_grad_(), (17, 13))
    assert torch.equal(written, concatenated.detach())
    reference = F.interpolate(logits.detach(), size=(17, 13), mode="bilinear", align_corners=False)
    torch.testing.assert_close(written, reference, rtol=0, atol=1e-5)
    assert upsample_logits(logits, (6, 6)) is logits
    assert resize_logits(logits, (6, 6)) is logits


def test_the_running_argmax_equals_the_argmax_of_the_upsampled_logits():
    torch.manual_seed(1)
    logits = torch.randn(2, 2 * UPSAMPLE_CHUNK + 3, 5, 5)
    logits[0, UPSAMPLE_CHUNK + 1, 2, 2] = float("nan")  # NaN wins, as in argmax
    logits[1, :, 0, 0] = 1.0  # a tie: the first class wins
    with torch.no_grad():
        expected = upsample_logits(logits, (9, 9)).argmax(dim=1)
        labels = upsampled_argmax(logits, (9, 9))
    assert torch.equal(labels, expected)
    assert int(labels[1, 0, 0]) == 0
    assert (labels[0] == UPSAMPLE_CHUNK + 1).any()


def test_padded_class_subsets_scatter_back_to_the_whole_vocabulary():
    selected = torch.tensor([[False, True, False, True, True], [True, False, False, False, False]])
    indices, mask = pad_class_subsets(selected)
    assert indices.tolist() == [[1, 3, 4], [0, 0, 0]]  # padding repeats a valid class
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    values = torch.arange(6.0).view(2, 3, 1) + 1
    full = scatter_class_subsets(values, indices, mask, 5, fill=-100.0)
    assert full[..., 0].tolist() == [[-100, 1, -100, 2, 3], [4, -100, -100, -100, -100]]
