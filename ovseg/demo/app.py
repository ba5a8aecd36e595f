"""The Gradio demo: give an image and a vocabulary, see every method's segmentation side by side.

Models are loaded once and shared read-only by all visitors; each browser session keeps its own
:class:`~ovseg.Predictor` in ``gr.State``, so one visitor's image never leaks into another's and a
vocabulary change on the same image does not re-encode it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np

import ovseg
from ovseg.backbones import ASSETS_DIR, WeightsError
from ovseg.methods import SegmentationMethod
from ovseg.viz import legend_entries, overlay

LOGGER = logging.getLogger(__name__)

DEFAULT_VOCABULARY = "cat, dog, car, tree, grass, sky, water, road"
PRESET_CUSTOM = "(type your own)"
EXAMPLES_DIR = ASSETS_DIR / "examples"


def bundled_examples(folder: Path = EXAMPLES_DIR) -> list[list[str]]:
    """[image path, vocabulary] pairs of the bundled example scenes (``assets/examples``)."""
    index = folder / "examples.json"
    if not index.is_file():
        return []
    entries = json.loads(index.read_text(encoding="utf-8"))
    return [[str(folder / entry["image"]), entry["vocabulary"]] for entry in entries]


@dataclass
class Session:
    """One visitor's state: their predictor and the fingerprint of the image it holds."""

    predictor: ovseg.Predictor
    image_digest: str = ""
    notes: list[str] = field(default_factory=list)


def load_default_methods() -> tuple[dict[str, SegmentationMethod], list[str]]:
    """Load every method that can run here; return them and notes about the ones that cannot."""
    methods, notes = {}, []
    for name in ovseg.list_methods():
        try:
            methods[name] = ovseg.load(name)
        except WeightsError as error:
            notes.append(f"**{name}** is unavailable: {error}")
    return methods, notes


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(
        np.ascontiguousarray(image).tobytes() + str(image.shape).encode()
    ).hexdigest()


def segment(
    image: np.ndarray | None,
    vocabulary_text: str,
    chosen_methods: list[str],
    alpha: float,
    session: Session | None,
    methods: dict[str, SegmentationMethod],
):
    """The Segment button: returns (gallery items, area table, status markdown, session)."""
    if image is None:
        raise gr.Error("Give an image first: upload one, paste one or pick an example.")
    if not chosen_methods:
        raise gr.Error("Choose at least one method.")
    if session is None:
        session = Session(predictor=ovseg.Predictor(methods))
    try:
        digest = _digest(image)
        if digest != session.image_digest:
            session.predictor.set_image(image)
            session.image_digest = digest
        vocabulary = ovseg.parse_vocabulary(vocabulary_text or "")
    except (ovseg.ImageError, ovseg.VocabularyError) as error:
        raise gr.Error(str(error)) from error

    shown_image = session.predictor.image
    gallery, rows, failures = [], [], []
    for name in chosen_methods:
        # One method failing (e.g. DPSeg has no visual prompt for a name) must not hide the others.
        try:
            prediction = session.predictor.predict(vocabulary, methods=[name])[name]
        except ValueError as error:
            failures.append(f"**{name}** could not run: {error}")
            continue
        seconds = sum(prediction.timings.values())
        caption = f"{name} · {seconds * 1000:.0f} ms"
        if not prediction.trained_head:
            caption += " · training-free"
        gallery.append(
            (overlay(shown_image, prediction.label_map, vocabulary.names, alpha=alpha), caption)
        )
        for label, _ in legend_entries(vocabulary.names, prediction.areas):
            rows.append([name, label])
    notes = list(failures)
    if vocabulary.dropped_duplicates:
        notes.append(f"Dropped repeated names: {', '.join(vocabulary.dropped_duplicates)}.")
    legend = " ".join(
        f"<span style='background:{colour};padding:2px 6px;border-radius:4px;color:#000'>"
        f"{label}</span>"
        for label, colour in legend_entries(vocabulary.names)
    )
    status = "\n\n".join([f"**Classes:** {legend}", *notes])
    return gallery, rows, status, session


def build_demo(
    methods: dict[str, SegmentationMethod] | None = None, notes: list[str] | None = None
) -> gr.Blocks:
    """Build the Blocks app around already loaded methods (default: every available method)."""
    if methods is None:
        methods, notes = load_default_methods()
    notes = notes or []
    presets = {PRESET_CUSTOM: None, **{name: name for name in ovseg.list_vocabularies()}}

    with gr.Blocks(title="ovseg: open-vocabulary segmentation") as demo:
        gr.Markdown(
            "# ovseg\nOpen-vocabulary semantic segmentation: type any classes, give an image, "
            "compare methods side by side."
        )
        for note in notes:
            gr.Markdown(note)
        session = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(
                    label="Image", type="numpy", sources=["upload", "clipboard", "webcam"]
                )
                preset = gr.Dropdown(
                    choices=list(presets), value=PRESET_CUSTOM, label="Vocabulary preset"
                )
                vocabulary = gr.Textbox(
                    value=DEFAULT_VOCABULARY,
                    label="Vocabulary",
                    info="Classes separated by commas or new lines; synonyms by ';' "
                    "(car; automobile).",
                    lines=3,
                )
                chosen = gr.CheckboxGroup(
                    choices=list(methods), value=list(methods), label="Methods"
                )
                with gr.Accordion("Options", open=False):
                    alpha = gr.Slider(0.0, 1.0, value=0.55, step=0.05, label="Overlay opacity")
                run = gr.Button("Segment", variant="primary")
                examples = bundled_examples()
                if examples:
                    gr.Examples(examples, inputs=[image, vocabulary], label="ToyWorld examples")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Segmentations", columns=2, height="auto")
                status = gr.Markdown()
                areas = gr.Dataframe(
                    headers=["method", "class (area)"], label="Classes found", wrap=True
                )

        def fill_preset(choice: str) -> str | gr.Textbox:
            if presets.get(choice) is None:
                return gr.Textbox()
            return ", ".join(
                ";".join(synonyms) for synonyms in ovseg.load_vocabulary(presets[choice])
            )

        preset.change(fill_preset, inputs=preset, outputs=vocabulary)
        run.click(
            lambda *args: segment(*args, methods=methods),
            inputs=[image, vocabulary, chosen, alpha, session],
            outputs=[gallery, areas, status, session],
        )
    return demo
