"""LDVC: Language-Driven Visual Consensus for zero-shot semantic segmentation (Zhang et al., 2024).

The file follows Section 3 of the paper (spec: ``specs/ldvc.md``):

1. **Vision-Language Prompt Tuning** (VLPT, Eqs. 1–2): CLIP stays frozen; every layer of both
   towers gets fresh learnable prompt tokens (:class:`PromptedImageEncoder`,
   :class:`PromptedTextEncoder`).
2. **Text adapter** (Eq. 3, :class:`TextAdapter`): ``T_new = Proj([T ⊙ V_g; T])``.
3. **Local Consensus Transformer Decoder** (LCTD, Eqs. 4–7, :class:`LocalConsensusBlock`) on the
   image tokens, with local consensus self-attention (LCSA, Eqs. 8–12, :class:`RouteAttention`).
   T_new is never updated: the same ``T_new`` feeds every block and Eq. 13.
4. **Score map** (Eq. 13): ``S = T_new · V_oᵀ``, trained with ZegCLIP's sigmoid focal + dice loss
   (weights 100 and 1).

Zero-shot protocol: inductive training sees only the seen class names and unseen-class pixels are
ignored (255). ``self_training=True`` is the transductive option: the ``unseen_classes`` join the
text encoder in training, and ignored pixels whose unseen-class probability is confident become
pseudo-labels (spec §3.1; the reference code pseudo-labels only ground-truth unseen pixels, which
ToyWorld's targets cannot tell apart from other ignored pixels, hence the confidence threshold).
LDVC has no training-free path: without trained head weights :meth:`Ldvc.segment` raises
:class:`UntrainedHeadError` in eval mode.

Where the paper is silent the spec's recommendations are the config's defaults (ViT-B/16,
ZegCLIP's prompt projection, LayerNorm and dropout, drop-path in the frozen ViT, text prompts from
"this is a photo of a", intermediates of layers (7, 11), trunc-normal init), and LCSA routes on its
pooled input without forcing the self-window. Deviations: the decoder's dropout acts on the
attention probabilities of LCSA and on the output of every sub-layer (the cross-attention has no
probability dropout); token grids must be whole windows (the padding variant of spec §2.6 is not
implemented; the demo resizes to ``input_size``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ovseg.backbones import ClipBackbone, DenseFeatures
from ovseg.backbones.clip import run_block, tokens_to_map
from ovseg.caching import LruCache
from ovseg.errors import UntrainedHeadError
from ovseg.methods import optimiser
from ovseg.methods.attention import (
    Mlp,
    MultiHeadAttention,
    merge_heads,
    split_heads,
    window_partition,
    window_unpartition,
)
from ovseg.methods.base import (
    IGNORE_INDEX,
    MethodConfig,
    SegmentationMethod,
    SegmentationOutput,
    VocabularyLike,
)
from ovseg.methods.builder import method_builder, register_method, require_vit
from ovseg.methods.chunking import class_slices, upsample_logits
from ovseg.methods.losses import focal_dice_loss
from ovseg.vocabulary import class_synonyms

SHIPPED_WEIGHTS = "ldvc-toy.safetensors"
SEGMENT_OPTIONS = ("top_m", "seen_classes", "seen_prob_offset")
TEXT_BATCH_SIZE = 256
TEXT_CACHE_SIZE = 16
NAME_CACHE_SIZE = 8192  # prompted embeddings of single names, reused across vocabularies
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class LdvcConfig(MethodConfig):
    """LDVC settings (beyond :class:`MethodConfig`). Defaults are the paper's COCO-Stuff model."""

    input_size: int = 512  # must give a token grid of whole LCSA windows
    templates: str | tuple[str, ...] = "single"
    image_normalisation: str = "clip"  # CLIP's mean/std, or "imagenet" (ZegCLIP's configs)
    visual_prompt_tokens: int = 100  # K_v per layer (40 for VOC; 0: no visual prompts)
    visual_prompt_depth: int | None = None  # layers with fresh prompts (None: all; VPT-deep)
    prompt_projection: bool = True  # ZegCLIP's Linear on the prompts, LayerNorm before ln_post
    prompt_dropout: float = 0.1  # on the projected visual prompts
    drop_path: float = 0.1  # stochastic depth of the frozen ViT in training
    text_prompt_tokens: int = 6  # K_t per layer (0: the template as plain text, "frozen")
    text_prompt_depth: int | None = None  # layers with fresh text prompts (None: all; 0: K_t = 0)
    text_prompt_init: str = "pretrain"  # template hidden states, or "random" (std 0.02; Table 6)
    text_prompt_template: str = "this is a photo of a"  # shorter than K_t: first slots random
    text_adapter: bool = True  # Eq. 3; False uses T as T_new
    decoder_blocks: int = 2  # LCTD blocks
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.1  # of the decoder (see the module docstring)
    inter_layers: tuple[int, ...] | None = None  # ViT layer per block (None: (7, 11) of 12)
    route_attention: bool = True  # LCSA, or global self-attention ("w/o LCSA", Table 4)
    window_size: int = 4  # n, the side of an LCSA window in tokens
    top_m: int = 16  # m, routed windows per query window (clamped to the number of windows)
    final_norm: bool = False  # LayerNorm on V_o before Eq. 13 (a fallback; off in the paper)
    cosine_logits: bool = False  # cosine times a learnable scale in Eq. 13 (a fallback)
    focal_weight: float = 100.0  # the loss (§4.2)
    dice_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    ignore_as_negative: bool = True  # ignored pixels are focal negatives of every class (ZegCLIP)
    self_training: bool = False  # transductive, pseudo-labelling the unseen_classes
    unseen_classes: tuple[str, ...] = ()
    pseudo_label_threshold: float = 0.5  # least unseen-class probability of a pseudo-label
    seen_prob_offset: float = 0.0  # ZegCLIP's seen-class calibration (0.1 for benchmarks)
    weight_decay: float = 0.01  # of prompts, Linear and Conv weights (not norms, biases)

    tuple_fields: ClassVar[tuple[str, ...]] = ("inter_layers", "unseen_classes")
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {
        "image_normalisation": ("clip", "imagenet"),
        "text_prompt_init": ("pretrain", "random"),
    }
    at_least: ClassVar[dict[str, float]] = {
        "visual_prompt_tokens": 0,
        "text_prompt_tokens": 0,
        "decoder_blocks": 0,
        "window_size": 1,
        "top_m": 1,
    }

    def problems(self) -> list[str]:
        if 0.0 <= self.seen_prob_offset < 1.0:  # half-open: ``within`` includes its high end
            return []
        return [f"seen_prob_offset must be in [0, 1); got {self.seen_prob_offset}"]


@dataclass
class LdvcOutput(SegmentationOutput):
    """:class:`SegmentationOutput` plus ``unseen_logits``: the ``B×U×h×w`` token-grid score maps
    of the ``unseen_classes`` in transductive training (None otherwise)."""

    unseen_logits: Tensor | None = None


# --------------------------------------------------- vision-language prompt tuning (§3.3, Eqs. 1–2)


def _prompt_depth(depth: int | None, layers: int, tokens: int) -> int:
    if tokens == 0:
        return 0
    depth = layers if depth is None else depth
    if not 0 <= depth <= layers:
        raise ValueError(f"Prompt depth {depth} out of range for {layers} layers.")
    return depth


class PromptedImageEncoder(nn.Module):
    """The frozen CLIP ViT with deep visual prompts (Eqs. 1–2).

    Layer i sees ``[CLS; e_p^(i); patches]``; the prompt outputs of a layer are discarded and the
    next layer gets its own learnable prompts (up to ``depth``). The CLIP is passed to
    :meth:`forward`, not registered, so it stays a submodule of the backbone only.
    """

    def __init__(
        self,
        *,
        backbone: ClipBackbone,
        tokens: int,
        depth: int | None,
        projection: bool,
        dropout: float,
        drop_path: float,
    ) -> None:
        """``backbone``: a ViT CLIP; ``tokens`` (K_v), ``depth``, ``projection``, ``dropout`` and
        ``drop_path``: :class:`LdvcConfig`'s ``visual_prompt_*``, ``prompt_*`` and ``drop_path``."""
        super().__init__()
        width = backbone.layer_dims[0]
        self.depth = _prompt_depth(depth, backbone.num_layers, tokens)
        self.num_tokens = tokens if self.depth else 0
        self.drop_path = drop_path
        # VPT's uniform init: v = sqrt(6 / (3·P·P + width)), 0.0625 for ViT-B/16.
        bound = math.sqrt(6.0 / (3 * backbone.stride * backbone.stride + width))
        prompts = torch.empty(self.depth, self.num_tokens, width).uniform_(-bound, bound)
        self.prompts = nn.Parameter(prompts)
        use_extras = projection and self.depth > 0
        self.projection = nn.Linear(width, width) if use_extras else nn.Identity()
        self.norm = nn.LayerNorm(width, eps=1e-6) if use_extras else nn.Identity()
        self.dropout = nn.Dropout(dropout)

    def _layer_prompts(self, layer: int, batch: int) -> Tensor:
        return self.dropout(self.projection(self.prompts[layer])).expand(batch, -1, -1)

    def forward(
        self, images: Tensor, backbone: ClipBackbone, layers: Sequence[int]
    ) -> DenseFeatures:
        """``B×3×H×W`` normalised images → L2-normalised V_l ``B×D×h×w`` and V_g ``B×D``, and
        the raw patch tokens ``B×width×h×w`` of ``layers`` (0-based) as ``"layer{i}"``."""
        backbone.check_images(images)
        batch, num_prompts = images.shape[0], self.num_tokens
        tokens, grid = backbone.vit_input_tokens(images)
        if num_prompts:
            tokens = torch.cat([tokens[:, :1], self._layer_prompts(0, batch), tokens[:, 1:]], 1)
        intermediates = {}
        for index, block in enumerate(backbone.model.visual.transformer.resblocks):
            if 0 < index < self.depth:  # Eq. 2: fresh prompts replace the previous outputs
                prompts = self._layer_prompts(index, batch)
                tokens = torch.cat([tokens[:, :1], prompts, tokens[:, 1 + num_prompts :]], dim=1)
            tokens = run_block(block, tokens, self.drop_path, self.training)
            if index in layers:
                intermediates[f"layer{index}"] = tokens_to_map(tokens[:, 1 + num_prompts :], grid)
        global_embedding, dense = backbone.vit_readout(self.norm(tokens), skip=num_prompts)
        return DenseFeatures(
            dense=tokens_to_map(F.normalize(dense, dim=-1), grid),
            global_embedding=F.normalize(global_embedding, dim=-1),
            intermediates=intermediates,
            attention=None,
            stride=backbone.stride,
            input_size=tuple(images.shape[-2:]),
        )


class PromptedTextEncoder(nn.Module):
    """The frozen CLIP text transformer with deep text prompts (Eqs. 1–2).

    Token layout ``[SOS] p_1..p_Kt name . [EOS]``: the K_t prompts take positions 1..K_t of every
    layer (fresh ones up to ``depth``) and the class embedding is read at [EOS]. CLIP's causal
    mask keeps the [SOS] and prompt states independent of the class name, so with "pretrain"
    initialisation the untrained encoder reproduces frozen CLIP on ``"{template} {name}."``
    exactly. The CLIP is passed to every call, not registered.
    """

    def __init__(
        self,
        *,
        backbone: ClipBackbone,
        tokens: int,
        depth: int | None,
        init: str,
        template: str,
    ) -> None:
        """``backbone``: a CLIP with a causal text transformer pooled at [EOS]; ``tokens`` (K_t),
        ``depth``, ``init`` and ``template``: :class:`LdvcConfig`'s ``text_prompt_*``."""
        super().__init__()
        model = backbone.model
        if not isinstance(getattr(model, "attn_mask", None), Tensor):
            raise ValueError(f"{backbone.name}: LDVC needs a causal CLIP text transformer.")
        self.template = template
        self.depth = _prompt_depth(depth, len(model.transformer.resblocks), tokens)
        self.num_tokens = tokens if self.depth else 0  # depth 0: the template as plain text
        width = model.token_embedding.weight.shape[1]
        prompts = torch.randn(self.depth, self.num_tokens, width) * 0.02
        if init == "pretrain" and self.depth:
            prompts = self._template_states(backbone, prompts)
        self.prompts = nn.Parameter(prompts)

    @torch.no_grad()
    def _template_states(self, backbone: ClipBackbone, random_prompts: Tensor) -> Tensor:
        """Per-layer hidden states of the template tokens (layer 0: token + position embedding,
        layer i: the output of layer i−1), right-aligned in the K_t prompt slots; slots before a
        short template keep their random layer-0 values and are propagated like tokens."""
        model = backbone.model
        words = backbone.tokenizer.encode(self.template)
        if len(words) > self.num_tokens:
            raise ValueError(
                f"The prompt template {self.template!r} has {len(words)} BPE tokens; "
                f"text_prompt_tokens={self.num_tokens} cannot hold them."
            )
        random_slots = self.num_tokens - len(words)
        # [SOS] and the K_t slots; the causal states before [EOS] do not depend on it.
        ids = backbone.text_token_ids([self.template], reserved=random_slots)[:, :-1]
        length = ids.shape[1]
        hidden = model.token_embedding(ids) + model.positional_embedding[:length]
        hidden[0, 1 : 1 + random_slots] = random_prompts[0, :random_slots].to(hidden.dtype)
        states = []
        for block in model.transformer.resblocks[: self.depth]:
            states.append(hidden[0, 1:].clone())
            hidden = block(hidden, attn_mask=model.attn_mask[:length, :length])
        return torch.stack(states).to(random_prompts.dtype)

    def forward(self, names: Sequence[str], backbone: ClipBackbone) -> Tensor:
        """``N`` class names → ``N×D`` L2-normalised class embeddings T (in batches)."""
        return torch.cat(
            [
                self._encode(names[index], backbone)
                for index in class_slices(len(names), TEXT_BATCH_SIZE)
            ]
        )

    def _encode(self, names: Sequence[str], backbone: ClipBackbone) -> Tensor:
        model = backbone.model
        texts = [f"{name}." if self.num_tokens else f"{self.template} {name}." for name in names]
        ids = backbone.text_token_ids(texts, reserved=self.num_tokens)  # zeros in prompt slots
        length = ids.shape[1]
        hidden = model.token_embedding(ids) + model.positional_embedding[:length]
        mask = model.attn_mask[:length, :length]
        for index, block in enumerate(model.transformer.resblocks):
            if index < self.depth:  # Eq. 2; layer 0's prompts already hold their positions
                prompts = self.prompts[index].to(hidden.dtype).expand(len(names), -1, -1)
                hidden = torch.cat(
                    [hidden[:, :1], prompts, hidden[:, 1 + self.num_tokens :]], dim=1
                )
            hidden = block(hidden, attn_mask=mask)
        return F.normalize(backbone.text_readout(hidden, ids), dim=-1)


# ----------------------------------------------------------------------------- text adapter (Eq. 3)


class TextAdapter(nn.Module):
    """Eq. 3: ``T_new = Proj([T ⊙ V_g; T])``, class embeddings conditioned on each image."""

    def __init__(self, *, dim: int) -> None:
        """``dim``: D, the joint embedding width (Proj is Linear 2D → D)."""
        super().__init__()
        self.projection = nn.Linear(2 * dim, dim)

    def forward(self, class_embeddings: Tensor, global_embedding: Tensor) -> Tensor:
        """T ``K×D`` and V_g ``B×D`` → T_new ``B×K×D``."""
        classes = class_embeddings[None].expand(global_embedding.shape[0], -1, -1)
        modulated = classes * global_embedding[:, None]
        return self.projection(torch.cat([modulated, classes], dim=-1))


# -------------------------------------------- local consensus transformer decoder (§3.4, Eqs. 4–12)


@dataclass
class Routing:
    """Which windows each window attends to in one LCSA call (Eqs. 8–10).

    Attributes:
        indices: ``B×S_w×m`` the routed windows of every query window (row-major window index),
            ordered by decreasing affinity.
        affinity: ``B×S_w×S_w`` window-to-window affinity ``V_w V_wᵀ``.
        grid: ``(h/n, w/n)`` windows per column and row.
    """

    indices: Tensor
    affinity: Tensor
    grid: tuple[int, int]


class RouteAttention(nn.Module):
    """Local consensus self-attention (LCSA, Eqs. 8–12): routed multi-head self-attention.

    Tokens are pooled into ``n×n`` windows (Eq. 8); each window picks the ``m`` windows of highest
    dot-product affinity with it (Eq. 10, shared across heads, no gradient through the choice)
    and its tokens attend only to the tokens of those windows (Eqs. 11–12). With ``m`` equal to
    the number of windows, or ``route=False``, it is plain global multi-head self-attention with
    the same weights ("LCTD w/o LCSA").
    """

    def __init__(
        self, *, dim: int, heads: int, window_size: int, top_m: int, route: bool, dropout: float
    ) -> None:
        """``dim``: D, divisible by ``heads``; ``window_size``: n; ``top_m``: m (clamped to the
        number of windows); ``route=False``: plain global self-attention; ``dropout``: on the
        attention probabilities in training."""
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}.")
        self.heads = heads
        self.window_size = window_size
        self.top_m = top_m
        self.route = route
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)  # Eq. 9
        self.output = nn.Linear(dim, dim)

    def routing(self, tokens: Tensor, top_m: int | None = None) -> Routing:
        """Window descriptors, affinity and top-m routing of ``B×h×w×D`` tokens (Eqs. 8, 10)."""
        size = self.window_size
        height, width = tokens.shape[1:3]
        if height % size or width % size:
            raise ValueError(
                f"LCSA needs a token grid in whole {size}×{size} windows; got {height}×{width} "
                f"(resize the image to a multiple of {size} patches, e.g. the config's input_size)."
            )
        grid = (height // size, width // size)
        descriptors = F.avg_pool2d(tokens.permute(0, 3, 1, 2), size)  # Eq. 8
        descriptors = descriptors.flatten(2).transpose(1, 2)  # B×S_w×D
        affinity = descriptors @ descriptors.transpose(1, 2)  # Eq. 10
        routed = min(top_m or self.top_m, grid[0] * grid[1])
        indices = affinity.detach().topk(routed, dim=-1).indices
        return Routing(indices=indices, affinity=affinity.detach(), grid=grid)

    def forward(self, tokens: Tensor, *, top_m: int | None = None) -> tuple[Tensor, Routing | None]:
        """``B×h×w×D`` tokens → ``B×h×w×D`` and the routing (None for plain attention);
        ``top_m`` overrides m for this call."""
        batch, height, width, channels = tokens.shape
        query, key, value = self.qkv(tokens).chunk(3, dim=-1)  # Eq. 9
        dropout = self.dropout if self.training else 0.0
        if not self.route:
            q, k, v = (split_heads(t.flatten(1, 2), self.heads) for t in (query, key, value))
            attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
            merged = merge_heads(attended).view(batch, height, width, channels)
            return self.output(merged), None
        routing = self.routing(tokens, top_m)
        window = (self.window_size, self.window_size)
        query, key, value = (window_partition(t, window) for t in (query, key, value))  # B×S_w×n²×D
        batch_index = torch.arange(batch, device=tokens.device)[:, None, None]
        routed_keys = key[batch_index, routing.indices].flatten(2, 3)  # Eq. 11: B×S_w×m·n²×D
        routed_values = value[batch_index, routing.indices].flatten(2, 3)
        q, k, v = (split_heads(t, self.heads) for t in (query, routed_keys, routed_values))
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # Eq. 12
        merged = window_unpartition(merge_heads(attended), window, routing.grid)
        return self.output(merged), routing


class LocalConsensusBlock(nn.Module):
    """One pre-norm LCTD block (Eqs. 4–7) on image tokens, guided by the fixed T_new.

    ``V = V_in + Conv1×1(V_j)``; ``V += LCSA(LN₁ V)``; ``V += CA(LN₂ V, LN₃ T_new)`` with the image
    tokens as queries and the class embeddings as keys and values; ``V += MLP(LN₄ V)``.
    """

    def __init__(
        self,
        *,
        dim: int,
        feature_dim: int,
        heads: int,
        window_size: int,
        top_m: int,
        route: bool,
        mlp_ratio: float,
        dropout: float,
    ) -> None:
        """``dim``: D, CLIP's joint embedding width; ``feature_dim``: the width of V_j;
        ``heads``, ``window_size``, ``top_m``, ``route``: see :class:`RouteAttention`; ``dropout``:
        on each sub-layer's output (and LCSA's attention probabilities)."""
        super().__init__()
        self.feature_projection = nn.Conv2d(feature_dim, dim, 1)  # Eq. 4
        self.norm1 = nn.LayerNorm(dim)
        self.self_attention = RouteAttention(
            dim=dim,
            heads=heads,
            window_size=window_size,
            top_m=top_m,
            route=route,
            dropout=dropout,
        )
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.cross_attention = MultiHeadAttention(dim=dim, heads=heads)
        self.norm4 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim=dim, hidden_dim=int(dim * mlp_ratio))
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        tokens: Tensor,
        clip_features: Tensor,
        conditioned_class_embeddings: Tensor,
        *,
        top_m: int | None = None,
        return_attention: bool = False,
    ) -> tuple[Tensor, Routing | None, Tensor | None]:
        """
        Arguments:
            tokens: V_in ``B×h×w×D``.
            clip_features: V_j ``B×C×h×w``, this block's intermediate CLIP tokens.
            conditioned_class_embeddings: T_new ``B×K×D`` (read, never updated).
            top_m: override of m for this call.
            return_attention: also return the cross-attention ``B×heads×(h·w)×K``.

        Returns:
            V_out ``B×h×w×D``, the LCSA routing (None without routing) and the cross-attention.
        """
        batch, height, width, channels = tokens.shape
        tokens = tokens + self.feature_projection(clip_features).permute(0, 2, 3, 1)  # Eq. 4
        consensus, routing = self.self_attention(self.norm1(tokens), top_m=top_m)
        tokens = tokens + self.dropout(consensus)  # Eq. 5
        queries = self.norm2(tokens).flatten(1, 2)
        keys = self.norm3(conditioned_class_embeddings)
        guided = self.cross_attention(queries, keys, return_attention=return_attention)
        attention = None
        if return_attention:
            guided, attention = guided
        tokens = tokens + self.dropout(guided.view(batch, height, width, channels))  # Eq. 6
        tokens = tokens + self.dropout(self.mlp(self.norm4(tokens)))  # Eq. 7
        return tokens, routing, attention


def _default_inter_layers(depth: int, blocks: int) -> tuple[int, ...]:
    """0-based ViT layers feeding the blocks: ending at the last layer, a third of the depth
    apart for two blocks ((7, 11) of 12, (3, 5) of 6), closer for more."""
    spacing = max(1, round(depth / 3 / max(1, blocks - 1)))
    return tuple(max(0, depth - 1 - spacing * (blocks - 1 - block)) for block in range(blocks))


# ------------------------------------------------------------------------------------ model


class Ldvc(SegmentationMethod):
    """LDVC on a frozen ViT CLIP: VLPT → text adapter → LCTD → ``S = T_new · V_oᵀ``."""

    name = "ldvc"
    config_class = LdvcConfig
    trained_head = False

    def __init__(self, *, config: LdvcConfig, backbone: ClipBackbone) -> None:
        """
        Arguments:
            config: the settings; ``input_size`` must give a token grid of whole LCSA windows.
            backbone: a ViT CLIP. All its parameters are frozen (``requires_grad=False``).
        """
        super().__init__()
        if require_vit(backbone, config.input_size, method="LDVC") % config.window_size:
            raise ValueError(
                f"input_size {config.input_size} must be a multiple of the patch size "
                f"{backbone.stride} times window_size {config.window_size}."
            )
        layers, blocks = backbone.num_layers, config.decoder_blocks
        inter_layers = config.inter_layers or _default_inter_layers(layers, blocks)
        if len(inter_layers) != blocks or not all(0 <= i < layers for i in inter_layers):
            raise ValueError(
                f"inter_layers {inter_layers} must name one of the {layers} ViT layers per "
                f"decoder block ({blocks})."
            )
        self.config = config
        self.backbone = backbone
        self.inter_layers = inter_layers
        for parameter in backbone.parameters():
            parameter.requires_grad_(False)
        dim = backbone.embed_dim
        self.image_encoder = PromptedImageEncoder(
            backbone=backbone,
            tokens=config.visual_prompt_tokens,
            depth=config.visual_prompt_depth,
            projection=config.prompt_projection,
            dropout=config.prompt_dropout,
            drop_path=config.drop_path,
        )
        self.text_encoder = PromptedTextEncoder(
            backbone=backbone,
            tokens=config.text_prompt_tokens,
            depth=config.text_prompt_depth,
            init=config.text_prompt_init,
            template=config.text_prompt_template,
        )
        self.text_adapter = TextAdapter(dim=dim) if config.text_adapter else None
        self.blocks = nn.ModuleList(
            LocalConsensusBlock(
                dim=dim,
                feature_dim=backbone.layer_dims[layer],
                heads=config.heads,
                window_size=config.window_size,
                top_m=config.top_m,
                route=config.route_attention,
                mlp_ratio=config.mlp_ratio,
                dropout=config.dropout,
            )
            for layer in self.inter_layers
        )
        self.final_norm = nn.LayerNorm(dim) if config.final_norm else None
        self.logit_scale = (
            nn.Parameter(torch.tensor(math.log(10.0))) if config.cosine_logits else None
        )
        self._init_head()
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if config.image_normalisation == "clip":
            mean, std = (
                backbone.image_mean.flatten().tolist(),
                backbone.image_std.flatten().tolist(),
            )
        self.register_buffer("image_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._text_cache: LruCache[Tensor] = LruCache(TEXT_CACHE_SIZE)
        self._name_cache: LruCache[Tensor] = LruCache(NAME_CACHE_SIZE)

    def _init_head(self) -> None:
        """Trunc-normal(0.02) Linear and Conv weights with zero biases (ZegCLIP); the prompts
        keep their own initialisation and the LayerNorms PyTorch's."""
        for root in (self.blocks, self.text_adapter, self.image_encoder.projection):
            for module in root.modules() if root is not None else ():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    nn.init.trunc_normal_(module.weight, std=0.02)
                    nn.init.zeros_(module.bias)

    def clear_caches(self) -> None:
        super().clear_caches()
        self._text_cache.clear()
        self._name_cache.clear()

    # ----------------------------------------------------------------- prompted encoders (Eqs. 1–2)
    def encode_image(self, images: Tensor) -> DenseFeatures:
        """``B×3×H×W`` images in [0, 1] → the prompted CLIP features V_l, V_g and V_j of
        ``inter_layers`` (see :class:`PromptedImageEncoder`)."""
        normalised = (images - self.image_mean.to(images.dtype)) / self.image_std.to(images.dtype)
        return self.image_encoder(normalised, self.backbone, self.inter_layers)

    def encode_classes(self, vocabulary: VocabularyLike) -> Tensor:
        """T ``K×D``: the prompted text embeddings of each class's synonyms, summed and
        L2-normalised. Without a gradient into the prompts, vocabularies and single names are
        cached by the prompts' version, so a vocabulary edit encodes only its new names."""
        classes = class_synonyms(vocabulary)
        names = [name for synonyms in classes for name in synonyms]
        prompts = self.text_encoder.prompts
        cached = not (torch.is_grad_enabled() and prompts.requires_grad and prompts.numel() > 0)
        version = (prompts._version, prompts.data_ptr(), prompts.device, prompts.dtype)
        if cached and (classes, *version) in self._text_cache:
            return self._text_cache.get((classes, *version))
        with torch.set_grad_enabled(not cached):
            if cached:
                rows = self._name_cache.rows(
                    [(name, *version) for name in names],
                    lambda missing: self.text_encoder([key[0] for key in missing], self.backbone),
                )
                embeddings = torch.stack(rows)
            else:
                embeddings = self.text_encoder(names, self.backbone)
            owners = [index for index, synonyms in enumerate(classes) for _ in synonyms]
            summed = embeddings.new_zeros(len(classes), embeddings.shape[-1]).index_add(
                0, torch.tensor(owners, device=embeddings.device), embeddings
            )
            text = F.normalize(summed, dim=-1)
        return self._text_cache.put((classes, *version), text) if cached else text

    # --------------------------------------------------------------------- forward pass (Eqs. 3–13)
    def segment(
        self,
        image_features: DenseFeatures,
        vocabulary: VocabularyLike,
        *,
        return_intermediates: bool = False,
        target: Tensor | None = None,
        **options: Any,
    ) -> LdvcOutput:
        """Score every token against the image-conditioned class embeddings (Eqs. 3–13).

        Arguments:
            image_features: what :meth:`encode_image` returned.
            vocabulary: ``K`` class names or synonym tuples.
            return_intermediates: also return ``class_embeddings`` T ``K×D``,
                ``conditioned_class_embeddings`` T_new ``B×K×D``, ``visual_features`` V_l and
                ``decoded_features`` V_o ``B×D×h×w``, ``score_map`` S ``B×K×h×w``, and per
                block its ``cross_attention`` ``B×heads×(h·w)×K`` and LCSA ``routing``
                (:class:`Routing`, None without LCSA).
            target: unused (LDVC trains the same way on every vocabulary).
            options: ``top_m`` (override m), ``seen_classes`` (names) and ``seen_prob_offset``
                (subtracted from their sigmoid probabilities; the scores are then calibrated
                probabilities instead of logits).

        Raises:
            UntrainedHeadError: in eval mode without trained head weights.
        """
        self.check_options(options, SEGMENT_OPTIONS)
        if not (self.trained_head or self.training):
            raise UntrainedHeadError(
                f"LDVC has no training-free path and no trained head weights here ("
                f"{SHIPPED_WEIGHTS} fits only the shipped toy CLIP); train them with "
                "training/configs/ldvc-toy.json."
            )
        classes = class_synonyms(vocabulary)
        # Transductive self-training scores the unseen names too, after the vocabulary's classes.
        unseen_names: tuple[str, ...] = ()
        if self.training and self.config.self_training:
            known = {name for synonyms in classes for name in synonyms}
            unseen_names = tuple(n for n in self.config.unseen_classes if n not in known)
        class_embeddings = self.encode_classes(classes + tuple((name,) for name in unseen_names))
        global_embedding = image_features.global_embedding
        if self.text_adapter is not None:  # Eq. 3
            conditioned_class_embeddings = self.text_adapter(class_embeddings, global_embedding)
        else:
            conditioned_class_embeddings = class_embeddings[None].expand(
                global_embedding.shape[0], -1, -1
            )

        tokens = image_features.dense.permute(0, 2, 3, 1)  # V_l, B×h×w×D
        routings, attentions = [], []
        for block, layer in zip(self.blocks, self.inter_layers, strict=True):  # Eqs. 4–12
            tokens, routing, attention = block(
                tokens,
                image_features.intermediates[f"layer{layer}"],
                conditioned_class_embeddings,
                top_m=options.get("top_m"),
                return_attention=return_intermediates,
            )
            routings.append(routing)
            attentions.append(attention)
        decoded = tokens if self.final_norm is None else self.final_norm(tokens)  # V_o
        if self.logit_scale is not None:
            scores = torch.einsum(
                "bkd,bhwd->bkhw",
                F.normalize(conditioned_class_embeddings, dim=-1),
                F.normalize(decoded, dim=-1),
            )
            scores = scores * self.logit_scale.exp()
        else:
            # Eq. 13: S = T_new V_oᵀ
            scores = torch.einsum("bkd,bhwd->bkhw", conditioned_class_embeddings, decoded)
        logits = upsample_logits(scores[:, : len(classes)], image_features.input_size)
        offset = options.get("seen_prob_offset", self.config.seen_prob_offset)
        if offset and options.get("seen_classes"):  # ZegCLIP: lower the seen probabilities
            seen = set(options["seen_classes"])
            is_seen = [any(name in seen for name in synonyms) for synonyms in classes]
            logits = logits.sigmoid() - offset * logits.new_tensor(is_seen)[:, None, None]
        intermediates = {}
        if return_intermediates:
            intermediates = {
                "class_embeddings": class_embeddings,
                "conditioned_class_embeddings": conditioned_class_embeddings,
                "visual_features": image_features.dense,
                "decoded_features": decoded.permute(0, 3, 1, 2),
                "score_map": scores,
                "cross_attention": attentions,
                "routing": routings,
            }
        return LdvcOutput(
            logits=logits,
            intermediates=intermediates,
            unseen_logits=scores[:, len(classes) :] if unseen_names else None,
        )

    # -------------------------------------------------------------------------- loss (focal + dice)
    def loss(self, output: SegmentationOutput, target: Tensor) -> dict[str, Tensor]:
        """Focal + dice (§4.2, :func:`~ovseg.methods.losses.focal_dice_loss`) on the score maps
        upsampled to the target size. In transductive self-training the unseen-class maps join
        the vocabulary's, and ignored pixels whose best unseen-class probability reaches
        ``pseudo_label_threshold`` are labelled with that class (a detached prediction)."""
        logits = upsample_logits(output.logits, target.shape[-2:])
        target = target.long()
        unseen = getattr(output, "unseen_logits", None)
        if unseen is not None:
            unseen = upsample_logits(unseen, target.shape[-2:])
            probability, best = unseen.detach().sigmoid().max(dim=1)
            confident = (target == IGNORE_INDEX) & (
                probability >= self.config.pseudo_label_threshold
            )
            target = torch.where(confident, best + logits.shape[1], target)
            logits = torch.cat([logits, unseen], dim=1)
        return focal_dice_loss(
            logits,
            target,
            focal_weight=self.config.focal_weight,
            dice_weight=self.config.dice_weight,
            alpha=self.config.focal_alpha,
            gamma=self.config.focal_gamma,
            ignore_as_negative=self.config.ignore_as_negative,
        )

    # ------------------------------------------------------------------------------------ optimiser
    def parameter_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """AdamW groups, all at ``base_lr`` (2e-4; spec §4.1: no zero multiplier that would
        freeze the text prompts). Prompts, Linear and Conv weights decay by ``weight_decay``;
        norms, biases and the logit scale do not (the ``_no_decay`` groups)."""
        parts = {
            "image_encoder.": "visual_prompts",
            "text_encoder.": "text_prompts",
            "text_adapter.": "text_adapter",
        }
        return optimiser.parameter_groups(
            self,
            lambda name, _: next((g for p, g in parts.items() if name.startswith(p)), "decoder"),
            lr=dict.fromkeys((*parts.values(), "decoder"), base_lr),
            weight_decay=self.config.weight_decay,
            no_decay=lambda name, parameter: (
                not (name.endswith("prompts") or (name.endswith(".weight") and parameter.ndim > 1))
            ),
        )


build_ldvc = register_method("ldvc")(method_builder(Ldvc, shipped=SHIPPED_WEIGHTS))
