"""DCP-CLIP: coarse-to-fine open-vocabulary segmentation with dual interaction (Wang et al., 2025).

The file follows Section III of the paper (spec: ``specs/dcp-clip.md``):

1. Dynamic Category Selection (DCS, Eqs. 1–5, :func:`select_categories`): only the classes it
   selects (C_s of them) go through the rest of the network, so its cost scales with C_s.
2. Text-guided alignment (TGA, Eqs. 6–12, :class:`TextGuidedAlignment`), the *coarse* stage.
3. Spatial Enhanced Decoder (SED, Eqs. 13–16, :class:`SpatialEnhancedDecoder`), the *fine* stage;
   the classes DCS left out get :data:`NOT_SELECTED_LOGIT`.
4. Tag Validation (TV, Eq. 17, :func:`tag_validation`), inference only.

Without trained head weights the method runs its training-free path: DCS on MaskCLIP dense
features, then the cosine cost volume over the selected classes.

What the paper leaves open the spec's §9 fills in (the values are the config's defaults): τ, N_c
and the attention widths, D_c, the cost embedding (7×7 over the P templates), the prompt P (one
vector shared by all classes), the [CLS] term of T_g, the Swin window, A_CLIP (the last block's
head-averaged attention), the guidance blocks (:func:`_default_guidance_layers`) and TV's k.
Deviations, all switchable: ground-truth classes are forced into the selection in training
(``train_force_gt_classes``; the paper does not say how labelled classes DCS misses are
supervised); TV decides every region from the pre-TV label map, so the order of regions cannot
matter.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg.backbones import ClipBackbone, DenseFeatures, TextEmbeddings, is_toy_clip
from ovseg.caching import ExpiringEntry
from ovseg.methods import optimiser
from ovseg.methods.attention import CrossAttentionBlock, SelfAttentionBlock, SwinBlock
from ovseg.methods.base import (
    IGNORE_INDEX,
    MethodConfig,
    SegmentationMethod,
    SegmentationOutput,
    VocabularyLike,
)
from ovseg.methods.blocks import CostEmbedding, DoubleConv, cosine_cost_volume
from ovseg.methods.builder import method_builder, register_method, require_vit
from ovseg.methods.chunking import (
    class_slices,
    pad_class_subsets,
    scatter_class_subsets,
    upsample_logits,
)
from ovseg.methods.losses import binary_cross_entropy_with_logits
from ovseg.prompts.templates import resolve_templates
from ovseg.vocabulary import class_synonyms, seen_class_mask

NOT_SELECTED_LOGIT = -100.0  # classes DCS leaves out: probability ≈ 0, never the argmax
SEGMENT_OPTIONS = ("theta", "tau", "tv_rank", "tag_validation", "seen_classes")
SHIPPED_WEIGHTS = "dcp-clip-toy.safetensors"


@dataclass
class DcpClipConfig(MethodConfig):
    """DCP-CLIP settings (beyond :class:`MethodConfig`). Defaults are the paper's full model."""

    # Dynamic Category Selection (§3)
    theta: float = 0.5  # θ of Eq. 4 (Table VII); 0 selects every class
    tau: float | None = None  # softmax scale of S_img (None: the CLIP's logit scale, 100)
    use_dcs: bool = True  # False: every class runs (Table III)
    train_force_gt_classes: bool = True  # training adds the target's classes to the selection
    max_selected: int | None = None  # cap on C_s (by ground truth, image level, patch votes)
    # In training the whole vocabulary is encoded again for DCS (without gradient) only this
    # often; the selected classes are encoded with gradient at every call.
    dcs_text_refresh_iters: int = 100
    # Text-guided alignment, the coarse stage (§2.4–2.7, Tables IV–V)
    cost_dim: int = 128  # D_c
    # False feeds F_cv straight to the decoder (Table III); with sed_layers=0 too the head reads
    # it directly: the "fine-tuned CLIP" baseline.
    use_tga: bool = True
    tga_cross_attention: bool = True  # the text→visual cross-attention branch (CA)
    tga_self_attention: bool = True  # the fusion self-attention (SA); without it, a linear layer
    guidance_cls_logits: str = "cosine"  # [CLS] term of T_g: "cosine", "hadamard" or "none"
    guidance_prompt: bool = True  # the learnable prompt term of T_g
    cross_attention_layers: int = 2  # N_c
    cross_attention_heads: int = 8
    self_attention_layers: int = 1
    self_attention_heads: int = 4
    mlp_ratio: float = 4.0  # MLP width of every transformer block, a multiple of its width
    # Spatial Enhanced Decoder, the fine stage (§2.8, Table VI)
    sed_layers: int = 2  # N_s (0: the head reads F_cv^ref at the patch grid)
    spatial_enhance: bool = True  # the Swin pair of each layer (Table VI a)
    fuse_patch: bool = True  # encoder features as Swin guidance and skip input ("F_patch")
    fuse_sim: bool = True  # the initial cost map in each upsampling stage ("F_sim")
    fuse_attention: bool = True  # CLIP's attention maps as Swin guidance ("A_CLIP")
    swin_heads: int = 4
    window_size: int = 12
    # 0-based ViT blocks of F_patch and A_CLIP's guidance (None: _default_guidance_layers)
    guidance_layers: tuple[int, ...] | None = None
    # Tag Validation (§4.3)
    tag_validation: bool = True
    tv_rank: int = 5  # k: a region is relabelled when its label ranks below k
    tv_restrict_to_selected: bool = False  # relabel only to classes DCS selected
    # The classes the head was trained on (None: ToyWorld's seen classes for a toy CLIP,
    # COCO-Stuff-171 otherwise; see seen_class_mask).
    seen_classes: tuple[str, ...] | None = None
    # Training-free path and training
    temperature: float = 0.01  # divides the cosine scores into logits on the training-free path
    finetune_clip: bool = True  # train CLIP's Q/V rows and position embeddings (False: freeze it)
    clip_lr_multiplier: float = 0.01  # CLIP's learning rate / the base one (2e-6 / 2e-4)
    weight_decay: float = 1e-4
    class_chunk_size: int = 16  # selected classes run through the per-class layers at a time

    tuple_fields: ClassVar[tuple[str, ...]] = ("guidance_layers", "seen_classes")
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {
        "guidance_cls_logits": ("cosine", "hadamard", "none")
    }
    at_least: ClassVar[dict[str, float]] = {
        "sed_layers": 0,
        "tv_rank": 0,
        "max_selected": 1,
        "class_chunk_size": 1,
    }
    within: ClassVar[dict[str, tuple[float, float]]] = {"theta": (0.0, 1.0)}

    def problems(self) -> list[str]:
        problems = []
        if int(self.tv_rank) != self.tv_rank:
            problems.append(f"tv_rank must be a whole number; got {self.tv_rank}")
        if self.cost_dim % (4 * 2 ** max(self.sed_layers - 1, 0)):
            problems.append(
                f"cost_dim {self.cost_dim} must halve sed_layers={self.sed_layers} times and stay "
                "divisible by 4 (the decoder's skip width is a quarter of its width)"
            )
        if self.use_tga and self.tga_cross_attention and self.cross_attention_layers < 1:
            problems.append("the cross-attention branch needs cross_attention_layers >= 1")
        if self.guidance_layers and len(self.guidance_layers) < self.sed_layers:
            problems.append(
                f"sed_layers={self.sed_layers} needs as many guidance_layers; "
                f"got {self.guidance_layers}"
            )
        return problems


@dataclass
class DcpClipOutput(SegmentationOutput):
    """DCP-CLIP's output: the full-vocabulary logits plus what the loss needs, each image's
    selected classes padded to the largest C_s of the batch (S) as :func:`pad_class_subsets` pads
    them."""

    selected_logits: Tensor | None = None  # B×S×H×W
    selected_classes: Tensor | None = None  # B×S vocabulary indices
    class_mask: Tensor | None = None  # B×S, False for padding


# ------------------------------------------------------------------ Dynamic Category Selection


@dataclass
class CategorySelection:
    """Dynamic Category Selection for a batch (Eqs. 1–5); ``B×C`` flags unless said otherwise."""

    image_scores: Tensor  # S_img, softmax over the vocabulary of τ·cos(F_cls, E_t)
    patch_scores: Tensor  # B×C×N S_patch, cos(F_patch, E_t)
    refined_patch_scores: Tensor  # B×C×N S_patch_ref = S_patch · (1 − S_img) (Eq. 2)
    from_patch: Tensor  # C_patch (Eq. 3)
    from_image: Tensor  # C_image (Eq. 4)
    forced: Tensor  # ground-truth classes added in training
    dropped: Tensor  # classes removed by max_selected
    selected: Tensor  # C_final (Eq. 5, then forcing and the cap)
    theta: float
    tau: float
    enabled: bool = True  # False: DCS was switched off (every class selected)

    @property
    def patch_winners(self) -> Tensor:
        """``B×N`` ĉ_i, the class each patch votes for after suppression (Eq. 3)."""
        return self.refined_patch_scores.argmax(dim=1)

    @property
    def patch_votes(self) -> Tensor:
        """``B×C`` number of patches voting for each class after suppression."""
        winners = self.patch_winners
        votes = torch.zeros(self.selected.shape, dtype=torch.long, device=winners.device)
        return votes.scatter_add_(1, winners, torch.ones_like(winners))

    @property
    def num_selected(self) -> Tensor:
        """``B`` C_s of each image."""
        return self.selected.sum(dim=1)

    def indices(self) -> list[list[int]]:
        """C_final of each image, sorted ascending."""
        return [row.nonzero().flatten().tolist() for row in self.selected]

    def with_forced(self, forced: Tensor) -> CategorySelection:
        """Add the classes in ``forced`` (``B×C`` bool) to the selection."""
        return dataclasses.replace(
            self, forced=self.forced | forced, selected=self.selected | forced
        )

    def capped(self, max_selected: int) -> CategorySelection:
        """Keep at most ``max_selected`` classes per image: ground truth first, then the image
        level, then the most patch votes and the highest refined patch score."""
        votes, best = self.patch_votes.double(), self.refined_patch_scores.amax(dim=2).double()
        # Lexicographic priority in one number: the flags dominate votes (≤ N), which dominate
        # the score (in [-1, 1]).
        scale = self.patch_scores.shape[2] + 1
        priority = (
            self.forced.double() * 4 * scale**2
            + self.from_image.double() * 2 * scale**2
            + votes * 4
            + best
        ).masked_fill(~self.selected, -math.inf)
        keep = torch.zeros_like(self.selected)
        count = min(max_selected, self.selected.shape[1])
        keep.scatter_(1, priority.topk(count, dim=1).indices, True)
        keep &= self.selected
        return dataclasses.replace(
            self, selected=keep, dropped=self.dropped | (self.selected & ~keep)
        )


@torch.no_grad()
def select_categories(
    cls_embedding: Tensor,
    dense: Tensor,
    class_embeddings: Tensor,
    *,
    theta: float,
    tau: float,
    enabled: bool = True,
) -> CategorySelection:
    """Dynamic Category Selection (Eqs. 1–5). Parameter-free; no gradient flows through it.

    Arguments:
        cls_embedding: ``B×D`` F_cls, the projected [CLS] token.
        dense: ``B×D×h×w`` F_patch, the projected patch tokens.
        class_embeddings: ``C×D`` E_t, one (template-averaged) embedding per vocabulary class.
        theta: θ of Eq. 4; a class enters C_image when S_img > θ (θ = 0: every class).
        tau: the softmax scale of S_img.
        enabled: False selects every class (the scores are still computed, to be shown).

    The scores are computed in float32 even under autocast: classes often score within bf16's
    resolution of each other, and a bf16 S_patch flipped a third of the patch winners of a
    171-class near-tie.
    """
    with torch.autocast(device_type=dense.device.type, enabled=False):
        classes = F.normalize(class_embeddings.float(), dim=-1)
        patches = F.normalize(dense.float().flatten(2), dim=1)  # B×D×N
        patch_scores = torch.einsum("cd,bdn->bcn", classes, patches)  # Eq. 1, S_patch
        log_image_scores = torch.log_softmax(
            tau * F.normalize(cls_embedding.float(), dim=-1) @ classes.T, dim=-1
        )  # Eq. 1, S_img
        image_scores = log_image_scores.exp()
        refined = patch_scores * (1 - image_scores[..., None])  # Eq. 2
    from_patch = torch.zeros_like(image_scores, dtype=torch.bool)
    from_patch.scatter_(1, refined.argmax(dim=1), True)  # Eq. 3
    # Eq. 4, compared in log space: a probability that underflows to 0 is still > 0 = θ.
    from_image = log_image_scores > (math.log(theta) if theta > 0 else -math.inf)
    selected = from_patch | from_image  # Eq. 5 (a union; the prose's "intersection" is a slip)
    if not enabled:
        selected = torch.ones_like(selected)
    return CategorySelection(
        image_scores=image_scores,
        patch_scores=patch_scores,
        refined_patch_scores=refined,
        from_patch=from_patch,
        from_image=from_image,
        forced=torch.zeros_like(selected),
        dropped=torch.zeros_like(selected),
        selected=selected,
        theta=float(theta),
        tau=float(tau),
        enabled=enabled,
    )


# ----------------------------------------------------------------------- text-guided alignment


class TextualGuidance(nn.Module):
    """``T_g = φ(concat[F_cls·E_SC, E_SC, P])`` (Eq. 7): one guidance token per selected class.

    The [CLS] term is ``cls_logits`` (see the config); the prompt P is one vector shared by all
    classes, since C_s varies per image and a per-class prompt cannot exist.
    """

    def __init__(self, *, embed_dim: int, cls_logits: str = "cosine", prompt: bool = True) -> None:
        super().__init__()
        self.cls_logits = cls_logits
        cls_width = {"cosine": 1, "hadamard": embed_dim, "none": 0}[cls_logits]
        self.prompt = nn.Parameter(torch.zeros(embed_dim)) if prompt else None
        if self.prompt is not None:
            nn.init.trunc_normal_(self.prompt, std=0.02)
        in_width = cls_width + embed_dim + (embed_dim if prompt else 0)
        self.projection = nn.Linear(in_width, embed_dim)  # φ

    def forward(self, cls_embedding: Tensor, class_text: Tensor) -> Tensor:
        """``B×D`` F_cls and ``B×S×D`` E_SC → ``B×S×D`` T_g."""
        cls_unit = F.normalize(cls_embedding, dim=-1)[:, None]
        text_unit = F.normalize(class_text, dim=-1)
        parts = []
        if self.cls_logits == "cosine":
            parts.append((text_unit * cls_unit).sum(dim=-1, keepdim=True))
        elif self.cls_logits == "hadamard":
            parts.append(text_unit * cls_unit)
        parts.append(class_text)
        if self.prompt is not None:
            parts.append(self.prompt.expand_as(class_text))
        return self.projection(torch.cat(parts, dim=-1))


class TextGuidedAlignment(nn.Module):
    """The coarse stage: text→visual cross-attention (Eqs. 7–10), then per-class spatial
    self-attention over the cost features concatenated with the refined patches (Eqs. 11–12).

    The cross-attention runs once per image over all selected classes (they are its keys); the
    fusion runs per class and is called on chunks of classes. Without the CA branch F_patch is
    used unrefined; without the SA branch a linear layer fuses the concatenation (with a residual
    to F_cv). ``embed_dim`` is D, the width of F_patch and of the text embeddings.
    """

    def __init__(self, *, config: DcpClipConfig, embed_dim: int) -> None:
        super().__init__()
        cost_dim, mlp_ratio = config.cost_dim, config.mlp_ratio
        self.guidance = (
            TextualGuidance(
                embed_dim=embed_dim,
                cls_logits=config.guidance_cls_logits,
                prompt=config.guidance_prompt,
            )
            if config.tga_cross_attention
            else None
        )
        self.cross_layers = nn.ModuleList(
            CrossAttentionBlock(
                dim=embed_dim, heads=config.cross_attention_heads, mlp_ratio=mlp_ratio
            )
            for _ in range(config.cross_attention_layers if config.tga_cross_attention else 0)
        )
        self.patch_projection = nn.Linear(embed_dim, cost_dim)  # φ of Eq. 11
        self.fusion_layers = nn.ModuleList(
            SelfAttentionBlock(
                dim=cost_dim,
                heads=config.self_attention_heads,
                input_dim=2 * cost_dim,
                mlp_ratio=mlp_ratio,
            )
            for _ in range(config.self_attention_layers if config.tga_self_attention else 0)
        )
        self.linear_fusion = (
            None if config.tga_self_attention else nn.Linear(2 * cost_dim, cost_dim)
        )

    def align_patches(
        self, patches: Tensor, cls_embedding: Tensor, class_text: Tensor, class_mask: Tensor
    ) -> Tensor:
        """Inject the selected classes' semantics into the patch features (Eqs. 7–10):
        ``B×N×D`` F_patch, ``B×D`` F_cls, ``B×S×D`` E_SC and its ``B×S`` mask (False: padding,
        masked out of the keys) → ``B×N×D`` F_patch^ref."""
        if self.guidance is None:
            return patches
        guidance = self.guidance(cls_embedding, class_text)  # Eq. 7
        for layer in self.cross_layers:  # Eqs. 8–10, N_c times
            patches = layer(patches, guidance, context_mask=class_mask)
        return patches

    def fuse(self, cost_tokens: Tensor, patches: Tensor) -> Tensor:
        """``B×s×N×D_c`` F_cv and ``B×N×D`` F_patch^ref → ``B×s×N×D_c`` F_cv^ref."""
        batch, classes, tokens, width = cost_tokens.shape
        visual = self.patch_projection(patches)[:, None].expand(batch, classes, tokens, width)
        if self.linear_fusion is not None:
            return cost_tokens + self.linear_fusion(torch.cat([cost_tokens, visual], dim=-1))
        fused = cost_tokens.flatten(0, 1)
        visual = visual.flatten(0, 1)
        for layer in self.fusion_layers:  # Eqs. 11–12: attention over the N positions per class
            fused = layer(fused, attention_input=torch.cat([fused, visual], dim=-1))
        return fused.view(batch, classes, tokens, width)


# ----------------------------------------------------------------------------------- decoder


def _conv_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU())


@dataclass
class DecoderGuidance:
    """Class-agnostic inputs of the decoder, computed once per image and shared by all classes."""

    swin: list[Tensor | None]  # per layer i, B×g_i×(h·2^i)×(w·2^i) Swin Q/K guidance
    skip: list[Tensor | None]  # per layer i, B×(d_i/4)×(h·2^(i+1))×(w·2^(i+1)) encoder features


class SpatialEnhancedDecoder(nn.Module):
    """The fine stage (Eqs. 13–16): N_s × [Swin pair with guidance → ConvT 2× → fuse].

    Layer i works at ``(h·2^i)×(w·2^i)`` with ``d_i = D_c / 2^i`` channels. Its Swin pair takes
    queries and keys from the class features concatenated with guidance (conv of the dense
    features at i = 0 or of the upsampled block features after, and conv of A_CLIP), values from
    the class features alone. The upsampling stage concatenates the initial cost map and the
    next level's encoder features and halves the channels.

    It is built for N_s = ``config.sed_layers`` ≥ 1 layers; ``embed_dim`` is D (the width of
    F_patch), ``vision_width`` D_v (the width of the guidance blocks' tokens) and
    ``attention_channels`` N = h·w, the patch count of A_CLIP's rows (fixed by the input size the
    model is built for).
    """

    def __init__(
        self, *, config: DcpClipConfig, embed_dim: int, vision_width: int, attention_channels: int
    ) -> None:
        super().__init__()
        self.layers = config.sed_layers
        self.dims = [config.cost_dim // 2**i for i in range(self.layers + 1)]
        self.spatial_enhance = config.spatial_enhance
        self.fuse_patch = config.fuse_patch
        self.fuse_sim = config.fuse_sim
        self.fuse_attention = config.fuse_attention and config.spatial_enhance
        self.attention_channels = attention_channels
        self.out_channels = self.dims[-1]
        self.feature_upsamplers = nn.ModuleList()  # CAT-Seg's upsample1/upsample2
        self.skip_projections = nn.ModuleList()
        self.swin_feature_projections = nn.ModuleList()
        self.swin_attention_projections = nn.ModuleList()
        self.swin_blocks = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        self.fusions = nn.ModuleList()
        for level, width in enumerate(self.dims[:-1]):
            if self.fuse_patch:
                scale = 2 ** (level + 1)
                self.feature_upsamplers.append(
                    nn.ConvTranspose2d(vision_width, 2 * width, scale, stride=scale)
                )
                self.skip_projections.append(_conv_relu(2 * width, width // 4))
            if self.spatial_enhance:
                guidance_width = 0
                if self.fuse_patch:
                    source = embed_dim if level == 0 else 2 * self.dims[level - 1]
                    self.swin_feature_projections.append(_conv_relu(source, width))
                    guidance_width += width
                if self.fuse_attention:
                    self.swin_attention_projections.append(_conv_relu(attention_channels, width))
                    guidance_width += width
                self.swin_blocks.append(
                    nn.ModuleList(
                        SwinBlock(
                            dim=width,
                            heads=config.swin_heads,
                            window_size=config.window_size,
                            shift=shift,
                            guidance_dim=guidance_width,
                            mlp_ratio=config.mlp_ratio,
                        )
                        for shift in (False, True)
                    )
                )
            self.upsamplers.append(nn.ConvTranspose2d(width, width, 2, stride=2))  # Eq. 15
            fused_width = width + int(self.fuse_sim) + (width // 4 if self.fuse_patch else 0)
            self.fusions.append(
                DoubleConv(in_channels=fused_width, out_channels=self.dims[level + 1])
            )

    def guidance(
        self, dense: Tensor, block_features: Sequence[Tensor], attention: Tensor | None
    ) -> DecoderGuidance:
        """Class-agnostic guidance for every layer.

        Arguments:
            dense: ``B×D×h×w`` F_patch.
            block_features: ``B×D_v×h×w`` tokens of the guidance blocks, one per layer (only
                with ``fuse_patch``).
            attention: ``B×N×N`` A_CLIP, patch→patch (only with ``fuse_attention``).
        """
        height, width = dense.shape[-2:]
        upsampled = [
            upsample(features)
            for upsample, features in zip(self.feature_upsamplers, block_features, strict=True)
        ]
        attention_map = None
        if self.fuse_attention:
            # Each patch's row of attention weights becomes an N-channel feature at that patch.
            attention_map = attention.transpose(1, 2).reshape(attention.shape[0], -1, height, width)
        swin, skip = [], []
        for level in range(self.layers):
            parts = []
            if self.spatial_enhance and self.fuse_patch:
                source = dense if level == 0 else upsampled[level - 1]
                parts.append(self.swin_feature_projections[level](source))
            if self.fuse_attention:
                projected = self.swin_attention_projections[level](attention_map)
                if level:
                    size = (height * 2**level, width * 2**level)
                    projected = F.interpolate(
                        projected, size=size, mode="bilinear", align_corners=False
                    )
                parts.append(projected)
            swin.append(torch.cat(parts, dim=1) if parts else None)
            skip.append(self.skip_projections[level](upsampled[level]) if self.fuse_patch else None)
        return DecoderGuidance(swin=swin, skip=skip)

    def forward(self, x: Tensor, cost_map: Tensor, guidance: DecoderGuidance) -> Tensor:
        """``B×s×D_c×h×w`` F_cv^ref of a chunk of classes and their ``B×s×1×h×w`` initial
        (template-averaged) cost map → ``B×s×(D_c/2^N_s)×(h·2^N_s)×(w·2^N_s)`` F_last."""
        batch, classes = x.shape[:2]
        x = x.flatten(0, 1)
        cost_map = cost_map.flatten(0, 1)
        for level in range(self.layers):
            if self.spatial_enhance:
                swin_guidance = guidance.swin[level]
                if swin_guidance is not None:  # one map per image, shared by its classes
                    swin_guidance = swin_guidance.permute(0, 2, 3, 1)
                tokens = x.permute(0, 2, 3, 1)
                for block in self.swin_blocks[level]:  # Eqs. 13–14
                    tokens = block(tokens, swin_guidance)
                x = tokens.permute(0, 3, 1, 2)
            x = self.upsamplers[level](x)  # Eq. 15
            parts = [x]
            if self.fuse_sim:
                parts.append(
                    F.interpolate(cost_map, size=x.shape[-2:], mode="bilinear", align_corners=False)
                )
            if self.fuse_patch:  # B×C×H×W → (B·classes)×C×H×W
                skip = guidance.skip[level]
                parts.append(skip[:, None].expand(-1, classes, -1, -1, -1).flatten(0, 1))
            x = self.fusions[level](torch.cat(parts, dim=1))  # Eq. 16
        return x.view(batch, classes, *x.shape[1:])


# ------------------------------------------------------------------------------ Tag Validation


@dataclass(frozen=True)
class TagDecision:
    """Tag Validation's verdict on one unseen-class region (Eq. 17)."""

    region_class: int  # the label the region was predicted as
    new_class: int  # the best class of the mask-pooled re-scoring
    rank: int  # 1-based rank of region_class in the re-scoring
    rank_cutoff: int  # k
    pixels: int  # the region's size
    relabelled: bool  # whether the region was changed to new_class (rank > k)


@torch.no_grad()
def tag_validation(
    labels: Tensor,
    dense: Tensor,
    class_embeddings: Tensor,
    *,
    seen: Tensor,
    rank_cutoff: int,
    candidates: Tensor | None = None,
) -> tuple[Tensor, list[TagDecision]]:
    """Re-validate the label of every region predicted as an unseen class (Eq. 17).

    A region is all pixels with one label. Its features are mask-average-pooled from ``dense``
    and compared with every class; if the original label is not among the ``rank_cutoff`` most
    similar classes, the region takes the most similar one. Seen classes are kept. All regions
    are judged on the input label map, so the result does not depend on their order.

    Arguments:
        labels: ``H×W`` predicted class indices.
        dense: ``D×h×w`` dense features (the region is area-pooled to this grid).
        class_embeddings: ``C×D`` text embeddings of the full vocabulary.
        seen: ``C`` bool, classes the head was trained on; rank_cutoff: k.
        candidates: ``C`` bool, the classes a region may be relabelled to (default: all).

    Returns the new label map and one :class:`TagDecision` per unseen region.
    """
    present = labels.unique()
    unseen = present[~seen[present]]
    if unseen.numel() == 0:
        return labels, []
    masks = (labels[None] == unseen[:, None, None]).to(dense.dtype)  # U×H×W
    weights = F.interpolate(masks[None], size=dense.shape[-2:], mode="area")[0]  # U×h×w
    totals = weights.sum(dim=(1, 2))
    pooled = torch.einsum("uhw,dhw->ud", weights, dense) / totals.clamp_min(1e-12)[:, None]
    scores = F.normalize(pooled, dim=-1) @ F.normalize(class_embeddings, dim=-1).T  # U×C
    if candidates is not None:
        allowed = candidates[None].expand_as(scores).clone()
        allowed[torch.arange(len(unseen)), unseen] = True
        scores = scores.masked_fill(~allowed, -math.inf)
    own = scores.gather(1, unseen[:, None])
    ranks = 1 + (scores > own).sum(dim=1)
    best = scores.argmax(dim=1)
    pixels = masks.sum(dim=(1, 2))
    new_labels = labels.clone()
    decisions = []
    for row, region_class in enumerate(unseen.tolist()):
        if totals[row] <= 0:  # too small to reach the patch grid: keep the label
            continue
        new_class, rank = int(best[row]), int(ranks[row])
        relabelled = rank > rank_cutoff and new_class != region_class  # Eq. 17
        if relabelled:
            new_labels[labels == region_class] = new_class
        pixel_count = int(pixels[row])
        decisions.append(
            TagDecision(region_class, new_class, rank, rank_cutoff, pixel_count, relabelled)
        )
    return new_labels, decisions


# ------------------------------------------------------------------------------------- model


def _default_guidance_layers(depth: int, count: int) -> tuple[int, ...]:
    """0-based blocks at (i+1)/(n+1) of the depth, n = max(2, count): CAT-Seg's blocks {4, 8} of
    ViT-B/16's 12 and {8, 16} of ViT-L/14's 24 (1-based), one and two thirds of the depth; the
    same fractions give blocks {2, 4} of the toy ViT's 6."""
    parts = max(2, count)
    return tuple(round(depth * (i + 1) / (parts + 1)) - 1 for i in range(count))


def _target_classes(target: Tensor, num_classes: int) -> Tensor:
    """``B×H×W`` labels → ``B×C`` bool of the classes present (ignoring ``IGNORE_INDEX``)."""
    present = torch.zeros(target.shape[0], num_classes, dtype=torch.bool, device=target.device)
    for image in range(target.shape[0]):
        labels = target[image].unique()
        labels = labels[(labels != IGNORE_INDEX) & (labels >= 0) & (labels < num_classes)]
        present[image, labels.long()] = True
    return present


class DcpClip(SegmentationMethod):
    """DCP-CLIP on a ViT CLIP: DCS → text-guided alignment → Spatial Enhanced Decoder → TV.

    The head runs when the module is training or ``trained_head`` is set (the builder sets it
    when it loads weights); otherwise :meth:`segment` takes the training-free path. The config's
    ``input_size`` fixes the patch grid A_CLIP is read at.
    """

    name = "dcp-clip"
    config_class = DcpClipConfig
    trained_head = False

    def __init__(self, *, config: DcpClipConfig, backbone: ClipBackbone) -> None:
        super().__init__()
        grid = require_vit(backbone, config.input_size, method="DCP-CLIP")  # [CLS] and A_CLIP
        self.config = config
        self.backbone = backbone
        layers = config.sed_layers
        guidance_layers = config.guidance_layers or _default_guidance_layers(
            backbone.num_layers, layers
        )
        self.feature_layers = tuple(guidance_layers[:layers]) if config.fuse_patch else ()
        self.cost_embedding = CostEmbedding(
            in_channels=len(resolve_templates(config.templates)), out_channels=config.cost_dim
        )  # Eq. 6
        self.alignment = (
            TextGuidedAlignment(config=config, embed_dim=backbone.embed_dim)
            if config.use_tga
            else None
        )
        self.decoder = (
            SpatialEnhancedDecoder(
                config=config,
                embed_dim=backbone.embed_dim,
                vision_width=backbone.layer_dims[0],
                attention_channels=grid * grid,
            )
            if layers
            else None
        )
        head_width = self.decoder.out_channels if self.decoder else config.cost_dim
        self.head = nn.Conv2d(head_width, 1, 3, padding=1)
        self._dcs_text: ExpiringEntry[TextEmbeddings] = ExpiringEntry()  # see _vocabulary_text

    def _uses_head(self) -> bool:
        return self.trained_head or self.training

    def clear_caches(self) -> None:
        super().clear_caches()
        self._dcs_text.clear()

    # ------------------------------------------------------------------------------ images
    def encode_image(self, images: Tensor) -> DenseFeatures:
        """``B×3×H×W`` images in [0, 1] → CLIP features.

        With the head: the fine-tuned CLIP's projected tokens (F_cls, F_patch), the guidance
        blocks and A_CLIP. Training-free: MaskCLIP dense features.
        """
        normalised = self.backbone.normalize(images)
        if not self._uses_head():
            return self.backbone.encode_image(normalised, dense_mode="maskclip")
        return self.backbone.encode_image(
            normalised,
            layers=self.feature_layers,
            dense_mode="standard",
            return_attention=self.decoder is not None and self.decoder.fuse_attention,
        )

    # -------------------------------------------------------------------------------- text
    def _text_tower_trains(self) -> bool:
        return self.training and self.backbone.text_tower_trains()

    def _vocabulary_text(self, classes: tuple[tuple[str, ...], ...]) -> TextEmbeddings:
        """E_C of the whole vocabulary for DCS and TV, without gradient and in float32 even under
        autocast, like DCS's scores (see :func:`select_categories`).

        While the text tower trains it changes every step, so the whole vocabulary is encoded
        again only every ``dcs_text_refresh_iters`` calls (spec §3.4).
        """

        def encode() -> TextEmbeddings:
            device_type = self.head.weight.device.type
            with torch.no_grad(), torch.autocast(device_type=device_type, enabled=False):
                return self.backbone.encode_text(classes, self.config.templates)

        if not self._text_tower_trains():
            return encode()
        key = (classes, resolve_templates(self.config.templates))
        return self._dcs_text.get(key, encode, max_uses=self.config.dcs_text_refresh_iters)

    def _selected_text(
        self, classes: tuple[tuple[str, ...], ...], text: TextEmbeddings, selected_classes: Tensor
    ) -> tuple[Tensor, Tensor]:
        """E_SC (``B×S×D``) and E_SC^P (``B×S×P×D``) of the ``B×S`` selected classes.

        While the text tower trains only the selected classes are encoded again, with gradient
        into its Q/V rows.
        """
        if not self._text_tower_trains():
            return text.mean[selected_classes], text.per_template[selected_classes]
        union, rows = selected_classes.unique(return_inverse=True)  # union sorted ascending
        fresh = self.backbone.encode_text(
            [classes[i] for i in union.tolist()], self.config.templates
        )
        return fresh.mean[rows], fresh.per_template[rows]

    # ----------------------------------------------------------------------------- segment
    def segment(
        self,
        image_features: DenseFeatures,
        vocabulary: VocabularyLike,
        *,
        return_intermediates: bool = False,
        target: Tensor | None = None,
        **options: Any,
    ) -> DcpClipOutput:
        """Segment encoded images with a vocabulary of C classes (see the base class).

        In training the classes of ``target`` are forced into the selection when
        ``train_force_gt_classes``; in eval it changes nothing, so an evaluation that passes
        labels sees exactly what inference does. The options (``SEGMENT_OPTIONS``: DCS's θ and τ,
        TV's settings) override the config for this call, without re-encoding the image.

        Intermediates: ``selection`` (:class:`CategorySelection`), ``selected_classes`` and
        ``num_selected`` (per image), ``coarse_cost_map`` (``B×S×h×w``, in ``selected_classes``
        order, then padding), ``fine_labels`` (``B×H×W``, before TV) and ``tag_validation`` (per
        image, one :class:`TagDecision` per unseen region).
        """
        config = self.config_with_options(options, SEGMENT_OPTIONS)
        classes = class_synonyms(vocabulary)
        text = self._vocabulary_text(classes)
        features = image_features
        tau = float(self.backbone.logit_scale.detach()) if config.tau is None else float(config.tau)
        selection = select_categories(
            features.global_embedding,
            features.dense,
            text.mean,
            theta=config.theta,
            tau=tau,
            enabled=config.use_dcs,
        )  # Eqs. 1–5
        if self.training and target is not None and config.train_force_gt_classes:
            selection = selection.with_forced(_target_classes(target, len(classes)))
        if config.max_selected is not None:
            selection = selection.capped(config.max_selected)
        selected_classes, class_mask = pad_class_subsets(selection.selected)

        if self._uses_head():
            selected_logits, coarse_cost_map = self._run_head(
                features, classes, text, selected_classes, class_mask
            )
        else:
            class_text = text.mean[selected_classes]
            coarse_cost_map = cosine_cost_volume(features.dense, class_text, per_image=True)
            selected_logits = upsample_logits(
                coarse_cost_map / config.temperature, features.input_size
            )
        logits = scatter_class_subsets(
            selected_logits, selected_classes, class_mask, len(classes), NOT_SELECTED_LOGIT
        )

        decisions: list[list[TagDecision]] = [[] for _ in range(logits.shape[0])]
        run_tag_validation = config.tag_validation and self._uses_head() and not self.training
        if run_tag_validation or return_intermediates:
            fine_labels = logits.argmax(dim=1)
        if run_tag_validation:  # Eq. 17
            logits, decisions = self._tag_validation(
                logits, fine_labels, features.dense, text.mean, classes, selection, config
            )
        intermediates = {}
        if return_intermediates:
            intermediates = {
                "selection": selection,
                "selected_classes": selection.indices(),
                "num_selected": selection.num_selected.tolist(),
                "coarse_cost_map": coarse_cost_map,
                "fine_labels": fine_labels,
                "tag_validation": decisions,
            }
        return DcpClipOutput(
            logits=logits,
            intermediates=intermediates,
            selected_logits=selected_logits,
            selected_classes=selected_classes,
            class_mask=class_mask,
        )

    def _check_features(self, features: DenseFeatures) -> None:
        """Refuse features the head cannot read: encoded for the training-free path (no guidance
        blocks or A_CLIP), or with A_CLIP at another patch grid than the decoder was built for."""
        attention = features.attention
        if any(f"layer{i}" not in features.intermediates for i in self.feature_layers) or (
            self.decoder is not None
            and self.decoder.fuse_attention
            and (attention is None or attention.shape[-1] != self.decoder.attention_channels)
        ):
            raise ValueError(
                f"These features cannot feed DCP-CLIP's head (built for input_size "
                f"{self.config.input_size}): encode the image at that size after setting "
                "trained_head or train()."
            )

    def _run_head(
        self,
        features: DenseFeatures,
        classes: tuple[tuple[str, ...], ...],
        text: TextEmbeddings,
        selected_classes: Tensor,
        class_mask: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """The trained path for the ``B×S`` selected classes only: ``B×S×H×W`` logits at the
        input size and the ``B×S×h×w`` initial cost map."""
        self._check_features(features)
        dense = features.dense
        batch, num_columns = selected_classes.shape
        height, width = dense.shape[-2:]
        class_text, class_templates = self._selected_text(classes, text, selected_classes)
        cost = cosine_cost_volume(dense, class_templates, per_image=True)  # Eq. 6: B×S×P×h×w
        cost_map = cost.mean(dim=2)  # the initial cost map, "F_sim"
        patches = dense.flatten(2).transpose(1, 2)  # F_patch, B×N×D
        if self.alignment is not None:  # Eqs. 7–10: F_patch^ref
            patches = self.alignment.align_patches(
                patches, features.global_embedding, class_text, class_mask
            )
        if self.decoder is not None:
            decoder_guidance = self.decoder.guidance(
                dense,
                [features.intermediates[f"layer{i}"] for i in self.feature_layers],
                features.attention,
            )
        outputs = []
        for chunk in class_slices(num_columns, self.config.class_chunk_size):
            cost_features = self.cost_embedding(cost[:, chunk])  # Eq. 6: B×s×D_c×h×w
            tokens = cost_features.flatten(3).transpose(2, 3)  # F_cv, B×s×N×D_c
            if self.alignment is not None:  # Eqs. 11–12: F_cv^ref
                tokens = self.alignment.fuse(tokens, patches)
            fine = tokens.transpose(2, 3).reshape(*tokens.shape[:2], -1, height, width)
            if self.decoder is not None:  # Eqs. 13–16: F_last
                fine = self.decoder(fine, cost_map[:, chunk, None], decoder_guidance)
            chunk_logits = self.head(fine.flatten(0, 1)).view(batch, -1, *fine.shape[-2:])
            outputs.append(upsample_logits(chunk_logits, features.input_size))
        return torch.cat(outputs, dim=1), cost_map

    def _tag_validation(
        self,
        logits: Tensor,
        labels: Tensor,
        dense: Tensor,
        class_embeddings: Tensor,
        classes: tuple[tuple[str, ...], ...],
        selection: CategorySelection,
        config: DcpClipConfig,
    ) -> tuple[Tensor, list[list[TagDecision]]]:
        """Run TV per image and move each relabelled region's winning logit to its new class.

        Swapping the two channels inside the region keeps every logit value, so the argmax
        there becomes the new class. TV is not differentiable: the result is detached.
        """
        seen = seen_class_mask(
            classes, toy=is_toy_clip(self.backbone), seen_names=config.seen_classes
        )
        seen = torch.tensor(seen, dtype=torch.bool, device=logits.device)
        decisions = []
        updated = None
        for image in range(logits.shape[0]):
            _, image_decisions = tag_validation(
                labels[image],
                dense[image],
                class_embeddings,
                seen=seen,
                rank_cutoff=int(config.tv_rank),
                candidates=selection.selected[image] if config.tv_restrict_to_selected else None,
            )
            decisions.append(image_decisions)
            for decision in image_decisions:
                if not decision.relabelled:
                    continue
                if updated is None:
                    updated = logits.detach().clone()
                region = labels[image] == decision.region_class
                old = updated[image, decision.region_class].clone()
                new = updated[image, decision.new_class].clone()
                updated[image, decision.region_class] = torch.where(region, new, old)
                updated[image, decision.new_class] = torch.where(region, old, new)
        return (logits if updated is None else updated), decisions

    # -------------------------------------------------------------------------------- loss
    def loss(self, output: SegmentationOutput, target: Tensor) -> dict[str, Tensor]:
        """Per-pixel binary cross-entropy on the selected channels of the fine output, averaged
        per image over labelled pixels × selected classes (``IGNORE_INDEX`` pixels and padding
        columns do not count), then over the batch (spec §9, item 31)."""
        if not isinstance(output, DcpClipOutput) or output.selected_logits is None:
            raise ValueError("DCP-CLIP's loss needs the DcpClipOutput that its segment returns.")
        logits = upsample_logits(output.selected_logits, target.shape[-2:])
        target = target.long()
        positives = target[:, None] == output.selected_classes[..., None, None]  # B×S×H×W
        counted = (target != IGNORE_INDEX)[:, None] & output.class_mask[..., None, None]
        counted = counted.to(logits.dtype)
        losses = binary_cross_entropy_with_logits(logits, positives.to(logits.dtype))
        per_image = (losses * counted).sum(dim=(1, 2, 3)) / counted.sum(dim=(1, 2, 3)).clamp_min(1)
        return {"loss_bce": per_image.mean()}

    # ------------------------------------------------------------------------ optimisation
    @property
    def clip_finetuning_scope(self) -> str:
        """CAT-Seg's "attention" scope: the Q/V projections of both towers and the position
        embeddings train; nothing of CLIP with ``finetune_clip=False``."""
        return "attention" if self.config.finetune_clip else "none"

    def parameter_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """The paper's AdamW groups: new layers at ``base_lr`` (2e-4), CLIP at
        ``base_lr · clip_lr_multiplier`` (2e-6), weight decay ``config.weight_decay`` (1e-4)."""
        self.set_clip_finetuning_scope()
        return optimiser.parameter_groups(
            self,
            lambda name, _: "clip" if name.startswith("backbone.") else "dcp-clip",
            lr={"dcp-clip": base_lr, "clip": base_lr * self.config.clip_lr_multiplier},
            weight_decay=self.config.weight_decay,
        )


build_dcp_clip = register_method("dcp-clip")(method_builder(DcpClip, shipped=SHIPPED_WEIGHTS))
