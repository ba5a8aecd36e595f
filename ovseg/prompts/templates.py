"""Text templates that turn a class name into CLIP prompts.

The 80 ImageNet templates are OpenAI's prompt ensemble, the set CAT-Seg, SED, DPSeg and DCP-CLIP use
(`PROMPT_ENSEMBLE_TYPE: imagenet`). They are taken from open_clip rather than retyped, so their
canonical order is guaranteed.
"""

from __future__ import annotations

from collections.abc import Sequence

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

IMAGENET_TEMPLATES: tuple[str, ...] = tuple(
    template("{}") for template in OPENAI_IMAGENET_TEMPLATES
)
SHORT_TEMPLATES: tuple[str, ...] = tuple(template("{}") for template in SIMPLE_IMAGENET_TEMPLATES)
SINGLE_TEMPLATE: tuple[str, ...] = ("a photo of a {}.",)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "imagenet": IMAGENET_TEMPLATES,
    "short": SHORT_TEMPLATES,
    "single": SINGLE_TEMPLATE,
}


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """Return a template tuple from a set name ("imagenet", "short", "single") or explicit strings.

    Every template must contain exactly one ``{}`` where the class name goes.
    """
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            return TEMPLATE_SETS[templates]
        if "{}" not in templates:
            raise ValueError(
                f"Unknown template set {templates!r}; expected one of {sorted(TEMPLATE_SETS)} "
                "or a template containing '{}'."
            )
        templates = (templates,)
    resolved = tuple(templates)
    if not resolved:
        raise ValueError("The template list is empty; give at least one template containing '{}'.")
    for template in resolved:
        if template.count("{}") != 1:
            raise ValueError(f"Template {template!r} must contain exactly one '{{}}'.")
    return resolved
