"""Dense CLIP: the training-free baseline every method is compared with.

Each pixel takes the class whose text embedding is most similar to its dense CLIP embedding: the
argmax of the cosine cost volume. With ``dense_mode="maskclip"`` the dense embeddings come from the
value path of the last ViT block (MaskCLIP, Zhou et al. 2022), which localises far better than the
ordinary token outputs of a CLIP that was never trained for segmentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ovseg.backbones import ClipBackbone, DenseFeatures
from ovseg.methods.base import (
    MethodConfig,
    SegmentationMethod,
    SegmentationOutput,
    VocabularyLike,
)
from ovseg.methods.blocks import cosine_cost_volume
from ovseg.methods.builder import method_builder, register_method
from ovseg.methods.chunking import upsample_logits


@dataclass
class DenseClipConfig(MethodConfig):
    """Attributes (beyond :class:`MethodConfig`):
    dense_mode: ``"maskclip"`` (value path, ViT only) or ``"standard"`` (token outputs).
    temperature: divides the cosine scores into logits; CLIP's own is 0.01.
    finetune: ``"none"`` (training-free) or ``"attention"``: train the attention projections of
        both CLIP towers with a per-pixel loss on the cost volume (the "fine-tuned CLIP"
        baseline of CAT-Seg's ablation), at ``lr_multiplier`` times the base rate.
    """

    dense_mode: str = "maskclip"
    temperature: float = 0.01
    finetune: str = "none"
    lr_multiplier: float = 0.01


class DenseClip(SegmentationMethod):
    """Argmax of the cosine cost volume between dense image and text embeddings."""

    name = "dense-clip"
    config_class = DenseClipConfig
    trained_head = False

    def __init__(self, *, config: DenseClipConfig, backbone: ClipBackbone) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.dense_mode = config.dense_mode if backbone.kind == "vit" else "standard"
        if config.finetune not in ("none", "attention"):
            raise ValueError(f"finetune must be 'none' or 'attention'; got {config.finetune!r}.")
        if config.finetune == "attention":
            # Fine-tuning changes the backbone in place: give this method a backbone of its own.
            for name, parameter in backbone.named_parameters():
                parameter.requires_grad = ".attn." in name

    def parameter_groups(self, base_lr: float) -> list[dict[str, Any]]:
        if self.config.finetune == "none":
            return []
        trainable = [p for n, p in self.backbone.named_parameters() if ".attn." in n]
        return [
            {
                "params": trainable,
                "lr": base_lr * self.config.lr_multiplier,
                "name": "clip_attention",
            }
        ]

    def encode_image(self, images: Tensor) -> DenseFeatures:
        """``B×3×H×W`` images in [0, 1] → dense CLIP features (stride of the backbone)."""
        return self.backbone.encode_image(
            self.backbone.normalize(images), dense_mode=self.dense_mode
        )

    def segment(
        self,
        image_features: DenseFeatures,
        vocabulary: VocabularyLike,
        *,
        return_intermediates: bool = False,
        target: Tensor | None = None,
        **options: Any,
    ) -> SegmentationOutput:
        self.check_options(options)
        text = self.backbone.encode_text(vocabulary, self.config.templates)
        cost_volume = cosine_cost_volume(image_features.dense, text.mean)  # B×K×h×w
        logits = upsample_logits(cost_volume / self.config.temperature, image_features.input_size)
        intermediates = {}
        if return_intermediates:
            intermediates = {
                "cost_volume": cost_volume,
                "text_embeddings": text.mean,
                "dense_embeddings": image_features.dense,
                "global_embedding": image_features.global_embedding,
            }
        return SegmentationOutput(logits=logits, intermediates=intermediates)


build_dense_clip = register_method("dense-clip")(method_builder(DenseClip))
