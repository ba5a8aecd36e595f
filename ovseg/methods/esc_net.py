"""ESC-Net: Effective SAM Combination for open-vocabulary segmentation (Lee et al.).

The file follows Section 3 of the paper (spec: ``specs/esc-net.md``). A CLIP cosine cost volume
(Eq. 1) is refined by N ESC blocks and decoded by a small U-Net (Sec. 3.6). Each ESC block
(:meth:`EscNet.esc_block`, Fig. 2)

1. turns every class's activation map into SAM prompts with the parameter-free **Pseudo Prompt
   Generator** (:func:`pseudo_prompts`, Sec. 3.3);
2. embeds them with SAM's pretrained prompt encoder (:class:`GridPromptEncoder`) and runs one
   **pretrained SAM two-way block** (:class:`SamBlock`, Sec. 3.4) batched over classes, fusing
   the per-class features into one class-agnostic ``F'_v`` (Eq. 2);
3. refines the embedded cost volume with the **VLF** block (:class:`VisionLanguageFusion`,
   Sec. 3.5; the model's ``fusion`` list).

SAM's image encoder is never part of the model. Without trained head weights the method runs
ovseg's training-free path instead (:func:`~ovseg.methods.training_free.sam_prompted_logits`).

Where the paper is silent the spec's §9 recommendations are used, each marked where it applies
(A2 … A20): among them τ = 0.01 and α = 1/(h·w) for the PPG (A7), farthest-point-seeded Lloyd
k-means (A8), SAM's two decoder layers copied as [L0, L1, L0, L1] (A2), the mean of the per-class
features in Eq. 2 (A5) and ``S_i = S_{i-1} + ZeroConv(C'_i)`` as block i+1's map (A11).

Shapes: ``B`` images, ``K`` classes (the paper's N_c; ``Kc`` in a chunk of classes), ``N`` ESC
blocks (block ``i`` of them maps ``S_{i-1}`` to ``S_i``), an ``h×w`` CLIP patch grid, ``C_s``
SAM's prompt width, ``D_h`` the VLF width.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from segment_anything.utils.amg import batched_mask_to_box
from torch import Tensor, nn

from ovseg.backbones import ClipBackbone, DenseFeatures, SamBackbone
from ovseg.backbones.sam import GridPromptEncoder, load_sam
from ovseg.errors import OptionError
from ovseg.methods import optimiser
from ovseg.methods.attention import LinearAttention, Mlp, SwinBlock
from ovseg.methods.base import MethodConfig, SegmentationMethod, SegmentationOutput, VocabularyLike
from ovseg.methods.blocks import DoubleConv, cosine_cost_volume
from ovseg.methods.builder import method_builder, register_method, require_vit
from ovseg.methods.chunking import class_slices, per_class, upsample_logits
from ovseg.methods.losses import one_hot_bce
from ovseg.methods.training_free import TrainingFreeSam, sam_prompted_logits

SHIPPED_WEIGHTS = "esc-net-toy.safetensors"
PROMPT_TYPES = ("point", "box", "mask")


@dataclass
class EscNetConfig(MethodConfig):
    """ESC-Net settings (beyond :class:`MethodConfig`); the defaults are the paper's full model."""

    templates: str | tuple[str, ...] = ("A photo of a {} in the scene.",)
    # SAM (Sec. 3.3–3.4). use_sam=False drops the PPG and SAM blocks, leaving the projected CLIP
    # features as the VLF guidance (Table 2 a); sam_pretrained=False starts them random (2 b).
    sam: str = "toy"  # architecture, a key of SAM_CONFIGS
    # None with sam="toy": the shipped ToyWorld SAM. Read for a new head's SAM parts and by the
    # training-free path; head weights carry their own SAM parts.
    sam_checkpoint: str | None = None
    use_sam: bool = True
    sam_pretrained: bool = True
    prompt_types: tuple[str, ...] = ("point", "mask")  # any of PROMPT_TYPES (Table 3)
    # "union" (A9) or "mean": the average of the N_o region embeddings, i.e. the union at 1/N_o
    # strength, which the shipped toy head was trained with.
    dense_prompt: str = "union"
    num_blocks: int = 4  # N
    # PPG (Sec. 3.3; A7, A8): N_o regions, softmax temperature, threshold α (None: 1/(h·w)),
    # Lloyd iterations, and κ of the ±κ mask-prompt logits.
    num_objects: int = 5
    ppg_tau: float = 0.01
    ppg_alpha: float | None = None
    kmeans_iterations: int = 10
    mask_logit: float = 10.0
    # VLF and decoder (Sec. 3.5–3.6; A12, A13). The window must divide the patch grid or exceed
    # it (A18); window_padding=True pads the grid to whole windows instead, which neither CAT-Seg
    # nor the paper does. skip_layers: 0-based ViT blocks (None: at a third and two thirds of the
    # depth, 12 → (3, 7), 24 → (7, 15)).
    hidden_dim: int = 128  # D_h
    swin_heads: int = 4
    window_size: int = 12
    window_padding: bool = False
    mlp_ratio: float = 4.0
    text_heads: int = 4
    decoder_dims: tuple[int, int] = (64, 32)
    skip_dims: tuple[int, int] = (32, 16)
    skip_layers: tuple[int, int] | None = None
    dense_mode: str = "standard"  # CLIP's dense readout for the head
    # Training (A16, A17): the CLIP scope tuned (ovseg.backbones.finetune), CLIP's and SAM's
    # learning rates as fractions of the base one, and the classes per chunk (A20).
    clip_finetune: str = "attention"
    clip_lr_multiplier: float = 0.01
    sam_lr_multiplier: float = 0.01
    weight_decay: float = 1e-4
    class_chunk_size: int = 128
    # Training-free path: the cosine scores' temperature; prompt with boxes as well as points.
    temperature: float = 0.01
    training_free_box: bool = True

    tuple_fields: ClassVar[tuple[str, ...]] = (
        "prompt_types",
        "decoder_dims",
        "skip_dims",
        "skip_layers",
    )
    choices: ClassVar[dict[str, tuple[str, ...]]] = {
        "dense_prompt": ("union", "mean"),
        "clip_finetune": ("attention", "full", "none"),
        "dense_mode": ("standard", "maskclip"),
    }
    at_least: ClassVar[dict[str, float]] = {
        "num_blocks": 1,
        "num_objects": 1,
        "class_chunk_size": 1,
        "kmeans_iterations": 1,
    }

    def problems(self) -> list[str]:
        problems = []
        if not self.prompt_types or set(self.prompt_types) - set(PROMPT_TYPES):
            problems.append(f"prompt_types must be a non-empty subset of {PROMPT_TYPES}")
        if len(set(self.prompt_types)) != len(self.prompt_types):
            problems.append(f"prompt_types has duplicates: {self.prompt_types}")
        if len(self.decoder_dims) != 2 or len(self.skip_dims) != 2:
            problems.append("decoder_dims and skip_dims need two widths each (two stages)")
        if self.skip_layers is not None and len(self.skip_layers) != 2:
            problems.append("skip_layers needs two ViT block indices")
        if self.ppg_tau <= 0:
            problems.append("ppg_tau must be positive")
        return problems


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


# ---------------------------------------------------------------------- SAM block (Sec. 3.4, Eq. 2)


class SamBlock(nn.Module):
    """One pretrained SAM two-way block run on every class's prompt set, then the fusion of the
    per-class results into one class-agnostic ``F'_v``. Eq. 2 reads
    ``(F_v^n)' = BCA(SA(F_l^n), F_v)`` and ``F'_v = Conv([F_v^0; …; F_v^{N_c}])``; with the
    spec's choices (A3, A5) that is::

        (F_v^n)' = BCA(SA([T_l^n ; P_sparse^n]), F_v + P_dense^n)
        F'_v = Conv1×1([F_v ; mean_n (F_v^n)'])

    The projected text token ``T_l^n`` of class n replaces SAM's output tokens (A3); the class's
    dense prompt is added to the vision features as SAM adds its mask embedding. ``layer`` is a
    SAM ``TwoWayAttentionBlock`` (copied, its ``skip_first_layer_pe`` kept), ``dim`` is C_s.
    """

    def __init__(self, *, layer: nn.Module, dim: int) -> None:
        super().__init__()
        self.layer = copy.deepcopy(layer)
        self.fuse = nn.Conv2d(2 * dim, dim, 1)

    def refine(
        self, vision_features: Tensor, queries: Tensor, dense_prompts: Tensor, key_pe: Tensor
    ) -> Tensor:
        """``(F_v^n)'``, ``(B·Kc)×(h·w)×C_s`` (SAM's updated keys), for ``Kc`` classes of ``B``
        images from ``F_v`` (``B×C_s×h×w``), the prompt tokens ``[T_l^n ; P_sparse^n]``
        (``(B·Kc)×T×C_s``), ``P_dense^n`` (``(B·Kc)×C_s×h×w``) and SAM's ``C_s×h×w`` dense PE."""
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
        """``hidden_dim`` is D_h, ``vision_dim`` C_s (of ``F'_v``), ``text_dim`` CLIP's D."""
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
            activation_map: ``(B·Kc)×h×w`` scalar maps ``S_{i-1}``.
            previous_correlation: ``(B·Kc)×D_h×h×w`` the previous block's ``C'_{v&l}`` (None in
                block 1).
            guidance: ``B×h×w×D_h`` from :meth:`guidance_map`.
            text_keys: ``K×D_h`` projected text of the whole vocabulary (keys and values).

        Returns:
            ``C'_{v&l}`` (``(B·Kc)×D_h×h×w``) and ``S_i`` (``(B·Kc)×h×w``).
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
        """``vision_widths``: the CLIP skips' channels, projected to ``skip_widths``; ``widths``:
        the two stages' outputs."""
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
    """What :meth:`EscNet.encode_image` returns: CLIP's dense features (with the skip layers for
    the head, MaskCLIP's on the training-free path), the full SAM's ``B×C_s×g×g`` image
    embeddings (training-free path only), and whether they were encoded for the head."""

    clip: DenseFeatures
    sam_embeddings: Tensor | None
    head: bool


@dataclass
class EscBlockOutput:
    """What one ESC block gives the next (Fig. 2).

    Attributes:
        vision_features: ``B×C_s×h×w`` ``F'_v`` (Eq. 2); without SAM, the block's input ``F_v``.
        correlation: ``B×K×D_h×h×w`` ``C'_{v&l}``, the VLF's refined correlation.
        activation_map: ``B×K×h×w`` ``S_i``, the map the next block's PPG reads (A11).
        pseudo_prompts: the PPG's prompts, one :class:`PseudoPrompts` per chunk of classes, of
            its ``B·Kc`` maps in (image, class) order; empty without SAM.
    """

    vision_features: Tensor
    correlation: Tensor
    activation_map: Tensor
    pseudo_prompts: list[PseudoPrompts]


class EscNet(SegmentationMethod):
    """ESC-Net on a ViT CLIP: cost volume → N × (PPG → SAM block → VLF) → U-Net decoder. The
    head runs when the module is training or ``trained_head`` is set; otherwise the training-free
    path does."""

    name = "esc-net"
    config_class = EscNetConfig
    trained_head = False

    def __init__(
        self, *, config: EscNetConfig, backbone: ClipBackbone, sam: SamBackbone | None
    ) -> None:
        """``sam``: the SAM whose prompt encoder and decoder layers are copied (pretrained, or
        random for Table 2 b or for head weights to overwrite; its image encoder may be absent).
        ``config.input_size`` fixes the patch grid the prompts live on."""
        super().__init__()
        self.grid = require_vit(backbone, config.input_size, method="ESC-Net")
        if config.use_sam and sam is None:
            raise ValueError("use_sam=True needs a SAM to copy the prompt encoder and layers from.")
        self.config = config
        self.backbone = backbone
        depth = backbone.num_layers
        self.skip_layers = config.skip_layers or (round(depth / 3) - 1, round(2 * depth / 3) - 1)
        self.ppg = partial(  # the PPG (Sec. 3.3) has no parameters, only these settings
            pseudo_prompts,
            num_objects=config.num_objects,
            tau=config.ppg_tau,
            alpha=config.ppg_alpha,
            iterations=config.kmeans_iterations,
        )
        vision_dim = sam.prompt_embed_dim if sam is not None else 256
        text_dim = backbone.embed_dim
        self.image_projection = nn.Conv2d(text_dim, vision_dim, 1)  # A4
        if config.use_sam:
            layers = sam.mask_decoder.transformer.layers
            self.prompt_encoding = GridPromptEncoder(
                source=sam.prompt_encoder,
                grid=self.grid,
                prompt_types=config.prompt_types,
                dense_prompt=config.dense_prompt,
                mask_logit=config.mask_logit,
            )
            self.text_token = nn.Linear(text_dim, vision_dim)  # A3
            self.sam_blocks = nn.ModuleList(
                SamBlock(layer=layers[i % len(layers)], dim=vision_dim)  # A2: [L0, L1, L0, L1]
                for i in range(config.num_blocks)
            )
        self.fusion = nn.ModuleList(  # the N VLF blocks
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
        # Read only by the training-free path, on first use; not a submodule.
        self.training_free_sam = TrainingFreeSam(
            config.sam, config.sam_checkpoint, pretrained=config.sam_pretrained
        )

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
        sam = self.training_free_sam.on(images.device)
        sam_embeddings = None if sam is None else sam.encode_image(images)
        return EscNetFeatures(clip=clip, sam_embeddings=sam_embeddings, head=False)

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
        ``activation_maps`` (``B×(N+1)×K×h×w``: S_0 … S_N, Fig. 6) and, with SAM,
        ``pseudo_prompts``: each ESC block's :attr:`EscBlockOutput.pseudo_prompts`. The
        training-free path returns its own (:func:`sam_prompted_logits`).
        """
        self.check_options(options)
        self._check_features(image_features)
        text = self.backbone.encode_text(vocabulary, self.config.templates).mean  # F_l, K×D
        cost_volume = cosine_cost_volume(image_features.clip.dense, text)  # C_{v&l}, Eq. 1
        if image_features.head:
            return self._run_head(image_features.clip, text, cost_volume, return_intermediates)
        return sam_prompted_logits(
            cost_volume,
            prompt_generator=self.ppg,
            sam=self.training_free_sam.loaded,
            sam_embeddings=image_features.sam_embeddings,
            stride=image_features.clip.stride,
            input_size=image_features.clip.input_size,
            temperature=self.config.temperature,
            class_chunk_size=self.config.class_chunk_size,
            boxes=self.config.training_free_box,
            return_intermediates=return_intermediates,
        )

    def _check_features(self, features: EscNetFeatures) -> None:
        """The features must be :meth:`encode_image`'s in the current mode, on the grid the
        prompts live on; the head's Swin windows must tile that grid (A18) unless
        ``window_padding`` asks for padded windows."""
        if not isinstance(features, EscNetFeatures):
            raise ValueError("segment needs the EscNetFeatures that encode_image returns.")
        if features.head != self._uses_head():
            raise ValueError(
                "These features were encoded for the "
                f"{'head' if features.head else 'training-free path'}; re-encode the "
                "image after changing trained_head or train()/eval()."
            )
        grid = tuple(features.clip.dense.shape[-2:])
        if grid != (self.grid, self.grid):
            raise ValueError(
                f"ESC-Net was built for a {self.grid}×{self.grid} grid (input_size "
                f"{self.config.input_size}); got features on a {grid[0]}×{grid[1]} grid."
            )
        window = self.config.window_size
        partial_windows = self.grid > window and self.grid % window
        if features.head and partial_windows and not self.config.window_padding:
            raise OptionError(
                f"window_size {window} does not divide ESC-Net's {self.grid}×{self.grid} patch "
                f"grid (input_size {self.config.input_size}), so the Swin windows would be "
                "padded. Use a window that divides the grid, an input_size whose grid it "
                "divides, or window_padding=True to pad on purpose."
            )

    def _run_head(
        self, clip: DenseFeatures, text: Tensor, cost_volume: Tensor, return_intermediates: bool
    ) -> SegmentationOutput:
        """Fig. 2: N ESC blocks refine the cost volume; the decoder upsamples it (Sec. 3.6)."""
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
        """ESC block ``i = index + 1`` (Fig. 2): PPG → SAM prompt encoder → SAM block → VLF.

        Arguments:
            index: the block, 0 … N−1.
            vision_features: ``B×C_s×h×w`` ``F_v``, the vision features the SAM block refines.
            activation_map: ``B×K×h×w`` ``S_{i-1}`` (``S_0``: the cost volume, Eq. 1).
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
                chunk_prompts = self.ppg(activation_map[:, chunk].detach().flatten(0, 1))
                prompts.append(chunk_prompts)
                sparse, dense = self.prompt_encoding(  # P_sparse^n, P_dense^n
                    chunk_prompts.points, chunk_prompts.boxes, chunk_prompts.regions
                )
                text_queries = text_tokens[chunk][None].expand(batch, -1, -1).flatten(0, 1)
                queries = torch.cat([text_queries[:, None], sparse], dim=1)  # [T_l^n ; P_sparse^n]
                refined = sam_block.refine(vision_features, queries, dense, key_pe)  # (F_v^n)'
                refined_sum = refined_sum + refined.view(batch, -1, *refined.shape[1:]).sum(dim=1)
            refined_mean = (refined_sum / classes).transpose(1, 2).reshape(vision_features.shape)
            vision_features = sam_block.fuse_classes(vision_features, refined_mean)  # F'_v, Eq. 2
        # Sec. 3.5: the VLF refines every class's correlation, guided by F'_v and the class texts.
        vlf = self.fusion[index]
        guidance = vlf.guidance_map(vision_features)
        text_keys = vlf.text(text)
        correlations, activation_maps = [], []
        for chunk in chunks:
            previous = None if correlation is None else correlation[:, chunk].flatten(0, 1)
            refined, next_map = vlf(
                activation_map[:, chunk].flatten(0, 1), previous, guidance, text_keys
            )
            correlations.append(refined.view(batch, -1, *refined.shape[1:]))
            activation_maps.append(next_map.view(batch, -1, height, width))
        return EscBlockOutput(
            vision_features=vision_features,
            correlation=torch.cat(correlations, dim=1),  # C'_{v&l}
            activation_map=torch.cat(activation_maps, dim=1),  # S_i (A11)
            pseudo_prompts=prompts,
        )

    # ---------------------------------------------------------------- loss and optimiser
    def loss(self, output: SegmentationOutput, target: Tensor) -> dict[str, Tensor]:
        """A14: per-pixel BCE against one-hot targets over all K classes, averaged over labelled
        pixels × classes."""
        logits = upsample_logits(output.logits, target.shape[-2:])
        return {"loss_bce": one_hot_bce(logits, target, ignore="exclude")}

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
        return optimiser.parameter_groups(
            self,
            _parameter_group,
            lr={
                "esc-net": base_lr,
                "clip": base_lr * config.clip_lr_multiplier,
                "sam": base_lr * config.sam_lr_multiplier,
            },
            weight_decay=config.weight_decay,
        )


def _parameter_group(name: str, parameter: nn.Parameter) -> str:
    if name.startswith("backbone."):
        return "clip"
    if name.startswith("prompt_encoding.") or (
        name.startswith("sam_blocks.") and ".layer." in name
    ):
        return "sam"
    return "esc-net"


def _build(config: EscNetConfig, clip: ClipBackbone, head: bool) -> EscNet:
    """The builder's factory: head weights hold every SAM part ESC-Net uses, so with them SAM's
    architecture is enough; without a head the SAM parts start from the checkpoint (or random
    ones: Table 2 b)."""
    pretrained = config.sam_pretrained and not head
    sam = load_sam(config.sam, config.sam_checkpoint, pretrained=pretrained, image_encoder=False)
    return EscNet(config=config, backbone=clip, sam=sam)


build_esc_net = register_method("esc-net")(
    method_builder(EscNet, shipped=SHIPPED_WEIGHTS, factory=_build)
)
