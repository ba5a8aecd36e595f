"""Attention layers shared by the methods.

Every method that needs attention builds it from these layers instead of writing its own, so they
are generic: separate input widths for queries, keys and values (a query may carry concatenated
guidance channels that the values do not), boolean key masks for padded tokens, and attention maps
returned on request rather than read out with hooks.

- :class:`MultiHeadAttention`: scaled dot-product attention between any two token sets.
- :class:`CrossAttentionBlock`: post-norm block whose tokens attend to a separate context
  (DCP-CLIP's text→visual cross-attention, Eqs. 8–10).
- :class:`SelfAttentionBlock`: post-norm self-attention whose Q/K/V may be computed from a wider
  input than the residual stream (DCP-CLIP's cost/visual fusion, Eqs. 11–12).
- :class:`WindowAttention` / :class:`SwinBlock`: Swin attention in (shifted) windows with a
  relative position bias and optional query/key guidance channels (CAT-Seg's aggregation,
  DCP-CLIP's spatial enhancement, Eqs. 13–14).
- :class:`LinearAttention`: kernelised attention whose cost is linear in the number of tokens.
- :func:`window_partition` / :func:`window_unpartition`: a token grid to windows and back (Swin,
  LDVC's routed windows).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def split_heads(tokens: Tensor, heads: int) -> Tensor:
    """``...×L×(heads·d)`` → ``...×heads×L×d``."""
    *batch, length, width = tokens.shape
    return tokens.view(*batch, length, heads, width // heads).transpose(-3, -2)


def merge_heads(tokens: Tensor) -> Tensor:
    """``...×heads×L×d`` → ``...×L×(heads·d)``."""
    tokens = tokens.transpose(-3, -2)
    return tokens.reshape(*tokens.shape[:-2], -1)


def window_partition(tokens: Tensor, window: tuple[int, int]) -> Tensor:
    """``B×H×W×C`` tokens (H, W multiples of the window) → ``B×nW×L×C``: row-major windows,
    row-major tokens inside each."""
    batch, height, width, channels = tokens.shape
    tokens = tokens.view(
        batch, height // window[0], window[0], width // window[1], window[1], channels
    )
    return tokens.permute(0, 1, 3, 2, 4, 5).reshape(batch, -1, window[0] * window[1], channels)


def window_unpartition(windows: Tensor, window: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: ``B×nW×L×C`` on a ``grid`` of windows → ``B×H×W×C``."""
    batch, _, _, channels = windows.shape
    windows = windows.view(batch, grid[0], grid[1], window[0], window[1], channels)
    return windows.permute(0, 1, 3, 2, 4, 5).reshape(
        batch, grid[0] * window[0], grid[1] * window[1], channels
    )


def _masked_score(dtype: torch.dtype) -> float:
    # A large finite negative instead of -inf: a query whose keys are all masked (a padded token
    # in an all-padding Swin region) gets uniform weights instead of NaN, which would otherwise
    # leak into gradients even though its output is discarded.
    return torch.finfo(dtype).min / 4


class Mlp(nn.Sequential):
    """Two-layer perceptron ``dim → hidden → dim`` with GELU, the transformer feed-forward."""

    def __init__(self, *, dim: int, hidden_dim: int) -> None:
        super().__init__(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim))


class MultiHeadAttention(nn.Module):
    """``softmax(Q Kᵀ / √d) V`` over ``heads`` heads, with separate input widths.

    Queries ``B×Lq×query_dim``, keys ``B×Lk×key_dim`` and values ``B×Lk×value_dim`` are projected
    to ``dim`` channels, attended per head (``d = dim / heads``) and projected to ``out_dim``.
    Any leading batch shape works, not just ``B``.
    """

    def __init__(
        self,
        *,
        dim: int,
        heads: int,
        query_dim: int | None = None,
        key_dim: int | None = None,
        value_dim: int | None = None,
        out_dim: int | None = None,
        bias: bool = True,
    ) -> None:
        """
        Arguments:
            dim: width of the projected queries, keys and values; divisible by ``heads``.
            heads: number of attention heads.
            query_dim, key_dim, value_dim: input widths (default ``dim``; ``value_dim`` defaults
                to ``key_dim``).
            out_dim: output width (default ``dim``).
            bias: whether the projections have biases.
        """
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}.")
        key_dim = key_dim or dim
        self.heads = heads
        self.query = nn.Linear(query_dim or dim, dim, bias=bias)
        self.key = nn.Linear(key_dim, dim, bias=bias)
        self.value = nn.Linear(value_dim or key_dim, dim, bias=bias)
        self.output = nn.Linear(dim, out_dim or dim, bias=bias)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor | None = None,
        *,
        key_mask: Tensor | None = None,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """
        Arguments:
            query: ``B×Lq×query_dim``.
            key: ``B×Lk×key_dim``.
            value: ``B×Lk×value_dim`` (default: ``key``).
            key_mask: ``B×Lk`` bool, True for keys that may be attended to (padding is False).
            return_attention: also return the weights ``B×heads×Lq×Lk``.

        Returns:
            ``B×Lq×out_dim``, and the attention weights when asked for.
        """
        value = key if value is None else value
        q = split_heads(self.query(query), self.heads)
        k = split_heads(self.key(key), self.heads)
        v = split_heads(self.value(value), self.heads)
        bias = None
        if key_mask is not None:
            bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~key_mask, _masked_score(q.dtype))[..., None, None, :]
        if return_attention:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            weights = (scores if bias is None else scores + bias).softmax(dim=-1)
            return self.output(merge_heads(weights @ v)), weights
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.output(merge_heads(attended))


class CrossAttentionBlock(nn.Module):
    """Post-norm cross-attention block: ``X = LN(Attn(x, ctx) + x)``, ``out = LN(MLP(X) + X)``.

    Queries come from the tokens ``x``; keys and values from a separate context (DCP-CLIP: patch
    features attend to the textual guidance of the selected classes, Eqs. 8–10).
    """

    def __init__(
        self, *, dim: int, heads: int, context_dim: int | None = None, mlp_ratio: float = 4.0
    ) -> None:
        """
        Arguments:
            dim: width of the tokens (and of the attention).
            heads: attention heads.
            context_dim: width of the context tokens (default ``dim``).
            mlp_ratio: MLP hidden width as a multiple of ``dim``.
        """
        super().__init__()
        self.attention = MultiHeadAttention(dim=dim, heads=heads, key_dim=context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim=dim, hidden_dim=int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        *,
        context_mask: Tensor | None = None,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """
        Arguments:
            x: ``B×N×dim`` tokens (queries and residual).
            context: ``B×M×context_dim`` keys/values.
            context_mask: ``B×M`` bool, False for padded context tokens.
            return_attention: also return the weights ``B×heads×N×M``.
        """
        attended = self.attention(
            x, context, key_mask=context_mask, return_attention=return_attention
        )
        weights = None
        if return_attention:
            attended, weights = attended
        mixed = self.norm1(attended + x)
        out = self.norm2(self.mlp(mixed) + mixed)
        return (out, weights) if return_attention else out


class SelfAttentionBlock(nn.Module):
    """Post-norm self-attention block whose Q/K/V may come from a wider input.

    ``Z = Attn(u, u, u)`` with ``u = attention_input`` (``input_dim`` channels, e.g. the residual
    stream concatenated with guidance), then ``X = LN(Z + x)`` and ``out = LN(MLP(X) + X)`` on the
    ``dim``-channel residual stream ``x`` (DCP-CLIP's fusion self-attention, Eqs. 11–12).
    """

    def __init__(
        self, *, dim: int, heads: int, input_dim: int | None = None, mlp_ratio: float = 4.0
    ) -> None:
        """
        Arguments:
            dim: width of the residual stream and of the attention.
            heads: attention heads.
            input_dim: width of the tensor Q/K/V are computed from (default ``dim``: plain
                self-attention on ``x``).
            mlp_ratio: MLP hidden width as a multiple of ``dim``.
        """
        super().__init__()
        self.input_dim = input_dim or dim
        self.attention = MultiHeadAttention(
            dim=dim, heads=heads, query_dim=self.input_dim, key_dim=self.input_dim
        )
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim=dim, hidden_dim=int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, *, attention_input: Tensor | None = None) -> Tensor:
        """``x``: ``B×N×dim``; ``attention_input``: ``B×N×input_dim`` (default ``x``)."""
        source = x if attention_input is None else attention_input
        if source.shape[-1] != self.input_dim:
            raise ValueError(
                f"Attention input has {source.shape[-1]} channels; this block was built with "
                f"input_dim={self.input_dim}."
            )
        mixed = self.norm1(self.attention(source, source, source) + x)
        return self.norm2(self.mlp(mixed) + mixed)


class WindowAttention(nn.Module):
    """Swin multi-head self-attention inside non-overlapping (optionally shifted) windows.

    Tokens on a ``H×W`` grid attend only within ``window_size²`` windows, with a learned relative
    position bias. ``shift=True`` rolls the grid by half a window first and masks attention
    between tokens that the roll brought together from opposite borders (Swin's SW-MSA). Grids not
    divisible by the window are padded, and padded tokens are masked out of the keys; a grid
    smaller than the window uses a window of the grid's size (and no shift along that axis).

    Queries and keys may see extra *guidance* channels concatenated to the tokens (CAT-Seg's and
    DCP-CLIP's appearance guidance, Eq. 14); values always come from the tokens alone.
    """

    def __init__(
        self,
        *,
        dim: int,
        heads: int,
        window_size: int,
        shift: bool = False,
        query_guidance_dim: int = 0,
        key_guidance_dim: int = 0,
    ) -> None:
        """
        Arguments:
            dim: token width.
            heads: attention heads (``dim`` divisible by it).
            window_size: side of the square windows.
            shift: shift the windows by ``window_size // 2`` (the second block of a Swin pair).
            query_guidance_dim, key_guidance_dim: channels of guidance appended to the tokens
                before the query / key projections (0: none).
        """
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}.")
        self.heads = heads
        self.window_size = window_size
        self.shift_size = window_size // 2 if shift else 0
        self.query_guidance_dim = query_guidance_dim
        self.key_guidance_dim = key_guidance_dim
        self.query = nn.Linear(dim + query_guidance_dim, dim)
        self.key = nn.Linear(dim + key_guidance_dim, dim)
        self.value = nn.Linear(dim, dim)
        self.output = nn.Linear(dim, dim)
        self.relative_position_bias = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias, std=0.02)

    def _project(
        self, linear: nn.Linear, x: Tensor, guidance: Tensor | None, expected: int, role: str
    ) -> Tensor:
        """``linear(concat[x, guidance])``, with the guidance term computed per guidance entry.

        ``W [x; g] + b = W_x x + W_g g + b``: when guidance is shared by groups of consecutive
        batch entries of ``x`` (all classes of one image), ``W_g g`` is computed once per group.
        """
        given = 0 if guidance is None else guidance.shape[-1]
        if given != expected:
            raise ValueError(
                f"{role} guidance has {given} channels; this layer was built for {expected}."
            )
        if guidance is None:
            return linear(x)
        if x.shape[0] % guidance.shape[0]:
            raise ValueError(
                f"{role} guidance batch {guidance.shape[0]} does not divide the token batch "
                f"{x.shape[0]}."
            )
        width = x.shape[-1]
        token_term = F.linear(x, linear.weight[:, :width], linear.bias)  # W_x x + b
        guidance_term = F.linear(guidance, linear.weight[:, width:])  # W_g g, once per group
        groups = x.shape[0] // guidance.shape[0]
        grouped = token_term.view(guidance.shape[0], groups, *token_term.shape[1:])
        return (grouped + guidance_term[:, None]).flatten(0, 1)

    def _position_bias(self, window: tuple[int, int]) -> Tensor:
        """``heads×L×L`` relative position bias for a ``window[0]×window[1]`` window."""
        rows = torch.arange(window[0], device=self.relative_position_bias.device)
        cols = torch.arange(window[1], device=self.relative_position_bias.device)
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij")).flatten(1)  # 2×L
        relative = coords[:, :, None] - coords[:, None, :] + (self.window_size - 1)
        index = relative[0] * (2 * self.window_size - 1) + relative[1]
        return self.relative_position_bias[index].permute(2, 0, 1)

    def _window_layout(
        self, size: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], dtype
    ) -> tuple[Tensor, Tensor, Tensor]:
        """How the ``H×W`` tokens map to windows, as index tensors (one gather each way).

        The grid is padded to whole windows and rolled by ``-shift``; slot ``l`` of window ``n``
        holds token ``gather[n·L + l]`` (padding points at token 0 and is masked), and pixel ``p``
        reads its output from slot ``scatter[p]``.

        Returns:
            ``gather`` (``nW·L``), ``scatter`` (``H·W``), and the ``nW×L×L`` additive mask that
            hides padded keys and, when shifted, keys from another region (Swin's SW-MSA mask).
        """
        height, width = size
        padded = (height + (-height) % window[0], width + (-width) % window[1])
        device = self.relative_position_bias.device
        # torch.roll(x, -s)[i] = x[(i + s) % n]: the rolled frame's row i shows padded row i + s.
        rows = (torch.arange(padded[0], device=device) + shift[0]) % padded[0]
        cols = (torch.arange(padded[1], device=device) + shift[1]) % padded[1]
        valid = (rows[:, None] < height) & (cols[None, :] < width)
        source = torch.where(valid, rows[:, None] * width + cols[None, :], 0)
        region = torch.zeros(padded, dtype=torch.long, device=device)
        if any(shift):
            # Swin's region labels, in the rolled frame: a window at the far border gathers
            # tokens from up to three regions that are not neighbours in the image.
            label = 0
            for row_slice in _shift_slices(window[0], shift[0]):
                for col_slice in _shift_slices(window[1], shift[1]):
                    region[row_slice, col_slice] = label
                    label += 1
        frame = torch.arange(padded[0] * padded[1], device=device).view(1, *padded, 1)
        order = window_partition(frame, window)[0, ..., 0]  # nW×L
        gather = source.flatten()[order].flatten()
        slot_of_frame = torch.empty_like(order.flatten())
        slot_of_frame[order.flatten()] = torch.arange(order.numel(), device=device)
        frame_rows = (torch.arange(height, device=device) - shift[0]) % padded[0]
        frame_cols = (torch.arange(width, device=device) - shift[1]) % padded[1]
        scatter = slot_of_frame[(frame_rows[:, None] * padded[1] + frame_cols[None, :]).flatten()]
        valid, region = valid.flatten()[order], region.flatten()[order]  # nW×L
        allowed = (region[:, :, None] == region[:, None, :]) & valid[:, None, :]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return gather, scatter, mask.masked_fill(~allowed, _masked_score(dtype))

    def forward(
        self,
        x: Tensor,
        *,
        query_guidance: Tensor | None = None,
        key_guidance: Tensor | None = None,
    ) -> Tensor:
        """
        Arguments:
            x: ``B×H×W×dim`` tokens (channels last).
            query_guidance: ``B'×H×W×query_guidance_dim`` (required iff that is not 0), where
                ``B'`` divides ``B``: entry ``i`` guides tokens ``i·B/B' ... (i+1)·B/B' − 1``
                (e.g. one guidance map per image shared by all its classes).
            key_guidance: ``B'×H×W×key_guidance_dim``, likewise.

        Returns:
            ``B×H×W×dim``.
        """
        batch, height, width, channels = x.shape
        window = (min(self.window_size, height), min(self.window_size, width))
        shift = (
            self.shift_size if height > self.window_size else 0,
            self.shift_size if width > self.window_size else 0,
        )
        gather, scatter, mask = self._window_layout((height, width), window, shift, x.dtype)
        bias = self._position_bias(window) + mask[:, None]  # nW×heads×L×L
        windows = []
        for tokens in (
            self._project(self.query, x, query_guidance, self.query_guidance_dim, "Query"),
            self._project(self.key, x, key_guidance, self.key_guidance_dim, "Key"),
            self.value(x),
        ):
            tokens = tokens.flatten(1, 2)[:, gather].view(batch, *mask.shape[:2], channels)
            windows.append(split_heads(tokens, self.heads))  # B×nW×heads×L×d
        queries, keys, values = windows
        # Written out rather than F.scaled_dot_product_attention: with a float mask on CPU that
        # falls back to the same arithmetic plus a scan for fully masked rows, which the finite
        # mask makes unnecessary.
        scores = (queries * queries.shape[-1] ** -0.5) @ keys.transpose(-2, -1)
        attended = scores.add_(bias).softmax(dim=-1) @ values
        merged = merge_heads(attended).flatten(1, 2)[:, scatter]
        return self.output(merged.view(batch, height, width, channels))


def _shift_slices(window: int, shift: int) -> tuple[slice, ...]:
    if shift == 0:
        return (slice(None),)
    return (slice(0, -window), slice(-window, -shift), slice(-shift, None))


class SwinBlock(nn.Module):
    """Pre-norm Swin block with optional guidance: ``x + WA(LN x, LN g)``, then ``x + MLP(LN x)``.

    The same (layer-normed) guidance is appended to the queries and the keys. Stack a block with
    ``shift=False`` and one with ``shift=True`` for Swin's W-MSA / SW-MSA pair.
    """

    def __init__(
        self,
        *,
        dim: int,
        heads: int,
        window_size: int,
        shift: bool = False,
        guidance_dim: int = 0,
        mlp_ratio: float = 4.0,
    ) -> None:
        """
        Arguments:
            dim: token width.
            heads: attention heads.
            window_size: side of the square windows.
            shift: shifted windows (the second block of a pair).
            guidance_dim: channels of query/key guidance (0: a plain Swin block).
            mlp_ratio: MLP hidden width as a multiple of ``dim``.
        """
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.guidance_norm = nn.LayerNorm(guidance_dim) if guidance_dim else None
        self.attention = WindowAttention(
            dim=dim,
            heads=heads,
            window_size=window_size,
            shift=shift,
            query_guidance_dim=guidance_dim,
            key_guidance_dim=guidance_dim,
        )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim=dim, hidden_dim=int(dim * mlp_ratio))

    def forward(self, x: Tensor, guidance: Tensor | None = None) -> Tensor:
        """``x``: ``B×H×W×dim``; ``guidance``: ``B'×H×W×guidance_dim`` with ``B'`` dividing ``B``
        (shared by groups of consecutive entries, see :class:`WindowAttention`) → ``B×H×W×dim``.
        """
        if self.guidance_norm is not None and guidance is not None:
            guidance = self.guidance_norm(guidance)
        x = x + self.attention(self.norm1(x), query_guidance=guidance, key_guidance=guidance)
        return x + self.mlp(self.norm2(x))


class LinearAttention(nn.Module):
    """Multi-head linear attention (Katharopoulos et al., 2020).

    ``softmax(Q Kᵀ)`` is replaced by the kernel ``φ(Q) φ(K)ᵀ`` with ``φ(x) = elu(x) + 1``, row
    normalised, so ``φ(K)ᵀ V`` is computed once and the cost is linear in the number of tokens.
    """

    def __init__(
        self,
        *,
        dim: int,
        heads: int,
        query_dim: int | None = None,
        key_dim: int | None = None,
        value_dim: int | None = None,
        out_dim: int | None = None,
        eps: float = 1e-6,
    ) -> None:
        """
        Arguments:
            dim: projected width, divisible by ``heads``.
            heads: attention heads.
            query_dim, key_dim, value_dim, out_dim: input/output widths (as
                :class:`MultiHeadAttention`).
            eps: added to the normaliser.
        """
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}.")
        key_dim = key_dim or dim
        self.heads = heads
        self.eps = eps
        self.query = nn.Linear(query_dim or dim, dim)
        self.key = nn.Linear(key_dim, dim)
        self.value = nn.Linear(value_dim or key_dim, dim)
        self.output = nn.Linear(dim, out_dim or dim)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor | None = None,
        *,
        key_mask: Tensor | None = None,
    ) -> Tensor:
        """``B×Lq×query_dim``, ``B×Lk×key_dim``, ``B×Lk×value_dim`` → ``B×Lq×out_dim``.

        ``key_mask`` (``B×Lk`` bool) is False for padded keys.
        """
        value = key if value is None else value
        q = split_heads(F.elu(self.query(query)) + 1, self.heads)
        k = F.elu(self.key(key)) + 1
        if key_mask is not None:
            k = k * key_mask[..., None].to(k.dtype)
        k = split_heads(k, self.heads)
        v = split_heads(self.value(value), self.heads)
        summary = k.transpose(-2, -1) @ v  # B×heads×d×d
        normaliser = q @ k.sum(dim=-2)[..., None] + self.eps  # B×heads×Lq×1
        return self.output(merge_heads((q @ summary) / normaliser))
