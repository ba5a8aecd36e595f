"""Optimiser parameter groups by name: the papers train their new layers, the CLIP they fine-tune
and any other pretrained part (SAM) at different learning rates."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn


def parameter_groups(
    module: nn.Module,
    group_of: Callable[[str, nn.Parameter], str | None],
    *,
    lr: Mapping[str, float],
    weight_decay: float | Mapping[str, float],
) -> list[dict[str, Any]]:
    """The trainable parameters of ``module`` in named AdamW groups.

    Arguments:
        group_of: the group of a parameter from its qualified name (None: in no group).
        lr: each group's learning rate; the groups come in this mapping's order, and a group
            without trainable parameters is left out.
        weight_decay: one decay for every group, or each group's.

    Returns:
        ``{"name", "params", "lr", "weight_decay"}`` dicts, as ``torch.optim.AdamW`` takes them.
    """
    members: dict[str, list[nn.Parameter]] = {name: [] for name in lr}
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        group = group_of(name, parameter)
        if group is None:
            continue
        if group not in members:
            raise KeyError(f"Parameter {name!r} is in group {group!r}, which has no learning rate.")
        members[group].append(parameter)
    return [
        {
            "name": group,
            "params": params,
            "lr": lr[group],
            "weight_decay": weight_decay[group]
            if isinstance(weight_decay, Mapping)
            else weight_decay,
        }
        for group, params in members.items()
        if params
    ]
