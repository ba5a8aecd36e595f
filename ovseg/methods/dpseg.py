"""DPSeg: dual-prompt cost volume learning for open-vocabulary segmentation (CVPR 2025).

DPSeg extends SED. Every class gets, per text template m, a text embedding T and the CLIP image
embedding V of a generated picture of that template (a *visual prompt*, drawn and cached by
:mod:`ovseg.prompts.visual`). The file follows the paper's §4:

- §4.1 the dual-prompt cost volume ``F_c = cos(E, R)``, ``R = (V̂ + T̂) / 2`` (Eq. 1), between the
  1/32-scale image embedding E and R, and its per-class cost embedding F;
- §4.2 the cost volume-guided decoder (CVGD): hybrid dilated convolution, class attention,
  deconvolution, detached encoder guidance E_j and the visual cost volumes
  ``F_v^j = cos(Pool(V_j), E_j)`` (Eq. 2);
- §4.3 semantic-guided prompt refinement (Inference II).

The per-class layers run on chunks of classes (``class_chunk``, :mod:`ovseg.methods.chunking`).
Without a trained head DPSeg runs training-free: the template-averaged F_c, refined by Inference
II (DESIGN.md §5). Choices the paper leaves open follow specs/dpseg.md §8, which cites SED for each;
the paper's tables are in ``training/dpseg_paper.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg.backbones import ClipBackbone, is_toy_clip
from ovseg.images import crop_class_region
from ovseg.methods.attention import LinearAttention, MultiHeadAttention
from ovseg.methods.base import MethodConfig, SegmentationMethod, SegmentationOutput, VocabularyLike
from ovseg.methods.blocks import (
    CostEmbedding,
    DoubleConv,
    convolved_cost_volume,
    cosine_cost_volume,
)
from ovseg.methods.builder import method_builder, register_method
from ovseg.methods.chunking import (
    ClassSource,
    class_slices,
    classes_of,
    each_class,
    join_classes,
    upsample_logits,
    upsampled_argmax,
)
from ovseg.methods.losses import one_hot_bce
from ovseg.methods.optimiser import parameter_groups
from ovseg.prompts.templates import resolve_templates
from ovseg.prompts.visual import (
    PromptEncoderId,
    PromptMemo,
    VisualPromptBank,
    VisualPromptEmbeddings,
    VisualPromptGenerator,
    make_generator,
    prompt_defaults,
    shipped_toy_prompts,
)

SHIPPED_WEIGHTS = "dpseg-toy.safetensors"
PROMPT_ENCODER_BATCH = 16
# Inference without gradients runs the class attention over chunks of pooled positions holding at
# most this many class tokens (its MLP widens each token 4×; 847 classes at 768 px have 1.9 M
# tokens in stage D3).
ATTENTION_TOKENS = 2**16
# The config fields that hold one width per decoder stage D1-D3.
STAGE_WIDTHS = ("decoder_dims", "guidance_dims", "visual_cost_dims")

# ------------------------------------------------------------------------------------- config


@dataclass
class DPSegConfig(MethodConfig):
    """DPSeg's settings; the defaults are the paper's (spec §2 and §8), M is the number of
    templates and the Table numbers are the paper's ablations (training/dpseg_paper.py)."""

    machine_settings: ClassVar[tuple[str, ...]] = ("prompt_cache_dir", "class_chunk")
    tuple_fields: ClassVar[tuple[str, ...]] = (*STAGE_WIDTHS, "dilations", "visual_cost_scales")
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {
        "prompt_mode": ("avg", "text", "visual"),
        "cost_fusion": ("avg_emb", "avg_cos", "cat"),
        "attention_type": ("linear", "full"),
        "inference": ("I", "II"),
        "crop_mode": ("masked", "bbox"),
        "prompt_dtype": (None, "float16", "bfloat16", "float32"),
        "ignore_policy": ("negative", "exclude"),
    }
    at_least: ClassVar[dict[str, float]] = {"class_chunk": 1}
    within: ClassVar[dict[str, tuple[float, float]]] = {"detection_threshold": (0.0, 1.0)}

    backbone: str = "toy-convnext"
    num_templates: int | None = None  # the first N templates only (Table 4); None: all (80)
    cost_embed_dim: int = 128  # d_F, the cost embedding width
    # Output widths of D1-D3: the paper's 62 for D1 does not split into SED's 62 // 16 = 3
    # GroupNorm groups, 64 does.
    decoder_dims: tuple[int, ...] = (64, 32, 16)
    guidance_dims: tuple[int, ...] = (32, 16, 8)  # E_4, E_3, E_2 reduced (÷16 for ConvNeXt-B)
    visual_cost_dims: tuple[int, ...] = (32, 16, 8)  # F_v^4, F_v^3, F_v^2 projected
    attention_heads: int = 4  # class attention
    attention_type: str = "linear"  # SED's linear attention, or softmax "full"
    attention_pool: int = 2  # spatial average pooling before the class attention
    dilations: tuple[int, ...] = (1, 2, 4)  # HD Conv branches
    mlp_ratio: int = 4  # HD Conv and class attention MLPs, times the stage width
    prompt_mode: str = "avg"  # R = (V̂+T̂)/2, T ("text") or V ("visual"); Table 2a
    # "avg_emb": Eq. 1; "avg_cos": the mean of the text and visual cost volumes; "cat": both
    # (2M channels); Table 2b.
    cost_fusion: str = "avg_emb"
    visual_cost_scales: tuple[int, ...] = (2, 3, 4)  # the F_v^j that guide the decoder; Table 3
    # F_c upsampled 2×, 4×, 8× by deconvolutions as guidance (Table 3's last row, with
    # visual_cost_scales=()).
    upsampled_cost_guidance: bool = False
    # "auto" (ToyWorld sprites, "toyworld", for the toy CLIPs, else "sd15"), "sd3" or a diffusers
    # model id or folder.
    prompt_generator: str = "auto"
    prompt_noise: float = 0.0  # Gaussian noise mixed into every prompt image (Table 5)
    # G distinct prompt images per class, template m using image m mod G. None: one per template
    # (the paper), or at most 16 for ToyWorld sprites (they ignore the template text).
    prompts_per_class: int | None = None
    # Side of the prompt images and the Inference II crops. None: input_size (the paper), or 128
    # for ToyWorld sprites.
    prompt_resolution: int | None = None
    prompt_seed: int = 0
    # The dtype a diffusers generator draws in (None: float16 on CUDA, else float32). It is part
    # of the bank's keys: a CPU reading a bank drawn on a GPU sets "float16".
    prompt_dtype: str | None = None
    prompt_cache_dir: str | None = None  # None: ~/.cache/ovseg/visual_prompts
    inference: str = "II"  # or "I"; training always uses "I"
    detection_threshold: float = 0.0  # τ, the share of pixels a class needs to be refined
    crop_mode: str = "masked"  # pixels outside the class in the CLIP mean colour, or "bbox"
    # Inference II also replaces V̄_j of Eq. 2 with the crops' (an ablation). The paper does not
    # say whether F_v^j come from the crops; spec §8.13 recommended it. But crops of the image
    # match its own E_2 far better than generated prompts (F_v^2 of detected classes doubles),
    # outside anything the head saw in training: on the shipped toy head pixel accuracy falls
    # from 54% in pass I to 4% with V̄_j replaced, and to 50% with V alone.
    refine_stage_features: bool = False
    encoder_lr_multiplier: float = 0.01  # α, the image encoder's learning-rate factor
    weight_decay: float = 1e-4  # AdamW, every group
    # Ignored pixels are negatives of every class (SED), or "exclude": left out of the loss.
    ignore_policy: str = "negative"
    temperature: float = 0.01  # divides the training-free cosine scores into logits
    # Classes the per-class layers take at a time. Without autograd the decoder writes the
    # chunks into one buffer per stage and runs the class attention over ATTENTION_TOKENS
    # tokens at a time; the same class_chunk gives the same bits with and without autograd.
    class_chunk: int = 64

    def problems(self) -> list[str]:
        problems = []
        if self.prompt_mode != "avg" and self.cost_fusion != "avg_emb":
            problems.append(
                f"cost_fusion={self.cost_fusion!r} combines text and visual prompts; it needs "
                f"prompt_mode='avg', not {self.prompt_mode!r}"
            )
        if not set(self.visual_cost_scales) <= {2, 3, 4}:
            problems.append(
                f"visual_cost_scales must be a subset of (2, 3, 4); got {self.visual_cost_scales}"
            )
        miscounted = [
            f"{name} needs one width per decoder stage (3); got {getattr(self, name)}"
            for name in STAGE_WIDTHS
            if len(getattr(self, name)) != 3
        ]
        if miscounted:
            return problems + miscounted
        for width, guidance in zip(
            (self.cost_embed_dim, *self.decoder_dims[:2]), self.guidance_dims, strict=True
        ):
            if width <= guidance:
                problems.append(
                    f"a decoder stage of width {width} cannot make room for {guidance} guidance "
                    "channels (its deconvolution outputs width - guidance)"
                )
            if width % self.attention_heads:
                problems.append(f"width {width} is not divisible by {self.attention_heads} heads")
        for width in self.decoder_dims:
            if width % max(1, width // 16):
                problems.append(
                    f"decoder width {width} does not split into SED's width // 16 = {width // 16} "
                    "GroupNorm groups; the paper's 62 is such a width, use 64"
                )
        return problems


# ------------------------------------------------------------------------- §4.1 dual prompts, F_c


@dataclass
class DualPrompts:
    """The prompts of one pass, per image (Inference II makes them image-specific).

    Attributes:
        text: T, ``B×K×M×D_z``, L2-normalised.
        visual: V, ``B×K×M×D_z``.
        pooled: V̄_2, V̄_3, V̄_4, ``B×K×M×D_j``.
    """

    text: Tensor
    visual: Tensor
    pooled: tuple[Tensor, ...]

    def classes(self, index: slice) -> DualPrompts:
        """The prompts of some classes (views)."""
        return DualPrompts(
            text=self.text[:, index],
            visual=self.visual[:, index],
            pooled=tuple(p[:, index] for p in self.pooled),
        )


def dual_prompt_cost_volume(
    embeddings: Tensor, prompts: DualPrompts, config: DPSegConfig
) -> Tensor:
    """F_c (Eq. 1 and the Table 2 variants ``config.prompt_mode`` and ``config.cost_fusion``):
    ``B×D_z×h×w`` → ``B×K×M×h×w`` (``2M`` for ``cost_fusion="cat"``); the CLIP logit scale is not
    applied."""
    if config.prompt_mode == "text":
        return cosine_cost_volume(embeddings, prompts.text, per_image=True)
    if config.prompt_mode == "visual":
        return cosine_cost_volume(embeddings, prompts.visual, per_image=True)
    if config.cost_fusion == "avg_emb":
        dual = (F.normalize(prompts.visual, dim=-1) + F.normalize(prompts.text, dim=-1)) / 2
        return cosine_cost_volume(embeddings, dual, per_image=True)  # R = Avg(V̂ + T̂), Eq. 1
    text_cost = cosine_cost_volume(embeddings, prompts.text, per_image=True)
    visual_cost = cosine_cost_volume(embeddings, prompts.visual, per_image=True)
    if config.cost_fusion == "avg_cos":
        return (text_cost + visual_cost) / 2
    return torch.cat([text_cost, visual_cost], dim=2)


# ------------------------------------------------------------------------------------ §4.2 blocks


class HybridDilatedConv(nn.Module):
    """HD Conv (§4.2): three depthwise 3×3 convolutions with dilations 1, 2, 4, summed, then a
    ConvNeXt-style LayerNorm → MLP (GELU) → layer scale → residual (spec §8.3). ``N×C×s×s`` →
    ``N×C×s×s``.

    Its receptive field is 9×9 (dilation 4) with 27 weights per channel, where SED's 9×9
    depthwise kernel has 81.
    """

    def __init__(
        self, *, channels: int, dilations: Sequence[int] = (1, 2, 4), mlp_ratio: int = 4
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=d, dilation=d, groups=channels)
            for d in dilations
        )
        self.norm = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(
            nn.Linear(channels, mlp_ratio * channels),
            nn.GELU(),
            nn.Linear(mlp_ratio * channels, channels),
        )
        self.layer_scale = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        merged = sum(branch(x) for branch in self.branches)  # element-wise addition
        merged = self.mlp(self.norm(merged.permute(0, 2, 3, 1))) * self.layer_scale
        return x + merged.permute(0, 3, 1, 2)


class ClassAttention(nn.Module):
    """Category-level self-attention (§4.2), SED's ClassTransformerLayer.

    At every position of a pooled grid, the K class tokens attend to each other (pre-norm
    attention and MLP, each with a residual); the result is upsampled back and added. There is no
    positional encoding over classes, so the layer is equivariant to permuting them. It is the
    decoder's only layer that mixes classes: :meth:`forward` gives the mixed tokens of all classes,
    :meth:`attended` the layer's output for a chunk of classes.
    """

    def __init__(
        self,
        *,
        channels: int,
        heads: int = 4,
        attention_type: str = "linear",
        pool: int = 2,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        self.pool = pool
        attention = LinearAttention if attention_type == "linear" else MultiHeadAttention
        self.attention = attention(dim=channels, heads=heads)
        self.norm1 = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(
            nn.Linear(channels, mlp_ratio * channels),
            nn.ReLU(),
            nn.Linear(mlp_ratio * channels, channels),
        )
        self.norm2 = nn.LayerNorm(channels)

    def forward(self, x: Tensor, *, class_chunk: int) -> Tensor:
        """``B×K×C×s×s`` → its pooled class tokens after the attention over classes, ``B×P×K×C``
        (P pooled positions), pooled ``class_chunk`` classes at a time. Positions are independent:
        without autograd they are mixed in place, ``ATTENTION_TOKENS`` tokens at a time."""
        classes = x.shape[1]
        tokens = join_classes(
            ((index, self.tokens(x[:, index])) for index in class_slices(classes, class_chunk)),
            classes,
            dim=2,
        )
        flat = tokens.reshape(-1, classes, tokens.shape[-1])  # (B·P)×K×C
        count = flat.shape[0]
        positions = count if torch.is_grad_enabled() else max(1, ATTENTION_TOKENS // classes)
        mixed = join_classes(
            ((index, self.mix(flat[index])) for index in class_slices(count, positions)),
            count,
            dim=0,
            buffer=flat,
        )
        return mixed.view(tokens.shape)

    def tokens(self, x: Tensor) -> Tensor:
        """``B×c×C×s×s`` → pooled tokens ``B×P×c×C`` (a permuted view)."""
        batch, classes, channels, height, width = x.shape
        pool = min(self.pool, height, width)
        pooled = F.avg_pool2d(x.reshape(batch * classes, channels, height, width), pool)
        return pooled.view(batch, classes, channels, -1).permute(0, 3, 1, 2)

    def mix(self, tokens: Tensor) -> Tensor:
        """Attention over classes and MLP: ``N×K×C`` → ``N×K×C``, each of the N positions alone."""
        normed = self.norm1(tokens)
        tokens = tokens + self.attention(normed, normed, normed)
        return tokens + self.mlp(self.norm2(tokens))

    def attended(self, x: Tensor, tokens: Tensor, index: slice) -> Tensor:
        """The layer's output for classes ``index``: ``x[:, index]`` (``B×c×C×s×s``) plus their
        mixed ``tokens`` (from :meth:`forward`) upsampled back to ``s×s``."""
        batch, _, channels, height, width = x.shape
        part = tokens[:, :, index]
        classes = part.shape[2]
        pool = min(self.pool, height, width)
        maps = part.permute(0, 2, 3, 1).reshape(
            batch * classes, channels, height // pool, width // pool
        )
        upsampled = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=True)
        return x[:, index] + upsampled.view(batch, classes, channels, height, width)


class VisualCostProjection(nn.Module):
    """The visual cost volume F_v^j (Eq. 2) projected from M to g channels: Conv(M→g, 3×3)+ReLU.

    :meth:`forward` folds the convolution into the prototypes when that is cheaper and then never
    builds the ``B×K×M×H_j×W_j`` volume (:func:`~ovseg.methods.blocks.convolved_cost_volume`,
    spec §2.7); :meth:`naive` builds it, as the reference.
    """

    def __init__(self, *, num_prompts: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(num_prompts, out_channels, 3, padding=1)

    @staticmethod
    def visual_cost_volume(encoder_features: Tensor, prototypes: Tensor) -> Tensor:
        """Eq. 2, ``F_v^j(x, k, m) = cos(Pool(V_j(k, m)), E_j(x))``: ``B×D_j×H×W`` and pooled
        prototypes ``B×K×M×D_j`` → ``B×K×M×H×W``."""
        return cosine_cost_volume(encoder_features, prototypes, per_image=True)

    def naive(self, encoder_features: Tensor, prototypes: Tensor) -> Tensor:
        """F_v^j built, then each class slice convolved. → ``B×K×g×H×W``."""
        return F.relu(each_class(self.conv, self.visual_cost_volume(encoder_features, prototypes)))

    def forward(self, encoder_features: Tensor, prototypes: Tensor) -> Tensor:
        """``B×D_j×H×W`` (detached E_j) and ``B×K×M×D_j`` (V̄_j) → ``B×K×g×H×W``."""
        return F.relu(convolved_cost_volume(self.conv, encoder_features, prototypes), inplace=True)


class DecoderStage(nn.Module):
    """CVGD stage D_i (§4.2, ``index`` i - 1): HD Conv → class attention → 2× deconvolution →
    concatenate the guidance E_j (reduced, repeated over classes), the projected F_v^j and
    (ablation) the upsampled F_c → DoubleConv. D1 is guided at 1/16 scale by E_4 and F_v^4, D2 at
    1/8 by E_3 and F_v^3, D3 at 1/4 by E_2 and F_v^2. ``B×K×C_in×s×s`` → ``B×K×C_out×2s×2s``."""

    def __init__(
        self, *, config: DPSegConfig, index: int, encoder_channels: int, num_prompts: int
    ) -> None:
        super().__init__()
        channels = (config.cost_embed_dim, *config.decoder_dims)[index]
        guidance = config.guidance_dims[index]
        scale = 4 - index  # j: D1 is guided by F_v^4, D2 by F_v^3, D3 by F_v^2
        visual_cost = config.visual_cost_dims[index] if scale in config.visual_cost_scales else 0
        upsampled_cost = config.visual_cost_dims[index] if config.upsampled_cost_guidance else 0
        self.hd_conv = HybridDilatedConv(
            channels=channels, dilations=config.dilations, mlp_ratio=config.mlp_ratio
        )
        self.class_attention = ClassAttention(
            channels=channels,
            heads=config.attention_heads,
            attention_type=config.attention_type,
            pool=config.attention_pool,
            mlp_ratio=config.mlp_ratio,
        )
        self.upsample = nn.ConvTranspose2d(channels, channels - guidance, kernel_size=2, stride=2)
        self.guidance = nn.Sequential(
            nn.Conv2d(encoder_channels, guidance, 3, padding=1), nn.ReLU()
        )
        self.visual_cost = (
            VisualCostProjection(num_prompts=num_prompts, out_channels=visual_cost)
            if visual_cost
            else None
        )
        self.fuse = DoubleConv(
            in_channels=channels + visual_cost + upsampled_cost,
            out_channels=config.decoder_dims[index],
        )

    def forward(
        self,
        source: ClassSource,
        classes: int,
        encoder_features: Tensor,
        prototypes: Tensor,
        upsampled_cost: ClassSource | None,
        *,
        class_chunk: int,
        buffer: Tensor | None = None,
        logit_conv: nn.Module | None = None,
    ) -> Tensor:
        """The stage on K classes, ``class_chunk`` at a time: only the HD Conv output, its
        pooled class tokens and the stage output span all classes.

        Arguments:
            source: class slice → the stage input of those classes, ``B×c×C_in×s×s``.
            encoder_features: E_j, ``B×D_j×2s×2s``, detached.
            prototypes: V̄_j, ``B×K×M×D_j``.
            upsampled_cost: class slice → the upsampled F_c, ``B×c×u×2s×2s``, or None.
            buffer: receives the HD Conv output without autograd; it may be the tensor ``source``
                reads from.
            logit_conv: applied to each chunk of the output (the decoder's ``head``, last stage),
                so that the last stage's output is never held for all classes.
        """
        slices = class_slices(classes, class_chunk)
        hidden = join_classes(
            ((index, each_class(self.hd_conv, source(index))) for index in slices),
            classes,
            buffer=buffer,
        )
        tokens = self.class_attention(hidden, class_chunk=class_chunk)
        guidance = self.guidance(encoder_features)[:, None]  # B×1×g×2s×2s

        def output(index: slice) -> Tensor:
            x = self.class_attention.attended(hidden, tokens, index)
            count = x.shape[1]
            pieces = [each_class(self.upsample, x), guidance.expand(-1, count, -1, -1, -1)]
            if self.visual_cost is not None:
                pieces.append(self.visual_cost(encoder_features, prototypes[:, index]))  # Eq. 2
            if upsampled_cost is not None:
                pieces.append(upsampled_cost(index))
            fused = self.fuse.fuse_classes(pieces)
            return fused if logit_conv is None else each_class(logit_conv, fused)

        return join_classes(((index, output(index)) for index in slices), classes)


class CostVolumeGuidedDecoder(nn.Module):
    """CVGD (§4.2): stages D1-D3 from 1/32 to 1/4 scale, then a 3×3 conv to one logit per class.
    ``encoder_channels`` are D_2, D_3, D_4 of the image encoder, ``num_prompts`` is M and
    ``cost_channels`` the channels of F_c (M, or 2M for ``cost_fusion="cat"``)."""

    def __init__(
        self,
        *,
        config: DPSegConfig,
        encoder_channels: Sequence[int],
        num_prompts: int,
        cost_channels: int,
    ) -> None:
        super().__init__()
        # The encoder's stages coarsest first: D1, D2, D3 are guided by E_4, E_3, E_2.
        self.stages = nn.ModuleList(
            DecoderStage(
                config=config, index=index, encoder_channels=channels, num_prompts=num_prompts
            )
            for index, channels in enumerate(reversed(encoder_channels))
        )
        self.cost_upsampling = None
        if config.upsampled_cost_guidance:
            widths = (cost_channels, *config.visual_cost_dims)
            self.cost_upsampling = nn.ModuleList(
                nn.Sequential(nn.ConvTranspose2d(widths[i], widths[i + 1], 2, stride=2), nn.ReLU())
                for i in range(3)
            )
        self.head = nn.Conv2d(config.decoder_dims[-1], 1, 3, padding=1)

    def forward(
        self,
        embedded_cost_of: ClassSource,
        cost_volume_of: ClassSource,
        classes: int,
        encoder_features: Sequence[Tensor],
        prototypes: Sequence[Tensor],
        *,
        class_chunk: int,
    ) -> Tensor:
        """Logits ``B×K×H/4×W/4`` from ``embedded_cost_of`` and ``cost_volume_of`` (class slice → F
        and F_c of those classes), E_2..E_4 (detached) and V̄_2..V̄_4. F, F_c and D3's output (the
        last stage applies the logit conv per chunk) are never held for all classes."""
        source, x = embedded_cost_of, None
        # E_j and V̄_j coarsest first, as the stages take them.
        inputs = zip(self.stages, reversed(encoder_features), reversed(prototypes), strict=True)
        for index, (stage, stage_features, pooled) in enumerate(inputs):
            upsampled = None
            if self.cost_upsampling is not None:
                upsampled = _upsampled_cost(cost_volume_of, self.cost_upsampling[: index + 1])
            x = stage(
                source,
                classes,
                stage_features,
                pooled,
                upsampled,
                class_chunk=class_chunk,
                buffer=x,
                logit_conv=self.head if index == len(self.stages) - 1 else None,
            )
            source = classes_of(x)
        return x.squeeze(2)


def _upsampled_cost(cost_volume_of: ClassSource, layers: Sequence[nn.Module]) -> ClassSource:
    """Class slice → F_c of those classes upsampled by ``layers`` (the ``upsampled_cost_guidance``
    deconvolutions up to the stage's scale)."""

    def upsampled(index: slice) -> Tensor:
        x = cost_volume_of(index)
        for layer in layers:
            x = each_class(layer, x)
        return x

    return upsampled


# ------------------------------------------------------------------------------ inputs of a pass


@dataclass
class DPSegFeatures:
    """What :meth:`DPSeg.encode_image` returns, reused by both inference passes.

    Attributes:
        embeddings: E, ``B×D_z×h×w`` (1/32 scale), the CLIP head applied per pixel; carries the
            gradient that trains the image encoder.
        guidance: E_2, E_3, E_4, ``B×D_j×H/2^j×W/2^j``, detached (stop-gradient, §4.2).
        images: ``B×3×H×W`` input images in [0, 1], for the Inference II crops.
        input_size: ``(H, W)``.
    """

    embeddings: Tensor
    guidance: tuple[Tensor, ...]
    images: Tensor
    input_size: tuple[int, int]


def detect_classes(label_map: Tensor, num_classes: int, threshold: float = 0.0) -> list[list[int]]:
    """Per image, the classes covering more than ``threshold`` of the pixels of ``label_map``
    (``B×H×W``); τ = 0 keeps every class that appears (§4.3: "each category detected")."""
    counts = torch.stack(
        [torch.bincount(labels.flatten(), minlength=num_classes) for labels in label_map]
    )
    pixels = label_map.shape[-2] * label_map.shape[-1]
    found = counts > threshold * pixels
    return [torch.nonzero(row).flatten().tolist() for row in found]


# -------------------------------------------------------------------------------------- model


# The config fields DPSeg.segment takes as options; anything else but ``head`` is refused.
SEGMENT_OPTIONS = ("inference", "detection_threshold", "crop_mode", "refine_stage_features")


class DPSeg(SegmentationMethod):
    """DPSeg: the trainable image encoder (the backbone's image tower, LR × α), a frozen copy of
    it that encodes the visual prompts, the frozen text tower, the cost embedding and the CVGD.

    ``prompt_generator`` draws the visual prompts instead of the one ``config.prompt_generator``
    names (LayerDiffuse's, say); the "auto" and None prompt settings of ``config`` are resolved
    and stored.
    """

    name = "dpseg"
    config_class = DPSegConfig
    pretrained_prefixes = ("backbone", "prompt_encoder")

    def __init__(
        self,
        *,
        config: DPSegConfig,
        backbone: ClipBackbone,
        prompt_generator: VisualPromptGenerator | None = None,
    ) -> None:
        super().__init__()
        if backbone.kind != "convnext" or backbone.num_layers < 4:
            raise ValueError(
                f"DPSeg needs a hierarchical CLIP image encoder with four stages (ConvNeXt, "
                f"strides 4-32); {backbone.name} is a {backbone.kind} tower."
            )
        all_templates = resolve_templates(config.templates)
        count = config.num_templates or len(all_templates)
        if not 1 <= count <= len(all_templates):
            raise ValueError(
                f"num_templates must be between 1 and {len(all_templates)}; got {count}."
            )
        self.templates = all_templates[:count]
        self.config = config = config.replace(
            **prompt_defaults(
                config.prompt_generator,
                config.prompts_per_class,
                config.prompt_resolution,
                toy=is_toy_clip(backbone),
                templates=count,
                input_size=config.input_size,
            )
        )
        self.backbone = backbone
        self.trained_head = False

        # Trained: the image tower (at α × LR). Frozen: the text tower and the prompt encoder.
        for name, parameter in backbone.model.named_parameters():
            parameter.requires_grad_(name.startswith("visual."))
        self.prompt_encoder = copy.deepcopy(backbone.model.visual).requires_grad_(False).eval()

        cost_channels = 2 * count if config.cost_fusion == "cat" else count
        self.cost_embedding = CostEmbedding(
            in_channels=cost_channels, out_channels=config.cost_embed_dim, kernel_size=7
        )
        self.decoder = CostVolumeGuidedDecoder(
            config=config,
            encoder_channels=backbone.layer_dims[:3],
            num_prompts=count,
            cost_channels=cost_channels,
        )
        self.prompt_bank = VisualPromptBank(
            generator=make_generator(
                prompt_generator or config.prompt_generator,
                resolution=config.prompt_resolution,
                dtype=config.prompt_dtype,
                noise=config.prompt_noise,
            ),
            encoder=self.encode_prompt_images,
            encoder_id=PromptEncoderId(backbone.name, self.prompt_encoder),
            cache_dir=config.prompt_cache_dir,
            seed=config.prompt_seed,
            resolution=config.prompt_resolution,
            shipped=shipped_toy_prompts() if is_toy_clip(backbone) else None,
        )
        self._prompt_memo = PromptMemo()

    def train(self, mode: bool = True) -> DPSeg:
        super().train(mode)
        self.prompt_encoder.eval()
        return self

    def clear_caches(self) -> None:
        super().clear_caches()
        self._prompt_memo.clear()

    # ------------------------------------------------------------------------ encoders, prompts
    def encode_image(self, images: Tensor) -> DPSegFeatures:
        """``B×3×H×W`` images in [0, 1] (H, W multiples of 32) → E and detached E_2..E_4."""
        features = self.backbone.encode_image(self.backbone.normalize(images), layers=(0, 1, 2))
        guidance = tuple(
            features.intermediates[f"stride{stride}"].detach() for stride in (4, 8, 16)
        )
        return DPSegFeatures(
            embeddings=features.dense,
            guidance=guidance,
            images=images.detach(),
            input_size=tuple(images.shape[-2:]),
        )

    @torch.no_grad()
    def encode_prompt_images(
        self, images: Tensor | Sequence[Tensor]
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The frozen visual prompt encoder: N ``3×S×S`` images in [0, 1] → V (``N×D_z``, the
        CLIP image embedding) and V̄_2, V̄_3, V̄_4 (``N×D_j``, the spatial means ``Pool(V_j)`` of
        the first three stages' maps), ``PROMPT_ENCODER_BATCH`` images at a time."""
        return self.backbone.encode_stage_means(
            images, (0, 1, 2), tower=self.prompt_encoder, batch_size=PROMPT_ENCODER_BATCH
        )

    def visual_prompts(self, vocabulary: VocabularyLike) -> VisualPromptEmbeddings:
        """V (``K×M×D_z``) and V̄_j (``K×M×D_j``) of a vocabulary, from the prompt bank."""
        parameter = next(self.cost_embedding.parameters())
        return self._prompt_memo.embeddings(
            self.prompt_bank,
            vocabulary,
            self.templates,
            self.config.prompts_per_class,
            device=parameter.device,
            dtype=parameter.dtype,
        )

    def dual_prompts(self, vocabulary: VocabularyLike, batch_size: int) -> DualPrompts:
        """T, V and V̄_j of a vocabulary, expanded (not copied) to ``batch_size`` images."""
        text = self.backbone.encode_text(vocabulary, self.templates).per_template
        visual = self.visual_prompts(vocabulary)
        return DualPrompts(
            text=text.to(visual.embeddings.dtype).expand(batch_size, -1, -1, -1),
            visual=visual.embeddings.expand(batch_size, -1, -1, -1),
            pooled=tuple(p.expand(batch_size, -1, -1, -1) for p in visual.pooled),
        )

    # ---------------------------------------------------------------------------- one pass
    def decode(self, features: DPSegFeatures, prompts: DualPrompts) -> Tensor:
        """The trained head → logits ``B×K×H/4×W/4``: F_c, its embedding F and the CVGD."""

        def cost_volume_of(index: slice) -> Tensor:  # F_c of some classes, Eq. 1
            return dual_prompt_cost_volume(features.embeddings, prompts.classes(index), self.config)

        def embedded_cost_of(index: slice) -> Tensor:
            return self.cost_embedding(cost_volume_of(index))  # F

        return self.decoder(
            embedded_cost_of,
            cost_volume_of,
            prompts.text.shape[1],
            features.guidance,
            prompts.pooled,
            class_chunk=self.config.class_chunk,
        )

    def training_free_scores(self, features: DPSegFeatures, prompts: DualPrompts) -> Tensor:
        """F_c averaged over templates, ``B×K×h×w`` (DESIGN.md §5)."""
        classes = prompts.text.shape[1]

        def template_mean(index: slice) -> Tensor:
            cost = dual_prompt_cost_volume(features.embeddings, prompts.classes(index), self.config)
            return cost.mean(dim=2)

        slices = class_slices(classes, self.config.class_chunk)
        return join_classes(((index, template_mean(index)) for index in slices), classes)

    def _pass(self, features: DPSegFeatures, prompts: DualPrompts, use_head: bool) -> Tensor:
        """One pass's logits at the head's resolution (1/4, or 1/32 training-free)."""
        if use_head:
            return self.decode(features, prompts)
        logits = self.training_free_scores(features, prompts)
        logits /= self.config.temperature  # a fresh tensor; in place saves a K×h×w copy
        return logits

    # ------------------------------------------------------------------------- Inference II
    def refine_prompts(
        self,
        features: DPSegFeatures,
        prompts: DualPrompts,
        label_map: Tensor,
        *,
        detection_threshold: float = 0.0,
        crop_mode: str = "masked",
        refine_stage_features: bool = False,
    ) -> tuple[DualPrompts, list[list[int]], list[dict[int, Tensor]]]:
        """Semantic-guided prompt refinement (§4.3).

        For each image and each class detected in its pass-I label map (``B×H×W``, at the input
        resolution), the crop of the class is encoded by the frozen prompt encoder and replaces V
        of that class for all M templates. T and (unless ``refine_stage_features``) V̄_j are
        unchanged, see :class:`DPSegConfig`. The crops are cut from the image as the network saw
        it (``features.images``), so the image encoder does not run again.

        Returns:
            The pass-II prompts, the detected classes per image and the crops per image
            (class index → ``3×S×S`` in [0, 1]).
        """
        detected = detect_classes(label_map, prompts.visual.shape[1], detection_threshold)
        fill = self.backbone.image_mean.view(3)
        crops = [
            {
                k: crop_class_region(
                    features.images[index],
                    label_map[index] == k,
                    size=self.config.prompt_resolution,
                    fill=fill,
                    mode=crop_mode,
                )
                for k in classes
            }
            for index, classes in enumerate(detected)
        ]
        owners = [(index, k) for index, classes in enumerate(detected) for k in classes]
        if not owners:
            return prompts, detected, crops
        embedding, pooled = self.encode_prompt_images([crops[b][k] for b, k in owners])
        images, classes = torch.tensor(owners, device=prompts.visual.device).unbind(dim=1)

        def replace(bank: Tensor, rows: Tensor) -> Tensor:
            bank = bank.clone()
            bank[images, classes] = rows.to(bank.dtype)[:, None, :]  # one crop for all M templates
            return bank

        refined = DualPrompts(
            text=prompts.text,
            visual=replace(prompts.visual, embedding),
            pooled=(
                tuple(replace(p, q) for p, q in zip(prompts.pooled, pooled, strict=True))
                if refine_stage_features
                else prompts.pooled
            ),
        )
        return refined, detected, crops

    # ------------------------------------------------------------------------------ segment
    def segment(
        self,
        image_features: DPSegFeatures,
        vocabulary: VocabularyLike,
        *,
        return_intermediates: bool = False,
        target: Tensor | None = None,
        head: bool | None = None,
        **options: Any,
    ) -> SegmentationOutput:
        """Segment encoded images (see :meth:`SegmentationMethod.segment`).

        Options: ``inference`` ("I" in training mode), ``detection_threshold``, ``crop_mode``
        and ``refine_stage_features`` replace the config's for this call; ``head``: True runs the
        decoder, False the training-free path; default: the decoder when it is trained or being
        trained.

        Intermediates (``return_intermediates=True``): pass I's ``image_embeddings`` (E) and
        ``prompts`` (:class:`DualPrompts`), ``visual_prompt_images`` (a lazy gallery, class index
        → images), and with Inference II ``refined_prompt_images`` (per image, class index → its
        crop), ``pass1_logits`` and ``pass2_logits``. Inference II always returns
        ``detected_classes``. Pass I's logits are upsampled for all classes only as the output or
        an intermediate (2 GB for 847 classes at 768 px); Inference II takes its label map from a
        running argmax over chunks of classes.
        """
        config = self.config_with_options(options, SEGMENT_OPTIONS)
        mode = "I" if self.training and "inference" not in options else config.inference
        use_head = head if head is not None else (self.trained_head or self.training)
        features = image_features
        size = features.input_size
        intermediates: dict[str, Any] = {"inference": mode}

        # Inference I: the dual prompts T, V, V̄_j (§4.1) and one pass at the head's resolution.
        prompts = self.dual_prompts(vocabulary, features.embeddings.shape[0])
        pass_one = self._pass(features, prompts, use_head)
        if return_intermediates:
            intermediates |= {
                "head": "trained" if use_head else "training-free",
                "image_embeddings": features.embeddings,
                "prompts": prompts,
                "visual_prompt_images": self.prompt_bank.gallery(
                    vocabulary, self.templates, config.prompts_per_class
                ),
            }
        if mode == "I":
            return SegmentationOutput(
                logits=upsample_logits(pass_one, size), intermediates=intermediates
            )

        # Inference II (§4.3): the classes found in pass I get their crops as visual prompts.
        refined, detected, crops = self.refine_prompts(
            features,
            prompts,
            upsampled_argmax(pass_one, size),
            detection_threshold=config.detection_threshold,
            crop_mode=config.crop_mode,
            refine_stage_features=config.refine_stage_features,
        )
        intermediates["detected_classes"] = detected
        if refined is prompts:  # nothing detected: pass II would repeat pass I
            logits = upsample_logits(pass_one, size)
        else:
            logits = upsample_logits(self._pass(features, refined, use_head), size)
        if return_intermediates:
            intermediates |= {
                "refined_prompt_images": crops,
                "pass1_logits": logits if refined is prompts else upsample_logits(pass_one, size),
                "pass2_logits": logits,
            }
        return SegmentationOutput(logits=logits, intermediates=intermediates)

    # ------------------------------------------------------------------------------ training
    def loss(self, output: SegmentationOutput, target: Tensor) -> dict[str, Tensor]:
        """Per-pixel sigmoid binary cross-entropy against one-hot targets over the K classes,
        with the logits resized to the target; ``config.ignore_policy`` says what an ignored
        pixel counts as."""
        logits = upsample_logits(output.logits, target.shape[-2:])
        return {"loss_bce": one_hot_bce(logits, target, ignore=self.config.ignore_policy)}

    def parameter_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """The paper's groups: cost embedding + decoder at ``base_lr`` (2e-4) and the image
        encoder at ``α · base_lr`` (2e-6), both with AdamW weight decay 1e-4. The text tower and
        the prompt encoder are frozen and in no group."""

        def group_of(name: str, parameter: nn.Parameter) -> str | None:
            if name.startswith("backbone.model.visual."):
                return "image_encoder"
            return None if name.startswith(("backbone.", "prompt_encoder.")) else "head"

        return parameter_groups(
            self,
            group_of,
            lr={"head": base_lr, "image_encoder": base_lr * self.config.encoder_lr_multiplier},
            weight_decay=self.config.weight_decay,
        )


build_dpseg = register_method("dpseg")(method_builder(DPSeg, shipped=SHIPPED_WEIGHTS))
