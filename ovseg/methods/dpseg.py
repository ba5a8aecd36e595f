"""DPSeg: dual-prompt cost volume learning for open-vocabulary segmentation (CVPR 2025).

DPSeg extends SED. Every class gets, per text template, a text embedding T and the CLIP image
embedding V of a generated picture of that template (a *visual prompt*, drawn and cached by
:mod:`ovseg.prompts.visual`). The file follows the paper's §4:

- §4.1 dual-prompt cost volume: ``R = (V̂ + T̂) / 2`` and ``F_c = cos(E, R)`` (Eq. 1) between the
  1/32-scale image embedding E and R, then a per-slice cost embedding.
- §4.2 cost volume-guided decoder (CVGD): three stages of hybrid dilated convolution, class
  attention, deconvolution, detached encoder guidance E_4, E_3, E_2 and the intra-modal visual
  cost volumes ``F_v^j = cos(Pool(V_j), E_j)`` (Eq. 2), computed folded into the prototypes so
  that K = 171 at 1/4 scale fits in memory. The decoder runs on chunks of classes
  (``class_chunk``, :mod:`ovseg.methods.chunking`): without autograd only stage inputs and
  outputs span all classes.
- §4.3 semantic-guided prompt refinement (Inference II): each class found by pass I has all of its
  visual prompts V replaced by the embedding of its masked crop of the image, and the head runs
  again on the image features of pass I. The pooled stage features V̄_j of Eq. 2 stay those of
  the generated prompts (``refine_stage_features`` replaces them too, see :class:`DPSegConfig`).

Without a trained head, DPSeg runs training-free: the template-averaged dual-prompt cost volume,
refined by Inference II, argmax (DESIGN.md §5). Implementation choices the paper leaves open
follow specs/dpseg.md (§8), which cites SED for each. The paper's tables are in
``training/dpseg_paper.py``.
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
from ovseg.methods.attention import LinearAttention, MultiHeadAttention
from ovseg.methods.base import (
    IGNORE_INDEX,
    MethodConfig,
    SegmentationMethod,
    SegmentationOutput,
    VocabularyLike,
)
from ovseg.methods.blocks import CostEmbedding, DoubleConv, cosine_cost_volume
from ovseg.methods.builder import build_with_weights, register_method
from ovseg.methods.chunking import (
    ClassSource,
    class_slices,
    classes_of,
    each_class,
    join_classes,
    upsample_logits,
    upsampled_argmax,
)
from ovseg.prompts.templates import resolve_templates
from ovseg.prompts.visual import (
    PromptEncoderId,
    PromptGallery,
    PromptMemo,
    VisualPromptBank,
    VisualPromptEmbeddings,
    VisualPromptGenerator,
    make_generator,
)

SHIPPED_WEIGHTS = "dpseg-toy.safetensors"
PROMPT_ENCODER_BATCH = 16
TOY_PROMPTS_PER_CLASS = 16
TOY_PROMPT_RESOLUTION = 128
# Inference without gradients runs the class attention over chunks of pooled positions holding at
# most this many class tokens (its MLP widens each token 4×; 847 classes at 768 px have 1.9 M
# tokens in stage D3).
ATTENTION_TOKENS = 2**16

# ------------------------------------------------------------------------------------- config


@dataclass
class DPSegConfig(MethodConfig):
    """Attributes (beyond :class:`MethodConfig`; defaults are the paper's, spec §2 and §8):
    num_templates: use the first N templates only (Table 4); None: all (80 for "imagenet").
    cost_embed_dim: d_F, the cost embedding width (128).
    decoder_dims: output width of the decoder stages D1-D3 (64, 32, 16; the paper's 62 cannot
        be group-normalised).
    guidance_dims: channels of the E_4, E_3, E_2 guidance (32, 16, 8: ÷16 for ConvNeXt-B).
    visual_cost_dims: channels F_v^4, F_v^3, F_v^2 are projected to (32, 16, 8).
    attention_heads: heads of the class attention (4).
    attention_type: "linear" (SED) or "full" (softmax).
    attention_pool: spatial average pooling before the class attention (2).
    dilations: dilations of the HD Conv branches (1, 2, 4).
    mlp_ratio: hidden width of the HD Conv and attention MLPs, times the stage width (4).
    prompt_mode: "avg" (R = (V̂+T̂)/2), "text" (R = T) or "visual" (R = V); Table 2a.
    cost_fusion: "avg_emb" (Eq. 1), "avg_cos" (mean of the two cost volumes) or "cat" (both,
        2M channels); Table 2b.
    visual_cost_scales: which F_v^j (j in 2, 3, 4) guide the decoder; Table 3.
    upsampled_cost_guidance: also feed F_c upsampled 2×, 4×, 8× by deconvolutions (Table 3,
        last row, with ``visual_cost_scales=()``).
    prompt_generator: "auto" (ToyWorld sprites for the toy CLIPs, else "sd15"), "toyworld",
        "sd15", "sd3", or a diffusers model id or folder.
    prompt_noise: Gaussian noise mixed into every prompt image (Table 5: 0.2, 0.6, 0.8).
    prompts_per_class: G distinct prompt images per class; template m uses image m mod G. None:
        one per template (the paper) for real CLIPs, 16 for the toy CLIP (sprites ignore the
        template text).
    prompt_resolution: side of the prompt images and of the Inference II crops. None: the
        input size (the paper: 768) for real CLIPs, 128 for the toy CLIP.
    prompt_seed: base seed of the prompt bank.
    prompt_dtype: dtype a diffusers generator draws in ("float16", "bfloat16" or "float32");
        None: float16 on CUDA, float32 elsewhere. It is part of the bank's keys (the two draw
        different images), so a CPU reading a bank drawn on a GPU sets "float16".
    prompt_cache_dir: prompt bank folder (None: ``~/.cache/ovseg/visual_prompts``).
    inference: "II" (two passes, the paper's best) or "I"; training always uses "I".
    detection_threshold: τ, the share of pixels a class needs in pass I to be refined (0).
    crop_mode: "masked" (pixels outside the class filled with the CLIP mean colour) or "bbox".
    refine_stage_features: Inference II also replaces V̄_j (Eq. 2) with the crop's pooled stage
        features, not only V (an ablation; off by default). The paper says the crops replace the
        class's visual prompts and does not say whether the decoder's F_v^j then come from
        them; specs/dpseg.md §8.13 recommended replacing both. Crops of the image itself
        match its own E_2 far better than generated prompts do: F_v^2 of the detected classes
        about doubles over all pixels (0.15 → 0.30 on a toy-full scene), outside anything the
        head saw in training. On the shipped toy head (8 toy-full scenes) pixel accuracy falls
        from 54% in pass I to 4% in pass II with both replaced, and to 50% with V alone.
    encoder_lr_multiplier: α, the image encoder's learning-rate factor (0.01).
    weight_decay: AdamW weight decay of every group (1e-4).
    ignore_policy: "negative" (ignored pixels are negatives for every class, SED) or
        "exclude" (left out of the loss).
    temperature: divides the training-free cosine scores into logits.
    class_chunk: classes processed together in the per-class layers (cost volume, cost embedding,
        decoder). The decoder runs every stage on chunks of classes; without autograd
        (inference) it writes them into one buffer, so its memory is bounded by the stage inputs
        plus one chunk's temporaries rather than every class's activations, and the class
        attention, which mixes classes, runs over chunks of ``ATTENTION_TOKENS`` tokens. With and
        without autograd the same class_chunk gives the same bits; other chunk sizes differ by
        float rounding only.
    """

    machine_settings: ClassVar[tuple[str, ...]] = ("prompt_cache_dir", "class_chunk")

    backbone: str = "toy-convnext"
    num_templates: int | None = None
    cost_embed_dim: int = 128
    decoder_dims: tuple[int, ...] = (64, 32, 16)
    guidance_dims: tuple[int, ...] = (32, 16, 8)
    visual_cost_dims: tuple[int, ...] = (32, 16, 8)
    attention_heads: int = 4
    attention_type: str = "linear"
    attention_pool: int = 2
    dilations: tuple[int, ...] = (1, 2, 4)
    mlp_ratio: int = 4
    prompt_mode: str = "avg"
    cost_fusion: str = "avg_emb"
    visual_cost_scales: tuple[int, ...] = (2, 3, 4)
    upsampled_cost_guidance: bool = False
    prompt_generator: str = "auto"
    prompt_noise: float = 0.0
    prompts_per_class: int | None = None
    prompt_resolution: int | None = None
    prompt_seed: int = 0
    prompt_dtype: str | None = None
    prompt_cache_dir: str | None = None
    inference: str = "II"
    detection_threshold: float = 0.0
    crop_mode: str = "masked"
    refine_stage_features: bool = False
    encoder_lr_multiplier: float = 0.01
    weight_decay: float = 1e-4
    ignore_policy: str = "negative"
    temperature: float = 0.01
    class_chunk: int = 64


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}.")


def _validate(config: DPSegConfig) -> None:
    _check_choice("prompt_mode", config.prompt_mode, ("avg", "text", "visual"))
    _check_choice("cost_fusion", config.cost_fusion, ("avg_emb", "avg_cos", "cat"))
    if config.prompt_mode != "avg" and config.cost_fusion != "avg_emb":
        raise ValueError(
            f"cost_fusion={config.cost_fusion!r} combines text and visual prompts; it needs "
            f"prompt_mode='avg', not {config.prompt_mode!r}."
        )
    _check_choice("attention_type", config.attention_type, ("linear", "full"))
    _check_choice("inference", config.inference, ("I", "II"))
    _check_choice("crop_mode", config.crop_mode, ("masked", "bbox"))
    _check_choice("prompt_dtype", config.prompt_dtype, (None, "float16", "bfloat16", "float32"))
    _check_choice("ignore_policy", config.ignore_policy, ("negative", "exclude"))
    if not set(config.visual_cost_scales) <= {2, 3, 4}:
        raise ValueError(
            f"visual_cost_scales must be a subset of (2, 3, 4); got {config.visual_cost_scales}."
        )
    for name in ("decoder_dims", "guidance_dims", "visual_cost_dims"):
        if len(getattr(config, name)) != 3:
            raise ValueError(
                f"{name} needs one width per decoder stage (3); got {getattr(config, name)}."
            )
    widths = (config.cost_embed_dim, *config.decoder_dims[:2])
    for width, guidance in zip(widths, config.guidance_dims, strict=True):
        if width <= guidance:
            raise ValueError(
                f"A decoder stage of width {width} cannot make room for {guidance} guidance "
                "channels (its deconvolution outputs width - guidance)."
            )
        if width % config.attention_heads:
            raise ValueError(f"Width {width} is not divisible by {config.attention_heads} heads.")
    for width in config.decoder_dims:
        if width % max(1, width // 16):
            raise ValueError(
                f"Decoder width {width} cannot be group-normalised with {width // 16} groups "
                "(SED's DoubleConv uses width // 16); the paper's 62 is such a width, use 64."
            )
    if not 0.0 <= config.detection_threshold <= 1.0:
        raise ValueError(
            f"detection_threshold must be in [0, 1]; got {config.detection_threshold}."
        )
    if config.class_chunk < 1:
        raise ValueError(f"class_chunk must be positive; got {config.class_chunk}.")


def _with_prompt_defaults(config: DPSegConfig, *, toy: bool, templates: int) -> DPSegConfig:
    """``config`` with its "auto" and None prompt settings resolved (see :class:`DPSegConfig`)."""
    generator = config.prompt_generator
    if generator == "auto":
        generator = "toyworld" if toy else "sd15"
    sprites = generator == "toyworld"
    config = config.replace(
        prompt_generator=generator,
        prompts_per_class=config.prompts_per_class
        or (min(TOY_PROMPTS_PER_CLASS, templates) if sprites else templates),
        prompt_resolution=config.prompt_resolution
        or (TOY_PROMPT_RESOLUTION if sprites else config.input_size),
    )
    if not 1 <= config.prompts_per_class <= templates:
        raise ValueError(
            f"prompts_per_class must be between 1 and the {templates} templates; "
            f"got {config.prompts_per_class}."
        )
    return config


# ------------------------------------------------------------------------------------- blocks


class HybridDilatedConv(nn.Module):
    """HD Conv (§4.2): three depthwise 3×3 convolutions with dilations 1, 2, 4, summed, then a
    ConvNeXt-style LayerNorm → MLP (GELU) → layer scale → residual (spec §8.3).

    Its receptive field is 9×9 (dilation 4) with 27 weights per channel, where SED's 9×9
    depthwise kernel has 81.
    """

    def __init__(
        self, *, channels: int, dilations: Sequence[int] = (1, 2, 4), mlp_ratio: int = 4
    ) -> None:
        """
        Arguments:
            channels: C, the width of the ``N×C×s×s`` input and output.
            dilations: one depthwise 3×3 branch per dilation.
            mlp_ratio: hidden width of the MLP, times C.
        """
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
        """``N×C×s×s`` → ``N×C×s×s``."""
        merged = sum(branch(x) for branch in self.branches)  # element-wise addition
        merged = self.mlp(self.norm(merged.permute(0, 2, 3, 1))) * self.layer_scale
        return x + merged.permute(0, 3, 1, 2)


class ClassAttention(nn.Module):
    """Category-level self-attention (§4.2), SED's ClassTransformerLayer.

    At every position of a 2×2-pooled grid, the K class tokens attend to each other (pre-norm
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
        """
        Arguments:
            channels: C, the token width.
            heads: attention heads.
            attention_type: "linear" (elu+1 kernel, SED) or "full" (softmax).
            pool: side of the spatial average pooling before the attention.
            mlp_ratio: hidden width of the MLP, times C.
        """
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

    ``F_v^j(x, k, m) = cos(Pool(V_j(k, m)), E_j(x))`` is linear in the normalised pixel features,
    so the projection folds into the prototypes (spec §2.7):
    ``Σ_m Σ_o W[c, m, o] · p̂_{k,m} · ê(x+o) = Σ_o ê(x+o) · Q[k, c, o]`` with
    ``Q[k, c, o] = Σ_m W[c, m, o] p̂_{k,m}``, a convolution of Ê_j with K·g prototype-derived
    filters (zero padding of F_v equals zero padding of Ê_j). The folded form never builds the
    ``B×K×M×H_j×W_j`` volume; :meth:`naive` does, as the reference. ``mode="auto"`` picks the one
    with fewer multiply-adds (folded costs ``9·g·D_j`` per class and pixel, naive
    ``M·D_j + 9·M·g``); both are chunked over classes by the decoder.
    """

    def __init__(self, *, num_prompts: int, out_channels: int, mode: str = "auto") -> None:
        """
        Arguments:
            num_prompts: M, the prototypes per class.
            out_channels: g, the projected width.
            mode: "auto", "folded" or "naive".
        """
        super().__init__()
        _check_choice("mode", mode, ("auto", "folded", "naive"))
        self.mode = mode
        self.conv = nn.Conv2d(num_prompts, out_channels, 3, padding=1)

    @staticmethod
    def cost_volume(encoder_features: Tensor, prototypes: Tensor) -> Tensor:
        """Eq. 2: ``B×D_j×H×W`` and pooled prototypes ``B×K×M×D_j`` → ``B×K×M×H×W``."""
        return cosine_cost_volume(encoder_features, prototypes, per_image=True)

    def naive(self, encoder_features: Tensor, prototypes: Tensor) -> Tensor:
        """Reference: build F_v^j, then convolve each class slice. → ``B×K×g×H×W``."""
        cost = self.cost_volume(encoder_features, prototypes)
        batch, classes = cost.shape[:2]
        projected = self.conv(cost.flatten(0, 1))
        return F.relu(projected).unflatten(0, (batch, classes))

    def folded(self, encoder_features: Tensor, prototypes: Tensor) -> Tensor:
        """The same as :meth:`naive` without the M-channel volume. → ``B×K×g×H×W``."""
        batch, channels, height, width = encoder_features.shape
        classes = prototypes.shape[1]
        pixels = F.normalize(encoder_features, dim=1)
        filters = torch.einsum(
            "gmyx,bkmd->bkgdyx", self.conv.weight, F.normalize(prototypes, dim=-1)
        )
        outputs = self.conv.out_channels
        projected = F.conv2d(
            pixels.reshape(1, batch * channels, height, width),
            filters.reshape(batch * classes * outputs, channels, 3, 3),
            padding=1,
            groups=batch,
        )
        projected = projected.view(batch, classes, outputs, height, width)
        projected += self.conv.bias.view(1, 1, -1, 1, 1)  # in place: a fresh conv output
        return F.relu(projected, inplace=True)

    def forward(self, encoder_features: Tensor, prototypes: Tensor) -> Tensor:
        """``B×D_j×H×W`` (detached E_j) and ``B×K×M×D_j`` (V̄_j) → ``B×K×g×H×W``."""
        mode = self.mode
        if mode == "auto":
            prompts, outputs = self.conv.in_channels, self.conv.out_channels
            dim = encoder_features.shape[1]
            mode = (
                "folded" if 9 * outputs * dim <= prompts * dim + 9 * prompts * outputs else "naive"
            )
        return (
            self.folded(encoder_features, prototypes)
            if mode == "folded"
            else self.naive(encoder_features, prototypes)
        )


class DecoderStage(nn.Module):
    """One CVGD stage D_i (§4.2): HD Conv → class attention → 2× deconvolution → concatenate the
    encoder guidance (E_j ÷16, repeated over classes), the projected F_v^j and (ablation) the
    upsampled F_c → DoubleConv."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        encoder_channels: int,
        guidance_channels: int,
        visual_cost_channels: int,
        upsampled_cost_channels: int,
        num_prompts: int,
        config: DPSegConfig,
    ) -> None:
        """
        Arguments:
            in_channels: width of the stage input ``B×K×C_in×s×s``.
            out_channels: width of the stage output ``B×K×C_out×2s×2s``.
            encoder_channels: D_j of the guiding encoder feature E_j (``B×D_j×2s×2s``).
            guidance_channels: width E_j is reduced to.
            visual_cost_channels: width F_v^j is projected to (0: no visual cost volume).
            upsampled_cost_channels: width of the upsampled F_c (0: none).
            num_prompts: M, the prompts per class.
            config: HD Conv and attention settings.
        """
        super().__init__()
        self.hd_conv = HybridDilatedConv(
            channels=in_channels, dilations=config.dilations, mlp_ratio=config.mlp_ratio
        )
        self.class_attention = ClassAttention(
            channels=in_channels,
            heads=config.attention_heads,
            attention_type=config.attention_type,
            pool=config.attention_pool,
            mlp_ratio=config.mlp_ratio,
        )
        self.upsample = nn.ConvTranspose2d(
            in_channels, in_channels - guidance_channels, kernel_size=2, stride=2
        )
        self.guidance = nn.Sequential(
            nn.Conv2d(encoder_channels, guidance_channels, 3, padding=1), nn.ReLU()
        )
        self.visual_cost = (
            VisualCostProjection(num_prompts=num_prompts, out_channels=visual_cost_channels)
            if visual_cost_channels
            else None
        )
        self.fuse = DoubleConv(
            in_channels=in_channels + visual_cost_channels + upsampled_cost_channels,
            out_channels=out_channels,
        )

    def forward(
        self,
        source: ClassSource,
        classes: int,
        encoder_features: Tensor,
        prototypes: Tensor | None,
        upsampled_cost: ClassSource | None,
        *,
        class_chunk: int,
        buffer: Tensor | None = None,
        head: nn.Module | None = None,
    ) -> Tensor:
        """The stage on K classes, ``class_chunk`` at a time.

        Only the HD Conv output, its pooled class tokens and the stage output span all classes;
        the class attention's residual, the deconvolution, the guidance, F_v^j and the DoubleConv
        exist for one chunk at a time.

        Arguments:
            source: class slice → the stage input of those classes, ``B×c×C_in×s×s``.
            classes: K.
            encoder_features: E_j, ``B×D_j×2s×2s``, detached.
            prototypes: V̄_j, ``B×K×M×D_j`` (used when the stage has a visual cost volume).
            upsampled_cost: class slice → the upsampled F_c, ``B×c×u×2s×2s``, or None.
            class_chunk: classes per chunk.
            buffer: ``B×K×C_in×s×s`` that receives the HD Conv output without autograd; it may
                be the tensor ``source`` reads from.
            head: applied to each chunk of the output (the decoder's logit conv, last stage).

        Returns:
            ``B×K×C_out×2s×2s``, or ``B×K×1×2s×2s`` through ``head``.
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
            fused = self._fuse(
                self.class_attention.attended(hidden, tokens, index),
                guidance,
                encoder_features,
                None if prototypes is None else prototypes[:, index],
                None if upsampled_cost is None else upsampled_cost(index),
            )
            return fused if head is None else each_class(head, fused)

        return join_classes(((index, output(index)) for index in slices), classes)

    def _fuse(
        self,
        x: Tensor,
        guidance: Tensor,
        encoder_features: Tensor,
        prototypes: Tensor | None,
        upsampled_cost: Tensor | None,
    ) -> Tensor:
        """Deconvolution, guidance and DoubleConv of a chunk of classes: ``B×c×C_in×s×s`` →
        ``B×c×C_out×2s×2s``."""
        batch, count = x.shape[:2]
        pieces = [each_class(self.upsample, x), guidance.expand(-1, count, -1, -1, -1)]
        if self.visual_cost is not None:
            pieces.append(self.visual_cost(encoder_features, prototypes))  # F_v^j, Eq. 2
        if upsampled_cost is not None:
            pieces.append(upsampled_cost)
        stacked = torch.cat(pieces, dim=2).flatten(0, 1)
        del pieces
        # self.fuse(stacked), with stacked (a chunk's largest tensor at 1/4 scale) freed after the
        # first convolution.
        first, *rest = self.fuse
        fused = first(stacked)
        del stacked
        for layer in rest:
            fused = layer(fused)
        return fused.unflatten(0, (batch, count))


class CostVolumeGuidedDecoder(nn.Module):
    """CVGD (§4.2): stages D1-D3 from 1/32 to 1/4 scale, then a 3×3 conv to one logit per class.

    Stage D1 is guided by E_4 and F_v^4 (1/16), D2 by E_3 and F_v^3 (1/8), D3 by E_2 and F_v^2
    (1/4).
    """

    def __init__(
        self,
        *,
        config: DPSegConfig,
        encoder_channels: Sequence[int],
        num_prompts: int,
        cost_channels: int,
    ) -> None:
        """
        Arguments:
            config: widths and switches.
            encoder_channels: D_2, D_3, D_4 of the image encoder's stages.
            num_prompts: M, prompts per class (channels of F_v^j).
            cost_channels: channels of F_c per class (M, or 2M for ``cost_fusion="cat"``).
        """
        super().__init__()
        in_widths = (config.cost_embed_dim, *config.decoder_dims[:2])
        upsampled = config.visual_cost_dims if config.upsampled_cost_guidance else (0, 0, 0)
        stages = []
        for index, scale in enumerate((4, 3, 2)):
            stages.append(
                DecoderStage(
                    in_channels=in_widths[index],
                    out_channels=config.decoder_dims[index],
                    encoder_channels=encoder_channels[scale - 2],
                    guidance_channels=config.guidance_dims[index],
                    visual_cost_channels=(
                        config.visual_cost_dims[index] if scale in config.visual_cost_scales else 0
                    ),
                    upsampled_cost_channels=upsampled[index],
                    num_prompts=num_prompts,
                    config=config,
                )
            )
        self.stages = nn.ModuleList(stages)
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
        embedded_cost: ClassSource,
        cost_volume: ClassSource,
        classes: int,
        encoder_features: Sequence[Tensor],
        prototypes: Sequence[Tensor],
        *,
        class_chunk: int,
        shapes: dict[str, tuple[int, ...]] | None = None,
    ) -> Tensor:
        """
        Arguments:
            embedded_cost: class slice → F of those classes, ``B×c×d_F×h×w``.
            cost_volume: class slice → F_c, ``B×c×M×h×w`` (used by ``upsampled_cost_guidance``).
            classes: K.
            encoder_features: E_2, E_3, E_4 (``B×D_j×H/2^j×W/2^j``), detached.
            prototypes: V̄_2, V̄_3, V̄_4 (``B×K×M×D_j``).
            class_chunk: classes per chunk (:meth:`DecoderStage.forward`).
            shapes: filled with each stage's output shape, if given.

        Returns:
            Logits ``B×K×H/4×W/4``. F, F_c and D3's ``B×K×C×H/4×W/4`` output (the last stage
            applies the logit conv per chunk) are never held for all classes; without autograd
            each stage writes its HD Conv output into the buffer of its input.
        """
        source, x = embedded_cost, None
        for index, stage in enumerate(self.stages):
            scale = 4 - index
            last = index == len(self.stages) - 1
            upsampled = None
            if self.cost_upsampling is not None:
                upsampled = _upsampled_cost(cost_volume, self.cost_upsampling[: index + 1])
            x = stage(
                source,
                classes,
                encoder_features[scale - 2],
                prototypes[scale - 2],
                upsampled,
                class_chunk=class_chunk,
                buffer=x,
                head=self.head if last else None,
            )
            if shapes is not None:
                width = stage.fuse[3].out_channels if last else x.shape[2]
                shapes[f"D{index + 1}"] = (x.shape[0], classes, width, *x.shape[-2:])
            source = classes_of(x)
        return x.squeeze(2)


def _upsampled_cost(cost_volume: ClassSource, layers: Sequence[nn.Module]) -> ClassSource:
    """Class slice → F_c of those classes upsampled by ``layers`` (the ``upsampled_cost_guidance``
    deconvolutions up to the stage's scale)."""

    def upsampled(index: slice) -> Tensor:
        x = cost_volume(index)
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


def detect_classes(label_map: Tensor, num_classes: int, threshold: float = 0.0) -> list[list[int]]:
    """Per image, the classes covering more than ``threshold`` of the pixels of ``label_map``
    (``B×H×W``); τ = 0 keeps every class that appears (§4.3: "each category detected")."""
    counts = torch.stack(
        [torch.bincount(labels.flatten(), minlength=num_classes) for labels in label_map]
    )
    pixels = label_map.shape[-2] * label_map.shape[-1]
    found = counts > threshold * pixels
    return [torch.nonzero(row).flatten().tolist() for row in found]


def crop_class_region(
    image: Tensor, mask: Tensor, *, size: int, fill: Tensor, mode: str = "masked"
) -> Tensor:
    """The Inference II prompt of one class: its region of the image, as a square picture.

    The tight box around all of ``mask`` is cut out; in ``"masked"`` mode pixels outside the mask
    become ``fill``; the box is padded to a square with ``fill`` (centred) and resized to
    ``size``.

    Arguments:
        image: ``3×H×W`` in [0, 1].
        mask: ``H×W`` bool, the class's pixels in the pass-I label map.
        size: side of the output.
        fill: ``3`` colour (the CLIP mean, zero after normalisation).
        mode: "masked" or "bbox" (keep the context inside the box).

    Returns:
        ``3×size×size``.
    """
    _check_choice("crop_mode", mode, ("masked", "bbox"))
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if rows.numel() == 0:
        raise ValueError("The class mask is empty; there is nothing to crop.")
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    left, right = int(cols[0]), int(cols[-1]) + 1
    fill = fill.to(image.dtype).view(3, 1, 1)
    crop = image[:, top:bottom, left:right]
    if mode == "masked":
        crop = torch.where(mask[top:bottom, left:right], crop, fill)
    height, width = crop.shape[-2:]
    side = max(height, width)
    canvas = fill.expand(3, side, side).clone()
    offset_y, offset_x = (side - height) // 2, (side - width) // 2
    canvas[:, offset_y : offset_y + height, offset_x : offset_x + width] = crop
    if side == size:
        return canvas
    return F.interpolate(
        canvas[None], size=(size, size), mode="bilinear", antialias=side > size, align_corners=False
    )[0]


def _template_mean_cost(features: Tensor, prompts: Tensor) -> Tensor:
    """``mean_m cos(features, prompts[:, :, m])``: ``B×D×h×w``, ``B×K×M×D`` → ``B×K×h×w``.

    The mean of cosines is the dot product with the mean of the normalised prompts, so the
    ``B×K×M×h×w`` volume is never built.
    """
    mean_prompt = F.normalize(prompts, dim=-1).mean(dim=2)
    return torch.einsum("bdhw,bkd->bkhw", F.normalize(features, dim=1), mean_prompt)


def _record_feature_shapes(features: DPSegFeatures, shapes: dict[str, tuple[int, ...]]) -> None:
    shapes["E"] = tuple(features.embeddings.shape)
    for j, encoder_features in zip((2, 3, 4), features.guidance, strict=True):
        shapes[f"E_{j}"] = tuple(encoder_features.shape)


# -------------------------------------------------------------------------------------- model


class DPSeg(SegmentationMethod):
    """DPSeg: dual-prompt cost volume, cost volume-guided decoder, Inference I/II.

    Parts: the trainable image encoder (the backbone's image tower, LR × α), a frozen copy of it
    that encodes visual prompts, the frozen text tower, the cost embedding and the CVGD. Visual
    prompts come from :attr:`prompt_bank` (ToyWorld sprites for the toy CLIP, Stable Diffusion
    for real ones).
    """

    name = "dpseg"
    config_class = DPSegConfig
    # The visual-prompt encoder is a frozen copy of the pretrained image tower.
    pretrained_prefixes = ("backbone", "prompt_encoder")

    def __init__(
        self,
        *,
        config: DPSegConfig,
        backbone: ClipBackbone,
        prompt_generator: VisualPromptGenerator | None = None,
        prompt_bank: VisualPromptBank | None = None,
    ) -> None:
        """
        Arguments:
            config: the settings; ``None`` prompt settings are resolved (see
                :class:`DPSegConfig`) and stored back.
            backbone: a ConvNeXt CLIP. Its image tower is trained (in place); its text tower is
                frozen (``requires_grad=False``).
            prompt_generator: draws the visual prompts (default from ``config.prompt_generator``).
            prompt_bank: a ready bank to use instead (its encoder must be this model's
                :meth:`encode_prompt_images` for the embeddings to match).
        """
        super().__init__()
        _validate(config)
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
        self.config = config = _with_prompt_defaults(
            config, toy=is_toy_clip(backbone), templates=count
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
        self.prompt_bank = prompt_bank or VisualPromptBank(
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
        )
        self._prompt_memo = PromptMemo()

    def train(self, mode: bool = True) -> DPSeg:
        super().train(mode)
        self.prompt_encoder.eval()
        return self

    def clear_caches(self) -> None:
        super().clear_caches()
        self._prompt_memo.clear()

    # ----------------------------------------------------------------------------- encoders
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
    def encode_prompt_images(self, images: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The frozen visual prompt encoder: ``N×3×S×S`` in [0, 1] → V (``N×D_z``, the CLIP
        image embedding) and V̄_2, V̄_3, V̄_4 (``N×D_j``, spatial means of the stage maps)."""
        tower = self.prompt_encoder
        trunk = tower.trunk
        parameter = next(tower.parameters())
        embeddings, pooled = [], []
        for chunk in images.split(PROMPT_ENCODER_BATCH):
            x = trunk.stem(self.backbone.normalize(chunk.to(parameter.device, parameter.dtype)))
            means = []
            for index, stage in enumerate(trunk.stages):
                x = stage(x)
                if index < 3:
                    means.append(x.mean(dim=(2, 3)))  # V̄_j = Pool(V_j)
            embeddings.append(tower.head(trunk.forward_head(trunk.norm_pre(x))))
            pooled.append(means)
        return torch.cat(embeddings), tuple(torch.cat(level) for level in zip(*pooled, strict=True))

    # ------------------------------------------------------------------------------ prompts
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

    def prompt_gallery(self, vocabulary: VocabularyLike) -> PromptGallery:
        """The visual prompt images of a vocabulary, read lazily per class from the bank."""
        return self.prompt_bank.gallery(vocabulary, self.templates, self.config.prompts_per_class)

    # ---------------------------------------------------------------------------- one pass
    def cost_volume(self, embeddings: Tensor, prompts: DualPrompts) -> Tensor:
        """F_c (Eq. 1 and the Table 2 variants): ``B×D_z×h×w`` → ``B×K×M×h×w`` (``2M`` for
        ``cost_fusion="cat"``); the CLIP logit scale is not applied."""
        config = self.config
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

    def decode(
        self,
        features: DPSegFeatures,
        prompts: DualPrompts,
        *,
        shapes: dict[str, tuple[int, ...]] | None = None,
    ) -> Tensor:
        """The trained head on one pass's prompts → logits ``B×K×H/4×W/4``: F_c, its embedding
        F and the CVGD, ``config.class_chunk`` classes at a time."""
        classes = prompts.text.shape[1]

        def cost_volume(index: slice) -> Tensor:
            return self.cost_volume(features.embeddings, prompts.classes(index))  # F_c, Eq. 1

        def embedded_cost(index: slice) -> Tensor:
            return self.cost_embedding(cost_volume(index))  # F

        if shapes is not None:
            _record_feature_shapes(features, shapes)
            batch, _, height, width = features.embeddings.shape
            cost_channels = self.cost_embedding.conv.in_channels
            shapes |= {
                "F_c": (batch, classes, cost_channels, height, width),
                "F": (batch, classes, self.config.cost_embed_dim, height, width),
            }
        return self.decoder(
            embedded_cost,
            cost_volume,
            classes,
            features.guidance,
            prompts.pooled,
            class_chunk=self.config.class_chunk,
            shapes=shapes,
        )

    def training_free_scores(self, features: DPSegFeatures, prompts: DualPrompts) -> Tensor:
        """The dual-prompt cost volume averaged over templates, ``B×K×h×w`` (DESIGN.md §5), in
        chunks of classes (``B×K×M×h×w`` is never held)."""
        classes = prompts.text.shape[1]
        return join_classes(
            (
                (index, self.cost_volume(features.embeddings, prompts.classes(index)).mean(dim=2))
                for index in class_slices(classes, self.config.class_chunk)
            ),
            classes,
        )

    def _pass(
        self,
        features: DPSegFeatures,
        prompts: DualPrompts,
        use_head: bool,
        shapes: dict[str, tuple[int, ...]] | None = None,
    ) -> Tensor:
        """One pass: logits ``B×K×H×W`` at the input size."""
        logits = self._low_resolution_pass(features, prompts, use_head, shapes)
        return upsample_logits(logits, features.input_size)

    def _low_resolution_pass(
        self,
        features: DPSegFeatures,
        prompts: DualPrompts,
        use_head: bool,
        shapes: dict[str, tuple[int, ...]] | None,
    ) -> Tensor:
        """One pass's logits at the head's resolution (1/4, or 1/32 training-free)."""
        if use_head:
            return self.decode(features, prompts, shapes=shapes)
        logits = self.training_free_scores(features, prompts)
        logits /= self.config.temperature  # a fresh tensor; in place saves a K×h×w copy
        if shapes is not None:
            _record_feature_shapes(features, shapes)
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

        For each image and each class detected in its pass-I label map, the masked crop of the
        class is encoded by the frozen prompt encoder and replaces V of that class for all M
        templates. Other classes, T and (unless ``refine_stage_features``) V̄_j are unchanged:
        the head was trained with V̄_j of generated prompts, and crop features of the image
        itself put F_v^j outside that range (see :class:`DPSegConfig`). The crops are cut from
        the image as the network saw it (``features.images``, at the input size): ``segment``
        never receives the original, and the Predictor resizes it to the input size anyway.

        Arguments:
            features: the image features of pass I (the image encoder does not run again).
            prompts: the prompts of pass I.
            label_map: ``B×H×W`` pass-I argmax at the input resolution.
            detection_threshold: τ (share of pixels).
            crop_mode: "masked" or "bbox".
            refine_stage_features: also replace V̄_j with the crops' (the spec's ablation).

        Returns:
            The pass-II prompts, the detected classes per image and the crops per image
            (class index → ``3×S×S`` in [0, 1]).
        """
        num_classes = prompts.visual.shape[1]
        detected = detect_classes(label_map, num_classes, detection_threshold)
        fill = self.backbone.image_mean.view(3)
        crops: list[dict[int, Tensor]] = []
        owners = []
        for index, classes in enumerate(detected):
            crops.append(
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
            )
            owners += [(index, k) for k in classes]
        if not owners:
            return prompts, detected, crops
        # Stacked per encoder batch (the batches encode_prompt_images cuts), not all at once.
        batches = []
        for start in range(0, len(owners), PROMPT_ENCODER_BATCH):
            batch = owners[start : start + PROMPT_ENCODER_BATCH]
            batches.append(self.encode_prompt_images(torch.stack([crops[b][k] for b, k in batch])))
        embedding = torch.cat([encoded[0] for encoded in batches])
        pooled = tuple(torch.cat(level) for level in zip(*(e[1] for e in batches), strict=True))
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
        inference: str | None = None,
        detection_threshold: float | None = None,
        crop_mode: str | None = None,
        refine_stage_features: bool | None = None,
        head: bool | None = None,
        **options: Any,
    ) -> SegmentationOutput:
        """Segment encoded images (see :meth:`SegmentationMethod.segment`).

        Options:
            inference: "I" or "II" (default ``config.inference``; "I" in training mode).
            detection_threshold: τ for Inference II (default ``config.detection_threshold``).
            crop_mode: "masked" or "bbox" (default ``config.crop_mode``).
            refine_stage_features: Inference II also replaces V̄_j, not only V (default
                ``config.refine_stage_features``; an ablation).
            head: True runs the decoder, False the training-free path; default: the decoder when
                it is trained (``trained_head``) or being trained (training mode).

        Intermediates (``return_intermediates=True``): ``text_cost_volume``,
        ``visual_cost_volume``, ``dual_cost_volume`` (``B×K×h×w``, template-averaged cosines of
        E with T, V and R, Fig. 3), ``visual_cost_volume_j{2,3,4}`` (``B×K×H_j×W_j``,
        template-averaged F_v^j, Fig. 8), ``visual_prompt_images`` (lazy gallery, class index →
        images), ``shapes`` (tensor inspector), and with Inference II ``refined_prompt_images``
        (per image, class index → its ``3×S×S`` crop in [0, 1]), ``pass1_logits`` and
        ``pass2_logits`` (``B×K×H×W``). Inference II always returns ``detected_classes`` (per
        image). Pass I's logits are upsampled for all classes only as the output or an
        intermediate (they are ``K×H×W`` floats: 2 GB for 847 classes at 768 px); Inference II
        takes its label map from a running argmax over chunks of classes.
        """
        if options:
            raise ValueError(
                f"dpseg takes the options inference, detection_threshold, crop_mode, "
                f"refine_stage_features and head; got {sorted(options)}."
            )
        mode = inference or ("I" if self.training else self.config.inference)
        _check_choice("inference", mode, ("I", "II"))
        use_head = head if head is not None else (self.trained_head or self.training)
        features = image_features
        size = features.input_size
        shapes: dict[str, tuple[int, ...]] | None = {} if return_intermediates else None
        intermediates: dict[str, Any] = {"inference": mode}

        # Inference I: the dual prompts T, V, V̄_j (§4.1) and one pass at the head's resolution.
        prompts = self.dual_prompts(vocabulary, features.embeddings.shape[0])
        pass_one = self._low_resolution_pass(features, prompts, use_head, shapes)
        if return_intermediates:
            intermediates |= self._cost_volume_intermediates(features, prompts, vocabulary)
            intermediates |= {"head": "trained" if use_head else "training-free", "shapes": shapes}
        if mode == "I":
            return SegmentationOutput(
                logits=upsample_logits(pass_one, size), intermediates=intermediates
            )

        # Inference II (§4.3): the classes found in pass I get their crops as visual prompts.
        refined, detected, crops = self.refine_prompts(
            features,
            prompts,
            upsampled_argmax(pass_one, size),
            detection_threshold=(
                self.config.detection_threshold
                if detection_threshold is None
                else detection_threshold
            ),
            crop_mode=crop_mode or self.config.crop_mode,
            refine_stage_features=(
                self.config.refine_stage_features
                if refine_stage_features is None
                else refine_stage_features
            ),
        )
        intermediates["detected_classes"] = detected
        if refined is prompts:  # nothing detected: pass II would repeat pass I
            logits = upsample_logits(pass_one, size)
        else:
            logits = self._pass(features, refined, use_head)
        if return_intermediates:
            intermediates |= {
                "refined_prompt_images": crops,
                "pass1_logits": logits if refined is prompts else upsample_logits(pass_one, size),
                "pass2_logits": logits,
            }
        return SegmentationOutput(logits=logits, intermediates=intermediates)

    def _cost_volume_intermediates(
        self, features: DPSegFeatures, prompts: DualPrompts, vocabulary: VocabularyLike
    ) -> dict[str, Any]:
        embeddings = features.embeddings
        dual = (F.normalize(prompts.visual, dim=-1) + F.normalize(prompts.text, dim=-1)) / 2
        result: dict[str, Any] = {
            "text_cost_volume": _template_mean_cost(embeddings, prompts.text),
            "visual_cost_volume": _template_mean_cost(embeddings, prompts.visual),
            "dual_cost_volume": _template_mean_cost(embeddings, dual),
            "visual_prompt_images": self.prompt_gallery(vocabulary),
        }
        for j, encoder_features, pooled in zip(
            (2, 3, 4), features.guidance, prompts.pooled, strict=True
        ):
            result[f"visual_cost_volume_j{j}"] = _template_mean_cost(encoder_features, pooled)
        return result

    # ------------------------------------------------------------------------------ training
    def loss(self, output: SegmentationOutput, target: Tensor) -> dict[str, Tensor]:
        """Per-pixel sigmoid binary cross-entropy against one-hot targets over the K classes.

        Logits are resized to the target; ``IGNORE_INDEX`` pixels are negatives for every class
        (``ignore_policy="negative"``, SED) or left out (``"exclude"``). The mean runs over all
        counted ``B·H·W·K`` elements.
        """
        logits = upsample_logits(output.logits, target.shape[-2:])
        num_classes = logits.shape[1]
        target = target.long()
        valid = target != IGNORE_INDEX
        if bool(((target < 0) | (target >= num_classes))[valid].any()):
            raise ValueError(
                f"Targets must be class indices below K = {num_classes} or {IGNORE_INDEX}."
            )
        one_hot = torch.zeros_like(logits)
        one_hot.scatter_(1, torch.where(valid, target, 0)[:, None], 1.0)
        one_hot = one_hot * valid[:, None].to(logits.dtype)
        per_element = F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none")
        if self.config.ignore_policy == "negative":
            return {"loss_bce": per_element.mean()}
        counted = valid.sum() * num_classes
        masked = per_element * valid[:, None].to(per_element.dtype)
        return {"loss_bce": masked.sum() / counted.clamp_min(1)}

    def parameter_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """The paper's groups: cost embedding + decoder at ``base_lr`` (2e-4) and the image
        encoder at ``α · base_lr`` (2e-6), both with AdamW weight decay 1e-4. The text tower and
        the prompt encoder are frozen and in no group."""
        encoder = [p for p in self.backbone.model.visual.parameters() if p.requires_grad]
        head = [
            p
            for name, p in self.named_parameters()
            if p.requires_grad and not name.startswith(("backbone.", "prompt_encoder."))
        ]
        decay = self.config.weight_decay
        return [
            {"name": "head", "params": head, "lr": base_lr, "weight_decay": decay},
            {
                "name": "image_encoder",
                "params": encoder,
                "lr": base_lr * self.config.encoder_lr_multiplier,
                "weight_decay": decay,
            },
        ]


# ------------------------------------------------------------------------------------ builder


@register_method("dpseg")
def build_dpseg(
    *,
    backbone: str | ClipBackbone | None = None,
    weights: str | None = None,
    device: str | torch.device | None = None,
    prompt_generator: str | VisualPromptGenerator | None = None,
    prompt_bank: VisualPromptBank | None = None,
    **config: Any,
) -> DPSeg:
    """Build DPSeg (the rules every builder follows: :mod:`ovseg.methods.builder`).

    Arguments:
        backbone: a loaded ConvNeXt :class:`ClipBackbone`, or a name or alias to load (default
            ``config.backbone``, the ToyWorld ConvNeXt CLIP).
        weights: a file written by :func:`~ovseg.methods.weights.save_weights`; None: the shipped
            ``assets/dpseg-toy.safetensors`` when the CLIP is the toy ConvNeXt it was trained on.
            Without a trained head :meth:`DPSeg.segment` runs the training-free path.
        device: where to build it.
        prompt_generator: a generator object that draws the visual prompts, or a name for the
            ``prompt_generator`` config field ("toyworld", "sd15", "sd3", a diffusers model).
        prompt_bank: a ready prompt bank (see :class:`DPSeg`).
        config: any :class:`DPSegConfig` field.
    """
    if isinstance(prompt_generator, str):
        config = {"prompt_generator": prompt_generator, **config}
        prompt_generator = None

    def factory(settings: DPSegConfig, clip: ClipBackbone, head: bool) -> DPSeg:
        return DPSeg(
            config=settings,
            backbone=clip,
            prompt_generator=prompt_generator,
            prompt_bank=prompt_bank,
        )

    return build_with_weights(
        DPSeg,
        backbone=backbone,
        weights=weights,
        device=device,
        config=config,
        shipped=SHIPPED_WEIGHTS,
        factory=factory,
    )
