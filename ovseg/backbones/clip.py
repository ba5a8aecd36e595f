"""CLIP backbones through open_clip: dense multi-scale image features and cached text embeddings.

One code path serves every CLIP ovseg uses: built-in open_clip names with a pretrained tag
(``"ViT-B-16"``/``"openai"``, ``"convnext_base_w_320"``/``"laion_aesthetic_s13b_b82k"``), a local
checkpoint path as the tag, ``hf-hub:org/repo`` and ``local-dir:/path`` names, and ovseg's own small
configs (``model_configs/*.json``, registered with open_clip at import). The weights are never
modified: dense features are read out of the unmodified towers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import open_clip
import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from ovseg.caching import LruCache
from ovseg.errors import WeightsError
from ovseg.prompts.templates import resolve_templates
from ovseg.vocabulary import class_synonyms

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

# The CLIPs the four papers use, as (open_clip name, pretrained tag). See the specs.
PAPER_CLIPS: dict[str, tuple[str, str]] = {
    "vit-b-16": ("ViT-B-16", "openai"),
    "vit-l-14": ("ViT-L-14", "openai"),
    "vit-l-14-336": ("ViT-L-14-336", "openai"),
    "convnext-b": ("convnext_base_w_320", "laion_aesthetic_s13b_b82k"),
    "convnext-l": ("convnext_large_d_320", "laion2b_s29b_b131k_ft_soup"),
}

TEXT_BATCH_SIZE = 256
TEXT_CACHE_SIZE = 32
# Per-class embeddings kept for reuse across vocabularies, bounded by their total size in floats
# (2**25 floats: 128 MB in float32, about 800 ViT-B classes with the 80 ImageNet templates).
CLASS_CACHE_FLOATS = 2**25

DenseMode = Literal["standard", "maskclip"]


@dataclass
class DenseFeatures:
    """What the image tower gives for a batch of images.

    Attributes:
        dense: ``B×D×h×w`` per-patch (ViT) or per-pixel (ConvNeXt) embeddings in the joint
            image-text space, not normalised.
        global_embedding: ``B×D`` the ordinary CLIP image embedding, not normalised.
        intermediates: name → ``B×C×h_i×w_i`` features; ``"layer{i}"`` for ViT blocks (0-based) and
            ``"stride{s}"`` for ConvNeXt stages (4, 8, 16, 32).
        attention: ``B×N×N`` patch-to-patch self-attention of the last ViT block, averaged over
            heads (rows sum to at most 1: the class token is left out), if asked for.
        stride: input pixels per step of ``dense``.
        input_size: ``(H, W)`` of the encoded images.
    """

    dense: Tensor
    global_embedding: Tensor
    intermediates: dict[str, Tensor]
    attention: Tensor | None
    stride: int
    input_size: tuple[int, int]


@dataclass
class TextEmbeddings:
    """Text embeddings of a vocabulary.

    Attributes:
        per_template: ``K×M×D``, one L2-normalised embedding per class and template (synonyms of a
            class averaged and re-normalised per template).
        mean: ``K×D``, the template average, re-normalised.
        templates: the ``M`` templates used.
    """

    per_template: Tensor
    mean: Tensor
    templates: tuple[str, ...]


class ClipBackbone(nn.Module):
    """An open_clip CLIP model with dense, multi-scale readouts and a text-embedding cache.

    Build it with :func:`load_clip`. ``forward`` is :meth:`encode_image`.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        name: str,
        pretrained: str | None,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        image_size: int,
        context_length: int,
    ) -> None:
        """
        Arguments:
            model: an open_clip ``CLIP`` or ``CustomTextCLIP`` with a ViT or timm ConvNeXt tower.
            name: the open_clip model name it was built from (part of cache keys).
            pretrained: the weights tag or path it was loaded with, or None for random weights.
            image_mean, image_std: pixel normalisation of its preprocessing, 0-1 scale.
            image_size: the square size it was pretrained at.
            context_length: the text tokenizer's context length.
        """
        super().__init__()
        self.model = model
        self.name = name
        self.pretrained = pretrained
        self.image_size = image_size
        # Every CLIP ovseg supports uses OpenAI's BPE; only the context length differs.
        self.tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
        self.register_buffer(
            "image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False
        )
        visual = model.visual
        if isinstance(visual, VisionTransformer):
            self.kind = "vit"
            self.stride = visual.patch_size[0]
            self.num_layers = len(visual.transformer.resblocks)
            self.layer_dims = [visual.transformer.width] * self.num_layers
            self._check_vit_blocks(visual)
        elif isinstance(visual, TimmModel) and hasattr(visual.trunk, "stages"):
            self.kind = "convnext"
            self.stride = 32
            self.num_layers = len(visual.trunk.stages)
            self.layer_dims = [info["num_chs"] for info in visual.trunk.feature_info]
        else:
            raise ValueError(
                f"{name}: ovseg reads dense features from ViT and timm ConvNeXt towers; "
                "this model's "
                f"image tower is a {type(visual).__name__}."
            )
        self.embed_dim = (
            int(model.text_projection.shape[1])
            if _has_text_projection(model)
            else (int(model.visual.output_dim))
        )
        self._text_cache: LruCache[TextEmbeddings] = LruCache(TEXT_CACHE_SIZE)
        self._class_cache: LruCache[Tensor] = LruCache(
            max_size=CLASS_CACHE_FLOATS, size=Tensor.numel
        )
        self._pos_embed_cache: dict[tuple, Tensor] = {}

    @staticmethod
    def _check_vit_blocks(visual: VisionTransformer) -> None:
        block = visual.transformer.resblocks[-1]
        if not isinstance(block, ResidualAttentionBlock) or not block.attn.batch_first:
            raise ValueError(
                f"Dense ViT features need open_clip's standard batch-first ResidualAttentionBlock; "
                f"got {type(block).__name__}."
            )

    # ----------------------------------------------------------------------------------- images
    def normalize(self, images: Tensor) -> Tensor:
        """Map ``B×3×H×W`` images in [0, 1] to this model's normalised input."""
        return (images - self.image_mean.to(images.dtype)) / self.image_std.to(images.dtype)

    def check_images(self, images: Tensor) -> None:
        """Raise ``ValueError`` unless ``images`` is ``B×3×H×W`` with H and W multiples of
        :attr:`stride`."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected images of shape B×3×H×W; got {tuple(images.shape)}.")
        height, width = images.shape[-2:]
        if height % self.stride or width % self.stride:
            raise ValueError(
                f"Image size {height}×{width} is not a multiple of the stride {self.stride} "
                f"of {self.name}."
            )

    def forward(self, images: Tensor, **kwargs) -> DenseFeatures:
        return self.encode_image(images, **kwargs)

    def encode_image(
        self,
        images: Tensor,
        *,
        layers: Sequence[int] = (),
        dense_mode: DenseMode = "standard",
        return_attention: bool = False,
    ) -> DenseFeatures:
        """Dense features, the global embedding and intermediate layers of normalised images.

        Arguments:
            images: ``B×3×H×W`` normalised images (see :meth:`normalize`). H and W must be
                multiples of :attr:`stride`; ViT position embeddings are interpolated to the grid.
            layers: 0-based ViT block or ConvNeXt stage indices whose outputs to return.
            dense_mode: ``"standard"`` applies the final norm and projection to every token
                (CAT-Seg's dense readout); ``"maskclip"`` takes the value path of the last ViT block
                instead (MaskCLIP), which localises better without training. ConvNeXt ignores it.
            return_attention: also return the last ViT block's patch-to-patch attention.
        """
        self.check_images(images)
        for layer in layers:
            if not -self.num_layers <= layer < self.num_layers:
                raise ValueError(f"Layer {layer} out of range for {self.num_layers} layers.")
        if self.kind == "vit":
            return self._encode_vit(images, layers, dense_mode, return_attention)
        if return_attention:
            raise ValueError("Attention maps exist only for ViT towers.")
        return self._encode_convnext(images, layers)

    def _positional_embedding(self, visual: VisionTransformer, grid: tuple[int, int]) -> Tensor:
        embedding = visual.positional_embedding
        if tuple(grid) == tuple(visual.grid_size):
            return embedding
        key = (grid, embedding.data_ptr(), embedding._version, self.training)
        if not torch.is_grad_enabled() and key in self._pos_embed_cache:
            return self._pos_embed_cache[key]
        class_position, patch_positions = embedding[:1], embedding[1:]
        old_h, old_w = visual.grid_size
        patch_positions = patch_positions.reshape(1, old_h, old_w, -1).permute(0, 3, 1, 2)
        patch_positions = F.interpolate(
            patch_positions, size=grid, mode="bicubic", align_corners=False
        )
        patch_positions = patch_positions.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
        resized = torch.cat([class_position, patch_positions], dim=0)
        if not torch.is_grad_enabled():
            self._pos_embed_cache = {key: resized}
        return resized

    def vit_input_tokens(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """What a ViT tower's first block sees: normalised ``B×3×H×W`` images → ``B×(1+h·w)×width``
        tokens (class token, then the patches; position embeddings resized to the grid, then
        ``ln_pre``) and the ``(h, w)`` grid."""
        visual: VisionTransformer = self.model.visual
        batch = images.shape[0]
        grid = (images.shape[-2] // self.stride, images.shape[-1] // self.stride)
        tokens = visual.conv1(images).flatten(2).transpose(1, 2)
        class_token = visual.class_embedding.to(tokens.dtype).expand(batch, 1, -1)
        tokens = torch.cat([class_token, tokens], dim=1)
        tokens = tokens + self._positional_embedding(visual, grid).to(tokens.dtype)
        return visual.ln_pre(tokens), grid

    def vit_readout(
        self, tokens: Tensor, *, skip: int = 0, dense: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """What a ViT tower's head makes of the last block's ``B×(1+skip+h·w)×width`` tokens:
        the global embedding ``B×D`` (class token) and the patch embeddings ``B×(h·w)×D`` (None
        unless ``dense``), both through ``ln_post`` and ``proj``, not normalised. ``skip`` tokens
        after the class token (learned prompts) are left out."""
        visual: VisionTransformer = self.model.visual
        tokens = visual.ln_post(tokens)
        patches = tokens[:, 1 + skip :] @ visual.proj if dense else None
        return tokens[:, 0] @ visual.proj, patches

    def _encode_vit(
        self, images: Tensor, layers: Sequence[int], dense_mode: DenseMode, return_attention: bool
    ) -> DenseFeatures:
        visual: VisionTransformer = self.model.visual
        tokens, grid = self.vit_input_tokens(images)

        wanted = {layer % self.num_layers for layer in layers}
        intermediates: dict[str, Tensor] = {}
        blocks = visual.transformer.resblocks
        attention = None
        value_path = None
        for index, block in enumerate(blocks):
            if index == len(blocks) - 1 and (return_attention or dense_mode == "maskclip"):
                tokens, attention, value_path = _last_block_with_readouts(block, tokens)
            else:
                tokens = block(tokens)
            if index in wanted:
                intermediates[f"layer{index}"] = tokens_to_map(tokens[:, 1:], grid)

        if dense_mode not in ("standard", "maskclip"):
            raise ValueError(f"dense_mode must be 'standard' or 'maskclip'; got {dense_mode!r}.")
        global_embedding, dense_tokens = self.vit_readout(tokens, dense=dense_mode == "standard")
        if dense_mode == "maskclip":
            dense_tokens = visual.ln_post(value_path[:, 1:]) @ visual.proj
        if attention is not None:
            attention = attention[:, 1:, 1:] if return_attention else None
        return DenseFeatures(
            dense=tokens_to_map(dense_tokens, grid),
            global_embedding=global_embedding,
            intermediates=intermediates,
            attention=attention,
            stride=self.stride,
            input_size=tuple(images.shape[-2:]),
        )

    def _encode_convnext(self, images: Tensor, layers: Sequence[int]) -> DenseFeatures:
        visual: TimmModel = self.model.visual
        trunk = visual.trunk
        wanted = {layer % self.num_layers for layer in layers}
        features = trunk.stem(images)
        intermediates: dict[str, Tensor] = {}
        stride = 4
        for index, stage in enumerate(trunk.stages):
            features = stage(features)
            if index > 0:
                stride *= 2
            if index in wanted:
                intermediates[f"stride{stride}"] = features
        features = trunk.norm_pre(features)
        # The CLIP head (norm, then projection) applied to every pixel, as SED and FC-CLIP do.
        pixels = trunk.head.norm(features).permute(0, 2, 3, 1)
        dense = visual.head(pixels).permute(0, 3, 1, 2)
        global_embedding = visual.head(trunk.forward_head(features))
        return DenseFeatures(
            dense=dense,
            global_embedding=global_embedding,
            intermediates=intermediates,
            attention=None,
            stride=self.stride,
            input_size=tuple(images.shape[-2:]),
        )

    def encode_stage_means(
        self,
        images: Tensor | Sequence[Tensor],
        stages: Sequence[int],
        *,
        tower: nn.Module | None = None,
        batch_size: int = 16,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """N ``3×S×S`` images in [0, 1] → their global embedding ``N×D`` and the spatial mean
        ``N×C_i`` of each ConvNeXt stage i of ``stages`` (0-based), in stage order. A sequence of
        images is stacked ``batch_size`` at a time.

        ``tower`` runs in place of this CLIP's image tower, with its normalisation: a copy of
        the tower (DPSeg's frozen prompt encoder). None: the tower itself.
        """
        if self.kind != "convnext":
            raise ValueError(f"Stage means exist only for ConvNeXt towers; {self.name} is a ViT.")
        tower = self.model.visual if tower is None else tower
        trunk = tower.trunk
        parameter = next(tower.parameters())
        embeddings, means = [], []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            batch = batch if isinstance(batch, Tensor) else torch.stack(batch)
            features = trunk.stem(self.normalize(batch.to(parameter.device, parameter.dtype)))
            batch_means = []
            for index, stage in enumerate(trunk.stages):
                features = stage(features)
                if index in stages:
                    batch_means.append(features.mean(dim=(2, 3)))
            embeddings.append(tower.head(trunk.forward_head(trunk.norm_pre(features))))
            means.append(batch_means)
        return torch.cat(embeddings), tuple(torch.cat(level) for level in zip(*means, strict=True))

    # ------------------------------------------------------------------------------------- text
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings ``N×D`` of raw prompts, encoded in batches."""
        parameter = next(self.model.parameters())
        outputs = []
        for start in range(0, len(prompts), TEXT_BATCH_SIZE):
            tokens = self.tokenizer(list(prompts[start : start + TEXT_BATCH_SIZE])).to(
                parameter.device
            )
            outputs.append(F.normalize(self._encode_tokens(tokens), dim=-1))
        return torch.cat(outputs)

    def _encode_tokens(self, tokens: Tensor) -> Tensor:
        """open_clip's ``encode_text``, run only over the context the batch actually uses.

        CLIP's text tower is causal and pools at the end-of-text token, so the padding after the
        longest prompt cannot change any result; dropping it makes an 80-template vocabulary
        several times cheaper (most prompts fill 10-15 of 77 positions).
        """
        model = self.model
        causal = isinstance(getattr(model, "attn_mask", None), Tensor)
        if not causal or getattr(model, "text_pool_type", None) != "argmax":
            return model.encode_text(tokens)
        length = int((tokens != 0).sum(dim=1).max())
        tokens = tokens[:, :length]
        cast_dtype = model.transformer.get_cast_dtype()
        hidden = model.token_embedding(tokens).to(cast_dtype)
        hidden = hidden + model.positional_embedding[:length].to(cast_dtype)
        hidden = model.transformer(hidden, attn_mask=model.attn_mask[:length, :length])
        return self.text_readout(hidden, tokens)

    def text_token_ids(self, texts: Sequence[str], *, reserved: int = 0) -> Tensor:
        """``N×L`` token ids ``[SOS] 0..0 text [EOS]``, zero-padded to the longest row, with
        ``reserved`` zero slots after [SOS] for learned prompt tokens. A text longer than the
        context is cut, keeping [EOS] (as CLIP's tokenizer does)."""
        tokenizer = self.tokenizer
        rows = []
        for text in texts:
            words = tokenizer.encode(text)[: tokenizer.context_length - 2 - reserved]
            rows.append(
                [tokenizer.sot_token_id] + [0] * reserved + words + [tokenizer.eot_token_id]
            )
        ids = torch.zeros(len(rows), max(len(row) for row in rows), dtype=torch.long)
        for index, row in enumerate(rows):
            ids[index, : len(row)] = torch.tensor(row)
        return ids.to(self.model.token_embedding.weight.device)

    def text_readout(self, hidden: Tensor, token_ids: Tensor) -> Tensor:
        """What a causal text tower's head makes of the last block's ``N×L×width`` states:
        ``ln_final``, the state at [EOS] (the highest token id), ``text_projection``; ``N×D``,
        not normalised."""
        model = self.model
        hidden = model.ln_final(hidden)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), token_ids.argmax(-1)]
        if isinstance(model.text_projection, nn.Linear):
            return model.text_projection(pooled)
        return pooled @ model.text_projection

    def _text_weights_version(self) -> tuple[int, ...]:
        # In-place updates (optimiser steps, load_state_dict) bump a tensor's _version, so a key
        # built from them goes stale exactly when the text tower changes.
        return tuple(p._version for p in self._text_parameters()) + tuple(
            p.data_ptr() for p in self._text_parameters()[:1]
        )

    def text_tower_trains(self) -> bool:
        """Whether text encodings take gradient now: autograd is on and a text-tower parameter
        trains (then nothing about the text is cached)."""
        return torch.is_grad_enabled() and any(p.requires_grad for p in self._text_parameters())

    def _text_parameters(self) -> list[Tensor]:
        return [p for n, p in self.model.named_parameters() if not n.startswith("visual.")]

    def encode_text(
        self,
        vocabulary: Sequence[str | Sequence[str]],
        templates: str | Sequence[str] = "imagenet",
    ) -> TextEmbeddings:
        """Embed every class of a vocabulary with every template.

        Arguments:
            vocabulary: class names, or per-class sequences of synonyms (averaged per template).
            templates: a template set name (``"imagenet"``: 80, ``"short"``: 7, ``"single"``) or
                explicit templates containing ``{}``.

        Results are cached by (model, weights, vocabulary, templates, device, dtype, autocast
        dtype) when no gradient flows into the text tower; a changed vocabulary or updated weights
        miss the cache, and an encoding made under mixed precision never answers an fp32 call.
        Each class's embeddings are also cached on their own, so a vocabulary that shares classes
        with an earlier one only encodes its new classes.
        """
        classes = class_synonyms(vocabulary)
        template_tuple = resolve_templates(templates)
        parameter = next(self.model.parameters())
        needs_grad = self.text_tower_trains()
        context = (
            self.name,
            self.pretrained,
            self._text_weights_version(),
            template_tuple,
            parameter.device,
            parameter.dtype,
            _autocast_dtype(parameter.device),
        )
        key = (*context, classes)
        if not needs_grad and key in self._text_cache:
            return self._text_cache.get(key)

        with torch.set_grad_enabled(needs_grad):
            if needs_grad:
                per_template = self._encode_classes(classes, template_tuple)
            else:
                per_template = self._cached_classes(classes, template_tuple, context)
            mean = F.normalize(per_template.mean(dim=1), dim=-1)
        result = TextEmbeddings(per_template=per_template, mean=mean, templates=template_tuple)
        if not needs_grad:
            self._text_cache.put(key, result)
        return result

    def _encode_classes(
        self, classes: tuple[tuple[str, ...], ...], templates: tuple[str, ...]
    ) -> Tensor:
        """``K×T×D``: each class's prompts encoded, synonyms summed per template, normalised."""
        prompts, owners = [], []
        for class_index, synonyms in enumerate(classes):
            for synonym in synonyms:
                for template in templates:
                    prompts.append(template.format(synonym))
                    owners.append(class_index)
        embeddings = self.encode_prompts(prompts)
        num_templates = len(templates)
        embeddings = embeddings.view(-1, num_templates, embeddings.shape[-1])
        owner_index = torch.tensor(owners[::num_templates], device=embeddings.device)
        summed = torch.zeros(
            len(classes),
            num_templates,
            embeddings.shape[-1],
            device=embeddings.device,
            dtype=embeddings.dtype,
        )
        summed = summed.index_add(0, owner_index, embeddings)
        return F.normalize(summed, dim=-1)

    def _cached_classes(
        self, classes: tuple[tuple[str, ...], ...], templates: tuple[str, ...], context: tuple
    ) -> Tensor:
        """:meth:`_encode_classes` through the per-class cache: only unseen classes are encoded
        (the least recently used classes are evicted, never one of this vocabulary's)."""
        rows = self._class_cache.rows(
            [(*context, synonyms) for synonyms in classes],
            lambda missing: self._encode_classes(tuple(key[-1] for key in missing), templates),
        )
        return torch.stack(rows)

    def clear_text_cache(self) -> None:
        self._text_cache.clear()
        self._class_cache.clear()

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on ``device`` now, or None outside autocast."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _has_text_projection(model: nn.Module) -> bool:
    projection = getattr(model, "text_projection", None)
    return isinstance(projection, (Tensor, nn.Parameter)) and projection.ndim == 2


def drop_path(residual: Tensor, probability: float, training: bool) -> Tensor:
    """Stochastic depth: drop a sample's residual branch with ``probability``, rescale the rest."""
    if probability == 0.0 or not training:
        return residual
    keep = 1.0 - probability
    mask = residual.new_empty(residual.shape[0], *([1] * (residual.ndim - 1))).bernoulli_(keep)
    return residual * mask / keep


def run_block(
    block: ResidualAttentionBlock, tokens: Tensor, drop_path_rate: float, training: bool
) -> Tensor:
    """One (frozen) open_clip ViT block, with drop-path on its two residual branches in
    training."""
    if drop_path_rate == 0.0 or not training:
        return block(tokens)
    attended = block.ls_1(block.attention(q_x=block.ln_1(tokens)))
    tokens = tokens + drop_path(attended, drop_path_rate, training)
    mlp = block.ls_2(block.mlp(block.ln_2(tokens)))
    return tokens + drop_path(mlp, drop_path_rate, training)


def tokens_to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """``B×(h·w)×C`` patch tokens → a ``B×C×h×w`` map."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], *grid)


def _last_block_with_readouts(
    block: ResidualAttentionBlock, tokens: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Run a ViT block by hand to read out its attention map and MaskCLIP value path.

    Returns the block output ``B×L×C``, the head-averaged attention ``B×L×L`` and the value path
    ``B×L×C`` (values through the output projection, no residual and no MLP).
    """
    attn: nn.MultiheadAttention = block.attn
    normed = block.ln_1(tokens)
    batch, length, width = normed.shape
    heads = attn.num_heads
    query, key, value = F.linear(normed, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)

    def split_heads(x: Tensor) -> Tensor:
        return x.view(batch, length, heads, width // heads).transpose(1, 2)

    query, key, value = split_heads(query), split_heads(key), split_heads(value)
    weights = torch.softmax(query @ key.transpose(-2, -1) / math.sqrt(width // heads), dim=-1)
    attended = (weights @ value).transpose(1, 2).reshape(batch, length, width)
    output = tokens + block.ls_1(attn.out_proj(attended))
    output = output + block.ls_2(block.mlp(block.ln_2(output)))
    value_path = attn.out_proj(value.transpose(1, 2).reshape(batch, length, width))
    return output, weights.mean(dim=1), value_path


def resolve_clip_name(name: str, pretrained: str | None) -> tuple[str, str | None]:
    """Map ovseg's short aliases (``"vit-b-16"``) to open_clip (name, tag); pass others through.

    An explicit ``pretrained`` (another tag or a local checkpoint) replaces the alias's tag.
    """
    if name in PAPER_CLIPS:
        open_clip_name, tag = PAPER_CLIPS[name]
        return open_clip_name, pretrained or tag
    return name, pretrained


def load_clip(
    name: str,
    pretrained: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
) -> ClipBackbone:
    """Build a CLIP backbone through open_clip's factory.

    Arguments:
        name: an open_clip model name (``"ViT-B-16"``, ``"convnext_base_w_320"``, ovseg's
            ``"ovseg-toy-vit"``), ``"hf-hub:org/repo"``, ``"local-dir:/path"``, or an ovseg alias
            from :data:`PAPER_CLIPS`.
        pretrained: an open_clip tag (``"openai"``), a local checkpoint file, or None for random
            weights. Ignored for ``hf-hub:`` and ``local-dir:`` names, which carry their weights.
        device: where to put the model (default CPU).
        cache_dir: where open_clip keeps downloaded weights.
        image_size: override the pretraining image size (ViT position embeddings are interpolated).

    Raises:
        WeightsError: if the weights cannot be found, downloaded or read, with the reason.
    """
    name, pretrained = resolve_clip_name(name, None if pretrained is None else str(pretrained))
    if pretrained is not None and os.path.sep in pretrained and not Path(pretrained).is_file():
        raise WeightsError(f"CLIP weights file {pretrained} does not exist.")
    kwargs = {}
    if image_size is not None:
        kwargs["force_image_size"] = image_size
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=pretrained,
            device=device or "cpu",
            cache_dir=None if cache_dir is None else str(cache_dir),
            weights_only=True,
            **kwargs,
        )
    except Exception as error:
        # A corrupt file can fail anywhere in safetensors or torch's unpickler, with any error
        # type; all of them mean the same thing to the caller.
        where = f"{name!r} with weights {pretrained!r}" if pretrained else repr(name)
        raise WeightsError(
            f"Could not load CLIP {where}: {error}. Without network access, pass a local "
            "checkpoint "
            "file as `pretrained`, or a 'local-dir:' folder with open_clip_config.json and weights."
        ) from error
    model.eval()
    transform = preprocess.transforms
    normalize = next(t for t in transform if t.__class__.__name__ == "Normalize")
    config_size = model.visual.image_size
    size = config_size[0] if isinstance(config_size, (tuple, list)) else int(config_size)
    return ClipBackbone(
        model=model,
        name=name,
        pretrained=pretrained,
        image_mean=tuple(normalize.mean),
        image_std=tuple(normalize.std),
        image_size=size,
        context_length=model.context_length,
    )
