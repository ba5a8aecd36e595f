"""Segment Anything (SAM) backbone: architectures as data, one factory, safe checkpoint loading.

The model itself is `segment_anything.modeling.Sam`, composed here from the package's own
`ImageEncoderViT`, `PromptEncoder`, `MaskDecoder` and `TwoWayTransformer`; nothing is vendored. The
real ViT-B/L/H architectures and the small ToyWorld one go through the same `build_sam` factory::

    sam = build_sam("vit_b", "sam_vit_b_01ec64.pth")  # official checkpoint
    sam = build_sam(None, "assets/toy_sam.safetensors")  # architecture read from toy_sam.json
    sam = load_sam("toy")  # the shipped ToyWorld SAM
    embeddings = sam.encode_image(images)  # (B, 3, H, W) in [0, 1] -> (B, C, h, w)
    mask_logits, iou = sam.decode(embeddings, points=(coords, labels))

`GridPromptEncoder` is SAM's prompt encoder for prompts placed on another model's patch grid
(ESC-Net prompts SAM's layers from CLIP's grid).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor, nn

import ovseg.backbones
from ovseg.errors import MissingWeightsError, WeightsError

__all__ = [
    "SAM_CONFIGS",
    "GridPromptEncoder",
    "SamBackbone",
    "SamConfig",
    "build_sam",
    "load_sam",
    "register_sam_config",
]

# Keys under which `SamBackbone.save` stores the architecture in the safetensors header, so a
# weights file stays self-describing when its JSON sibling is lost.
_METADATA_NAME_KEY = "ovseg.sam.name"
_METADATA_CONFIG_KEY = "ovseg.sam.config"
_SAFETENSORS_SUFFIX = ".safetensors"
# The ToyWorld SAM shipped in the assets folder: what the "toy" architecture loads by default.
TOY_SAM_CHECKPOINT = Path("sam-toy") / "sam-toy.safetensors"
# How many offending keys an architecture-mismatch error quotes.
_KEYS_SHOWN = 5


@dataclass(frozen=True)
class SamConfig:
    """Hyper-parameters of one SAM architecture (the arguments of `segment_anything._build_sam`).

    Attributes:
        encoder_embed_dim: Width of the ViT image encoder.
        encoder_depth: Number of ViT blocks.
        encoder_num_heads: Attention heads per ViT block; must divide `encoder_embed_dim`.
        encoder_global_attn_indexes: Blocks that attend globally; the others use windows.
        encoder_window_size: Side of the attention windows of the non-global blocks.
        encoder_mlp_ratio: ViT MLP hidden width as a multiple of `encoder_embed_dim`.
        image_size: Side of the square, padded encoder input in pixels.
        vit_patch_size: Patch side; the image embedding grid is `image_size // vit_patch_size`.
        prompt_embed_dim: Width of image embeddings, prompt tokens and the mask decoder.
        mask_in_chans: Hidden channels of the prompt encoder's mask downscaling.
        decoder_depth: Two-way attention blocks in the mask decoder's transformer.
        decoder_mlp_dim: MLP hidden width inside the two-way blocks.
        decoder_num_heads: Attention heads in the two-way blocks.
        num_multimask_outputs: Masks predicted when `multimask_output=True`.
        iou_head_depth: Layers of the IoU prediction MLP.
        iou_head_hidden_dim: Hidden width of the IoU prediction MLP.
        pixel_mean: Per-channel RGB mean on the 0-255 scale, subtracted before encoding.
        pixel_std: Per-channel RGB std on the 0-255 scale, divided out before encoding.
    """

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    encoder_window_size: int = 14
    encoder_mlp_ratio: float = 4.0
    image_size: int = 1024
    vit_patch_size: int = 16
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    def __post_init__(self) -> None:
        # JSON gives lists; the dataclass is frozen and hashable only with tuples.
        for field in ("encoder_global_attn_indexes", "pixel_mean", "pixel_std"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        problems = []
        if self.image_size % self.vit_patch_size:
            problems.append(
                f"image_size {self.image_size} is not a multiple of "
                f"vit_patch_size {self.vit_patch_size}"
            )
        if self.encoder_embed_dim % self.encoder_num_heads:
            problems.append(
                f"encoder_num_heads {self.encoder_num_heads} does not divide "
                f"encoder_embed_dim {self.encoder_embed_dim}"
            )
        outside = [i for i in self.encoder_global_attn_indexes if not 0 <= i < self.encoder_depth]
        if outside:
            problems.append(
                f"encoder_global_attn_indexes {outside} are outside the "
                f"{self.encoder_depth} encoder blocks"
            )
        # The two-way cross-attentions work at half width, and the mask upscaling at 1/8.
        if self.prompt_embed_dim % (2 * self.decoder_num_heads) or self.prompt_embed_dim % 8:
            problems.append(
                f"prompt_embed_dim {self.prompt_embed_dim} must be a multiple of 8 and of "
                f"2 * decoder_num_heads = {2 * self.decoder_num_heads}"
            )
        if self.mask_in_chans % 4:
            problems.append(f"mask_in_chans {self.mask_in_chans} is not a multiple of 4")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3:
            problems.append(
                f"pixel_mean and pixel_std need 3 values each, got {len(self.pixel_mean)} "
                f"and {len(self.pixel_std)}"
            )
        if problems:
            raise ValueError("invalid SamConfig: " + "; ".join(problems))

    @property
    def embedding_size(self) -> int:
        """Side of the square image-embedding grid, `image_size // vit_patch_size`."""
        return self.image_size // self.vit_patch_size

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as JSON-ready plain values."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> SamConfig:
        """Build a config from `to_dict` output; unknown or missing fields raise `ValueError`."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown SamConfig fields {unknown}; known fields: {sorted(known)}")
        try:
            return cls(**fields)
        except TypeError as error:
            raise ValueError(f"invalid SamConfig fields: {error}") from None


SAM_CONFIGS: dict[str, SamConfig] = {
    # The three released checkpoints, as in segment_anything/build_sam.py.
    "vit_b": SamConfig(
        encoder_embed_dim=768,
        encoder_depth=12,
        encoder_num_heads=12,
        encoder_global_attn_indexes=(2, 5, 8, 11),
    ),
    "vit_l": SamConfig(
        encoder_embed_dim=1024,
        encoder_depth=24,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(5, 11, 17, 23),
    ),
    "vit_h": SamConfig(
        encoder_embed_dim=1280,
        encoder_depth=32,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(7, 15, 23, 31),
    ),
    # ToyWorld SAM, trained on a CPU by training/pretrain_sam.py: a 16x16 embedding grid and
    # 2x2 attention windows, with every other block layout kept as in the real models.
    "toy": SamConfig(
        encoder_embed_dim=192,
        encoder_depth=6,
        encoder_num_heads=4,
        encoder_global_attn_indexes=(2, 5),
        encoder_window_size=8,
        image_size=256,
        vit_patch_size=16,
        prompt_embed_dim=128,
        decoder_mlp_dim=512,
        decoder_num_heads=8,
        iou_head_hidden_dim=128,
    ),
}


def register_sam_config(name: str, config: SamConfig, *, overwrite: bool = False) -> None:
    """Make `config` buildable as `build_sam(name)`.

    Args:
        name: Registry key.
        config: The architecture.
        overwrite: Replace an existing entry instead of raising.
    """
    if not isinstance(config, SamConfig):
        raise TypeError(f"config must be a SamConfig, got {type(config).__name__}")
    if name in SAM_CONFIGS and not overwrite and SAM_CONFIGS[name] != config:
        raise ValueError(
            f"SAM architecture '{name}' is already registered with a different config; "
            "pass overwrite=True to replace it"
        )
    SAM_CONFIGS[name] = config


def _build_sam_model(config: SamConfig, *, image_encoder: bool = True) -> Sam:
    """Compose a randomly initialised `Sam` exactly as `segment_anything._build_sam` does.

    Without `image_encoder` the model's `image_encoder` is None: only the prompt encoder and the
    mask decoder exist (what a method that reuses SAM's decoder layers needs).
    """
    grid = config.embedding_size
    return Sam(
        image_encoder=None
        if not image_encoder
        else ImageEncoderViT(
            depth=config.encoder_depth,
            embed_dim=config.encoder_embed_dim,
            img_size=config.image_size,
            mlp_ratio=config.encoder_mlp_ratio,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=config.encoder_num_heads,
            patch_size=config.vit_patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=config.encoder_global_attn_indexes,
            window_size=config.encoder_window_size,
            out_chans=config.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=config.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=config.prompt_embed_dim,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_num_heads,
            ),
            transformer_dim=config.prompt_embed_dim,
            iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        ),
        pixel_mean=list(config.pixel_mean),
        pixel_std=list(config.pixel_std),
    )


class SamBackbone(nn.Module):
    """A `segment_anything` SAM with batched, shape-checked encode and decode calls.

    Args:
        config: The architecture; the `Sam` is built with random weights.
        name: Registry name of the architecture, written by `save` (None for an unnamed config).
        image_encoder: False builds only the prompt encoder and the mask decoder, for callers that
            never encode an image (most of SAM's parameters and memory are the image encoder).
    """

    def __init__(
        self, *, config: SamConfig, name: str | None = None, image_encoder: bool = True
    ) -> None:
        super().__init__()
        self._config = config
        self.name = name
        self.sam = _build_sam_model(config, image_encoder=image_encoder)

    @property
    def config(self) -> SamConfig:
        return self._config

    @property
    def image_encoder(self) -> ImageEncoderViT | None:
        """The ViT image encoder, or None for a SAM built without it."""
        return self.sam.image_encoder

    @property
    def prompt_encoder(self) -> PromptEncoder:
        return self.sam.prompt_encoder

    @property
    def mask_decoder(self) -> MaskDecoder:
        return self.sam.mask_decoder

    @property
    def image_size(self) -> int:
        """Side of the square encoder input in pixels."""
        return self._config.image_size

    @property
    def embedding_size(self) -> int:
        """Side of the image-embedding grid; decoded masks are `4 * embedding_size` wide."""
        return self._config.embedding_size

    @property
    def prompt_embed_dim(self) -> int:
        """Channels of the image embeddings and prompt tokens."""
        return self._config.prompt_embed_dim

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of an `original_size` image after `preprocess` resizes it, before padding."""
        height, width = original_size
        return ResizeLongestSide.get_preprocess_shape(height, width, self.image_size)

    def preprocess(self, images: Tensor) -> Tensor:
        """Resize the longest side to `image_size`, normalise as SAM does and pad bottom-right.

        Args:
            images: (B, 3, H, W) float RGB in [0, 1].

        Returns:
            (B, 3, image_size, image_size) encoder input.
        """
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                "images must be a float (B, 3, H, W) tensor, got "
                f"{images.dtype} of shape {tuple(images.shape)}"
            )
        low, high = (value.item() for value in torch.aminmax(images))
        if low < 0.0 or high > 1.0:
            raise ValueError(f"images must be in [0, 1], got values in [{low:.3g}, {high:.3g}]")
        # Resize and normalise in float32 (antialiased resizing has no half-precision CPU
        # kernel), then hand the encoder its own dtype.
        images = images.to(device=self.sam.device, dtype=torch.float32)
        input_size = self.input_size(images.shape[-2:])
        if input_size != images.shape[-2:]:
            # Same resize as SamPredictor's torch path (ResizeLongestSide.apply_image_torch).
            images = F.interpolate(
                images, input_size, mode="bilinear", align_corners=False, antialias=True
            )
        # Sam.preprocess normalises with its 0-255 pixel statistics and pads to image_size.
        return self.sam.preprocess(images * 255.0).to(self.sam.pixel_mean.dtype)

    def postprocess_masks(self, mask_logits: Tensor, *, original_size: tuple[int, int]) -> Tensor:
        """Undo `preprocess` on decoded masks: upsample, crop the padding, resize to the image.

        Args:
            mask_logits: (B, M, 4h, 4w) logits from `decode`.
            original_size: (H, W) of the images given to `preprocess`.

        Returns:
            (B, M, H, W) logits; threshold at 0 for binary masks.
        """
        return self.sam.postprocess_masks(
            mask_logits, input_size=self.input_size(original_size), original_size=original_size
        )

    def encode_image(self, images: Tensor) -> Tensor:
        """Run `preprocess` and the ViT image encoder.

        Args:
            images: (B, 3, H, W) float RGB in [0, 1].

        Returns:
            (B, prompt_embed_dim, embedding_size, embedding_size) image embeddings.
        """
        if self.image_encoder is None:
            raise ValueError(
                "this SAM was built without its image encoder (image_encoder=False); build it "
                "with the image encoder to encode images"
            )
        return self.image_encoder(self.preprocess(images))

    def decode(
        self,
        image_embeddings: Tensor,
        *,
        points: tuple[Tensor, Tensor] | None = None,
        boxes: Tensor | None = None,
        masks: Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Predict masks from image embeddings and prompts, batched over images.

        Prompt row `i` belongs to image `i`. One image (B = 1) may also be shared by P prompt
        rows, as with `SamPredictor`. Without any prompt, SAM predicts from the image alone.

        Args:
            image_embeddings: (B, C, h, w) output of `encode_image`.
            points: Coordinates (P, N, 2) as (x, y) in pixels of the `image_size` input frame,
                and labels (P, N): 1 foreground, 0 background, -1 ignored.
            boxes: (P, 4) as (x0, y0, x1, y1) in the same frame.
            masks: (P, 1, 4h, 4w) mask logits, e.g. the low-resolution output of an earlier call.
            multimask_output: Return the `num_multimask_outputs` ambiguity masks instead of one.

        Returns:
            Mask logits (P, M, 4h, 4w) and predicted IoUs (P, M), where P = max(B, prompt rows)
            and M is 1, or `num_multimask_outputs` when `multimask_output` is set.
        """
        batch = self._check_decode_inputs(image_embeddings, points, boxes, masks)
        with self._prompt_precision(image_embeddings.device):
            sparse_embeddings, dense_embeddings = self.prompt_encoder(
                points=points, boxes=boxes, masks=masks
            )
            # MaskDecoder repeats its image embeddings once per prompt row: right for one image
            # and many prompts, but here it would pair every image with every row. Handing it a
            # zero image and folding the real embeddings into the dense prompt (which it adds to
            # the image anyway) keeps one image per row in a single batched call.
            mask_logits, iou = self.mask_decoder(
                image_embeddings=image_embeddings.new_zeros(1, *image_embeddings.shape[1:]),
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse_embeddings.expand(batch, -1, -1),
                dense_prompt_embeddings=image_embeddings + dense_embeddings,
                multimask_output=multimask_output,
            )
        return mask_logits, iou

    def _prompt_precision(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Context in which `PromptEncoder` and `MaskDecoder` run in the module's dtype.

        SAM's prompt encoder builds its positional encodings in float32 whatever the module's
        dtype, so a half-precision SAM decodes under autocast to that precision.
        """
        dtype = self.sam.pixel_mean.dtype
        if dtype == torch.float32:
            return contextlib.nullcontext()
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"SAM decodes in float32, float16 or bfloat16, but the backbone is in {dtype}"
            )
        return torch.autocast(device.type, dtype=dtype)

    def _check_decode_inputs(
        self,
        image_embeddings: Tensor,
        points: tuple[Tensor, Tensor] | None,
        boxes: Tensor | None,
        masks: Tensor | None,
    ) -> int:
        """Raise `ValueError` on malformed `decode` inputs; return the output batch size."""
        grid = self.embedding_size
        expected = (self.prompt_embed_dim, grid, grid)
        if image_embeddings.ndim != 4 or tuple(image_embeddings.shape[1:]) != expected:
            raise ValueError(
                f"image_embeddings must be (B, {expected[0]}, {grid}, {grid}), "
                f"got {tuple(image_embeddings.shape)}"
            )
        rows = {}
        if points is not None:
            coords, labels = points
            if coords.ndim != 3 or coords.shape[-1] != 2:
                raise ValueError(f"point coords must be (P, N, 2), got {tuple(coords.shape)}")
            if tuple(labels.shape) != tuple(coords.shape[:2]):
                raise ValueError(
                    f"point labels must be (P, N) = {tuple(coords.shape[:2])}, "
                    f"got {tuple(labels.shape)}"
                )
            rows["points"] = coords.shape[0]
        if boxes is not None:
            if boxes.ndim != 2 or boxes.shape[-1] != 4:
                raise ValueError(f"boxes must be (P, 4), got {tuple(boxes.shape)}")
            rows["boxes"] = boxes.shape[0]
        if masks is not None:
            if masks.ndim != 4 or tuple(masks.shape[1:]) != (1, 4 * grid, 4 * grid):
                raise ValueError(
                    f"masks must be (P, 1, {4 * grid}, {4 * grid}) logits, got {tuple(masks.shape)}"
                )
            rows["masks"] = masks.shape[0]
        if len(set(rows.values())) > 1:
            raise ValueError(f"prompts disagree on the number of rows: {rows}")
        images = image_embeddings.shape[0]
        prompt_rows = next(iter(rows.values()), images)
        if images not in (1, prompt_rows):
            raise ValueError(
                f"{images} image embeddings but {prompt_rows} prompt rows; give one row per "
                "image, or a single image shared by all rows"
            )
        return max(images, prompt_rows)

    def save(self, path: str | os.PathLike) -> Path:
        """Write `<path>.safetensors` and `<path>.json` so `build_sam(None, path)` rebuilds this.

        The architecture is also stored in the safetensors metadata. A trailing `.safetensors`
        in `path` is not doubled.

        Returns:
            The path of the weights file.

        Raises:
            ValueError: this SAM was built without its image encoder, so no file of it could be
                read back.
        """
        if self.image_encoder is None:
            raise ValueError(
                "A SAM built without its image encoder (image_encoder=False) cannot be saved: "
                "build_sam reads a whole SAM."
            )
        base = _strip_safetensors_suffix(Path(path))
        base.parent.mkdir(parents=True, exist_ok=True)
        weights_path = base.parent / (base.name + _SAFETENSORS_SUFFIX)
        config_path = base.parent / (base.name + ".json")
        state_dict = {
            key: value.detach().cpu().contiguous() for key, value in self.sam.state_dict().items()
        }
        fields = self._config.to_dict()
        metadata = {_METADATA_CONFIG_KEY: json.dumps(fields)}
        if self.name is not None:
            metadata[_METADATA_NAME_KEY] = self.name
        save_file(state_dict, weights_path, metadata=metadata)
        config_path.write_text(json.dumps({"name": self.name, "config": fields}, indent=2) + "\n")
        return weights_path


class GridPromptEncoder(nn.Module):
    """SAM's pretrained prompt encoder for prompts placed on a patch grid, not in pixels.

    The encoder is segment-anything's own `PromptEncoder` rebuilt for the grid
    (`input_image_size` = `image_embedding_size` = grid×grid), so a point's positional encoding
    is the dense PE of its cell; its weights are copied from a SAM's.

    Args:
        source: The SAM prompt encoder whose weights are copied.
        grid: Side of the patch grid the prompts live on.
        prompt_types: Which of `"point"`, `"box"`, `"mask"` to embed.
        dense_prompt: How the N regions of a prompt set become SAM's one mask prompt: `"union"`,
            the mask prompt of their union; `"mean"`, the average of the N regions' mask
            embeddings (SAM's mask downscaling maps a ±κ mask cell by cell to one of two
            vectors, so this is the union at 1/N strength).
        mask_logit: κ, the magnitude of the ±κ mask-prompt logits.
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
        """(C, h, w) positional encoding of the grid (SAM's `get_dense_pe`)."""
        return self.encoder.pe_layer(size)

    def forward(self, points: Tensor, boxes: Tensor, regions: Tensor) -> tuple[Tensor, Tensor]:
        """Embed R prompt sets of N regions each, all in grid units.

        Args:
            points: (R, N, 2) foreground points as (x, y) cells.
            boxes: (R, N, 4) boxes as (x0, y0, x1, y1) with inclusive corners.
            regions: (R, N, h, w) bool region masks.

        Returns:
            SAM's sparse (R, T, C) and dense (R, C, h, w) prompt embeddings; T counts N points
            (+ SAM's padding point when there are no boxes) and 2·N box corners.
        """
        rows, objects, height, width = regions.shape
        encoder = self.encoder
        dtype = encoder.no_mask_embed.weight.dtype
        sparse = [encoder.no_mask_embed.weight.new_zeros(rows, 0, encoder.embed_dim)]
        if "point" in self.prompt_types:
            labels = torch.ones(rows, objects, device=points.device)
            sparse.append(encoder._embed_points(points, labels, pad="box" not in self.prompt_types))
        if "box" in self.prompt_types:
            corners = encoder._embed_boxes(boxes.reshape(rows * objects, 4))
            sparse.append(corners.view(rows, 2 * objects, -1))
        if "mask" not in self.prompt_types:
            dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
            return torch.cat(sparse, dim=1).to(dtype), dense.expand(rows, -1, height, width)
        masks = regions.to(dtype)
        if self.dense_prompt == "union":
            masks = masks.amax(dim=1, keepdim=True)
        # SAM mask prompts are logits at 4× the embedding grid, thresholded at 0.
        masks = F.interpolate(masks.flatten(0, 1)[:, None], scale_factor=4, mode="nearest")
        masks = self.mask_logit * (2 * masks - 1)
        if self.dense_prompt == "union":
            return torch.cat(sparse, dim=1).to(dtype), encoder._embed_masks(masks)
        # The mean over regions commutes with mask_downscaling's last 1×1 convolution, its widest
        # layer: averaging before it runs that layer once per set instead of N times.
        *downscale, project = encoder.mask_downscaling
        features = nn.Sequential(*downscale)(masks)
        dense = project(features.view(rows, objects, *features.shape[1:]).mean(dim=1))
        return torch.cat(sparse, dim=1).to(dtype), dense


def _strip_safetensors_suffix(path: Path) -> Path:
    if path.name.endswith(_SAFETENSORS_SUFFIX):
        return path.with_name(path.name[: -len(_SAFETENSORS_SUFFIX)])
    return path


def _resolve_checkpoint(checkpoint: str | os.PathLike) -> Path:
    """Return the existing weights file, accepting the suffix-less base that `save` takes."""
    path = Path(checkpoint)
    if path.is_file():
        return path
    with_suffix = path.with_name(path.name + _SAFETENSORS_SUFFIX)
    if not path.name.endswith(_SAFETENSORS_SUFFIX) and with_suffix.is_file():
        return with_suffix
    tried = f" (nor {with_suffix})" if not path.name.endswith(_SAFETENSORS_SUFFIX) else ""
    raise MissingWeightsError(f"SAM checkpoint not found: {path}{tried}")


def _read_saved_architecture(path: Path) -> tuple[str | None, SamConfig]:
    """Read the (name, config) that `SamBackbone.save` stored beside or inside `path`."""
    config_path = path.with_name(_strip_safetensors_suffix(path).name + ".json")
    if config_path.is_file():
        try:
            saved = json.loads(config_path.read_text())
            return saved.get("name"), SamConfig.from_dict(saved["config"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as error:
            raise WeightsError(
                f"{config_path} is not a SAM config written by SamBackbone.save "
                f'(expected {{"name": ..., "config": {{...}}}}): {error}'
            ) from None
    try:
        with safe_open(path, framework="pt") as weights:
            metadata = weights.metadata() or {}
    except SafetensorError as error:
        raise WeightsError(f"{path} is not a readable safetensors file: {error}") from None
    if _METADATA_CONFIG_KEY not in metadata:
        raise WeightsError(
            f"cannot tell the SAM architecture of {path}: there is no {config_path.name} beside "
            f"it and no '{_METADATA_CONFIG_KEY}' in its metadata; pass a name, one of "
            f"{sorted(SAM_CONFIGS)}"
        )
    try:
        config = SamConfig.from_dict(json.loads(metadata[_METADATA_CONFIG_KEY]))
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise WeightsError(f"{path} has a malformed '{_METADATA_CONFIG_KEY}': {error}") from None
    return metadata.get(_METADATA_NAME_KEY), config


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Load a state dict from safetensors or, for any other suffix, `torch.load` (weights only)."""
    if path.name.endswith(_SAFETENSORS_SUFFIX):
        try:
            return load_file(path, device="cpu")
        except SafetensorError as error:
            raise WeightsError(f"{path} is not a readable safetensors file: {error}") from None
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        # torch's weights-only unpickler fails on garbage with whatever error the bytes provoke
        # (IndexError, KeyError, UnicodeDecodeError, ...); every one means "not a checkpoint".
        raise WeightsError(
            f"{path} is not a readable PyTorch checkpoint: it is corrupt, truncated or holds "
            f"more than tensors ({_torch_load_reason(error)})"
        ) from None
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in state_dict.items()
    ):
        found = (
            f"keys {sorted(map(str, state_dict))[:_KEYS_SHOWN]}"
            if isinstance(state_dict, Mapping)
            else type(state_dict).__name__
        )
        raise WeightsError(
            f"{path} does not hold a SAM state dict (a mapping from names such as "
            f"'image_encoder.patch_embed.proj.weight' to tensors); found {found}"
        )
    return dict(state_dict)


def _torch_load_reason(error: Exception) -> str:
    """The informative part of a `torch.load` error, without its advice to drop weights_only."""
    text = str(error).strip()
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", text)
    if unpickler:
        return unpickler.group(1)
    first_line = text.splitlines()[0] if text else type(error).__name__
    return first_line.split(". ")[0]


def _check_state_dict(
    model: Sam, state_dict: Mapping[str, Tensor], *, path: Path, name: str | None
) -> None:
    """Raise `WeightsError` listing what differs if `state_dict` does not fit `model` exactly."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{key}: file {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if state_dict[key].shape != expected[key].shape
    )
    if not (missing or unexpected or mismatched):
        return
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:_KEYS_SHOWN])}"
        + (", ..." if len(items) > _KEYS_SHOWN else "")
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if items
    ]
    raise WeightsError(
        f"{path} does not match SAM architecture '{name or 'unnamed'}'"
        f"{_describe_encoder(state_dict)}: " + "; ".join(problems)
    )


def _describe_encoder(state_dict: Mapping[str, Tensor]) -> str:
    """Say which registered architectures the file's image encoder looks like, if it has one."""
    patch_weight = state_dict.get("image_encoder.patch_embed.proj.weight")
    if patch_weight is None:
        return ""
    width = patch_weight.shape[0]
    depth = len(
        {key.split(".")[2] for key in state_dict if key.startswith("image_encoder.blocks.")}
    )
    candidates = [
        registered
        for registered, config in SAM_CONFIGS.items()
        if (config.encoder_embed_dim, config.encoder_depth) == (width, depth)
    ]
    looks_like = f", like {' or '.join(repr(c) for c in candidates)}" if candidates else ""
    return f" (the file has a {depth}-block, {width}-wide image encoder{looks_like})"


def build_sam(
    name: str | None = "vit_b",
    checkpoint: str | os.PathLike | None = None,
    *,
    device: torch.device | str | None = None,
    image_encoder: bool = True,
) -> SamBackbone:
    """Build a SAM backbone by architecture name, optionally loading weights.

    Args:
        name: A key of `SAM_CONFIGS`. May be None for a safetensors checkpoint written by
            `SamBackbone.save`, whose architecture is read from `<stem>.json` or its metadata.
        checkpoint: An official `.pth` state dict (read with `torch.load(weights_only=True)`)
            or a `.safetensors` file; `save`'s suffix-less path also works. None keeps the
            random initialisation.
        device: Where to put the model; weights are loaded on the CPU first.
        image_encoder: False builds and loads only the prompt encoder and the mask decoder; the
            checkpoint's image-encoder tensors are checked and then dropped.

    Returns:
        The backbone in eval mode.
    """
    path = _resolve_checkpoint(checkpoint) if checkpoint is not None else None
    if name is not None:
        if name not in SAM_CONFIGS:
            raise ValueError(
                f"unknown SAM architecture '{name}'; known: {', '.join(sorted(SAM_CONFIGS))}"
            )
        config = SAM_CONFIGS[name]
    elif path is None:
        raise ValueError("build_sam needs an architecture name when no checkpoint is given")
    elif not path.name.endswith(_SAFETENSORS_SUFFIX):
        raise ValueError(
            f"{path} carries no architecture; pass a name, one of {sorted(SAM_CONFIGS)} "
            "(only safetensors files written by SamBackbone.save describe themselves)"
        )
    else:
        name, config = _read_saved_architecture(path)
    backbone = SamBackbone(config=config, name=name, image_encoder=image_encoder)
    if path is not None:
        state_dict = _read_state_dict(path)
        if not image_encoder:
            # Checked against the whole architecture (shapes only, on the meta device), so a file
            # of another architecture is still named as such.
            with torch.device("meta"):
                full = _build_sam_model(config)
            _check_state_dict(full, state_dict, path=path, name=name)
            state_dict = {
                key: value
                for key, value in state_dict.items()
                if not key.startswith("image_encoder.")
            }
        _check_state_dict(backbone.sam, state_dict, path=path, name=name)
        backbone.sam.load_state_dict(state_dict, strict=True)
    backbone.eval()
    if device is not None:
        backbone.to(device)
    return backbone


def load_sam(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    pretrained: bool = True,
    device: torch.device | str | None = None,
    image_encoder: bool = True,
) -> SamBackbone:
    """A pretrained SAM by architecture name: `build_sam` with the default weights filled in.

    Args:
        name: A key of `SAM_CONFIGS`.
        checkpoint: The weights (see `build_sam`); None: the shipped ToyWorld SAM for `"toy"`
            (other architectures have no default and need one).
        pretrained: False builds the architecture with random weights; `checkpoint` is not read.
        device: Where to put the model.
        image_encoder: False builds and loads only the prompt encoder and the mask decoder.

    Raises:
        ValueError: a pretrained SAM other than `"toy"` without a checkpoint.
        WeightsError: the checkpoint is missing or does not fit the architecture.
    """
    if not pretrained:
        return build_sam(name, None, device=device, image_encoder=image_encoder)
    if checkpoint is None:
        if name != "toy":
            raise ValueError(
                f"SAM {name!r} has no shipped weights: give its checkpoint (a method's "
                "sam_checkpoint setting; e.g. the official sam_vit_b_01ec64.pth), or "
                "pretrained=False for random weights."
            )
        checkpoint = ovseg.backbones.ASSETS_DIR / TOY_SAM_CHECKPOINT
    try:
        return build_sam(name, checkpoint, device=device, image_encoder=image_encoder)
    except (FileNotFoundError, ValueError) as error:
        raise WeightsError(f"Cannot load the SAM {name!r}: {error}") from error
