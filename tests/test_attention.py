import math

import pytest
import torch
import torch.nn.functional as F

from ovseg.methods.attention import (
    CrossAttentionBlock,
    LinearAttention,
    MultiHeadAttention,
    SelfAttentionBlock,
    SwinBlock,
    WindowAttention,
    window_partition,
    window_unpartition,
)


def _reference_attention(layer, query, key, value, key_mask=None):
    """Softmax attention written out head by head from the layer's own projections."""
    heads = layer.heads
    q = layer.query(query)
    k = layer.key(key)
    v = layer.value(value)
    head_dim = q.shape[-1] // heads
    outputs = []
    for head in range(heads):
        part = slice(head * head_dim, (head + 1) * head_dim)
        scores = q[..., part] @ k[..., part].transpose(-2, -1) / math.sqrt(head_dim)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
        outputs.append(scores.softmax(dim=-1) @ v[..., part])
    return layer.output(torch.cat(outputs, dim=-1))


def test_multi_head_attention_matches_the_written_out_formula():
    torch.manual_seed(0)
    layer = MultiHeadAttention(dim=8, heads=2, query_dim=6, key_dim=5, value_dim=4, out_dim=3)
    query, key, value = torch.randn(2, 7, 6), torch.randn(2, 4, 5), torch.randn(2, 4, 4)
    out, weights = layer(query, key, value, return_attention=True)
    assert out.shape == (2, 7, 3)
    assert weights.shape == (2, 2, 7, 4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 7))
    torch.testing.assert_close(out, _reference_attention(layer, query, key, value))
    torch.testing.assert_close(layer(query, key, value), out)


def test_masked_keys_have_no_influence():
    torch.manual_seed(0)
    layer = MultiHeadAttention(dim=8, heads=4)
    query, key = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    mask = torch.tensor([[True, True, False, True, False, False], [True] * 6])
    out = layer(query, key, key_mask=mask)
    changed = key.clone()
    changed[0, ~mask[0]] = 100 * torch.randn(3, 8)
    torch.testing.assert_close(layer(query, changed, key_mask=mask), out)
    torch.testing.assert_close(out, _reference_attention(layer, query, key, key, mask))
    # Dropping the masked keys altogether gives the same answer.
    kept = key[0, mask[0]][None]
    torch.testing.assert_close(layer(query[:1], kept), out[:1])


def test_attention_is_equivariant_to_queries_and_invariant_to_key_order():
    torch.manual_seed(0)
    layer = MultiHeadAttention(dim=8, heads=2)
    query, key = torch.randn(1, 6, 8), torch.randn(1, 5, 8)
    out = layer(query, key)
    query_order, key_order = torch.randperm(6), torch.randperm(5)
    torch.testing.assert_close(layer(query[:, query_order], key), out[:, query_order])
    torch.testing.assert_close(layer(query, key[:, key_order]), out)


def test_cross_attention_block_is_post_norm_with_mlp():
    torch.manual_seed(0)
    block = CrossAttentionBlock(dim=8, heads=2, context_dim=5)
    x, context = torch.randn(2, 6, 8), torch.randn(2, 3, 5)
    attended = block.attention(x, context)
    mixed = F.layer_norm(attended + x, (8,), block.norm1.weight, block.norm1.bias)
    expected = block.norm2(block.mlp(mixed) + mixed)
    torch.testing.assert_close(block(x, context), expected)


def test_self_attention_block_attends_over_an_extended_input_with_residual_to_x():
    torch.manual_seed(0)
    block = SelfAttentionBlock(dim=4, heads=2, input_dim=10)
    x, extended = torch.randn(3, 9, 4), torch.randn(3, 9, 10)
    attended = block.attention(extended, extended, extended)
    mixed = block.norm1(attended + x)
    torch.testing.assert_close(
        block(x, attention_input=extended), block.norm2(block.mlp(mixed) + mixed)
    )
    with pytest.raises(ValueError, match="input_dim"):
        block(x)


def _window_reference(layer, tokens):
    """Plain attention among a set of tokens (``1×L×C``) with the layer's weights, no bias."""
    out = _reference_attention(layer, tokens, tokens, tokens)
    return out


def _zero_position_bias(layer):
    with torch.no_grad():
        layer.relative_position_bias.zero_()


def test_window_attention_equals_global_attention_when_the_window_covers_the_image():
    torch.manual_seed(0)
    layer = WindowAttention(dim=8, heads=2, window_size=6)
    _zero_position_bias(layer)
    x = torch.randn(2, 4, 6, 8)
    out = layer(x)
    expected = _window_reference(layer, x.reshape(2, 24, 8)).reshape(2, 4, 6, 8)
    torch.testing.assert_close(out, expected)


def test_windows_do_not_see_each_other_without_shift():
    torch.manual_seed(0)
    layer = WindowAttention(dim=8, heads=2, window_size=4)
    x = torch.randn(1, 8, 8, 8)
    out = layer(x)
    changed = x.clone()
    changed[0, 0, 0] += 5
    changed_out = layer(changed)
    torch.testing.assert_close(changed_out[0, 4:], out[0, 4:])
    torch.testing.assert_close(changed_out[0, :4, 4:], out[0, :4, 4:])
    assert not torch.allclose(changed_out[0, :4, :4], out[0, :4, :4])


def test_shifted_windows_mix_neighbouring_windows_but_not_wrapped_borders():
    torch.manual_seed(0)
    layer = WindowAttention(dim=8, heads=2, window_size=4, shift=True)
    x = torch.randn(1, 8, 8, 8)
    out = layer(x)
    changed = x.clone()
    changed[0, 3, 3] += 5  # corner of the first regular window
    changed_out = layer(changed)
    # The shifted window spanning rows/cols 2..5 now mixes it into (4, 4) ...
    assert not torch.allclose(changed_out[0, 4, 4], out[0, 4, 4])
    changed = x.clone()
    changed[0, 0, 0] += 5
    changed_out = layer(changed)
    # ... but (7, 7) shares a cyclically rolled window with (0, 0) and must not see it.
    torch.testing.assert_close(changed_out[0, 7, 7], out[0, 7, 7])
    torch.testing.assert_close(changed_out[0, 6:, 6:], out[0, 6:, 6:])


def test_padded_tokens_are_masked_out():
    torch.manual_seed(0)
    layer = WindowAttention(dim=8, heads=2, window_size=4)
    _zero_position_bias(layer)
    x = torch.randn(1, 6, 7, 8)
    out = layer(x)
    assert out.shape == x.shape
    # The bottom-right window holds 2×3 real tokens and 10 padded ones: attention among the real
    # ones only.
    corner = x[:, 4:6, 4:7].reshape(1, 6, 8)
    expected = _window_reference(layer, corner).reshape(1, 2, 3, 8)
    torch.testing.assert_close(out[:, 4:6, 4:7], expected)
    shifted = WindowAttention(dim=8, heads=2, window_size=4, shift=True)
    assert torch.isfinite(shifted(x)).all()


def test_guidance_reaches_queries_and_keys_but_not_values():
    torch.manual_seed(0)
    layer = WindowAttention(dim=8, heads=2, window_size=4, query_guidance_dim=3, key_guidance_dim=3)
    x, guidance = torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 3)
    out = layer(x, query_guidance=guidance, key_guidance=guidance)
    assert not torch.allclose(out, layer(x, query_guidance=-guidance, key_guidance=-guidance))
    # With constant queries and keys the attention is uniform: the guidance cannot matter and
    # every token gets the mean of the values.
    with torch.no_grad():
        for linear in (layer.query, layer.key):
            linear.weight.zero_()
        layer.relative_position_bias.zero_()
    uniform = layer(x, query_guidance=guidance, key_guidance=guidance)
    mean_value = layer.output(layer.value(x).mean(dim=(1, 2)))
    torch.testing.assert_close(uniform, mean_value[:, None, None].expand_as(uniform))
    with pytest.raises(ValueError, match="guidance"):
        layer(x)


def test_swin_block_keeps_shape_and_is_equivariant_to_shifts_by_whole_windows():
    torch.manual_seed(0)
    block = SwinBlock(dim=8, heads=2, window_size=4, guidance_dim=2)
    x, guidance = torch.randn(1, 8, 8, 8), torch.randn(1, 8, 8, 2)
    out = block(x, guidance)
    assert out.shape == x.shape
    # Regular windows tile the image, so a cyclic shift by a whole window commutes with the block.
    rolled = block(x.roll(4, dims=1), guidance.roll(4, dims=1))
    torch.testing.assert_close(rolled, out.roll(4, dims=1))


def test_linear_attention_matches_its_kernel_formula():
    torch.manual_seed(0)
    layer = LinearAttention(dim=8, heads=2)
    query, key = torch.randn(2, 5, 8), torch.randn(2, 7, 8)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    out = layer(query, key, key_mask=mask)
    q = F.elu(layer.query(query)) + 1
    k = (F.elu(layer.key(key)) + 1) * mask[..., None]
    v = layer.value(key)
    heads = []
    for head in range(2):
        part = slice(head * 4, head * 4 + 4)
        weights = q[..., part] @ k[..., part].transpose(-2, -1)
        weights = weights / (weights.sum(-1, keepdim=True) + layer.eps)
        heads.append(weights @ v[..., part])
    torch.testing.assert_close(out, layer.output(torch.cat(heads, dim=-1)))
    changed = key.clone()
    changed[1, 4:] = 50
    torch.testing.assert_close(layer(query, changed, key_mask=mask), out)


def test_guidance_shared_by_groups_equals_repeated_guidance():
    torch.manual_seed(0)
    block = SwinBlock(dim=8, heads=2, window_size=4, shift=True, guidance_dim=3)
    x, guidance = torch.randn(6, 8, 8, 8), torch.randn(2, 8, 8, 3)
    shared = block(x, guidance)
    repeated = block(x, guidance.repeat_interleave(3, dim=0))
    torch.testing.assert_close(shared, repeated)
    with pytest.raises(ValueError, match="divide"):
        block(x, torch.randn(4, 8, 8, 3))


def test_window_partition_holds_row_major_blocks_and_unpartition_inverts_it():
    tokens = torch.randn(2, 4, 6, 3)  # a 2×3 grid of 2×2 windows
    windows = window_partition(tokens, (2, 2))
    assert windows.shape == (2, 6, 4, 3)
    # window 4 is row 1, column 1: tokens (2..3, 2..3), row-major inside
    assert torch.equal(windows[:, 4], tokens[:, 2:4, 2:4].reshape(2, 4, 3))
    assert torch.equal(window_unpartition(windows, (2, 2), (2, 3)), tokens)
