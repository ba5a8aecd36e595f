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
    no_decay: Callable[[str, nn.Parameter], bool] | None = None,
) -> list[dict[str, Any]]:
    """The trainable parameters of ``module`` in named AdamW groups.

    Arguments:
        group_of: the group of a parameter from its qualified name (None: in no group).
        lr: each group's learning rate; the groups come in this mapping's order, and a group
            without trainable parameters is left out.
        weight_decay: one decay for every group, or each group's.
        no_decay: parameters it accepts (norms, biases) go to a ``"<group>_no_decay"`` group,
            right after their group, at its rate and without weight decay.

    Returns:
        ``{"name", "params", "lr", "weight_decay"}`` dicts, as ``torch.optim.AdamW`` takes them.
    """
    kinds = (True, False) if no_decay is not None else (True,)
    members: dict[tuple[str, bool], list[nn.Parameter]] = {
        (group, decays): [] for group in lr for decays in kinds
    }
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        group = group_of(name, parameter)
        if group is None:
            continue
        if group not in lr:
            raise KeyError(f"Parameter {name!r} is in group {group!r}, which has no learning rate.")
        decays = no_decay is None or not no_decay(name, parameter)
        members[group, decays].append(parameter)
    decay = weight_decay if isinstance(weight_decay, Mapping) else dict.fromkeys(lr, weight_decay)
    return [
        {
            "name": group if decays else f"{group}_no_decay",
            "params": params,
            "lr": lr[group],
            "weight_decay": decay[group] if decays else 0.0,
        }
        for (group, decays), params in members.items()
        if params
    ]
