"""Which parts of CLIP a method fine-tunes, with CLIP's K projections frozen by construction.

CAT-Seg's "attention" scope, which DCP-CLIP and ESC-Net follow, trains the Q and V projections of
every attention block of both towers and the position embeddings; K and everything else stay as
pretrained. open_clip fuses Q, K and V into one ``in_proj_weight`` (and ``in_proj_bias``), so K
cannot be frozen with ``requires_grad``. A gradient hook that zeroes the K rows is fragile:
``copy.deepcopy`` drops it, and AdamW's weight decay still moves rows whose gradient is zero.
Here the fused tensor is split instead: a parametrization (:class:`FrozenKeyRows`) rebuilds
``[Q; K; V]`` on every access from a trainable ``Q;V`` tensor and a K *buffer*. No gradient,
optimiser step or weight decay can reach a buffer, and the split survives ``deepcopy``.

State dicts keep open_clip's fused key names (``…attn.in_proj_weight``), so weights saved before
or after the split load either way and the shipped head files are unchanged.

The scope is set when a method is trained (``method.train()`` or ``parameter_groups``), not when
it is built, so a backbone shared with other methods for inference is left untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

SCOPES = ("none", "attention", "full")
FUSED_PROJECTIONS = ("in_proj_weight", "in_proj_bias")


class FrozenKeyRows(nn.Module):
    """Parametrization of a fused ``[Q; K; V]`` projection (``3D×…``) whose K rows are a buffer.

    The trainable tensor it wraps holds the Q and V rows (``2D×…``); :meth:`forward` puts the
    frozen K rows back between them.
    """

    def __init__(self, fused: Tensor) -> None:
        super().__init__()
        width = fused.shape[0] // 3
        self.register_buffer("key", fused[width : 2 * width].detach().clone())

    def forward(self, query_value: Tensor) -> Tensor:
        query, value = query_value.chunk(2, dim=0)
        return torch.cat([query, self.key, value], dim=0)

    def right_inverse(self, fused: Tensor) -> Tensor:
        query, key, value = fused.chunk(3, dim=0)
        with torch.no_grad():
            self.key.copy_(key)
        return torch.cat([query, value], dim=0)


def _original_key(prefix: str, name: str) -> str:
    return f"{prefix}parametrizations.{name}.original"


def _key_buffer_key(prefix: str, name: str) -> str:
    return f"{prefix}parametrizations.{name}.0.key"


def _fuse_state(module: nn.Module, state: dict, prefix: str, metadata) -> None:
    """State-dict post-hook: write the split projection back under its fused open_clip name."""
    for name in FUSED_PROJECTIONS:
        original, key = _original_key(prefix, name), _key_buffer_key(prefix, name)
        if original not in state:
            continue
        query, value = state.pop(original).chunk(2, dim=0)
        state[prefix + name] = torch.cat([query, state.pop(key), value], dim=0)


def _split_state(module: nn.Module, state: dict, prefix: str, *args) -> None:
    """Load pre-hook: a fused ``in_proj_*`` entry fills the split Q;V tensor and the K buffer."""
    for name in FUSED_PROJECTIONS:
        if prefix + name not in state or not parametrize.is_parametrized(module, name):
            continue
        query, key, value = state.pop(prefix + name).chunk(3, dim=0)
        state[_original_key(prefix, name)] = torch.cat([query, value], dim=0)
        state[_key_buffer_key(prefix, name)] = key


def split_key_rows(attention: nn.MultiheadAttention) -> None:
    """Split ``attention``'s fused projections into trainable Q;V and a K buffer (idempotent).

    The module computes exactly what it computed before.
    """
    if parametrize.is_parametrized(attention):
        return
    if not attention._qkv_same_embed_dim:
        raise ValueError("Only fused Q/K/V projections (open_clip's attention) can be split.")
    for name in FUSED_PROJECTIONS:
        tensor = getattr(attention, name)
        if tensor is not None:
            parametrize.register_parametrization(attention, name, FrozenKeyRows(tensor))
    # The hooks do nothing on an unsplit module, so after a split is undone they stay, once.
    if not getattr(attention, "_fused_state_hooks", False):
        attention.register_state_dict_post_hook(_fuse_state)
        attention.register_load_state_dict_pre_hook(_split_state)
        attention._fused_state_hooks = True


def attention_modules(model: nn.Module) -> Iterator[nn.MultiheadAttention]:
    return (module for module in model.modules() if isinstance(module, nn.MultiheadAttention))


def query_value_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable Q;V tensors of every split attention projection in ``model``."""
    return [
        attention.parametrizations[name].original
        for attention in attention_modules(model)
        if parametrize.is_parametrized(attention)
        for name in FUSED_PROJECTIONS
        if parametrize.is_parametrized(attention, name)
    ]


def set_finetuning_scope(model: nn.Module, scope: str) -> None:
    """Set which of ``model``'s (a CLIP's) parameters train.

    Arguments:
        model: the CLIP (a :class:`~ovseg.backbones.ClipBackbone` or its open_clip model).
        scope: ``"none"`` (all frozen), ``"attention"`` (Q/V of every attention block and the
            position embeddings of both towers; K split off and frozen) or ``"full"`` (all of
            it, K included: a split is undone, keeping its values).

    Raises:
        ValueError: an unknown scope.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}; got {scope!r}.")
    for attention in attention_modules(model):
        if scope == "attention":
            split_key_rows(attention)
        elif scope == "full":
            for name in FUSED_PROJECTIONS:
                if parametrize.is_parametrized(attention, name):
                    parametrize.remove_parametrizations(attention, name)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(
            scope == "full" or (scope == "attention" and name.endswith("positional_embedding"))
        )
    for parameter in query_value_parameters(model) if scope == "attention" else ():
        parameter.requires_grad_(True)


def trainable_state_names(names: Iterable[str], scope: str) -> set[str]:
    """Which of a CLIP's state-dict ``names`` (fused open_clip names) ``scope`` trains: what a
    head file must hold, whether or not the scope has been set on the model yet."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}; got {scope!r}.")
    if scope == "full":
        return set(names)
    if scope == "none":
        return set()
    ends = ("attn.in_proj_weight", "attn.in_proj_bias", "positional_embedding")
    return {name for name in names if name.endswith(ends)}


def fused_state_name(name: str) -> str:
    """The state-dict name of a parameter: a split projection's ``…parametrizations.X.original``
    is saved as ``…X``."""
    head, marker, tail = name.partition("parametrizations.")
    if not marker or not tail.endswith(".original"):
        return name
    return head + tail.removesuffix(".original")
