"""DCP-CLIP: coarse-to-fine open-vocabulary segmentation with dual interaction (Wang et al., 2025).

The file follows Section III of the paper (spec: ``specs/dcp-clip.md``):

1. **Dynamic Category Selection** (DCS, Eqs. 1–5, :func:`select_categories`). CLIP scores every
   vocabulary class per image ([CLS] softmax) and per patch (cosine, with the classes that
   dominate the image damped). The selected set is the union of the patch winners and the
   classes above θ. Only this set goes through the rest of the network, so its cost scales with
   C_s, not with the vocabulary.
2. **Text-guided alignment** (TGA, Eqs. 6–12, :class:`TextGuidedAlignment`), the *coarse* stage.
   A cosine cost volume over the selected classes is embedded (``F_cv``). Patch features
   cross-attend to a textual guidance built from the selected classes (text→visual), and a
   per-class spatial self-attention fuses them with ``F_cv`` into ``F_cv^ref``.
3. **Spatial Enhanced Decoder** (SED, Eqs. 13–16, :class:`SpatialEnhancedDecoder`), the *fine*
   stage: N_s layers of a Swin pair whose queries and keys also see encoder features and CLIP's
   attention maps, then 2× transposed-conv upsampling fused with the initial cost map and
   upsampled intermediate CLIP features. A 3×3 conv gives one logit per selected class; the other
   classes get :data:`NOT_SELECTED_LOGIT`.
4. **Tag Validation** (TV, Eq. 17, :func:`tag_validation`), inference only: a region predicted as
   an unseen class is re-scored from its mask-pooled features and relabelled when its label is not
   among the top-k.

Without trained head weights the method runs its training-free path: DCS on MaskCLIP dense
features, then the argmax of the cosine cost volume over the selected classes.

Where the paper is silent the spec's §9 recommendations are used: τ = CLIP's logit scale,
N_c = 2 cross-attention layers with 8 heads, one fusion self-attention layer with 4 heads, D_c =
128, a 7×7 cost-embedding conv over the P templates, a shared learnable prompt vector, the [CLS]
term of T_g as one cosine per class, Swin window 12 with 4 heads, the last block's head-averaged
attention as A_CLIP, and k = 5 for TV. Encoder features for the decoder come from blocks {4, 8}
of ViT-B/16's 12 and {8, 16} of ViT-L/14's 24 (1-based; CAT-Seg), i.e. at one and two thirds of
the depth; the same fractions give blocks {2, 4} of the toy ViT's 6 (0-based indices 1 and 3).

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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg.backbones import ClipBackbone, DenseFeatures, TextEmbeddings, is_toy_clip
from ovseg.caching import LruCache
from ovseg.errors import OptionError
from ovseg.methods.attention import CrossAttentionBlock, SelfAttentionBlock, SwinBlock
from ovseg.methods.base import (
    IGNORE_INDEX,
    MethodConfig,
    SegmentationMethod,
    SegmentationOutput,
    VocabularyLike,
)
from ovseg.methods.blocks import CostEmbedding, DoubleConv, cosine_cost_volume
from ovseg.methods.builder import method_builder, register_method
from ovseg.methods.chunking import class_slices, upsample_logits
from ovseg.prompts.templates import resolve_templates
from ovseg.vocabulary import class_synonyms, seen_class_mask

NOT_SELECTED_LOGIT = -100.0  # classes DCS leaves out: probability ≈ 0, never the argmax
SEGMENT_OPTIONS = ("theta", "tau", "tv_rank", "tag_validation", "seen_classes")
SHIPPED_WEIGHTS = "dcp-clip-toy.safetensors"


@dataclass
class DcpClipConfig(MethodConfig):
    """DCP-CLIP settings (beyond :class:`MethodConfig`). Defaults are the paper's full model.

    Dynamic Category Selection (§3):
        theta: image-level threshold θ of Eq. 4 (Table VII); 0 selects every class.
        tau: softmax scale of the image-level score (None: the CLIP's own logit scale, 100).
        use_dcs: False skips the selection and runs every class (Table III).
        train_force_gt_classes: in training, add the ground-truth classes of ``target`` to the
            selection.
        max_selected: optional cap on C_s (ranked by ground truth, image level, patch votes).
        dcs_text_refresh_iters: in training, re-encode the whole vocabulary for DCS (no grad)
            only this often; the selected classes are always re-encoded with gradient.

    Text-guided alignment, the coarse stage (§2.4–2.7, Tables IV–V):
        cost_dim: D_c, the cost-volume feature width.
        use_tga: False feeds the embedded cost volume straight to the decoder (Table III); with
            ``sed_layers=0`` too, the head reads it directly: the "fine-tuned CLIP" baseline.
        tga_cross_attention: the text→visual cross-attention branch (CA).
        tga_self_attention: the cost/visual fusion self-attention branch (SA); without it the
            concatenation is fused by a linear layer.
        guidance_cls_logits: the [CLS] term of T_g: ``"cosine"`` (one logit per class),
            ``"hadamard"`` (D channels) or ``"none"``.
        guidance_prompt: the learnable prompt term of T_g.
        cross_attention_layers, cross_attention_heads: N_c and its heads.
        self_attention_layers, self_attention_heads: fusion self-attention depth and heads.
        mlp_ratio: MLP width of every transformer block, as a multiple of its width.

    Spatial Enhanced Decoder, the fine stage (§2.8, Table VI):
        sed_layers: N_s (0: the head reads ``F_cv^ref`` at the patch grid).
        spatial_enhance: the Swin pair in each layer (Table VI a).
        fuse_patch: encoder features as Swin guidance and decoder skip input ("F_patch").
        fuse_sim: the initial cost map concatenated in each upsampling stage ("F_sim").
        fuse_attention: CLIP's attention maps as Swin guidance ("A_CLIP").
        swin_heads, window_size: Swin attention heads and window side.
        guidance_layers: 0-based ViT blocks whose tokens feed the decoder (None: one and two
            thirds of the depth, the papers' blocks 4 and 8 of 12).

    Tag Validation (§4.3):
        tag_validation: run TV at inference.
        tv_rank: k; a region is relabelled when its label ranks below k.
        tv_restrict_to_selected: only relabel to classes DCS selected.
        seen_classes: names of the classes the head was trained on (None: ToyWorld's seen
            classes for a toy CLIP, COCO-Stuff-171 otherwise; see
            :func:`~ovseg.vocabulary.seen_class_mask`).

    Other:
        temperature: divides the cosine scores into logits on the training-free path.
        finetune_clip: train CLIP's attention Q/V rows and position embeddings and freeze the
            rest (False: freeze all of CLIP).
        clip_lr_multiplier: CLIP's learning rate as a fraction of the base (2e-6 / 2e-4).
        weight_decay: AdamW weight decay of the parameter groups.
        class_chunk_size: selected classes run through the per-class layers at a time.
    """

    theta: float = 0.5
    tau: float | None = None
    use_dcs: bool = True
    train_force_gt_classes: bool = True
    max_selected: int | None = None
    dcs_text_refresh_iters: int = 100
    cost_dim: int = 128
    use_tga: bool = True
    tga_cross_attention: bool = True
    tga_self_attention: bool = True
    guidance_cls_logits: str = "cosine"
    guidance_prompt: bool = True
    cross_attention_layers: int = 2
    cross_attention_heads: int = 8
    self_attention_layers: int = 1
    self_attention_heads: int = 4
    mlp_ratio: float = 4.0
    sed_layers: int = 2
    spatial_enhance: bool = True
    fuse_patch: bool = True
    fuse_sim: bool = True
    fuse_attention: bool = True
    swin_heads: int = 4
    window_size: int = 12
    guidance_layers: tuple[int, ...] | None = None
    tag_validation: bool = True
    tv_rank: int = 5
    tv_restrict_to_selected: bool = False
    seen_classes: tuple[str, ...] | None = None
    temperature: float = 0.01
    finetune_clip: bool = True
    clip_lr_multiplier: float = 0.01
    weight_decay: float = 1e-4
    class_chunk_size: int = 16

    def __post_init__(self) -> None:
        _check_theta(self.theta)
        _check_rank(self.tv_rank)
        if self.guidance_cls_logits not in ("cosine", "hadamard", "none"):
            raise ValueError(
                "guidance_cls_logits must be 'cosine', 'hadamard' or 'none'; "
                f"got {self.guidance_cls_logits!r}."
            )
        if self.sed_layers < 0 or self.cost_dim % (4 * 2 ** max(self.sed_layers - 1, 0)):
            raise ValueError(
                f"cost_dim {self.cost_dim} must halve sed_layers={self.sed_layers} times and "
                "stay divisible by 4 (the decoder's skip width is a quarter of its width)."
            )
        if self.tga_cross_attention and self.use_tga and self.cross_attention_layers < 1:
            raise ValueError("The cross-attention branch needs cross_attention_layers >= 1.")
        if self.max_selected is not None and self.max_selected < 1:
            raise ValueError(f"max_selected must be at least 1; got {self.max_selected}.")
        if self.class_chunk_size < 1:
            raise ValueError(f"class_chunk_size must be at least 1; got {self.class_chunk_size}.")


def _check_theta(theta: float) -> None:
    if not 0.0 <= theta <= 1.0:
        raise OptionError(f"theta must be in [0, 1]; got {theta}.")


def _check_rank(rank: int) -> None:
    if int(rank) != rank or rank < 0:
        raise OptionError(f"tv_rank must be a non-negative integer; got {rank}.")


@dataclass
class DcpClipOutput(SegmentationOutput):
    """DCP-CLIP's output: the full-vocabulary logits plus what the loss needs.

    Attributes:
        selected_logits: ``B×S×H×W`` logits of each image's selected classes, padded to the
            largest C_s of the batch (S).
        selected_classes: ``B×S`` vocabulary indices of each image's selected classes, sorted,
            then padding (which repeats a valid index).
        class_mask: ``B×S`` bool, False for padding.
    """

    selected_logits: Tensor | None = None
    selected_classes: Tensor | None = None
    class_mask: Tensor | None = None


# ------------------------------------------------------------------ Dynamic Category Selection


@dataclass
class CategorySelection:
    """Dynamic Category Selection for a batch (Eqs. 1–5): the scores, the sets and their union.

    Attributes:
        image_scores: ``B×C`` S_img, softmax over the vocabulary of τ·cos(F_cls, E_t).
        patch_scores: ``B×C×N`` S_patch, cos(F_patch, E_t).
        refined_patch_scores: ``B×C×N`` S_patch_ref = S_patch · (1 − S_img) (Eq. 2).
        from_patch: ``B×C`` bool, C_patch (Eq. 3).
        from_image: ``B×C`` bool, C_image (Eq. 4).
        forced: ``B×C`` bool, ground-truth classes added in training.
        dropped: ``B×C`` bool, classes removed by ``max_selected``.
        selected: ``B×C`` bool, C_final (Eq. 5, then forcing and the cap).
        grid: ``(h, w)`` of the patch grid (N = h·w).
        theta, tau: the threshold and softmax scale used.
        enabled: False when DCS was switched off (every class selected).
    """

    image_scores: Tensor
    patch_scores: Tensor
    refined_patch_scores: Tensor
    from_patch: Tensor
    from_image: Tensor
    forced: Tensor
    dropped: Tensor
    selected: Tensor
    grid: tuple[int, int]
    theta: float
    tau: float
    enabled: bool = True

    @property
    def patch_winners(self) -> Tensor:
        """``B×N`` ĉ_i, the class each patch votes for after suppression (Eq. 3)."""
        return self.refined_patch_scores.argmax(dim=1)

    @property
    def raw_patch_winners(self) -> Tensor:
        """``B×N`` the argmax of S_patch before suppression."""
        return self.patch_scores.argmax(dim=1)

    @property
    def patch_votes(self) -> Tensor:
        """``B×C`` number of patches voting for each class after suppression."""
        return _count(self.patch_winners, self.image_scores.shape[1])

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


def _count(winners: Tensor, num_classes: int) -> Tensor:
    counts = torch.zeros(winners.shape[0], num_classes, dtype=torch.long, device=winners.device)
    return counts.scatter_add_(1, winners, torch.ones_like(winners))


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
    171-class near-tie. The image features themselves still come from the (mixed-precision)
    CLIP forward, so training and float32 inference can still differ a little: on a random toy
    ViT, bf16 features changed 0.8% of patch winners and 1 of 96 selected classes.
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
        grid=tuple(dense.shape[-2:]),
        theta=float(theta),
        tau=float(tau),
        enabled=enabled,
    )


# ----------------------------------------------------------------------- text-guided alignment


class TextualGuidance(nn.Module):
    """``T_g = φ(concat[F_cls·E_SC, E_SC, P])`` (Eq. 7): one guidance token per selected class."""

    def __init__(self, *, embed_dim: int, cls_logits: str = "cosine", prompt: bool = True) -> None:
        """
        Arguments:
            embed_dim: D, the CLIP joint embedding width.
            cls_logits: the [CLS] term: ``"cosine"`` (1 channel), ``"hadamard"`` (D) or
                ``"none"``.
            prompt: include the learnable prompt, one vector shared by all classes (C_s varies
                per image, so a per-class prompt cannot exist).
        """
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
    fusion runs per class and is called on chunks of classes.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        cost_dim: int,
        cross_attention: bool = True,
        self_attention: bool = True,
        cross_layers: int = 2,
        cross_heads: int = 8,
        self_layers: int = 1,
        self_heads: int = 4,
        mlp_ratio: float = 4.0,
        cls_logits: str = "cosine",
        prompt: bool = True,
    ) -> None:
        """
        Arguments:
            embed_dim: D, width of F_patch and the text embeddings.
            cost_dim: D_c, width of the cost features.
            cross_attention: the CA branch (Table IV); without it F_patch is used unrefined.
            self_attention: the SA branch (Table IV); without it a linear layer fuses the
                concatenation (with a residual to F_cv).
            cross_layers, cross_heads: N_c and its heads.
            self_layers, self_heads: fusion depth and heads.
            mlp_ratio: MLP width of the blocks.
            cls_logits, prompt: the terms of T_g (Table V), see :class:`TextualGuidance`.
        """
        super().__init__()
        self.guidance = (
            TextualGuidance(embed_dim=embed_dim, cls_logits=cls_logits, prompt=prompt)
            if cross_attention
            else None
        )
        self.cross_layers = nn.ModuleList(
            CrossAttentionBlock(dim=embed_dim, heads=cross_heads, mlp_ratio=mlp_ratio)
            for _ in range(cross_layers if cross_attention else 0)
        )
        self.patch_projection = nn.Linear(embed_dim, cost_dim)  # φ of Eq. 11
        self.fusion_layers = nn.ModuleList(
            SelfAttentionBlock(
                dim=cost_dim, heads=self_heads, input_dim=2 * cost_dim, mlp_ratio=mlp_ratio
            )
            for _ in range(self_layers if self_attention else 0)
        )
        self.linear_fusion = None if self_attention else nn.Linear(2 * cost_dim, cost_dim)

    def align_patches(
        self,
        patches: Tensor,
        cls_embedding: Tensor,
        class_text: Tensor,
        class_mask: Tensor,
        *,
        return_attention: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Inject the selected classes' semantics into the patch features.

        Arguments:
            patches: ``B×N×D`` F_patch (raw projected tokens).
            cls_embedding: ``B×D`` F_cls.
            class_text: ``B×S×D`` E_SC.
            class_mask: ``B×S`` bool, False for padding (masked out of the keys).
            return_attention: also return the last layer's head-averaged weights.

        Returns:
            ``B×N×D`` F_patch^ref, ``B×S×D`` T_g (None without CA), and ``B×N×S`` attention
            weights (None unless asked for).
        """
        if self.guidance is None:
            return patches, None, None
        guidance = self.guidance(cls_embedding, class_text)  # Eq. 7
        weights = None
        for index, layer in enumerate(self.cross_layers):  # Eqs. 8–10, N_c times
            if return_attention and index == len(self.cross_layers) - 1:
                patches, weights = layer(
                    patches, guidance, context_mask=class_mask, return_attention=True
                )
                weights = weights.mean(dim=1)
            else:
                patches = layer(patches, guidance, context_mask=class_mask)
        return patches, guidance, weights

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
    """Class-agnostic inputs of the decoder, computed once per image and shared by all classes.

    Attributes:
        swin: per layer i, ``B×g_i×(h·2^i)×(w·2^i)`` Swin Q/K guidance (None: no guidance).
        skip: per layer i, ``B×(d_i/4)×(h·2^(i+1))×(w·2^(i+1))`` encoder features for the
            upsampling stage (None without ``fuse_patch``).
    """

    swin: list[Tensor | None]
    skip: list[Tensor | None]


def _repeat_over_classes(features: Tensor, classes: int) -> Tensor:
    """``B×C×H×W`` → ``(B·classes)×C×H×W``."""
    return features[:, None].expand(-1, classes, -1, -1, -1).flatten(0, 1)


class SpatialEnhancedDecoder(nn.Module):
    """The fine stage (Eqs. 13–16): N_s × [Swin pair with guidance → ConvT 2× → fuse].

    Layer i works at ``(h·2^i)×(w·2^i)`` with ``d_i = D_c / 2^i`` channels. Its Swin pair takes
    queries and keys from the class features concatenated with guidance (conv of the dense
    features at i = 0 or of the upsampled block features after, and conv of A_CLIP), values from
    the class features alone. The upsampling stage concatenates the initial cost map and the
    next level's encoder features and halves the channels.
    """

    def __init__(
        self,
        *,
        cost_dim: int,
        layers: int,
        embed_dim: int,
        vision_width: int,
        attention_channels: int,
        window_size: int = 12,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        spatial_enhance: bool = True,
        fuse_patch: bool = True,
        fuse_sim: bool = True,
        fuse_attention: bool = True,
    ) -> None:
        """
        Arguments:
            cost_dim: D_c = d_0, width of F_cv^ref.
            layers: N_s ≥ 1.
            embed_dim: D, width of F_patch (level-0 guidance).
            vision_width: D_v, width of the intermediate ViT tokens.
            attention_channels: N = h·w, the patch count A_CLIP rows have (fixed by the input
                size the model is built for).
            window_size, heads, mlp_ratio: Swin settings.
            spatial_enhance: the Swin pairs (Table VI a).
            fuse_patch, fuse_sim, fuse_attention: the fusion sources (Table VI c).
        """
        super().__init__()
        self.layers = layers
        self.dims = [cost_dim // 2**i for i in range(layers + 1)]
        self.spatial_enhance = spatial_enhance
        self.fuse_patch = fuse_patch
        self.fuse_sim = fuse_sim
        self.fuse_attention = fuse_attention and spatial_enhance
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
            if fuse_patch:
                scale = 2 ** (level + 1)
                self.feature_upsamplers.append(
                    nn.ConvTranspose2d(vision_width, 2 * width, scale, stride=scale)
                )
                self.skip_projections.append(_conv_relu(2 * width, width // 4))
            if spatial_enhance:
                guidance_width = 0
                if fuse_patch:
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
                            heads=heads,
                            window_size=window_size,
                            shift=shift,
                            guidance_dim=guidance_width,
                            mlp_ratio=mlp_ratio,
                        )
                        for shift in (False, True)
                    )
                )
            self.upsamplers.append(nn.ConvTranspose2d(width, width, 2, stride=2))  # Eq. 15
            fused_width = width + int(fuse_sim) + (width // 4 if fuse_patch else 0)
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
        """
        Arguments:
            x: ``B×s×D_c×h×w`` F_cv^ref of a chunk of classes.
            cost_map: ``B×s×1×h×w`` the initial (template-averaged) cost map of those classes.
            guidance: from :meth:`guidance`.

        Returns:
            ``B×s×(D_c/2^N_s)×(h·2^N_s)×(w·2^N_s)``, F_last.
        """
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
            if self.fuse_patch:
                parts.append(_repeat_over_classes(guidance.skip[level], classes))
            x = self.fusions[level](torch.cat(parts, dim=1))  # Eq. 16
        return x.view(batch, classes, *x.shape[1:])


# ------------------------------------------------------------------------------ Tag Validation


@dataclass(frozen=True)
class TagDecision:
    """Tag Validation's verdict on one unseen-class region (Eq. 17).

    Attributes:
        region_class: the label the region was predicted as.
        new_class: the best class of the mask-pooled re-scoring.
        rank: 1-based rank of ``region_class`` in the re-scoring.
        rank_cutoff: k.
        pixels: region size.
        relabelled: whether the region was changed to ``new_class`` (rank > k).
    """

    region_class: int
    new_class: int
    rank: int
    rank_cutoff: int
    pixels: int
    relabelled: bool


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
        seen: ``C`` bool, classes the head was trained on.
        rank_cutoff: k.
        candidates: ``C`` bool, the classes a region may be relabelled to (default: all).

    Returns:
        The new label map and one :class:`TagDecision` per unseen region.
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
        decisions.append(
            TagDecision(
                region_class=region_class,
                new_class=new_class,
                rank=rank,
                rank_cutoff=rank_cutoff,
                pixels=int(pixels[row]),
                relabelled=relabelled,
            )
        )
    return new_labels, decisions


# ------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class _SegmentOptions:
    """The options of one :meth:`DcpClip.segment` call, resolved against the config."""

    theta: float  # θ of Eq. 4
    tau: float  # the softmax scale of S_img (Eq. 1)
    tv_rank: int  # k of Eq. 17
    tag_validation: bool
    seen_classes: tuple[str, ...] | None  # None: the default of seen_class_mask


@dataclass
class _EncodedVocabulary:
    """E_C of the whole vocabulary, and the training call it was encoded at."""

    encoded_at_call: int
    text: TextEmbeddings


def _default_guidance_layers(depth: int, count: int) -> tuple[int, ...]:
    """0-based blocks at (i+1)/(n+1) of the depth, n = max(2, count): 12 → (3, 7), 6 → (1, 3)."""
    parts = max(2, count)
    return tuple(round(depth * (i + 1) / (parts + 1)) - 1 for i in range(count))


class DcpClip(SegmentationMethod):
    """DCP-CLIP on a ViT CLIP: DCS → text-guided alignment → Spatial Enhanced Decoder → TV.

    The head runs when the module is training or ``trained_head`` is set; otherwise
    :meth:`segment` takes the training-free path. Set ``trained_head = True`` after training a
    head (the builder does when it loads weights).
    """

    name = "dcp-clip"
    config_class = DcpClipConfig
    trained_head = False

    def __init__(self, *, config: DcpClipConfig, backbone: ClipBackbone) -> None:
        """
        Arguments:
            config: the settings; ``input_size`` fixes the patch grid A_CLIP is read at.
            backbone: a ViT CLIP. Training the method (``train()``, ``parameter_groups``) sets
                its fine-tuning scope (Q/V and position embeddings; nothing with
                ``finetune_clip=False``); building it changes nothing.
        """
        super().__init__()
        if backbone.kind != "vit":
            raise ValueError(
                f"DCP-CLIP reads the [CLS] token and attention maps of a ViT CLIP; "
                f"{backbone.name} has a {backbone.kind} image tower."
            )
        if config.input_size % backbone.stride:
            raise ValueError(
                f"input_size {config.input_size} is not a multiple of the patch size "
                f"{backbone.stride}."
            )
        self.config = config
        self.backbone = backbone
        grid = config.input_size // backbone.stride
        layers = config.sed_layers
        guidance_layers = config.guidance_layers or _default_guidance_layers(
            backbone.num_layers, layers
        )
        if len(guidance_layers) < layers:
            raise ValueError(
                f"sed_layers={layers} needs {layers} guidance_layers; got {guidance_layers}."
            )
        self.feature_layers = tuple(guidance_layers[:layers]) if config.fuse_patch else ()
        self.cost_embedding = CostEmbedding(
            in_channels=len(resolve_templates(config.templates)), out_channels=config.cost_dim
        )  # Eq. 6
        self.alignment = (
            TextGuidedAlignment(
                embed_dim=backbone.embed_dim,
                cost_dim=config.cost_dim,
                cross_attention=config.tga_cross_attention,
                self_attention=config.tga_self_attention,
                cross_layers=config.cross_attention_layers,
                cross_heads=config.cross_attention_heads,
                self_layers=config.self_attention_layers,
                self_heads=config.self_attention_heads,
                mlp_ratio=config.mlp_ratio,
                cls_logits=config.guidance_cls_logits,
                prompt=config.guidance_prompt,
            )
            if config.use_tga
            else None
        )
        self.decoder = (
            SpatialEnhancedDecoder(
                cost_dim=config.cost_dim,
                layers=layers,
                embed_dim=backbone.embed_dim,
                vision_width=backbone.layer_dims[0],
                attention_channels=grid * grid,
                window_size=config.window_size,
                heads=config.swin_heads,
                mlp_ratio=config.mlp_ratio,
                spatial_enhance=config.spatial_enhance,
                fuse_patch=config.fuse_patch,
                fuse_sim=config.fuse_sim,
                fuse_attention=config.fuse_attention,
            )
            if layers
            else None
        )
        head_width = self.decoder.out_channels if self.decoder else config.cost_dim
        self.head = nn.Conv2d(head_width, 1, 3, padding=1)
        # In training, DCS reads a whole-vocabulary encoding that is refreshed only every
        # dcs_text_refresh_iters calls (spec §3.4); the last vocabulary's is cached.
        self._dcs_text: LruCache[_EncodedVocabulary] = LruCache(max_entries=1)
        self._training_calls = 0  # segment calls that encoded text with a training text tower

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
        return (
            self.training
            and torch.is_grad_enabled()
            and any(
                parameter.requires_grad
                for name, parameter in self.backbone.model.named_parameters()
                if not name.startswith("visual.")
            )
        )

    def _vocabulary_text(self, classes: tuple[tuple[str, ...], ...]) -> TextEmbeddings:
        """E_C of the whole vocabulary for DCS and TV, in float32 and without gradient.

        While the text tower trains it changes every step, so the whole vocabulary is encoded
        again only every ``dcs_text_refresh_iters`` calls (spec §3.4).
        """
        if not self._text_tower_trains():
            return self._encode_vocabulary_fp32(classes)
        call = self._training_calls
        self._training_calls += 1
        key = (classes, resolve_templates(self.config.templates))
        cached = self._dcs_text.get(key)
        if cached is None or call - cached.encoded_at_call >= self.config.dcs_text_refresh_iters:
            cached = self._dcs_text.put(
                key, _EncodedVocabulary(call, self._encode_vocabulary_fp32(classes))
            )
        return cached.text

    def _encode_vocabulary_fp32(self, classes: tuple[tuple[str, ...], ...]) -> TextEmbeddings:
        """E_C in float32 even under autocast, like DCS's scores (see :func:`select_categories`)."""
        device_type = self.head.weight.device.type
        with torch.no_grad(), torch.autocast(device_type=device_type, enabled=False):
            return self.backbone.encode_text(classes, self.config.templates)

    def _selected_text(
        self,
        classes: tuple[tuple[str, ...], ...],
        text: TextEmbeddings,
        selected_classes: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """E_SC (``B×S×D``) and E_SC^P (``B×S×P×D``) of the ``B×S`` selected classes.

        While the text tower trains only the selected classes are encoded again, with gradient
        into its Q/V rows.
        """
        if not self._text_tower_trains():
            return text.mean[selected_classes], text.per_template[selected_classes]
        union = sorted(set(selected_classes.flatten().tolist()))
        fresh = self.backbone.encode_text([classes[i] for i in union], self.config.templates)
        row_of_class = torch.zeros(len(classes), dtype=torch.long, device=selected_classes.device)
        row_of_class[union] = torch.arange(len(union), device=selected_classes.device)
        rows = row_of_class[selected_classes]
        return fresh.mean[rows], fresh.per_template[rows]

    # ----------------------------------------------------------------------------- segment
    def _options(self, options: dict[str, Any]) -> _SegmentOptions:
        unknown = set(options) - set(SEGMENT_OPTIONS)
        if unknown:
            raise ValueError(
                f"dcp-clip has no option(s) {sorted(unknown)}; known: {list(SEGMENT_OPTIONS)}."
            )
        theta = float(options.get("theta", self.config.theta))
        _check_theta(theta)
        tau = options.get("tau", self.config.tau)
        tv_rank = options.get("tv_rank", self.config.tv_rank)
        _check_rank(tv_rank)
        seen = options.get("seen_classes", self.config.seen_classes)
        return _SegmentOptions(
            theta=theta,
            tau=float(self.backbone.logit_scale.detach()) if tau is None else float(tau),
            tv_rank=int(tv_rank),
            tag_validation=bool(options.get("tag_validation", self.config.tag_validation)),
            seen_classes=None if seen is None else tuple(seen),
        )

    def segment(
        self,
        image_features: DenseFeatures,
        vocabulary: VocabularyLike,
        *,
        return_intermediates: bool = False,
        target: Tensor | None = None,
        **options: Any,
    ) -> DcpClipOutput:
        """Segment encoded images with a vocabulary of C classes.

        Arguments:
            image_features: from :meth:`encode_image`.
            vocabulary: class names or synonym tuples.
            return_intermediates: also return the selection, coarse/fine predictions and TV's
                decisions (see the keys below).
            target: ``B×H×W`` ground truth. In training its classes are forced into the
                selection when ``train_force_gt_classes``; in eval it changes nothing, so an
                evaluation that passes labels sees exactly what inference does.
            options: ``theta``, ``tau`` (DCS), ``tv_rank``, ``tag_validation``, ``seen_classes``
                (TV); they override the config for this call, without re-encoding the image.

        Intermediates: ``selection`` (:class:`CategorySelection`), ``selected_classes`` (per
        image, the sorted vocabulary indices), ``num_selected``, ``patch_winners_raw`` and
        ``patch_winners`` (``B×h×w``, before/after suppression), ``coarse_cost_map``
        (``B×S×h×w``, the selected classes in ``selected_classes`` order, then padding),
        ``fine_labels`` and ``labels`` (``B×H×W``, before/after TV), ``tag_validation`` (per
        image, one :class:`TagDecision` per unseen region); with the head also
        ``cost_features`` (F_cv), ``refined_cost_features`` (F_cv^ref), ``textual_guidance``
        (T_g), ``refined_patch_features`` (F_patch^ref), ``cross_attention`` (``B×N×S``) and
        ``fine_features`` (F_last); training-free also ``cost_volume``.
        """
        settings = self._options(options)
        classes = class_synonyms(vocabulary)
        text = self._vocabulary_text(classes)
        features = image_features
        selection = select_categories(
            features.global_embedding,
            features.dense,
            text.mean,
            theta=settings.theta,
            tau=settings.tau,
            enabled=self.config.use_dcs,
        )  # Eqs. 1–5
        if self.training and target is not None and self.config.train_force_gt_classes:
            selection = selection.with_forced(_target_classes(target, len(classes)))
        if self.config.max_selected is not None:
            selection = selection.capped(self.config.max_selected)
        selected_classes, class_mask = _pad_selection(selection)
        intermediates: dict[str, Any] | None = {} if return_intermediates else None

        if self._uses_head():
            selected_logits, coarse_cost_map = self._run_head(
                features, classes, text, selected_classes, class_mask, intermediates
            )
        else:
            class_text = text.mean[selected_classes]
            coarse_cost_map = cosine_cost_volume(features.dense, class_text, per_image=True)
            selected_logits = upsample_logits(
                coarse_cost_map / self.config.temperature, features.input_size
            )
            if intermediates is not None:
                intermediates["cost_volume"] = coarse_cost_map
        logits = _scatter(selected_logits, selected_classes, class_mask, len(classes))

        decisions: list[list[TagDecision]] = [[] for _ in range(logits.shape[0])]
        run_tag_validation = settings.tag_validation and self._uses_head() and not self.training
        if run_tag_validation or intermediates is not None:
            fine_labels = logits.argmax(dim=1)
        if run_tag_validation:  # Eq. 17
            logits, decisions = self._tag_validation(
                logits, fine_labels, features.dense, text.mean, classes, selection, settings
            )
        if intermediates is not None:
            batch, grid = logits.shape[0], selection.grid
            intermediates.update(
                selection=selection,
                selected_classes=selection.indices(),
                num_selected=selection.num_selected.tolist(),
                patch_winners_raw=selection.raw_patch_winners.view(batch, *grid),
                patch_winners=selection.patch_winners.view(batch, *grid),
                coarse_cost_map=coarse_cost_map,
                fine_labels=fine_labels,
                labels=logits.argmax(dim=1),
                tag_validation=decisions,
            )
        return DcpClipOutput(
            logits=logits,
            intermediates=intermediates or {},
            selected_logits=selected_logits,
            selected_classes=selected_classes,
            class_mask=class_mask,
        )

    def _check_features(self, features: DenseFeatures) -> None:
        missing = [
            f"layer{i}" for i in self.feature_layers if f"layer{i}" not in features.intermediates
        ]
        needs_attention = self.decoder is not None and self.decoder.fuse_attention
        if missing or (needs_attention and features.attention is None):
            raise ValueError(
                "These features were encoded for the training-free path (no guidance blocks or "
                "attention maps); encode the image again after setting trained_head or train()."
            )
        if needs_attention and features.attention.shape[-1] != self.decoder.attention_channels:
            raise ValueError(
                f"DCP-CLIP was built for input_size {self.config.input_size} "
                f"({self.decoder.attention_channels} patches); the image was encoded at "
                f"{tuple(features.input_size)} ({features.attention.shape[-1]} patches)."
            )

    def _run_head(
        self,
        features: DenseFeatures,
        classes: tuple[tuple[str, ...], ...],
        text: TextEmbeddings,
        selected_classes: Tensor,
        class_mask: Tensor,
        intermediates: dict[str, Any] | None,
    ) -> tuple[Tensor, Tensor]:
        """The trained path for the ``B×S`` selected classes only.

        Returns ``B×S×H×W`` logits at the input size and the ``B×S×h×w`` initial cost map.
        """
        self._check_features(features)
        dense = features.dense
        batch, num_columns = selected_classes.shape
        height, width = dense.shape[-2:]
        class_text, class_templates = self._selected_text(classes, text, selected_classes)
        cost = cosine_cost_volume(dense, class_templates, per_image=True)  # Eq. 6: B×S×P×h×w
        cost_map = cost.mean(dim=2)  # the initial cost map, "F_sim"
        patches = dense.flatten(2).transpose(1, 2)  # F_patch, B×N×D
        guidance_tokens = attention = None
        if self.alignment is not None:
            patches, guidance_tokens, attention = self.alignment.align_patches(
                patches,
                features.global_embedding,
                class_text,
                class_mask,
                return_attention=intermediates is not None,
            )  # Eqs. 7–10
        decoder_guidance = None
        if self.decoder is not None:
            decoder_guidance = self.decoder.guidance(
                dense,
                [features.intermediates[f"layer{i}"] for i in self.feature_layers],
                features.attention,
            )
        outputs = []
        chunk_features: dict[str, list[Tensor]] = {
            "cost_features": [],
            "refined_cost_features": [],
            "fine_features": [],
        }
        for chunk in class_slices(num_columns, self.config.class_chunk_size):
            cost_features = self.cost_embedding(cost[:, chunk])  # Eq. 6: B×s×D_c×h×w
            tokens = cost_features.flatten(3).transpose(2, 3)  # F_cv, B×s×N×D_c
            refined = tokens if self.alignment is None else self.alignment.fuse(tokens, patches)
            fine = refined.transpose(2, 3).reshape(*refined.shape[:2], -1, height, width)
            if self.decoder is not None:  # Eqs. 13–16
                fine = self.decoder(fine, cost_map[:, chunk, None], decoder_guidance)
            chunk_logits = self.head(fine.flatten(0, 1)).view(batch, -1, *fine.shape[-2:])
            outputs.append(upsample_logits(chunk_logits, features.input_size))
            if intermediates is not None:
                chunk_features["cost_features"].append(tokens)
                chunk_features["refined_cost_features"].append(refined)
                chunk_features["fine_features"].append(fine)
        if intermediates is not None:
            for key, parts in chunk_features.items():
                intermediates[key] = torch.cat(parts, dim=1)
            intermediates["refined_patch_features"] = patches
            if guidance_tokens is not None:
                intermediates["textual_guidance"] = guidance_tokens
                intermediates["cross_attention"] = attention
        return torch.cat(outputs, dim=1), cost_map

    def _tag_validation(
        self,
        logits: Tensor,
        labels: Tensor,
        dense: Tensor,
        class_embeddings: Tensor,
        classes: tuple[tuple[str, ...], ...],
        selection: CategorySelection,
        settings: _SegmentOptions,
    ) -> tuple[Tensor, list[list[TagDecision]]]:
        """Run TV per image and move each relabelled region's winning logit to its new class.

        Swapping the two channels inside the region keeps every logit value, so the argmax
        there becomes the new class. TV is not differentiable: the result is detached.
        """
        seen = seen_class_mask(
            classes, toy=is_toy_clip(self.backbone), seen_names=settings.seen_classes
        )
        seen = torch.tensor(seen, dtype=torch.bool, device=logits.device)
        decisions = []
        updated = None
        for image in range(logits.shape[0]):
            candidates = selection.selected[image] if self.config.tv_restrict_to_selected else None
            _, image_decisions = tag_validation(
                labels[image],
                dense[image],
                class_embeddings,
                seen=seen,
                rank_cutoff=settings.tv_rank,
                candidates=candidates,
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
        """Per-pixel binary cross-entropy on the selected channels of the fine output.

        Averaged over labelled pixels × selected classes per image, then over the batch;
        ``IGNORE_INDEX`` pixels and padding columns do not count.
        """
        if not isinstance(output, DcpClipOutput) or output.selected_logits is None:
            raise ValueError("DCP-CLIP's loss needs the DcpClipOutput that its segment returns.")
        logits = output.selected_logits
        if tuple(logits.shape[-2:]) != tuple(target.shape[-2:]):
            logits = upsample_logits(logits, target.shape[-2:])
        target = target.long()
        positives = target[:, None] == output.selected_classes[..., None, None]  # B×S×H×W
        weights = (target != IGNORE_INDEX)[:, None] & output.class_mask[..., None, None]
        weights = weights.to(logits.dtype)
        losses = F.binary_cross_entropy_with_logits(
            logits, positives.to(logits.dtype), reduction="none"
        )
        per_image = (losses * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3)).clamp_min(1)
        return {"loss_bce": per_image.mean()}

    # ------------------------------------------------------------------------ optimisation
    @property
    def clip_finetuning_scope(self) -> str:
        """CAT-Seg's "attention" scope: Q/V projections of every block of both towers and the
        position embeddings train (at the CLIP learning rate); K and everything else stay
        frozen, and all of CLIP does with ``finetune_clip=False``."""
        return "attention" if self.config.finetune_clip else "none"

    def parameter_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """AdamW groups of the paper: new layers at ``base_lr`` (2e-4), CLIP at
        ``base_lr · clip_lr_multiplier`` (2e-6), weight decay ``config.weight_decay`` (1e-4)."""
        self.set_clip_finetuning_scope()
        clip_lr = base_lr * self.config.clip_lr_multiplier
        head, clip = [], []
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                (clip if name.startswith("backbone.") else head).append(parameter)
        decay = self.config.weight_decay
        groups = [
            {"name": "dcp-clip", "params": head, "lr": base_lr, "weight_decay": decay},
            {"name": "clip", "params": clip, "lr": clip_lr, "weight_decay": decay},
        ]
        return [group for group in groups if group["params"]]


def _target_classes(target: Tensor, num_classes: int) -> Tensor:
    """``B×H×W`` labels → ``B×C`` bool of the classes present (ignoring ``IGNORE_INDEX``)."""
    present = torch.zeros(target.shape[0], num_classes, dtype=torch.bool, device=target.device)
    for image in range(target.shape[0]):
        labels = target[image].unique()
        labels = labels[(labels != IGNORE_INDEX) & (labels >= 0) & (labels < num_classes)]
        present[image, labels.long()] = True
    return present


def _pad_selection(selection: CategorySelection) -> tuple[Tensor, Tensor]:
    """Each image's selected class indices, as one tensor padded to the batch's largest C_s.

    Returns the ``B×S`` selected classes (sorted; padding at the end repeats the image's first
    class, so every entry is a valid class) and the ``B×S`` mask of real entries.
    """
    indices = selection.indices()
    width = max(len(row) for row in indices)
    device = selection.selected.device
    selected_classes = torch.tensor(
        [row + [row[0]] * (width - len(row)) for row in indices], dtype=torch.long, device=device
    )
    mask = torch.tensor(
        [[True] * len(row) + [False] * (width - len(row)) for row in indices], device=device
    )
    return selected_classes, mask


def _scatter(
    selected_logits: Tensor, selected_classes: Tensor, class_mask: Tensor, num_classes: int
) -> Tensor:
    """``B×S×H×W`` selected logits → ``B×C×H×W``, :data:`NOT_SELECTED_LOGIT` elsewhere."""
    images = []
    for logits, indices, mask in zip(selected_logits, selected_classes, class_mask, strict=True):
        full = logits.new_full((num_classes, *logits.shape[1:]), NOT_SELECTED_LOGIT)
        images.append(full.index_copy(0, indices[mask], logits[mask]))
    return torch.stack(images)


# ----------------------------------------------------------------------------------- builder


build_dcp_clip = register_method("dcp-clip")(method_builder(DcpClip, shipped=SHIPPED_WEIGHTS))
