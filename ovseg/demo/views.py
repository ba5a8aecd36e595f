"""What each tab shows, computed from a session's latest predictions.

Every function returns plain data (``H×W×3`` uint8 images with captions, table rows, Markdown), so
the views are tested without a browser and ``app.py`` only wires them to components.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ovseg.demo.session import MethodResult, Session
from ovseg.errors import OvsegError
from ovseg.methods.dcp_clip import CategorySelection
from ovseg.prompts.visual import ToyWorldSpriteGenerator, VisualPromptError
from ovseg.viz import (
    changed_pixels,
    draw_pseudo_prompts,
    draw_window_routing,
    embedding_scatter,
    heatmap,
    legend_entries,
    overlay,
    project,
    similarity_plot,
)

Captioned = tuple[np.ndarray, str]
MAX_PROMPT_CLASSES = 12
PROMPTS_SHOWN_PER_CLASS = 4
MAX_GAP_CLASSES = 32  # 1 + 3·32 = 97 points: t-SNE stays under 100 points and a second

GAP_EXPLANATION = """\
**What this shows.** CLIP was trained to put a picture and its caption close together, yet the
two kinds of embedding live in separate regions of the space: the *modality gap*. Here the whole
image (black star) is compared with three kinds of class prompt:

* **text** (blue): the embedding of sentences such as "a photo of a cat";
* **visual** (orange): the image embedding of a *picture* of the class (DPSeg's visual prompts,
  drawn by Stable Diffusion in the real world, by the ToyWorld sprite renderer here);
* **dual** (green): the average of the two, which DPSeg uses to build its cost volume.

Visual prompts are images, so they sit on the image's side of the gap and are usually far more
similar to it than text prompts (DPSeg reports about 0.7 against 0.3, Fig. 1). The dual prompt
keeps the text's meaning while moving towards the image, which makes the cost volume sharper.
The bar plot shows the same numbers per class (Fig. 2). PCA keeps global distances; t-SNE keeps
neighbourhoods, so distances between far-apart groups in a t-SNE plot mean little."""


class ViewUnavailable(OvsegError, ValueError):
    """A view that cannot be drawn for the current session, with the reason in words."""


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy()
    return np.asarray(value)


def _resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an ``h×w`` label map to ``size``."""
    rows = (np.arange(size[0]) * labels.shape[0] // size[0]).clip(0, labels.shape[0] - 1)
    cols = (np.arange(size[1]) * labels.shape[1] // size[1]).clip(0, labels.shape[1] - 1)
    return labels[rows][:, cols]


def _logits_to_labels(logits: Any, size: tuple[int, int]) -> np.ndarray:
    """``1×K×h×w`` logits → ``H×W`` label map at the image size."""
    labels = torch.as_tensor(logits)[0].float().argmax(dim=0).cpu().numpy()
    return _resize_labels(labels, size)


def _require(session: Session | None, name: str | None = None) -> MethodResult | None:
    if session is None or session.image is None or session.vocabulary is None:
        raise ViewUnavailable("Segment an image first (Segment tab), then come back here.")
    if name is None:
        return None
    if name not in session.models:
        raise ViewUnavailable(f"{name} is not loaded in this demo.")
    result = session.result(name)
    if result is None:
        raise ViewUnavailable(f"{name} was not among the methods run; tick it and segment again.")
    if result.prediction is None:
        raise ViewUnavailable(f"{name} could not run: {result.error}")
    return result


# --------------------------------------------------------------------------------- Segment
def method_caption(result: MethodResult) -> str:
    prediction = result.prediction
    path = "trained head" if prediction.trained_head else "training-free"
    encode = prediction.timings.get("encode_image", 0.0)
    note = f", encode {encode * 1000:.0f} ms" if encode else ", image features cached"
    return f"{result.name} · {result.seconds * 1000:.0f} ms ({path}{note})"


def segmentation_gallery(session: Session, alpha: float) -> list[Captioned]:
    """Each method's overlay, captioned with its name, time and path."""
    names = session.vocabulary.names
    return [
        (
            overlay(session.image, result.prediction.label_map, names, alpha=alpha),
            method_caption(result),
        )
        for result in session.ordered_results()
        if result.prediction is not None
    ]


def legend_html(session: Session) -> str:
    """The shared colour legend of the vocabulary (colours follow class names everywhere)."""
    chips = " ".join(
        f"<span style='background:{colour};padding:2px 6px;border-radius:4px;color:#000;"
        f"display:inline-block;margin:2px'>{label}</span>"
        for label, colour in legend_entries(session.vocabulary.names)
    )
    return f"<div><b>Classes:</b> {chips}</div>"


def status_markdown(session: Session, loaded_status: dict[str, str]) -> str:
    """One line per method asked for: how long it took, or plainly why it could not run."""
    lines = []
    for result in session.ordered_results():
        name = result.name
        if result.prediction is None:
            lines.append(f"- **{name}** did not run: {result.error}")
        else:
            lines.append(f"- **{name}**: {method_caption(result).split(' · ', 1)[1]}")
    for name, status in loaded_status.items():
        if status.startswith("unavailable"):
            lines.append(f"- **{name}** is {status}")
    dpseg = session.result("dpseg")
    if dpseg is not None and dpseg.prediction is not None:
        generator = session.predictor.methods["dpseg"].prompt_bank.generator
        note = drawn_prompts_note(generator.id, session.vocabulary.classes)
        if note:
            lines.append(f"- {note}")
    dropped = session.vocabulary.dropped_duplicates
    if dropped:
        lines.append(f"- Dropped repeated names: {', '.join(dropped)}.")
    return "\n".join(lines)


def drawn_prompts_note(generator_id: str, classes: Sequence[Sequence[str]]) -> str | None:
    """What to say when DPSeg's toy diffusion model drew prompts for names ToyWorld lacks: that
    those prompts are whatever a model trained on ToyWorld's classes makes of their words (as
    Stable Diffusion's images of a rare word are, only more so)."""
    if "toy-diffusion@" not in generator_id:
        return None
    known = ToyWorldSpriteGenerator()
    outside = [synonyms[0] for synonyms in classes if known.class_id(synonyms) is None]
    if not outside:
        return None
    shown = ", ".join(outside[:8]) + (f" and {len(outside) - 8} more" if len(outside) > 8 else "")
    return (
        f"DPSeg's visual prompts for {shown} are whatever the toy diffusion model draws for "
        "those words: ToyWorld has no such class, and the model learned only ToyWorld's "
        f"{len(known.world.classes)} (Method views › DPSeg shows them)."
    )


def area_rows(session: Session) -> list[list[Any]]:
    """[method, class, area %, mean score] for every class a method assigned pixels to."""
    rows = []
    for name, prediction in session.predictions().items():
        summary = prediction.summary()
        for entry in summary["classes"]:
            rows.append(
                [name, entry["name"], round(entry["area"] * 100, 2), round(entry["score"], 4)]
            )
    return rows


# ---------------------------------------------------------------------------- Cost volumes
def _class_map(result: MethodResult, index: int) -> tuple[np.ndarray | None, str]:
    """The score map one method computed for class ``index`` and what it is."""
    intermediates = result.prediction.intermediates
    name = result.name
    if name == "dpseg":
        dual = dpseg_cost_volumes(intermediates)["dual"]
        return _numpy(dual[0, index]), "dual-prompt cost volume"
    if name == "dcp-clip":
        selected = list(intermediates["selected_classes"][0])
        if index not in selected:
            return None, "not selected by Dynamic Category Selection (lower θ to keep it)"
        slot = selected.index(index)
        return _numpy(intermediates["coarse_cost_map"][0, slot]), "coarse cost map"
    if name == "esc-net":
        if "activation_maps" in intermediates:
            maps = intermediates["activation_maps"]
            return _numpy(maps[0, -1, index]), "last ESC block's activation map"
        return _numpy(intermediates["cost_volume"][0, index]), "cosine cost volume"
    if name == "ldvc":
        return _numpy(intermediates["score_map"][0, index]), "score map S (Eq. 13)"
    if "cost_volume" in intermediates:
        return _numpy(intermediates["cost_volume"][0, index]), "cosine cost volume"
    return None, "no cost volume"


def cost_volume_gallery(session: Session, class_name: str) -> list[Captioned]:
    """Every method's score map for one class as a heatmap over the image."""
    _require(session)
    index = _class_index(session, class_name)
    items = []
    for result in session.ordered_results():
        if result.prediction is None:
            continue
        scores, what = _class_map(result, index)
        if scores is None:
            items.append((_blank(session.image), f"{result.name}: {what}"))
            continue
        items.append(
            (
                heatmap(session.image, scores),
                f"{result.name} · {what} · {scores.min():.2f}…{scores.max():.2f}",
            )
        )
    return items


def dpseg_prompt_comparison(session: Session, class_name: str) -> list[Captioned]:
    """DPSeg Fig. 3: text-only, visual-only and dual cost volumes on one colour scale."""
    result = _require(session, "dpseg")
    index = _class_index(session, class_name)
    intermediates = result.prediction.intermediates
    costs = dpseg_cost_volumes(intermediates)
    maps = {kind: _numpy(cost[0, index]) for kind, cost in costs.items()}
    low = min(float(m.min()) for m in maps.values())
    high = max(float(m.max()) for m in maps.values())
    return [
        (
            heatmap(session.image, scores, vmin=low, vmax=high),
            f"{kind} prompt · cos {scores.min():.2f}…{scores.max():.2f}",
        )
        for kind, scores in maps.items()
    ]


def _class_index(session: Session, class_name: str | None) -> int:
    if not class_name:
        raise ViewUnavailable("Pick a class.")
    try:
        return session.vocabulary.index(class_name)
    except KeyError as error:
        raise ViewUnavailable(
            f"{class_name!r} is not in the current vocabulary; segment again or pick another."
        ) from error


def _blank(image: np.ndarray) -> np.ndarray:
    return (image.astype(np.float32) * 0.25).astype(np.uint8)


# ------------------------------------------------------------------------------------ DPSeg
@dataclass
class DPSegView:
    prompts: list[Captioned]
    passes: list[Captioned]
    summary: str


def dpseg_cost_volumes(intermediates: dict[str, Any]) -> dict[str, torch.Tensor]:
    """DPSeg Fig. 3 from its pass-I intermediates: the template-averaged cosines of E with the text
    prompts T, the visual prompts V and the dual prompts R = (V̂ + T̂) / 2, ``B×K×h×w`` each. The
    mean over templates is a dot product with the mean normalised prompt (``B×K×M×h×w`` is never
    built)."""
    pixels = F.normalize(intermediates["image_embeddings"], dim=1)
    prompts = intermediates["prompts"]
    text, visual = F.normalize(prompts.text, dim=-1), F.normalize(prompts.visual, dim=-1)
    kinds = {"text": prompts.text, "visual": prompts.visual, "dual": (visual + text) / 2}
    return {
        kind: torch.einsum("bdhw,bkd->bkhw", pixels, F.normalize(rows, dim=-1).mean(dim=2))
        for kind, rows in kinds.items()
    }


def _crop_image(crop: torch.Tensor) -> np.ndarray:
    """An Inference II crop, ``3×S×S`` in [0, 1] → ``S×S×3`` uint8."""
    return (crop.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def dpseg_view(session: Session) -> DPSegView:
    """Visual prompts per class, the pass-II crops, and pass I against pass II."""
    result = _require(session, "dpseg")
    intermediates = result.prediction.intermediates
    names = session.vocabulary.names
    gallery = intermediates["visual_prompt_images"]
    prompts = []
    for index in range(min(len(names), MAX_PROMPT_CLASSES)):
        for number, image in enumerate(gallery[index][:PROMPTS_SHOWN_PER_CLASS], start=1):
            prompts.append((image, f"{names[index]} · visual prompt {number}"))
    size = session.image.shape[:2]
    if intermediates.get("inference") != "II":
        return DPSegView(
            prompts=prompts,
            passes=[],
            summary="DPSeg ran pass I only; choose pass II under Options to compare the passes.",
        )
    crops = intermediates.get("refined_prompt_images", [{}])[0]
    for index, crop in crops.items():
        prompts.append((_crop_image(crop), f"{names[index]} · pass-II prompt (crop of this image)"))
    first = _logits_to_labels(intermediates["pass1_logits"], size)
    second = _logits_to_labels(intermediates["pass2_logits"], size)
    changed = float((first != second).mean())
    detected = [names[k] for k in intermediates["detected_classes"][0]]
    passes = [
        (overlay(session.image, first, names), "pass I (generated visual prompts)"),
        (overlay(session.image, second, names), "pass II (prompts cut from this image)"),
        (changed_pixels(session.image, first, second), f"changed pixels: {changed:.1%}"),
    ]
    summary = (
        f"Pass I found {len(detected)} classes ({', '.join(detected) or 'none'}); their visual "
        f"prompts were replaced by crops of this image and the head ran again. "
        f"{changed:.1%} of the pixels changed label."
    )
    return DPSegView(prompts=prompts, passes=passes, summary=summary)


# --------------------------------------------------------------------------------- DCP-CLIP
SELECTION_HEADERS = ["class", "image score", "above θ", "patch votes", "selected", "why"]
TAG_HEADERS = ["region label", "best re-scored class", "rank", "k", "pixels", "relabelled"]


@dataclass
class DcpClipView:
    selection: list[list[Any]]
    labels: list[Captioned]
    relabels: list[list[Any]]
    summary: str


def dcp_clip_selection_table(
    selection: CategorySelection, names: Sequence[str]
) -> list[list[dict[str, Any]]]:
    """Per image, one row per vocabulary class: scores, votes, selected or not, and why."""
    votes = selection.patch_votes.tolist()
    num_classes = selection.selected.shape[1]
    raw_winners = selection.patch_scores.argmax(dim=1)  # before the suppression of Eq. 2
    raw_votes = F.one_hot(raw_winners, num_classes).sum(dim=1).tolist()
    best_patch = selection.patch_scores.amax(dim=2).tolist()
    image_scores = selection.image_scores.tolist()
    flags = {
        key: getattr(selection, key).tolist()
        for key in ("from_image", "from_patch", "forced", "dropped", "selected")
    }
    tables = []
    for image in range(selection.selected.shape[0]):
        rows = []
        for index, name in enumerate(names):
            flag = {key: bool(values[image][index]) for key, values in flags.items()}
            rows.append(
                {
                    "index": index,
                    "name": name,
                    "image_score": image_scores[image][index],
                    "above_theta": flag["from_image"],
                    "patch_votes": votes[image][index],
                    "patch_votes_before_suppression": raw_votes[image][index],
                    "max_patch_score": best_patch[image][index],
                    "in_patch_set": flag["from_patch"],
                    "forced": flag["forced"],
                    "selected": flag["selected"],
                    "reason": _selection_reason(flag, enabled=selection.enabled),
                }
            )
        tables.append(rows)
    return tables


def _selection_reason(flag: dict[str, bool], *, enabled: bool) -> str:
    if not enabled:
        return "all classes (DCS off)"
    reasons = [
        text
        for key, text in (
            ("from_image", "image score > θ"),
            ("from_patch", "patch votes"),
            ("forced", "ground truth"),
        )
        if flag[key]
    ]
    if flag["dropped"]:
        return f"dropped by max_selected ({' + '.join(reasons)})"
    return " + ".join(reasons) if reasons else "not selected"


def dcp_clip_coarse_labels(intermediates: dict[str, Any]) -> torch.Tensor:
    """``B×h×w`` coarse prediction: per patch, the selected class of the highest initial cost.

    The cost map holds each image's selected classes in ``selected_classes`` order, then
    padding, which never wins.
    """
    cost_map = intermediates["coarse_cost_map"]
    return torch.stack(
        [
            torch.tensor(selected, device=cost_map.device)[
                cost_map[image, : len(selected)].argmax(dim=0)
            ]
            for image, selected in enumerate(intermediates["selected_classes"])
        ]
    )


def dcp_clip_view(session: Session) -> DcpClipView:
    """The selection table, coarse against fine labels and Tag Validation's relabels."""
    result = _require(session, "dcp-clip")
    intermediates = result.prediction.intermediates
    names = session.vocabulary.names
    rows = dcp_clip_selection_table(intermediates["selection"], names)[0]
    table = sorted(rows, key=lambda row: -row["image_score"])
    selection = [
        [
            row["name"],
            round(row["image_score"], 4),
            row["above_theta"],
            row["patch_votes"],
            row["selected"],
            row["reason"],
        ]
        for row in table
    ]
    size = session.image.shape[:2]
    coarse_labels = dcp_clip_coarse_labels(intermediates)[0]
    coarse = _resize_labels(_numpy(coarse_labels).astype(np.int64), size)
    fine = _resize_labels(_numpy(intermediates["fine_labels"][0]).astype(np.int64), size)
    final = result.prediction.label_map
    labels = [
        (overlay(session.image, coarse, names), "coarse (cost map over the selected classes)"),
        (overlay(session.image, fine, names), "fine (before Tag Validation)"),
        (overlay(session.image, final, names), "final (after Tag Validation)"),
    ]
    relabels = [
        [
            names[d.region_class],
            names[d.new_class],
            d.rank,
            d.rank_cutoff,
            d.pixels,
            d.relabelled,
        ]
        for d in intermediates["tag_validation"][0]
    ]
    selection_object = intermediates["selection"]
    count = int(intermediates["num_selected"][0])
    summary = (
        f"θ = {selection_object.theta:.2f}: {count} of {len(names)} classes selected; only they "
        "go through the rest of the network."
    )
    if not result.prediction.trained_head:
        summary += (
            " Training-free path: the fine stage and Tag Validation need the trained head, so "
            "coarse, fine and final agree."
        )
    elif not relabels:
        summary += " Tag Validation found no region of an unseen class to check."
    return DcpClipView(selection=selection, labels=labels, relabels=relabels, summary=summary)


# ---------------------------------------------------------------------------------- ESC-Net
@dataclass
class EscNetView:
    prompts: list[Captioned]
    activations: list[Captioned]
    summary: str


def esc_net_blocks(session: Session | None) -> int:
    """How many blocks of pseudo prompts the last ESC-Net run has (0: none; the training-free
    path has one set, from the cost volume)."""
    result = None if session is None else session.result("esc-net")
    prediction = None if result is None else result.prediction
    if prediction is None or "pseudo_prompts" not in prediction.intermediates:
        return 0
    return len(prediction.intermediates["pseudo_prompts"])


def _esc_net_prompts(intermediates: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """ESC-Net's pseudo prompts as ``B×N×K×N_o×2`` points, ``B×N×K×N_o×h×w`` regions and
    ``B×N×K×N_o×4`` boxes: the method gives, per block, one ``PseudoPrompts`` per chunk of
    classes, of its ``B·Kc`` maps in (image, class) order."""
    batch = intermediates["cost_volume"].shape[0]
    return tuple(
        torch.stack(
            [
                torch.cat([getattr(p, field).unflatten(0, (batch, -1)) for p in chunks], dim=1)
                for chunks in intermediates["pseudo_prompts"]
            ],
            dim=1,
        )
        for field in ("points", "regions", "boxes")
    )


def esc_net_view(session: Session, class_name: str, block: int) -> EscNetView:
    """Pseudo points and regions of one class and block, and the block activation maps."""
    result = _require(session, "esc-net")
    intermediates = result.prediction.intermediates
    index = _class_index(session, class_name)
    if "pseudo_prompts" not in intermediates:
        raise ViewUnavailable("This ESC-Net runs without SAM blocks, so it has no pseudo prompts.")
    points, regions, boxes = _esc_net_prompts(intermediates)
    blocks = esc_net_blocks(session)
    block = int(min(max(block, 0), blocks - 1))
    drawing = draw_pseudo_prompts(
        session.image,
        _numpy(regions[0, block, index]).astype(bool),
        _numpy(points[0, block, index]),
        _numpy(boxes[0, block, index]),
    )
    where = f"block {block + 1} of {blocks}" if blocks > 1 else "from the cost volume"
    prompts = [(drawing, f"{class_name} · pseudo points and regions, {where}")]
    activations = []
    if "activation_maps" in intermediates:
        maps = intermediates["activation_maps"][0, :, index]
        for step, activation in enumerate(maps):
            label = "S_0 = cost volume" if step == 0 else f"S_{step} after block {step}"
            activations.append((heatmap(session.image, _numpy(activation)), label))
        summary = (
            "Each block turns every class's activation map into points and regions (spatial "
            "softmax, threshold, k-means), prompts the pretrained SAM decoder block with them and "
            "refines the map for the next block."
        )
    else:
        activations.append(
            (heatmap(session.image, _numpy(intermediates["cost_volume"][0, index])), "cost volume")
        )
        if intermediates.get("sam_masks") is not None:
            mask = _numpy(intermediates["sam_masks"][0, index])
            activations.append((heatmap(session.image, mask, vmin=0, vmax=1), "SAM mask"))
        summary = (
            "Training-free path (no trained ESC head here): the pseudo prompts from the CLIP cost "
            "volume prompt a full pretrained SAM, whose masks label the pixels."
        )
    return EscNetView(prompts=prompts, activations=activations, summary=summary)


# ------------------------------------------------------------------------------------- LDVC
@dataclass
class LdvcView:
    attention: list[Captioned]
    routing: np.ndarray | None
    summary: str


def ldvc_routing_shape(session: Session | None) -> tuple[int, int]:
    """(blocks with routing, windows per block) of the last LDVC run, (0, 0) without one."""
    result = None if session is None else session.result("ldvc")
    prediction = None if result is None else result.prediction
    if prediction is None:
        return 0, 0
    routings = [r for r in prediction.intermediates.get("routing", []) if r is not None]
    if not routings:
        return 0, 0
    rows, cols = routings[0].grid
    return len(routings), rows * cols


def ldvc_class_attention_maps(intermediates: dict[str, Any]) -> torch.Tensor | None:
    """Fig. 1's class attention maps ``B×K×h×w``: the last decoder block's cross-attention of
    every token to each class, averaged over heads (None without decoder blocks)."""
    cross_attention = intermediates.get("cross_attention") or []
    if not cross_attention:
        return None
    last = cross_attention[-1]
    grid = intermediates["score_map"].shape[-2:]
    return last.mean(dim=1).transpose(1, 2).reshape(last.shape[0], -1, *grid)


def window_at(session: Session | None, block: int, x: float, y: float) -> int:
    """The row-major LCSA window under image pixel (x, y) in a block's window grid (0 when there
    is no routing to inspect)."""
    result = None if session is None else session.result("ldvc")
    if result is None or result.prediction is None or session.image is None:
        return 0
    routings = [r for r in result.prediction.intermediates.get("routing", []) if r is not None]
    if not routings:
        return 0
    rows, cols = routings[int(min(max(block, 0), len(routings) - 1))].grid
    height, width = session.image.shape[:2]
    row = int(min(max(y * rows // height, 0), rows - 1))
    col = int(min(max(x * cols // width, 0), cols - 1))
    return row * cols + col


def ldvc_view(session: Session, block: int, window: int) -> LdvcView:
    """Per-class cross-attention maps and the windows one window routes to."""
    result = _require(session, "ldvc")
    intermediates = result.prediction.intermediates
    names = session.vocabulary.names
    attention = []
    class_maps = ldvc_class_attention_maps(intermediates)
    if class_maps is not None:
        for index in range(min(len(names), MAX_PROMPT_CLASSES)):
            attention.append(
                (heatmap(session.image, _numpy(class_maps[0, index])), f"{names[index]} attention")
            )
    routings = [r for r in intermediates.get("routing", []) if r is not None]
    if not routings:
        return LdvcView(attention, None, "This LDVC uses global self-attention (no routing).")
    block = int(min(max(block, 0), len(routings) - 1))
    routing = routings[block]
    rows, cols = routing.grid
    window = int(min(max(window, 0), rows * cols - 1))
    routed = routing.indices[0, window].tolist()
    drawing = draw_window_routing(session.image, routing.grid, window, routed)
    row, col = divmod(window, cols)
    summary = (
        f"Block {block + 1}: window {window} (row {row}, column {col}, red) attends only to the "
        f"tokens of its {len(routed)} most similar windows (yellow, numbered by similarity) of "
        f"the {rows}×{cols} grid: the local visual consensus."
    )
    return LdvcView(attention, drawing, summary)


# --------------------------------------------------------------------------- Embedding gap
@dataclass
class EmbeddingGap:
    projection: np.ndarray
    similarity: np.ndarray
    rows: list[list[Any]]
    summary: str


def _gap_classes(session: Session) -> list[int]:
    """The classes to plot: those DPSeg found, largest first, then the rest, at most 32."""
    count = len(session.vocabulary)
    result = session.result("dpseg")
    if result is None or result.prediction is None:
        return list(range(min(count, MAX_GAP_CLASSES)))
    areas = result.prediction.areas
    order = sorted(range(count), key=lambda k: (-float(areas[k]), k))
    return order[:MAX_GAP_CLASSES]


@torch.inference_mode()
def embedding_gap(session: Session, projection: str) -> EmbeddingGap:
    """Image, text-, visual- and dual-prompt embeddings of the vocabulary with DPSeg's encoders.

    The image embedding comes from DPSeg's frozen visual-prompt encoder applied to the whole
    image, so image and visual prompts are compared through the same encoder (as in the paper).
    """
    _require(session)
    if "dpseg" not in session.models:
        raise ViewUnavailable("The embedding gap needs DPSeg's visual prompts; load dpseg.")
    method = session.predictor.methods["dpseg"]
    features = session.predictor.features("dpseg")
    classes = _gap_classes(session)
    vocabulary = [session.vocabulary.classes[k] for k in classes]
    names = [session.vocabulary.names[k] for k in classes]
    size = method.config.prompt_resolution
    image = F.interpolate(features.images, size=(size, size), mode="bilinear", antialias=True)
    image_embedding = F.normalize(method.encode_prompt_images(image)[0].float(), dim=-1)[0]
    text = method.backbone.encode_text(vocabulary, method.templates).per_template.float()
    try:
        visual = F.normalize(method.visual_prompts(vocabulary).embeddings.float(), dim=-1)
    except VisualPromptError as error:
        raise ViewUnavailable(
            f"DPSeg has no visual prompts for this vocabulary: {error}"
        ) from error
    text = F.normalize(text.mean(dim=1), dim=-1)  # K×D, template average
    visual = F.normalize(visual.mean(dim=1), dim=-1)
    dual = F.normalize((text + visual) / 2, dim=-1)
    similarities = {
        kind: (embeddings @ image_embedding).cpu().numpy()
        for kind, embeddings in (("text", text), ("visual", visual), ("dual", dual))
    }
    points = torch.cat([image_embedding[None], text, visual, dual]).cpu().numpy()
    kinds = ["image"] + ["text"] * len(names) + ["visual"] * len(names) + ["dual"] * len(names)
    labels = ["image", *names, *names, *names]
    if len(points) < 4:
        raise ViewUnavailable("Use at least one class to see the embedding gap.")
    coordinates = project(points, projection)
    scatter = embedding_scatter(
        coordinates,
        kinds,
        labels,
        title=f"{projection} of DPSeg's embeddings ({len(names)} classes)",
    )
    bars = similarity_plot(names, similarities, title="cosine similarity to the image per class")
    rows = [
        [name, *(round(float(similarities[kind][i]), 4) for kind in ("text", "visual", "dual"))]
        for i, name in enumerate(names)
    ]
    means = {kind: float(values.mean()) for kind, values in similarities.items()}
    summary = (
        f"Mean cosine to the image: text {means['text']:.2f}, visual {means['visual']:.2f}, "
        f"dual {means['dual']:.2f}"
        + (f" (first {MAX_GAP_CLASSES} classes)." if len(session.vocabulary) > len(names) else ".")
    )
    return EmbeddingGap(projection=scatter, similarity=bars, rows=rows, summary=summary)


def class_choices(session: Session | None) -> list[str]:
    """The classes a class picker offers: the current vocabulary's names."""
    if session is None or session.vocabulary is None:
        return []
    return list(session.vocabulary.names)


def default_class(session: Session | None) -> str | None:
    """The class pickers start on the largest class any method found."""
    if session is None or session.vocabulary is None:
        return None
    predictions = session.predictions()
    if not predictions:
        return session.vocabulary.names[0]
    areas = np.sum([p.areas for p in predictions.values()], axis=0)
    return session.vocabulary.names[int(np.argmax(areas))]
