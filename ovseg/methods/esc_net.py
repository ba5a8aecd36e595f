"""ESC-Net: Effective SAM Combination for open-vocabulary segmentation (Lee et al.).

The file follows Section 3 of the paper (spec: ``specs/esc-net.md``). ESC-Net is a one-stage,
CAT-Seg-style model: a CLIP cosine cost volume (Eq. 1) is refined by N = 4 ESC blocks and decoded by
a small U-Net (Sec. 3.6). Each ESC block (:meth:`EscNet.esc_block`, Fig. 2)

1. turns every class's activation map into SAM prompts with the parameter-free **Pseudo Prompt
   Generator** (:func:`pseudo_prompts`, Sec. 3.3: spatial softmax, threshold α, k-means on pixel
   coordinates into N_o = 5 regions, one peak point and one mask per region);
2. embeds them with SAM's **pretrained prompt encoder** (:class:`SamPromptEncoding`) and runs one
   **pretrained SAM mask-decoder two-way block** (:class:`SamBlock`, Sec. 3.4) batched over
   classes on the CLIP vision features; the per-class refined features are fused into one
   class-agnostic ``F'_v`` (Eq. 2);
3. refines the embedded cost volume with the **VLF** block (:class:`VisionLanguageFusion`,
   Sec. 3.5): Swin window attention guided by ``F'_v``, then linear attention over classes with
   the text embeddings as keys and values.

SAM's image encoder is never part of the model. Without trained head weights the method runs its
training-free path instead: pseudo prompts from the MaskCLIP cost volume are decoded by a full
pretrained SAM (its own image encoder and mask decoder) and each mask is labelled by its class.

Where the paper is silent the spec's §9 recommendations are used: τ = 0.01 and α = 1/(h·w) for
the PPG (A7), farthest-point-seeded Lloyd k-means with 10 iterations (A8), the SAM layers copied
in the order [L0, L1, L0, L1] (A2), one projected text token replacing SAM's output tokens (A3),
``F'_v = Conv1×1([F_v ; mean_n (F_v^n)'])`` (A5), SAM's mask prompt of the union of the 5
regions as each class's dense prompt (A9: SAM takes one mask per prompt set, and an average of the
5 region embeddings would only be that union at a fifth of its strength), ``S_k = S_{k-1} +
ZeroConv(C'_k)`` as the next block's map (A11), CAT-Seg's Swin and decoder sizes (A12, A13; with
ViT-B/16 at the paper's 336 px, window 7 on the 21×21 grid, A18), per-pixel BCE (A14), and CLIP's
Q/V projections and position embeddings tuned with the SAM layers at 2e-6 and the rest at 2e-4
(A16, A17).

Shapes: ``B`` images, ``K`` classes (``Kc`` in a chunk of classes), ``N`` ESC blocks (``k`` one
of them), an ``h×w`` CLIP patch grid, ``C_s`` SAM's prompt width, ``D_h`` the VLF width.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling import PromptEncoder
from segment_anything.utils.amg import batched_mask_to_box
from torch import Tensor, nn

from ovseg.backbones import ClipBackbone, DenseFeatures, SamBackbone
from ovseg.backbones.sam import load_sam
from ovseg.errors import OptionError
from ovseg.methods.attention import LinearAttention, Mlp, SwinBlock
from ovseg.methods.base import (
    IGNORE_INDEX,
    MethodConfig,
    SegmentationMethod,
    SegmentationOutput,
    VocabularyLike,
)
from ovseg.methods.blocks import DoubleConv, cosine_cost_volume
from ovseg.methods.builder import method_builder, register_method
from ovseg.methods.chunking import class_slices, per_class, upsample_logits

SHIPPED_WEIGHTS = "esc-net-toy.safetensors"
PROMPT_TYPES = ("point", "box", "mask")
DENSE_PROMPT_MODES = ("union", "mean")
CLIP_FINETUNE_MODES = ("attention", "full", "none")


@dataclass
class EscNetConfig(MethodConfig):
    """ESC-Net settings (beyond :class:`MethodConfig`). Defaults are the paper's full model.

    SAM (Sec. 3.3–3.4, Table 2):
        num_blocks: N, ESC blocks (one SAM layer each).
        sam: SAM architecture name (``"vit_b"``, ``"toy"`` …, see ``SAM_CONFIGS``).
        sam_checkpoint: SAM weights (official ``.pth`` or a ``SamBackbone.save`` file); None
            with ``sam="toy"`` is the shipped ToyWorld SAM. Read to initialise a new head's SAM
            parts, and by the training-free path when it first runs; head weights carry their
            own SAM parts and do not need it.
        use_sam: False removes the PPG and the SAM blocks (Table 2 a); the VLF guidance is then
            the projected CLIP features.
        sam_pretrained: False initialises the SAM blocks and prompt encoder randomly (Table 2 b).
        prompt_types: any non-empty combination of ``"point"``, ``"box"``, ``"mask"`` (Table 3).
        dense_prompt: the class's dense prompt (A9). ``"union"`` (default): SAM's mask prompt
            of the union of the N_o regions, i.e. of the binary mask (c): one mask per prompt
            set, as SAM takes it; the regions reach SAM through their points. ``"mean"``: the
            average of the N_o region embeddings, the setting the shipped toy head was trained
            with. SAM's mask downscaling maps a ±κ mask cell by cell to one of two vectors, so
            this average is exactly ``d0 + (fg/N_o)·(d1 − d0)``: the union at 1/N_o strength,
            kept only for that head and as an ablation.

    Pseudo Prompt Generator (Sec. 3.3):
        num_objects: N_o, regions and points per class.
        ppg_tau: temperature of the spatial softmax.
        ppg_alpha: threshold α on the softmax probability (None: 1/(h·w), "above uniform").
        kmeans_iterations: Lloyd iterations.
        mask_logit: κ, the magnitude of the ±κ mask-prompt logits.

    VLF and decoder (Sec. 3.5–3.6):
        hidden_dim: D_h, the embedded cost-volume width.
        swin_heads, window_size, mlp_ratio: the guided Swin pair (and the MLPs' width). The
            window must divide the patch grid (or exceed it): ViT-B/16 at the paper's 336 px has a
            21×21 grid, so its paper config uses window 7 (spec A18).
        window_padding: let a grid that is not a whole number of windows run anyway, padded to
            whole windows with the padding masked out of the attention (off: such a grid is an
            error, since neither CAT-Seg nor the paper pads).
        text_heads: heads of the linear text attention.
        decoder_dims: widths of the two upsampling stages.
        skip_dims: widths the two CLIP skip features are projected to.
        skip_layers: 0-based ViT blocks whose tokens are the skips (None: a third and two thirds
            of the depth, CAT-Seg's [3, 7] of ViT-B/16 and [7, 15] of ViT-L/14).
        dense_mode: CLIP's dense readout for the head (``"standard"`` or ``"maskclip"``).

    Training:
        clip_finetune: ``"attention"`` (Q/V projections and position embeddings of both towers),
            ``"full"`` or ``"none"``.
        clip_lr_multiplier, sam_lr_multiplier: CLIP's and SAM's learning rates as a fraction of
            the base (2e-6 / 2e-4).
        weight_decay: AdamW weight decay of the parameter groups.
        class_chunk_size: classes run through the per-class layers at a time (A20).

    Training-free path:
        temperature: divides the cosine scores into class probabilities.
        training_free_box: prompt the full SAM with each region's box as well as its point.
    """

    templates: str | tuple[str, ...] = ("A photo of a {} in the scene.",)
    sam: str = "toy"
    sam_checkpoint: str | None = None
    use_sam: bool = True
    sam_pretrained: bool = True
    prompt_types: tuple[str, ...] = ("point", "mask")
    dense_prompt: str = "union"
    num_blocks: int = 4
    num_objects: int = 5
    ppg_tau: float = 0.01
    ppg_alpha: float | None = None
    kmeans_iterations: int = 10
    mask_logit: float = 10.0
    hidden_dim: int = 128
    swin_heads: int = 4
    window_size: int = 12
    window_padding: bool = False
    mlp_ratio: float = 4.0
    text_heads: int = 4
    decoder_dims: tuple[int, int] = (64, 32)
    skip_dims: tuple[int, int] = (32, 16)
    skip_layers: tuple[int, int] | None = None
    dense_mode: str = "standard"
    clip_finetune: str = "attention"
    clip_lr_multiplier: float = 0.01
    sam_lr_multiplier: float = 0.01
    weight_decay: float = 1e-4
    class_chunk_size: int = 128
    temperature: float = 0.01
    training_free_box: bool = True

    def __post_init__(self) -> None:
        self.prompt_types = tuple(self.prompt_types)
        if self.sam_checkpoint is not None:
            self.sam_checkpoint = str(self.sam_checkpoint)  # a Path too; the record is JSON
        self.decoder_dims = tuple(self.decoder_dims)
        self.skip_dims = tuple(self.skip_dims)
        if self.skip_layers is not None:
            self.skip_layers = tuple(self.skip_layers)
        problems = []
        if not self.prompt_types or set(self.prompt_types) - set(PROMPT_TYPES):
            problems.append(f"prompt_types must be a non-empty subset of {PROMPT_TYPES}")
        if len(set(self.prompt_types)) != len(self.prompt_types):
            problems.append(f"prompt_types has duplicates: {self.prompt_types}")
        if self.dense_prompt not in DENSE_PROMPT_MODES:
            problems.append(f"dense_prompt must be one of {DENSE_PROMPT_MODES}")
        if self.clip_finetune not in CLIP_FINETUNE_MODES:
            problems.append(f"clip_finetune must be one of {CLIP_FINETUNE_MODES}")
        if self.dense_mode not in ("standard", "maskclip"):
            problems.append("dense_mode must be 'standard' or 'maskclip'")
        if len(self.decoder_dims) != 2 or len(self.skip_dims) != 2:
            problems.append("decoder_dims and skip_dims need two widths each (two stages)")
        if self.skip_layers is not None and len(self.skip_layers) != 2:
            problems.append("skip_layers needs two ViT block indices")
        for name in ("num_blocks", "num_objects", "class_chunk_size", "kmeans_iterations"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.ppg_tau <= 0:
            problems.append("ppg_tau must be positive")
        if problems:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(problems) + ".")


# --------------------------------------------------------------- Pseudo Prompt Generator (Sec. 3.3)


@dataclass
class PseudoPrompts:
    """What the PPG gives for ``R`` activation maps on an ``h×w`` grid (Fig. 3).

    Attributes:
        probability: ``R×h×w`` spatial softmax of each map, panel (b).
        foreground: ``R×h×w`` bool, the α-thresholded mask, panel (c).
        regions: ``R×N_o×h×w`` bool k-means regions, panel (d): disjoint, their union is
            ``foreground`` (an empty cluster is replaced by a copy of the strongest region).
        points: ``R×N_o×2`` peak of each region in (e), as (x, y) grid cells.
        boxes: ``R×N_o×4`` tight box of each region, (x0, y0, x1, y1) in grid units with
            inclusive corners (SAM's ``batched_mask_to_box``).
    """

    probability: Tensor
    foreground: Tensor
    regions: Tensor
    points: Tensor
    boxes: Tensor


@torch.no_grad()
def pseudo_prompts(
    maps: Tensor,
    *,
    num_objects: int = 5,
    tau: float = 0.01,
    alpha: float | None = None,
    iterations: int = 10,
) -> PseudoPrompts:
    """The Pseudo Prompt Generator, batched over maps, deterministic and without gradient.

    Arguments:
        maps: ``R×h×w`` activation maps (one per image and class).
        num_objects: N_o, regions per map.
        tau: softmax temperature.
        alpha: probability threshold (None: 1/(h·w)).
        iterations: Lloyd iterations of the k-means on pixel coordinates.
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be R×h×w; got {tuple(maps.shape)}.")
    rows, height, width = maps.shape
    pixels = height * width
    scores = maps.reshape(rows, pixels).float()
    probability = (scores / tau).softmax(dim=-1)  # (b)
    threshold = 1.0 / pixels if alpha is None else alpha
    foreground = probability > threshold  # (c)
    # The N_o most probable pixels always count, so no class is left without prompts.
    top = scores.topk(min(num_objects, pixels), dim=-1).indices
    foreground.scatter_(1, top, True)

    device = maps.device
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij"
    )
    xy = torch.stack([xs / max(width - 1, 1), ys / max(height - 1, 1)], dim=-1)
    xy = xy.reshape(pixels, 2).float()

    # (d) k-means: farthest-point seeds among foreground pixels, starting at the peak (the
    # first top-k index, so a tie on a flat map still starts inside the foreground).
    peak = top[:, 0]
    seeds = [xy[peak]]
    nearest = ((xy[None] - seeds[0][:, None]) ** 2).sum(-1)  # R×P
    for _ in range(1, num_objects):
        pick = nearest.masked_fill(~foreground, -1.0).argmax(dim=-1)
        seeds.append(xy[pick])
        nearest = torch.minimum(nearest, ((xy[None] - xy[pick][:, None]) ** 2).sum(-1))
    centroids = torch.stack(seeds, dim=1)  # R×N_o×2
    weights = foreground.float()[..., None]
    for _ in range(iterations):
        assignment = _nearest_centroid(xy, centroids)
        members = F.one_hot(assignment, num_objects).float() * weights  # R×P×N_o
        counts = members.sum(dim=1)[..., None]
        means = members.transpose(1, 2) @ xy / counts.clamp_min(1.0)
        centroids = torch.where(counts > 0, means, centroids)  # empty clusters stay put
    assignment = _nearest_centroid(xy, centroids)
    regions = F.one_hot(assignment, num_objects).bool() & foreground[..., None]
    regions = regions.transpose(1, 2)  # R×N_o×P
    strongest = assignment.gather(1, peak[:, None])[:, 0]
    empty = ~regions.any(dim=-1)
    regions = torch.where(
        empty[..., None], regions[torch.arange(rows, device=device), strongest][:, None], regions
    )

    # (e) the probability restricted to each region; its peak is the region's point (taken on
    # the scores: the same pixel, without the softmax's underflow to 0 far from the peak).
    inside = scores[:, None].masked_fill(~regions, float("-inf"))
    index = inside.argmax(dim=-1)
    points = torch.stack([index % width, index // width], dim=-1).to(maps.dtype)
    regions = regions.view(rows, num_objects, height, width)
    # SAM's own box convention (inclusive corners): its prompt encoder adds half a cell, so each
    # corner lands on the centre of the region's first and last cell, inside the grid.
    boxes = batched_mask_to_box(regions).to(maps.dtype)
    return PseudoPrompts(
        probability=probability.view(rows, height, width).to(maps.dtype),
        foreground=foreground.view(rows, height, width),
        regions=regions,
        points=points,
        boxes=boxes,
    )


def _nearest_centroid(xy: Tensor, centroids: Tensor) -> Tensor:
    """``P×2`` pixels, ``R×N_o×2`` centroids → ``R×P`` index of the nearest (first on ties)."""
    return ((xy[None, :, None] - centroids[:, None]) ** 2).sum(-1).argmin(dim=-1)


# -------------------------------------------------------------------- SAM prompt encoder (Sec. 3.3)


class SamPromptEncoding(nn.Module):
    """SAM's pretrained prompt encoder, run on pseudo prompts in grid units (Sec. 3.3; A9, A10).

    The encoder is SAM's own ``PromptEncoder`` built for the CLIP grid (``input_image_size`` =
    ``image_embedding_size`` = ``h×w``), so a point's positional encoding is the dense PE of its
    cell; its weights are the checkpoint's.
    """

    def __init__(
        self,
        *,
        source: PromptEncoder,
        grid: int,
        prompt_types: Sequence[str],
        dense_prompt: str = "union",
        mask_logit: float = 10.0,
    ) -> None:
        """
        Arguments:
            source: a SAM prompt encoder whose weights are copied.
            grid: side of the CLIP patch grid the prompts live on.
            prompt_types: which of ``"point"``, ``"box"``, ``"mask"`` to embed.
            dense_prompt: ``"union"`` (SAM's mask prompt of the regions' union) or ``"mean"``
                (the average of the N_o region embeddings; see :class:`EscNetConfig`).
            mask_logit: κ of the ±κ mask logits.
        """
        super().__init__()
        self.encoder = PromptEncoder(
            embed_dim=source.embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(grid, grid),
            mask_in_chans=source.mask_downscaling[0].out_channels * 4,
        )
        self.encoder.load_state_dict(source.state_dict())
        self.prompt_types = tuple(prompt_types)
        self.dense_prompt = dense_prompt
        self.mask_logit = mask_logit

    def dense_pe(self, size: tuple[int, int]) -> Tensor:
        """``C×h×w`` positional encoding of the image grid (SAM's ``get_dense_pe``)."""
        return self.encoder.pe_layer(size)

    def forward(self, prompts: PseudoPrompts) -> tuple[Tensor, Tensor]:
        """Pseudo prompts of ``R`` maps → ``P_sparse`` (``R×T×C_s``) and ``P_dense``
        (``R×C_s×h×w``), SAM's sparse and dense prompt embeddings.

        ``T``: N_o points (+ SAM's padding point when there are no boxes), 2·N_o box corners.
        """
        rows, objects, height, width = prompts.regions.shape
        encoder = self.encoder
        dtype = encoder.no_mask_embed.weight.dtype
        sparse = [encoder.no_mask_embed.weight.new_zeros(rows, 0, encoder.embed_dim)]
        if "point" in self.prompt_types:
            labels = torch.ones(rows, objects, device=prompts.points.device)
            sparse.append(
                encoder._embed_points(prompts.points, labels, pad="box" not in self.prompt_types)
            )
        if "box" in self.prompt_types:
            corners = encoder._embed_boxes(prompts.boxes.reshape(rows * objects, 4))
            sparse.append(corners.view(rows, 2 * objects, -1))
        if "mask" not in self.prompt_types:
            dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
            return torch.cat(sparse, dim=1).to(dtype), dense.expand(rows, -1, height, width)
        masks = prompts.regions.to(dtype)
        if self.dense_prompt == "union":
            masks = masks.amax(dim=1, keepdim=True)
        # SAM mask prompts are logits at 4× the embedding grid, thresholded at 0.
        masks = F.interpolate(masks.flatten(0, 1)[:, None], scale_factor=4, mode="nearest")
        masks = self.mask_logit * (2 * masks - 1)
        if self.dense_prompt == "union":
            return torch.cat(sparse, dim=1).to(dtype), encoder._embed_masks(masks)
        # The mean over regions commutes with mask_downscaling's last 1×1 convolution, its widest
        # layer: averaging before it runs that layer once per map instead of N_o times.
        *downscale, project = encoder.mask_downscaling
        features = nn.Sequential(*downscale)(masks)
        dense = project(features.view(rows, objects, *features.shape[1:]).mean(dim=1))
        return torch.cat(sparse, dim=1).to(dtype), dense


# ---------------------------------------------------------------------- SAM block (Sec. 3.4, Eq. 2)


class SamBlock(nn.Module):
    """One pretrained SAM two-way block run on every class's prompt set, then the fusion of the
    per-class results into one class-agnostic ``F'_v``. Eq. 2 reads
    ``(F_v^n)' = BCA(SA(F_l^n), F_v)`` and ``F'_v = Conv([F_v^0; …; F_v^{N_c}])``; with the
    spec's choices (A3, A5) that is::

        (F_v^n)' = BCA(SA([T_l^n ; P_sparse^n]), F_v + P_dense^n)
        F'_v = Conv1×1([F_v ; mean_n (F_v^n)'])

    The projected text token ``T_l^n`` of class n replaces SAM's output tokens (A3); the class's
    dense prompt is added to the vision features as SAM adds its mask embedding.
    """

    def __init__(self, *, layer: nn.Module, dim: int) -> None:
        """
        Arguments:
            layer: a SAM ``TwoWayAttentionBlock`` (copied; its ``skip_first_layer_pe`` is kept).
            dim: C_s, SAM's prompt width.
        """
        super().__init__()
        self.layer = copy.deepcopy(layer)
        self.fuse = nn.Conv2d(2 * dim, dim, 1)

    def refine(
        self, vision_features: Tensor, queries: Tensor, dense_prompts: Tensor, key_pe: Tensor
    ) -> Tensor:
        """``(F_v^n)'`` for a chunk of ``Kc`` classes of ``B`` images.

        Arguments:
            vision_features: ``B×C_s×h×w`` ``F_v``, the keys of SAM's two-way attention.
            queries: ``(B·Kc)×T×C_s`` prompt tokens ``[T_l^n ; P_sparse^n]``.
            dense_prompts: ``(B·Kc)×C_s×h×w`` ``P_dense^n``.
            key_pe: ``C_s×h×w`` SAM's dense positional encoding of the grid.

        Returns:
            ``(B·Kc)×(h·w)×C_s`` refined vision features (SAM's updated keys).
        """
        batch = vision_features.shape[0]
        keys = vision_features[:, None] + dense_prompts.view(batch, -1, *dense_prompts.shape[1:])
        keys = keys.flatten(0, 1).flatten(2).transpose(1, 2)
        _, keys = self.layer(
            queries=queries, keys=keys, query_pe=queries, key_pe=key_pe.flatten(1).T
        )
        return keys

    def fuse_classes(self, vision_features: Tensor, refined_mean: Tensor) -> Tensor:
        """Eq. 2: ``F'_v = Conv1×1([F_v ; mean_n (F_v^n)'])``, both ``B×C_s×h×w``."""
        return self.fuse(torch.cat([vision_features, refined_mean], dim=1))


# ---------------------------------------------------------------- Vision-Language Fusion (Sec. 3.5)


class VisionLanguageFusion(nn.Module):
    """The VLF block (Fig. 4): guided Swin pair, then linear attention over the class texts."""

    def __init__(
        self,
        *,
        hidden_dim: int,
        vision_dim: int,
        text_dim: int,
        swin_heads: int,
        window_size: int,
        text_heads: int,
        mlp_ratio: float,
    ) -> None:
        """
        Arguments:
            hidden_dim: D_h, the embedded cost-volume width.
            vision_dim: C_s, channels of the vision features ``F'_v``.
            text_dim: D, the CLIP joint embedding width.
            swin_heads, window_size: of the Swin pair.
            text_heads: of the linear text attention.
            mlp_ratio: MLP width as a multiple of ``hidden_dim``.
        """
        super().__init__()
        self.embed = nn.Conv2d(1, hidden_dim, 1)
        self.guidance = nn.Conv2d(vision_dim, hidden_dim, 1)
        self.swin = nn.ModuleList(
            SwinBlock(
                dim=hidden_dim,
                heads=swin_heads,
                window_size=window_size,
                shift=shift,
                guidance_dim=hidden_dim,
                mlp_ratio=mlp_ratio,
            )
            for shift in (False, True)
        )
        self.text = nn.Linear(text_dim, hidden_dim)
        self.text_norm = nn.LayerNorm(hidden_dim)
        self.text_attention = LinearAttention(dim=hidden_dim, heads=text_heads)
        self.mlp_norm = nn.LayerNorm(hidden_dim)
        self.mlp = Mlp(dim=hidden_dim, hidden_dim=int(hidden_dim * mlp_ratio))
        self.to_activation = nn.Conv2d(hidden_dim, 1, 1)
        # A11: at initialisation every block prompts SAM from the raw cosine map.
        nn.init.zeros_(self.to_activation.weight)
        nn.init.zeros_(self.to_activation.bias)

    def guidance_map(self, vision_features: Tensor) -> Tensor:
        """``B×C_s×h×w`` ``F'_v`` → ``B×h×w×D_h`` Swin guidance (normed inside the blocks)."""
        return self.guidance(vision_features).permute(0, 2, 3, 1)

    def forward(
        self,
        activation_map: Tensor,
        previous_correlation: Tensor | None,
        guidance: Tensor,
        text_keys: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """One VLF pass over a chunk of ``Kc`` classes of ``B`` images.

        Arguments:
            activation_map: ``(B·Kc)×h×w`` scalar maps ``S_{k-1}``.
            previous_correlation: ``(B·Kc)×D_h×h×w`` the previous block's ``C'_{v&l}`` (None in
                block 1).
            guidance: ``B×h×w×D_h`` from :meth:`guidance_map`.
            text_keys: ``K×D_h`` projected text of the whole vocabulary (keys and values).

        Returns:
            ``C'_{v&l}`` (``(B·Kc)×D_h×h×w``) and ``S_k`` (``(B·Kc)×h×w``).
        """
        embedded = self.embed(activation_map[:, None])  # C_e
        if previous_correlation is not None:
            embedded = embedded + previous_correlation
        correlation = embedded.permute(0, 2, 3, 1)
        for block in self.swin:
            correlation = block(correlation, guidance)  # C_v, Fig. 4 (a)
        maps, height, width, channels = correlation.shape
        # Fig. 4 (b): each (pixel, class) query attends to all class texts; queries are
        # independent, so one flat query batch against the shared text keys is the per-pixel
        # attention over classes.
        queries = correlation.reshape(1, maps * height * width, channels)
        queries = queries + self.text_attention(self.text_norm(queries), text_keys[None])
        queries = queries + self.mlp(self.mlp_norm(queries))
        refined = queries.view(maps, height, width, channels).permute(0, 3, 1, 2)
        return refined, activation_map + self.to_activation(refined)[:, 0]


# --------------------------------------------------------------- mask prediction decoder (Sec. 3.6)


class UpsamplingDecoder(nn.Module):
    """U-Net upsampler with CLIP skips: two × (bilinear ×2, concat skip, DoubleConv)."""

    def __init__(
        self,
        *,
        hidden_dim: int,
        vision_widths: Sequence[int],
        widths: Sequence[int] = (64, 32),
        skip_widths: Sequence[int] = (32, 16),
    ) -> None:
        """
        Arguments:
            hidden_dim: D_h of the input ``(B·K)×D_h×h×w``.
            vision_widths: channels of the two CLIP skip features.
            widths: output widths of the two stages.
            skip_widths: widths the skips are projected to.
        """
        super().__init__()
        self.skips = nn.ModuleList(
            nn.Sequential(nn.Conv2d(vision, skip, 3, padding=1), nn.ReLU())
            for vision, skip in zip(vision_widths, skip_widths, strict=True)
        )
        inputs = (hidden_dim, *widths[:-1])
        self.stages = nn.ModuleList(
            DoubleConv(in_channels=width_in + skip, out_channels=width_out)
            for width_in, skip, width_out in zip(inputs, skip_widths, widths, strict=True)
        )
        self.head = nn.Conv2d(widths[-1], 1, 3, padding=1)

    def skip_features(self, features: Sequence[Tensor]) -> list[Tensor]:
        """``B×D_w×h×w`` ViT features → stage i's ``B×s_i×(h·2^(i+1))×(w·2^(i+1))`` skips."""
        return [
            project(F.interpolate(x, scale_factor=2 ** (i + 1), mode="bilinear"))
            for i, (project, x) in enumerate(zip(self.skips, features, strict=True))
        ]

    def forward(self, correlation: Tensor, skips: Sequence[Tensor]) -> Tensor:
        """``(B·Kc)×D_h×h×w`` ``C'_{v&l}`` → ``(B·Kc)×4h×4w`` logits; ``skips`` from
        :meth:`skip_features`."""
        features = correlation
        for stage, skip in zip(self.stages, skips, strict=True):
            features = F.interpolate(features, scale_factor=2, mode="bilinear")
            classes = features.shape[0] // skip.shape[0]
            repeated = skip[:, None].expand(-1, classes, -1, -1, -1).flatten(0, 1)
            features = stage(torch.cat([features, repeated], dim=1))
        return self.head(features)[:, 0]


# ----------------------------------------------------------------------------- the model (Sec. 3.1)


@dataclass
class EscNetFeatures:
    """What :meth:`EscNet.encode_image` returns.

    Attributes:
        clip: CLIP's dense features (with the skip layers for the head, MaskCLIP features on the
            training-free path).
        sam_embeddings: ``B×C_s×g×g`` full-SAM image embeddings (training-free path only).
        head: whether these were encoded for the trained head.
    """

    clip: DenseFeatures
    sam_embeddings: Tensor | None
    head: bool


@dataclass
class EscBlockOutput:
    """What one ESC block gives the next (Fig. 2).

    Attributes:
        vision_features: ``B×C_s×h×w`` ``F'_v`` (Eq. 2); without SAM, the block's input ``F_v``.
        correlation: ``B×K×D_h×h×w`` ``C'_{v&l}``, the VLF's refined correlation.
        activation_map: ``B×K×h×w`` ``S_k``, the map the next block's PPG reads (A11).
        pseudo_prompts: the PPG's prompts, one :class:`PseudoPrompts` per chunk of classes, of
            its ``B·Kc`` maps in (image, class) order; empty without SAM.
    """

    vision_features: Tensor
    correlation: Tensor
    activation_map: Tensor
    pseudo_prompts: list[PseudoPrompts]


def _default_skip_layers(depth: int) -> tuple[int, int]:
    """0-based blocks at a third and two thirds of the depth: 12 → (3, 7), 24 → (7, 15)."""
    return (round(depth / 3) - 1, round(2 * depth / 3) - 1)


class EscNet(SegmentationMethod):
    """ESC-Net on a ViT CLIP: cost volume → N × (PPG → SAM block → VLF) → U-Net decoder.

    The head runs when the module is training or ``trained_head`` is set; otherwise
    :meth:`segment` takes the training-free path (pseudo prompts → full pretrained SAM).
    """

    name = "esc-net"
    config_class = EscNetConfig
    trained_head = False

    def __init__(
        self, *, config: EscNetConfig, backbone: ClipBackbone, sam: SamBackbone | None
    ) -> None:
        """
        Arguments:
            config: the settings; ``input_size`` fixes the patch grid the prompt encoder uses.
            backbone: a ViT CLIP; training the method sets its ``clip_finetune`` scope.
            sam: the SAM whose prompt encoder and decoder layers are copied (pretrained, or
                random for the Table 2 b ablation, or random for head weights to overwrite);
                needed when ``use_sam``. Its image encoder is not used and may be absent.
        """
        super().__init__()
        if backbone.kind != "vit":
            raise ValueError(f"ESC-Net needs a ViT CLIP; {backbone.name} is a {backbone.kind}.")
        if config.input_size % backbone.stride:
            raise ValueError(
                f"input_size {config.input_size} is not a multiple of the patch size "
                f"{backbone.stride}."
            )
        if config.use_sam and sam is None:
            raise ValueError("use_sam=True needs a SAM to copy the prompt encoder and layers from.")
        self.config = config
        self.backbone = backbone
        self.grid = config.input_size // backbone.stride
        self.skip_layers = config.skip_layers or _default_skip_layers(backbone.num_layers)
        vision_dim = sam.prompt_embed_dim if sam is not None else 256
        text_dim = backbone.embed_dim
        self.image_projection = nn.Conv2d(text_dim, vision_dim, 1)  # A4
        if config.use_sam:
            layers = sam.mask_decoder.transformer.layers
            self.prompt_encoding = SamPromptEncoding(
                source=sam.prompt_encoder,
                grid=self.grid,
                prompt_types=config.prompt_types,
                dense_prompt=config.dense_prompt,
                mask_logit=config.mask_logit,
            )
            self.text_token = nn.Linear(text_dim, vision_dim)  # A3
            self.sam_blocks = nn.ModuleList(
                SamBlock(layer=layers[k % len(layers)], dim=vision_dim)  # A2: [L0, L1, L0, L1]
                for k in range(config.num_blocks)
            )
        self.fusion = nn.ModuleList(
            VisionLanguageFusion(
                hidden_dim=config.hidden_dim,
                vision_dim=vision_dim,
                text_dim=text_dim,
                swin_heads=config.swin_heads,
                window_size=config.window_size,
                text_heads=config.text_heads,
                mlp_ratio=config.mlp_ratio,
            )
            for _ in range(config.num_blocks)
        )
        self.decoder = UpsamplingDecoder(
            hidden_dim=config.hidden_dim,
            vision_widths=[backbone.layer_dims[i] for i in self.skip_layers],
            widths=config.decoder_dims,
            skip_widths=config.skip_dims,
        )
        # The full pretrained SAM (image encoder included) serves only the training-free path. It
        # is no submodule (not in ESC-Net's weights or optimiser) and is read from its checkpoint
        # the first time that path runs, so a trained head never holds it. A dict, so that the
        # shallow copies the demo makes share one loaded SAM.
        self._loaded_sam: dict[str, SamBackbone] = {}

    # ------------------------------------------------------------------------------ images
    def _uses_head(self) -> bool:
        return self.trained_head or self.training

    def encode_image(self, images: Tensor) -> EscNetFeatures:
        """``B×3×H×W`` images in [0, 1] → CLIP features (and SAM's, on the training-free path)."""
        normalised = self.backbone.normalize(images)
        if self._uses_head():
            clip = self.backbone.encode_image(
                normalised, layers=self.skip_layers, dense_mode=self.config.dense_mode
            )
            return EscNetFeatures(clip=clip, sam_embeddings=None, head=True)
        clip = self.backbone.encode_image(normalised, dense_mode="maskclip")
        sam = self._pretrained_sam(images.device)
        sam_embeddings = None if sam is None else sam.encode_image(images)
        return EscNetFeatures(clip=clip, sam_embeddings=sam_embeddings, head=False)

    @property
    def training_free_sam(self) -> SamBackbone | None:
        """The full pretrained SAM of the training-free path once loaded (None before)."""
        return self._loaded_sam.get("sam")

    def _pretrained_sam(self, device: torch.device) -> SamBackbone | None:
        """The full pretrained SAM, loaded on first use; None with ``sam_pretrained=False``."""
        if not self.config.sam_pretrained:
            return None
        if "sam" not in self._loaded_sam:
            self._loaded_sam["sam"] = load_sam(self.config.sam, self.config.sam_checkpoint)
        return self._loaded_sam["sam"].to(device)

    # ----------------------------------------------------------------------------- segment
    def segment(
        self,
        image_features: EscNetFeatures,
        vocabulary: VocabularyLike,
        *,
        return_intermediates: bool = False,
        target: Tensor | None = None,
        **options: Any,
    ) -> SegmentationOutput:
        """Segment encoded images with a vocabulary of ``K`` classes.

        Intermediates (on request): ``cost_volume`` (``B×K×h×w``, Eq. 1); with the head,
        ``activation_maps`` (``B×(N+1)×K×h×w``: S_0 … S_N, Fig. 6); on the training-free path,
        ``sam_masks`` (``B×K×H×W`` probabilities); and with SAM, ``pseudo_prompts``: one set per
        ESC block (one set, from the cost volume, on the training-free path), each the PPG's
        :class:`PseudoPrompts` per chunk of classes as in :attr:`EscBlockOutput.pseudo_prompts`.
        """
        if options:
            raise OptionError(f"esc-net takes no options; got {sorted(options)}.")
        if not isinstance(image_features, EscNetFeatures):
            raise ValueError("segment needs the EscNetFeatures that encode_image returns.")
        if image_features.head != self._uses_head():
            raise ValueError(
                "These features were encoded for the "
                f"{'head' if image_features.head else 'training-free path'}; re-encode the "
                "image after changing trained_head or train()/eval()."
            )
        grid = tuple(image_features.clip.dense.shape[-2:])
        if grid != (self.grid, self.grid):
            raise ValueError(
                f"ESC-Net was built for a {self.grid}×{self.grid} grid (input_size "
                f"{self.config.input_size}); got features on a {grid[0]}×{grid[1]} grid."
            )
        text = self.backbone.encode_text(vocabulary, self.config.templates).mean  # F_l, K×D
        cost_volume = cosine_cost_volume(image_features.clip.dense, text)  # C_{v&l}, Eq. 1
        if not image_features.head:
            return self._training_free(image_features, cost_volume, return_intermediates)
        return self._run_head(image_features.clip, text, cost_volume, return_intermediates)

    def _run_head(
        self, clip: DenseFeatures, text: Tensor, cost_volume: Tensor, return_intermediates: bool
    ) -> SegmentationOutput:
        """Fig. 2: N ESC blocks refine the cost volume; the decoder upsamples it (Sec. 3.6)."""
        window = self.config.window_size
        if self.grid > window and self.grid % window and not self.config.window_padding:
            raise OptionError(
                f"window_size {window} does not divide ESC-Net's {self.grid}×{self.grid} patch "
                f"grid (input_size {self.config.input_size}), so the Swin windows would be "
                "padded. Use a window that divides the grid, an input_size whose grid it "
                "divides, or window_padding=True to pad on purpose."
            )
        missing = [i for i in self.skip_layers if f"layer{i}" not in clip.intermediates]
        if missing:
            raise ValueError(f"The CLIP features lack the skip layers {missing}.")
        vision_features = self.image_projection(clip.dense)  # F_v at SAM's width (A4)
        skips = self.decoder.skip_features(
            [clip.intermediates[f"layer{i}"] for i in self.skip_layers]
        )
        text_tokens = self.text_token(text) if self.config.use_sam else None  # T_l (A3)
        activation_map, correlation = cost_volume, None  # S_0 = C_{v&l}
        activation_maps, block_prompts = [cost_volume], []
        for index in range(self.config.num_blocks):
            block = self.esc_block(
                index, vision_features, activation_map, correlation, text, text_tokens
            )
            vision_features, correlation = block.vision_features, block.correlation
            activation_map = block.activation_map
            activation_maps.append(activation_map)
            block_prompts.append(block.pseudo_prompts)
        decoder = partial(self.decoder, skips=skips)
        logits = per_class(decoder, correlation, self.config.class_chunk_size)  # Sec. 3.6
        logits = upsample_logits(logits, clip.input_size)
        intermediates: dict[str, Any] = {}
        if return_intermediates:
            intermediates = {
                "cost_volume": cost_volume,
                "activation_maps": torch.stack([a.detach() for a in activation_maps], dim=1),
            }
            if self.config.use_sam:
                intermediates["pseudo_prompts"] = block_prompts
        return SegmentationOutput(logits=logits, intermediates=intermediates)

    def esc_block(
        self,
        index: int,
        vision_features: Tensor,
        activation_map: Tensor,
        correlation: Tensor | None,
        text: Tensor,
        text_tokens: Tensor | None,
    ) -> EscBlockOutput:
        """ESC block ``index`` (Fig. 2): PPG → SAM prompt encoder → SAM block (Eq. 2) → VLF.

        Arguments:
            index: the block, 0 … N−1.
            vision_features: ``B×C_s×h×w`` ``F_v``, the vision features the SAM block refines.
            activation_map: ``B×K×h×w`` ``S_{k-1}`` (``S_0``: the cost volume, Eq. 1).
            correlation: ``B×K×D_h×h×w`` the previous block's ``C'_{v&l}`` (None in block 1).
            text: ``K×D`` class embeddings ``F_l``.
            text_tokens: ``K×C_s`` projected text tokens ``T_l`` (A3; None without SAM).
        """
        batch, classes, height, width = activation_map.shape
        chunks = class_slices(classes, self.config.class_chunk_size)
        prompts: list[PseudoPrompts] = []
        if self.config.use_sam:
            sam_block = self.sam_blocks[index]
            key_pe = self.prompt_encoding.dense_pe((height, width)).to(vision_features.dtype)
            dim = vision_features.shape[1]
            refined_sum = vision_features.new_zeros(batch, height * width, dim)
            for chunk in chunks:
                # Sec. 3.3: pseudo points and masks, from a map no gradient flows back through.
                chunk_prompts = self._ppg(activation_map[:, chunk].detach().flatten(0, 1))
                prompts.append(chunk_prompts)
                sparse, dense = self.prompt_encoding(chunk_prompts)  # P_sparse^n, P_dense^n
                text_queries = text_tokens[chunk][None].expand(batch, -1, -1).flatten(0, 1)
                queries = torch.cat([text_queries[:, None], sparse], dim=1)  # [T_l^n ; P_sparse^n]
                refined = sam_block.refine(vision_features, queries, dense, key_pe)  # (F_v^n)'
                refined_sum = refined_sum + refined.view(batch, -1, *refined.shape[1:]).sum(dim=1)
            refined_mean = (refined_sum / classes).transpose(1, 2).reshape(vision_features.shape)
            vision_features = sam_block.fuse_classes(vision_features, refined_mean)  # F'_v, Eq. 2
        # Sec. 3.5: the VLF refines every class's correlation, guided by F'_v and the class texts.
        fusion = self.fusion[index]
        guidance = fusion.guidance_map(vision_features)
        text_keys = fusion.text(text)
        correlations, activation_maps = [], []
        for chunk in chunks:
            previous = None if correlation is None else correlation[:, chunk].flatten(0, 1)
            refined, next_map = fusion(
                activation_map[:, chunk].flatten(0, 1), previous, guidance, text_keys
            )
            correlations.append(refined.view(batch, -1, *refined.shape[1:]))
            activation_maps.append(next_map.view(batch, -1, height, width))
        return EscBlockOutput(
            vision_features=vision_features,
            correlation=torch.cat(correlations, dim=1),  # C'_{v&l}
            activation_map=torch.cat(activation_maps, dim=1),  # S_k (A11)
            pseudo_prompts=prompts,
        )

    def _ppg(self, maps: Tensor) -> PseudoPrompts:
        config = self.config
        return pseudo_prompts(
            maps,
            num_objects=config.num_objects,
            tau=config.ppg_tau,
            alpha=config.ppg_alpha,
            iterations=config.kmeans_iterations,
        )

    # ------------------------------------------------------------------- training-free path
    @torch.no_grad()
    def _training_free(
        self, features: EscNetFeatures, cost_volume: Tensor, return_intermediates: bool
    ) -> SegmentationOutput:
        """DESIGN §5: pseudo prompts from the cost volume, decoded by the full pretrained SAM.

        Every region's peak point (and box) prompts SAM; a class's mask is the maximum over its
        N_o region masks, and ``log p_CLIP(class) + log σ(SAM mask)`` labels each pixel by the
        class whose mask covers it and whose CLIP score agrees. Without a pretrained SAM the
        logits are the cosine scores over the temperature (dense CLIP).
        """
        batch, classes = cost_volume.shape[:2]
        size = features.clip.input_size
        class_log_prob = upsample_logits(
            (cost_volume / self.config.temperature).log_softmax(dim=1), size
        )
        sam = self.training_free_sam
        if features.sam_embeddings is None:
            intermediates = {"cost_volume": cost_volume} if return_intermediates else {}
            return SegmentationOutput(logits=class_log_prob, intermediates=intermediates)
        stride = features.clip.stride
        scale = sam.image_size / max(size)  # SAM's ResizeLongestSide
        logits = torch.empty_like(class_log_prob)
        sam_masks = torch.empty_like(class_log_prob) if return_intermediates else None
        prompts = []
        for chunk in class_slices(classes, self.config.class_chunk_size):
            chunk_prompts = self._ppg(cost_volume[:, chunk].flatten(0, 1))
            prompts.append(chunk_prompts)
            points = (chunk_prompts.points + 0.5) * stride * scale
            # Inclusive grid boxes → inclusive pixel boxes: from a region's first pixel to its
            # last one, the frame SAM's predictor gives its prompt encoder.
            last_pixel = chunk_prompts.boxes.new_tensor([0, 0, stride - 1, stride - 1])
            boxes = (chunk_prompts.boxes * stride + last_pixel) * scale
            chunk_size = chunk.stop - chunk.start
            for image in range(batch):
                maps = slice(image * chunk_size, (image + 1) * chunk_size)
                coords = points[maps].reshape(-1, 1, 2)
                mask_logits, _ = sam.decode(
                    features.sam_embeddings[image : image + 1],
                    points=(coords, torch.ones(coords.shape[:2], device=coords.device)),
                    boxes=boxes[maps].reshape(-1, 4) if self.config.training_free_box else None,
                )
                mask_logits = mask_logits.view(-1, self.config.num_objects, *mask_logits.shape[-2:])
                mask_logits = sam.postprocess_masks(
                    mask_logits.amax(dim=1)[None], original_size=size
                )
                log_mask = F.logsigmoid(mask_logits[0].to(logits.dtype))
                logits[image, chunk] = class_log_prob[image, chunk] + log_mask
                if sam_masks is not None:
                    sam_masks[image, chunk] = log_mask.exp()
        intermediates: dict[str, Any] = {}
        if return_intermediates:
            intermediates = {
                "cost_volume": cost_volume,
                "sam_masks": sam_masks,
                "pseudo_prompts": [prompts],
            }
        return SegmentationOutput(logits=logits, intermediates=intermediates)

    # ---------------------------------------------------------------- loss and optimiser
    def loss(self, output: SegmentationOutput, target: Tensor) -> dict[str, Tensor]:
        """A14: per-pixel binary cross-entropy against one-hot targets over all K classes,
        averaged over labelled pixels × classes; ``IGNORE_INDEX`` pixels do not count."""
        logits = upsample_logits(output.logits, target.shape[-2:])
        target = target.long()
        classes = torch.arange(logits.shape[1], device=target.device)
        positives = (target[:, None] == classes[None, :, None, None]).to(logits.dtype)
        valid = (target != IGNORE_INDEX)[:, None].to(logits.dtype)
        losses = F.binary_cross_entropy_with_logits(logits, positives, reduction="none")
        denominator = (valid.sum() * logits.shape[1]).clamp_min(1)
        return {"loss_bce": (losses * valid).sum() / denominator}

    @classmethod
    def from_settings(cls, config: EscNetConfig, backbone: ClipBackbone, head: bool) -> EscNet:
        """The builder's factory (:mod:`ovseg.methods.builder`). Head weights hold every SAM part
        ESC-Net uses (prompt encoder, two-way layers), so with them SAM's architecture is enough:
        its checkpoint is read if the training-free path runs. Without a head the SAM parts
        start from the checkpoint (or random ones: Table 2 b)."""
        sam = load_sam(
            config.sam,
            config.sam_checkpoint,
            pretrained=config.sam_pretrained and not head,
            image_encoder=False,
        )
        return cls(config=config, backbone=backbone, sam=sam)

    @property
    def clip_finetuning_scope(self) -> str:
        """A16: ``"attention"`` trains the Q/V projections of every CLIP attention block and the
        position embeddings of both towers; the key projections stay frozen."""
        return self.config.clip_finetune

    def parameter_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """AdamW groups (Sec. 4.3): CLIP and SAM (prompt encoder, two-way layers) at
        ``base_lr · multiplier`` (2e-6), the rest at ``base_lr`` (2e-4)."""
        self.set_clip_finetuning_scope()
        config = self.config
        rates = {
            "esc-net": base_lr,
            "clip": base_lr * config.clip_lr_multiplier,
            "sam": base_lr * config.sam_lr_multiplier,
        }
        groups: dict[str, list[nn.Parameter]] = {name: [] for name in rates}
        for name, parameter in self.named_parameters():
            if not parameter.requires_grad:
                continue
            if name.startswith("backbone."):
                groups["clip"].append(parameter)
            elif name.startswith("prompt_encoding.") or (
                name.startswith("sam_blocks.") and ".layer." in name
            ):
                groups["sam"].append(parameter)
            else:
                groups["esc-net"].append(parameter)
        return [
            {"name": name, "params": params, "lr": rates[name], "weight_decay": config.weight_decay}
            for name, params in groups.items()
            if params
        ]


# ------------------------------------------------------------------------------------------ builder


build_esc_net = register_method("esc-net")(
    method_builder(EscNet, shipped=SHIPPED_WEIGHTS, factory=EscNet.from_settings)
)
