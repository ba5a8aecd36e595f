"""ESC-Net: Effective SAM Combination for open-vocabulary segmentation (Lee et al.).

The file follows Section 3 of the paper (spec: ``specs/esc-net.md``). ESC-Net is a one-stage,
CAT-Seg-style model: a CLIP cosine cost volume (Eq. 1) is refined by K = 4 ESC blocks and decoded by
a small U-Net. Each ESC block

1. turns every class's activation map into SAM prompts with the parameter-free **Pseudo Prompt
   Generator** (:func:`pseudo_prompts`: spatial softmax, threshold α, k-means on pixel coordinates
   into N_o = 5 regions, one peak point and one mask per region);
2. embeds them with SAM's **pretrained prompt encoder** and runs one **pretrained SAM mask-decoder
   two-way block** batched over classes on the CLIP image stream; the per-class refined maps are
   fused into one class-agnostic map ``F'_v`` (Eq. 2);
3. refines the embedded cost volume with the **VLF** block (:class:`VisionLanguageFusion`): Swin
   window attention guided by ``F'_v``, then linear attention over classes with the text
   embeddings as keys and values.

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
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling import PromptEncoder
from segment_anything.utils.amg import batched_mask_to_box
from torch import Tensor, nn

import ovseg.backbones
from ovseg.backbones import (
    ClipBackbone,
    DenseFeatures,
    SamBackbone,
    WeightsError,
    build_sam,
)
from ovseg.errors import OptionError
from ovseg.methods.attention import LinearAttention, Mlp, SwinBlock
from ovseg.methods.base import (
    IGNORE_INDEX,
    MethodConfig,
    SegmentationMethod,
    SegmentationOutput,
    VocabularyLike,
    register_method,
)
from ovseg.methods.blocks import DoubleConv, cosine_cost_volume
from ovseg.methods.builder import build_with_weights
from ovseg.methods.chunking import upsample_logits

SHIPPED_WEIGHTS = "esc-net-toy.safetensors"
TOY_SAM_CHECKPOINT = Path("sam-toy") / "sam-toy.safetensors"
PROMPT_TYPES = ("point", "box", "mask")
DENSE_PROMPT_MODES = ("union", "mean")
CLIP_FINETUNE_MODES = ("attention", "full", "none")


@dataclass
class EscNetConfig(MethodConfig):
    """ESC-Net settings (beyond :class:`MethodConfig`). Defaults are the paper's full model.

    SAM (§2.4–2.5, Table 2):
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

    Pseudo Prompt Generator (§3):
        num_blocks: K, ESC blocks (one SAM layer each).
        num_objects: N_o, regions and points per class.
        ppg_tau: temperature of the spatial softmax.
        ppg_alpha: threshold α on the softmax probability (None: 1/(h·w), "above uniform").
        kmeans_iterations: Lloyd iterations.
        mask_logit: κ, the magnitude of the ±κ mask-prompt logits.

    VLF and decoder (§4, §2.7):
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


# ------------------------------------------------------------------ Pseudo Prompt Generator (§3)


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


# -------------------------------------------------------------------------- ESC blocks (§2.4–2.6)


class SamPromptEncoding(nn.Module):
    """SAM's pretrained prompt encoder, run on pseudo prompts in grid units (§2.4, A9, A10).

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
        """Pseudo prompts of ``R`` maps → sparse ``R×T×C`` and dense ``R×C×h×w`` embeddings.

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


class SamBlock(nn.Module):
    """One pretrained SAM two-way block run on every class's prompts (Eq. 2).

    Tokens of class n are ``[T_l^n ; P_sparse^n]`` (the projected text replaces SAM's output
    tokens, A3); keys are the image stream plus the class's dense prompt. The refined keys
    ``(F_v^n)'`` of all classes are averaged and fused with the block input into ``F'_v`` (A5).
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

    def refine(self, image: Tensor, tokens: Tensor, dense: Tensor, pe: Tensor) -> Tensor:
        """``(F_v^n)'`` for a chunk of ``Kc`` classes of ``B`` images.

        Arguments:
            image: ``B×C×h×w`` image stream.
            tokens: ``(B·Kc)×T×C`` prompt tokens.
            dense: ``(B·Kc)×C×h×w`` dense prompts.
            pe: ``C×h×w`` dense positional encoding.

        Returns:
            ``(B·Kc)×(h·w)×C`` refined image keys.
        """
        batch = image.shape[0]
        keys = image[:, None] + dense.view(batch, -1, *dense.shape[1:])
        keys = keys.flatten(0, 1).flatten(2).transpose(1, 2)
        _, keys = self.layer(queries=tokens, keys=keys, query_pe=tokens, key_pe=pe.flatten(1).T)
        return keys

    def fuse_classes(self, image: Tensor, refined_mean: Tensor) -> Tensor:
        """Eq. 2: ``F'_v = Conv1×1([F_v ; mean_n (F_v^n)'])``, both ``B×C×h×w``."""
        return self.fuse(torch.cat([image, refined_mean], dim=1))


class VisionLanguageFusion(nn.Module):
    """The VLF block (Fig. 4): guided Swin pair, then linear attention over the class texts."""

    def __init__(
        self,
        *,
        hidden_dim: int,
        image_dim: int,
        text_dim: int,
        swin_heads: int,
        window_size: int,
        text_heads: int,
        mlp_ratio: float,
    ) -> None:
        """
        Arguments:
            hidden_dim: D_h, the embedded cost-volume width.
            image_dim: channels of the image stream ``F'_v``.
            text_dim: D, the CLIP joint embedding width.
            swin_heads, window_size: of the Swin pair.
            text_heads: of the linear text attention.
            mlp_ratio: MLP width as a multiple of ``hidden_dim``.
        """
        super().__init__()
        self.embed = nn.Conv2d(1, hidden_dim, 1)
        self.guidance = nn.Conv2d(image_dim, hidden_dim, 1)
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

    def guidance_map(self, image: Tensor) -> Tensor:
        """``B×C×h×w`` image stream → ``B×h×w×D_h`` Swin guidance (normed inside the blocks)."""
        return self.guidance(image).permute(0, 2, 3, 1)

    def forward(
        self,
        activation: Tensor,
        previous: Tensor | None,
        guidance: Tensor,
        text: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """One VLF pass over a chunk of ``Kc`` classes of ``B`` images.

        Arguments:
            activation: ``(B·Kc)×h×w`` scalar maps ``S_{k-1}``.
            previous: ``(B·Kc)×D_h×h×w`` the previous block's ``C'_{v&l}`` (None in block 1).
            guidance: ``B×h×w×D_h`` from :meth:`guidance_map`.
            text: ``K×D_h`` projected text of the whole vocabulary (keys and values).

        Returns:
            ``C'_{v&l}`` (``(B·Kc)×D_h×h×w``) and ``S_k`` (``(B·Kc)×h×w``).
        """
        embedded = self.embed(activation[:, None])  # C_e
        if previous is not None:
            embedded = embedded + previous
        tokens = embedded.permute(0, 2, 3, 1)
        for block in self.swin:
            tokens = block(tokens, guidance)  # C_v
        rows, height, width, channels = tokens.shape
        # Each (pixel, class) query attends to all class texts; queries are independent, so one
        # flat query batch against the shared text keys is the per-pixel attention over classes.
        flat = tokens.reshape(1, rows * height * width, channels)
        flat = flat + self.text_attention(self.text_norm(flat), text[None])
        flat = flat + self.mlp(self.mlp_norm(flat))
        refined = flat.view(rows, height, width, channels).permute(0, 3, 1, 2)
        return refined, activation + self.to_activation(refined)[:, 0]


class UpsamplingDecoder(nn.Module):
    """U-Net upsampler with CLIP skips (§2.7): two × (bilinear ×2, concat skip, DoubleConv)."""

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

    def forward(self, x: Tensor, skips: Sequence[Tensor]) -> Tensor:
        """``(B·Kc)×D_h×h×w`` → ``(B·Kc)×4h×4w`` logits; ``skips`` from :meth:`skip_features`."""
        for stage, skip in zip(self.stages, skips, strict=True):
            x = F.interpolate(x, scale_factor=2, mode="bilinear")
            classes = x.shape[0] // skip.shape[0]
            repeated = skip[:, None].expand(-1, classes, -1, -1, -1).flatten(0, 1)
            x = stage(torch.cat([x, repeated], dim=1))
        return self.head(x)[:, 0]


# ------------------------------------------------------------------------------------ the model


@dataclass
class EscNetFeatures:
    """What :meth:`EscNet.encode_image` returns.

    Attributes:
        clip: CLIP's dense features (with the skip layers for the head, MaskCLIP features on the
            training-free path).
        sam_embeddings: ``B×C×g×g`` full-SAM image embeddings (training-free path only).
        head: whether these were encoded for the trained head.
    """

    clip: DenseFeatures
    sam_embeddings: Tensor | None
    head: bool


def _default_skip_layers(depth: int) -> tuple[int, int]:
    """0-based blocks at a third and two thirds of the depth: 12 → (3, 7), 24 → (7, 15)."""
    return (round(depth / 3) - 1, round(2 * depth / 3) - 1)


class EscNet(SegmentationMethod):
    """ESC-Net on a ViT CLIP: cost volume → K × (PPG → SAM block → VLF) → U-Net decoder.

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
        image_dim = sam.prompt_embed_dim if sam is not None else 256
        text_dim = backbone.embed_dim
        self.image_projection = nn.Conv2d(text_dim, image_dim, 1)  # A4
        if config.use_sam:
            layers = sam.mask_decoder.transformer.layers
            self.prompt_encoding = SamPromptEncoding(
                source=sam.prompt_encoder,
                grid=self.grid,
                prompt_types=config.prompt_types,
                dense_prompt=config.dense_prompt,
                mask_logit=config.mask_logit,
            )
            self.text_token = nn.Linear(text_dim, image_dim)  # A3
            self.sam_blocks = nn.ModuleList(
                SamBlock(layer=layers[k % len(layers)], dim=image_dim)  # A2: [L0, L1, L0, L1]
                for k in range(config.num_blocks)
            )
        self.fusion = nn.ModuleList(
            VisionLanguageFusion(
                hidden_dim=config.hidden_dim,
                image_dim=image_dim,
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

    # ----------------------------------------------------------------------------- training
    @property
    def clip_finetuning_scope(self) -> str:
        """A16: ``"attention"`` trains the Q/V projections of every CLIP attention block and the
        position embeddings of both towers; K stays frozen."""
        return self.config.clip_finetune

    def parameter_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """AdamW groups (§5): CLIP and SAM (prompt encoder, two-way layers) at
        ``base_lr · multiplier`` (2e-6), the rest at ``base_lr`` (2e-4)."""
        self.set_clip_finetuning_scope()
        groups: dict[str, list[nn.Parameter]] = {"esc-net": [], "clip": [], "sam": []}
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
        clip_lr = base_lr * self.config.clip_lr_multiplier
        rates = {
            "esc-net": base_lr,
            "clip": clip_lr,
            "sam": base_lr * self.config.sam_lr_multiplier,
        }
        decay = self.config.weight_decay
        return [
            {
                "name": name,
                "params": params,
                "lr": rates[name],
                "weight_decay": decay,
            }
            for name, params in groups.items()
            if params
        ]

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
            self._loaded_sam["sam"] = load_sam_for(self.config)
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

        Intermediates (on request): ``cost_volume`` (``B×K×h×w``, Eq. 1) and, with the head,
        ``activation_maps`` (``B×(N+1)×K×h×w``: S_0 … S_N, Fig. 6) and, per block, the pseudo
        prompts ``pseudo_points`` (``B×N×K×N_o×2``, grid cells), ``pseudo_regions``
        (``B×N×K×N_o×h×w``) and ``pseudo_boxes`` (``B×N×K×N_o×4``). The training-free path
        gives ``pseudo_points``/``pseudo_regions``/``pseudo_boxes`` (``B×K×…``) and
        ``sam_masks`` (``B×K×H×W`` probabilities).
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
        text = self.backbone.encode_text(vocabulary, self.config.templates).mean  # K×D
        cost_volume = cosine_cost_volume(image_features.clip.dense, text)  # Eq. 1
        if not image_features.head:
            return self._training_free(image_features, cost_volume, return_intermediates)
        return self._run_head(image_features.clip, text, cost_volume, return_intermediates)

    def _chunks(self, classes: int) -> list[slice]:
        size = self.config.class_chunk_size
        return [slice(start, min(start + size, classes)) for start in range(0, classes, size)]

    def _ppg(self, maps: Tensor) -> PseudoPrompts:
        config = self.config
        return pseudo_prompts(
            maps,
            num_objects=config.num_objects,
            tau=config.ppg_tau,
            alpha=config.ppg_alpha,
            iterations=config.kmeans_iterations,
        )

    def _sam_block(
        self, index: int, image: Tensor, activation: Tensor, text_tokens: Tensor
    ) -> tuple[Tensor, list[PseudoPrompts]]:
        """ESC block ``index``'s PPG and SAM block: ``B×C×h×w`` → ``F'_v`` (Eq. 2)."""
        batch, classes, height, width = activation.shape
        block = self.sam_blocks[index]
        pe = self.prompt_encoding.dense_pe((height, width)).to(image.dtype)
        refined_sum = image.new_zeros(batch, height * width, image.shape[1])
        prompts = []
        for chunk in self._chunks(classes):
            chunk_prompts = self._ppg(activation[:, chunk].detach().flatten(0, 1))
            prompts.append(chunk_prompts)
            sparse, dense = self.prompt_encoding(chunk_prompts)
            tokens = text_tokens[chunk][None].expand(batch, -1, -1).flatten(0, 1)[:, None]
            tokens = torch.cat([tokens, sparse], dim=1)
            refined = block.refine(image, tokens, dense, pe)  # (F_v^n)'
            refined_sum = refined_sum + refined.view(batch, -1, *refined.shape[1:]).sum(dim=1)
        refined_mean = (refined_sum / classes).transpose(1, 2).reshape(image.shape)
        return block.fuse_classes(image, refined_mean), prompts

    def _run_head(
        self, clip: DenseFeatures, text: Tensor, cost_volume: Tensor, return_intermediates: bool
    ) -> SegmentationOutput:
        batch, classes, height, width = cost_volume.shape
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
        image = self.image_projection(clip.dense)  # X_0
        skips = self.decoder.skip_features(
            [clip.intermediates[f"layer{i}"] for i in self.skip_layers]
        )
        text_tokens = self.text_token(text) if self.config.use_sam else None
        activation, embedded = cost_volume, None  # S_0 = C_0
        activations, block_prompts = [cost_volume], []
        for index, fusion in enumerate(self.fusion):
            if self.config.use_sam:
                image, prompts = self._sam_block(index, image, activation, text_tokens)
                block_prompts.append(prompts)
            guidance = fusion.guidance_map(image)
            text_keys = fusion.text(text)
            refined_chunks, activation_chunks = [], []
            for chunk in self._chunks(classes):
                previous = None if embedded is None else embedded[:, chunk].flatten(0, 1)
                refined, next_activation = fusion(
                    activation[:, chunk].flatten(0, 1), previous, guidance, text_keys
                )
                refined_chunks.append(refined.view(batch, -1, *refined.shape[1:]))
                activation_chunks.append(next_activation.view(batch, -1, height, width))
            embedded = torch.cat(refined_chunks, dim=1)  # C'_{v&l}
            activation = torch.cat(activation_chunks, dim=1)  # S_k
            activations.append(activation)
        logits = torch.cat(
            [
                self.decoder(embedded[:, chunk].flatten(0, 1), skips).view(
                    batch, -1, 4 * height, 4 * width
                )
                for chunk in self._chunks(classes)
            ],
            dim=1,
        )
        logits = upsample_logits(logits, clip.input_size)
        intermediates: dict[str, Any] = {}
        if return_intermediates:
            intermediates = {
                "cost_volume": cost_volume,
                "activation_maps": torch.stack([a.detach() for a in activations], dim=1),
            }
            if block_prompts:
                intermediates |= _stack_block_prompts(block_prompts, batch, classes)
        return SegmentationOutput(logits=logits, intermediates=intermediates)

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
        for chunk in self._chunks(classes):
            chunk_prompts = self._ppg(cost_volume[:, chunk].flatten(0, 1))
            prompts.append(chunk_prompts)
            points = (chunk_prompts.points + 0.5) * stride * scale
            # Inclusive grid boxes → inclusive pixel boxes: from a region's first pixel to its
            # last one, the frame SAM's predictor gives its prompt encoder.
            last_pixel = chunk_prompts.boxes.new_tensor([0, 0, stride - 1, stride - 1])
            boxes = (chunk_prompts.boxes * stride + last_pixel) * scale
            for b in range(batch):
                rows = slice(b * (chunk.stop - chunk.start), (b + 1) * (chunk.stop - chunk.start))
                coords = points[rows].reshape(-1, 1, 2)
                mask_logits, _ = sam.decode(
                    features.sam_embeddings[b : b + 1],
                    points=(coords, torch.ones(coords.shape[:2], device=coords.device)),
                    boxes=boxes[rows].reshape(-1, 4) if self.config.training_free_box else None,
                )
                mask_logits = mask_logits.view(-1, self.config.num_objects, *mask_logits.shape[-2:])
                mask_logits = sam.postprocess_masks(
                    mask_logits.amax(dim=1)[None], original_size=size
                )
                log_mask = F.logsigmoid(mask_logits[0].to(logits.dtype))
                logits[b, chunk] = class_log_prob[b, chunk] + log_mask
                if sam_masks is not None:
                    sam_masks[b, chunk] = log_mask.exp()
        intermediates: dict[str, Any] = {}
        if return_intermediates:
            intermediates = {"cost_volume": cost_volume, "sam_masks": sam_masks}
            stacked = _stack_block_prompts([prompts], batch, classes)
            intermediates |= {key: value[:, 0] for key, value in stacked.items()}
        return SegmentationOutput(logits=logits, intermediates=intermediates)


def _stack_block_prompts(
    block_prompts: list[list[PseudoPrompts]], batch: int, classes: int
) -> dict[str, Tensor]:
    """Per block, chunked ``(B·Kc)×…`` prompts → ``B×N×K×…`` tensors for the demo."""
    stacked: dict[str, list[Tensor]] = {
        "pseudo_points": [],
        "pseudo_regions": [],
        "pseudo_boxes": [],
    }
    for chunks in block_prompts:
        for key, attribute in (
            ("pseudo_points", "points"),
            ("pseudo_regions", "regions"),
            ("pseudo_boxes", "boxes"),
        ):
            parts = [getattr(p, attribute) for p in chunks]
            parts = [part.view(batch, -1, *part.shape[1:]) for part in parts]
            stacked[key].append(torch.cat(parts, dim=1))
    return {key: torch.stack(values, dim=1) for key, values in stacked.items()}


# ----------------------------------------------------------------------------------- builder


def load_sam_for(
    config: EscNetConfig,
    device: str | torch.device | None = None,
    *,
    image_encoder: bool = True,
) -> SamBackbone:
    """The SAM an ESC-Net config names: its checkpoint (the shipped toy SAM by default), or a
    random one of the architecture with ``sam_pretrained=False``; ``image_encoder=False`` keeps
    only the prompt encoder and mask decoder that the head copies."""
    if not config.sam_pretrained:
        return build_sam(config.sam, None, device=device, image_encoder=image_encoder)
    checkpoint = config.sam_checkpoint
    if checkpoint is None:
        if config.sam != "toy":
            raise ValueError(
                f"ESC-Net with sam={config.sam!r} needs sam_checkpoint (e.g. the official "
                "sam_vit_b_01ec64.pth), or sam_pretrained=False for random SAM blocks."
            )
        checkpoint = ovseg.backbones.ASSETS_DIR / TOY_SAM_CHECKPOINT
    try:
        return build_sam(config.sam, checkpoint, device=device, image_encoder=image_encoder)
    except (FileNotFoundError, ValueError) as error:
        raise WeightsError(f"Cannot load the SAM for ESC-Net: {error}") from error


@register_method("esc-net")
def build_esc_net(
    *,
    backbone: str | ClipBackbone | None = None,
    weights: str | None = None,
    device: str | torch.device | None = None,
    sam_checkpoint: str | None = None,
    **config: Any,
) -> EscNet:
    """Build ESC-Net (the rules every builder follows: :mod:`ovseg.methods.builder`).

    Arguments:
        backbone: a loaded ViT :class:`ClipBackbone`, or a name or alias to load (default
            ``config.backbone``, the ToyWorld ViT CLIP).
        weights: a file written by :func:`~ovseg.methods.weights.save_weights`; None: the shipped
            ``assets/esc-net-toy.safetensors`` when the CLIP is the toy ViT it was trained on.
        device: where to build it.
        sam_checkpoint: SAM weights (official ``.pth`` for ``sam="vit_b"``, or a
            ``SamBackbone.save`` file); None: the shipped toy SAM when ``sam="toy"``.
        config: any :class:`EscNetConfig` field.

    Raises:
        WeightsError: if an explicit ``weights`` file is missing or does not fit, or, without
            head weights, the SAM checkpoint.
    """
    if sam_checkpoint is not None:
        config = {**config, "sam_checkpoint": str(sam_checkpoint)}

    def factory(settings: EscNetConfig, clip: ClipBackbone, head: bool) -> EscNet:
        if head:
            # The head file holds every SAM part ESC-Net uses (prompt encoder, two-way layers),
            # so SAM's architecture is enough: its checkpoint is read only if the training-free
            # path runs.
            sam = build_sam(settings.sam, None, device=device, image_encoder=False)
        else:
            sam = load_sam_for(settings, device=device, image_encoder=False)
        return EscNet(config=settings, backbone=clip, sam=sam)

    return build_with_weights(
        EscNet,
        backbone=backbone,
        weights=weights,
        device=device,
        config=config,
        shipped=SHIPPED_WEIGHTS,
        factory=factory,
    )
