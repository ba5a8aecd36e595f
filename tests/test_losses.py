"""The shared one-hot losses, optimiser groups and declarative config checks."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ovseg.methods.base import IGNORE_INDEX, MethodConfig
from ovseg.methods.losses import binary_cross_entropy_with_logits, one_hot_bce, one_hot_targets
from ovseg.methods.optimiser import parameter_groups


def _reference_bce(logits, target, ignore):
    """Element by element, as the definition reads."""
    total, count = 0.0, 0
    batch, classes, height, width = logits.shape
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                label = int(target[b, y, x])
                if label == IGNORE_INDEX and ignore == "exclude":
                    continue
                for k in range(classes):
                    z = float(logits[b, k, y, x])
                    positive = float(label == k)
                    total += (
                        max(z, 0) - z * positive + torch.log1p(torch.exp(-torch.tensor(abs(z))))
                    )
                    count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("ignore", ["negative", "exclude"])
def test_one_hot_bce_is_the_mean_over_the_counted_elements(ignore):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 4, 5), generator=generator)
    target[0, :2] = IGNORE_INDEX
    expected = _reference_bce(logits, target, ignore)
    assert float(one_hot_bce(logits, target, ignore=ignore)) == pytest.approx(float(expected))


def test_ignore_policies_differ_only_where_pixels_are_unlabelled():
    logits = torch.randn(1, 2, 3, 3)
    target = torch.zeros(1, 3, 3, dtype=torch.long)
    assert torch.equal(
        one_hot_bce(logits, target, ignore="negative"),
        one_hot_bce(logits, target, ignore="exclude"),
    )
    target[0, 0, 0] = IGNORE_INDEX
    assert not torch.equal(
        one_hot_bce(logits, target, ignore="negative"),
        one_hot_bce(logits, target, ignore="exclude"),
    )


def test_all_unlabelled_excluded_is_zero_not_nan():
    logits = torch.randn(1, 2, 2, 2)
    target = torch.full((1, 2, 2), IGNORE_INDEX)
    assert float(one_hot_bce(logits, target, ignore="exclude")) == 0.0


def test_one_hot_targets_and_their_errors():
    target = torch.tensor([[[0, 2], [IGNORE_INDEX, 1]]])
    one_hot = one_hot_targets(target, 3, torch.float32)
    assert one_hot.shape == (1, 3, 2, 2)
    assert one_hot[0, :, 1, 0].sum() == 0  # unlabelled: no class
    assert one_hot.sum() == 3 and one_hot[0, 2, 0, 1] == 1
    with pytest.raises(ValueError, match="below K = 2"):
        one_hot_targets(target, 2, torch.float32)
    with pytest.raises(ValueError, match="ignore must be one of"):
        one_hot_bce(torch.zeros(1, 3, 2, 2), target, ignore="skip")


def test_parameter_groups_follow_the_order_of_the_rates_and_drop_empty_ones():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    model[2].bias.requires_grad_(False)

    def group_of(name, parameter):
        return {"0": "clip", "1": "head"}.get(name.split(".")[0])  # layer 2: in no group

    groups = parameter_groups(
        model,
        group_of,
        lr={"head": 1e-3, "sam": 1e-5, "clip": 1e-6},
        weight_decay={"head": 0.1, "sam": 0, "clip": 0.0},
    )
    assert [g["name"] for g in groups] == ["head", "clip"]
    assert groups[0]["params"] == [model[1].weight, model[1].bias] and groups[0]["lr"] == 1e-3
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    with pytest.raises(KeyError, match="no learning rate"):
        parameter_groups(model, lambda name, p: "other", lr={"head": 1.0}, weight_decay=0.0)


def test_no_decay_parameters_follow_their_group_at_its_rate_without_decay():
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2), nn.Linear(2, 2))
    groups = parameter_groups(
        model,
        lambda name, parameter: "head" if name.startswith("2.") else "body",
        lr={"body": 1e-3, "head": 1e-2},
        weight_decay=0.5,
        no_decay=lambda name, parameter: parameter.ndim < 2,
    )
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("body", 1e-3, 0.5),
        ("body_no_decay", 1e-3, 0.0),
        ("head", 1e-2, 0.5),
        ("head_no_decay", 1e-2, 0.0),
    ]
    assert groups[0]["params"] == [model[0].weight]
    assert groups[1]["params"] == [model[0].bias, model[1].weight, model[1].bias]
    assert groups[3]["params"] == [model[2].bias]


@dataclass
class _Config(MethodConfig):
    mode: str = "a"
    blocks: int = 1
    ratio: float = 0.5
    widths: tuple[int, ...] = (1, 2)

    tuple_fields: ClassVar[tuple[str, ...]] = ("widths",)
    choices: ClassVar[dict] = {"mode": ("a", "b")}
    at_least: ClassVar[dict] = {"blocks": 1}
    within: ClassVar[dict] = {"ratio": (0.0, 1.0)}

    def problems(self):
        return ["widths needs two entries"] if len(self.widths) != 2 else []


def test_config_checks_report_every_problem_at_once():
    assert _Config(widths=[3, 4]).widths == (3, 4)  # a JSON record's list becomes a tuple
    with pytest.raises(ValueError) as caught:
        _Config(mode="c", blocks=0, ratio=1.5, widths=(1,))
    message = str(caught.value)
    assert message.startswith("invalid _Config: ")
    for clause in (
        "mode must be one of ['a', 'b']",
        "blocks must be at least 1",
        "ratio must be in [0.0, 1.0]",
        "widths needs two entries",
    ):
        assert clause in message
    with pytest.raises(ValueError, match="blocks must be at least 1"):
        _Config().replace(blocks=0)


def test_the_fast_binary_cross_entropy_matches_pytorchs_values_and_gradients():
    generator = torch.Generator().manual_seed(0)
    logits = (6 * torch.randn(3, 4, 33, 17, generator=generator)).requires_grad_()
    targets = (torch.rand(3, 4, 33, 17, generator=generator) < 0.3).float()
    expected = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), logits)
    fast = binary_cross_entropy_with_logits(logits, targets)
    (fast_grad,) = torch.autograd.grad(fast.square().sum(), logits)
    torch.testing.assert_close(fast, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast_grad, expected_grad, rtol=1e-5, atol=1e-6)
    soft = torch.rand(2, 3, generator=generator).requires_grad_()  # soft targets get a gradient
    x = torch.randn(2, 3, generator=generator)
    (grad_targets,) = torch.autograd.grad(binary_cross_entropy_with_logits(x, soft).sum(), soft)
    torch.testing.assert_close(grad_targets, -x)
    assert binary_cross_entropy_with_logits(x.bfloat16(), soft.bfloat16()).dtype == torch.float32


def test_focal_dice_never_takes_an_unlabelled_pixel_for_class_255():
    """With more than 255 classes (ToyWorld's 312), IGNORE_INDEX is also a class index: an
    unlabelled pixel must stay a negative of every class, not become a positive of class 255."""
    from ovseg.methods.losses import focal_dice_loss

    torch.manual_seed(0)
    logits = torch.randn(1, 312, 4, 4)
    target = torch.full((1, 4, 4), IGNORE_INDEX)
    target[0, :2] = 7
    with_ignore = focal_dice_loss(logits, target)
    # Only class 7 is present: one mask.
    only_seven = focal_dice_loss(logits[:, [7]], torch.where(target == 7, 0, IGNORE_INDEX))
    assert with_ignore["loss_dice"] == pytest.approx(only_seven["loss_dice"].item(), rel=1e-5)
    with pytest.raises(ValueError, match="class indices below"):
        focal_dice_loss(logits[:, :5], target.clamp(max=6))
