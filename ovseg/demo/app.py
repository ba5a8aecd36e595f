"""The Gradio demo: segment an image with every method side by side and look inside each one.

Tabs: **Segment** (overlays, legend, timings, areas, downloads), **Cost volumes** (each method's
score map for a class; DPSeg's text/visual/dual comparison), **Method views** (DPSeg, DCP-CLIP,
ESC-Net and LDVC internals) and **Embedding gap** (DPSeg's modality-gap figures).

Models are loaded once and shared read-only by all visitors; everything a visitor does lives in
their :class:`~ovseg.demo.session.Session`, kept in ``gr.State``. The named API endpoints
(``/segment``, ``/cost_volumes``, ``/dcp_clip_selection``, ``/esc_net_prompts``,
``/ldvc_routing``, ``/embedding_gap``, ``/vocabulary_preset``) are callable with ``gradio_client``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import gradio as gr

import ovseg
from ovseg.demo import gradio_fixes, views
from ovseg.demo.examples import all_examples, preset_names, preset_text, resolve_vocabulary
from ovseg.demo.session import (
    ESC_PROMPT_TYPES,
    DemoInputError,
    RunOptions,
    ScratchSpace,
    Session,
    esc_net_prompt_types,
)
from ovseg.demo.settings import describe
from ovseg.methods import SegmentationMethod
from ovseg.viz import PROJECTIONS

LOGGER = logging.getLogger(__name__)

DEFAULT_VOCABULARY = "cat, dog, car, tree, grass, sky, water, road"
METHOD_DEFAULT_SIZE = "each method's own"
INPUT_SIZES = [METHOD_DEFAULT_SIZE, "192", "256", "320", "384", "448", "512"]
# Methods that cost the most run last, so the others' overlays appear while they work.
SLOW_LAST = ("esc-net", "dpseg")
# A session idle this long is dropped with its files (a new segment request starts a fresh one).
SESSION_TTL_S = 2 * 3600
# Gradio's cached uploads and served files: checked hourly, deleted once a day old.
CACHE_PRUNING = (3600, 86400)
INTRODUCTION = """\
# ovseg: open-vocabulary segmentation, side by side
Give an image, type any classes (commas or new lines between classes, `;` between synonyms:
`car; automobile`), press **Segment**. Every method's result appears side by side with one colour
legend; the other tabs show what happens inside each method. Changing only the vocabulary or an
option re-uses the encoded image."""


def _readable(error: Exception) -> gr.Error:
    """A message for the UI: the visitor's own mistakes as they are, anything else logged."""
    # Gradio would print a traceback for every gr.Error; the visitor's mistakes need none and
    # unexpected failures are logged here, once.
    if isinstance(error, ovseg.OvsegError):
        return gr.Error(str(error), print_exception=False)
    LOGGER.exception("Demo request failed")
    return gr.Error(
        f"Something went wrong ({type(error).__name__}): {error}", print_exception=False
    )


def _guarded(function: Callable[..., Any]) -> Callable[..., Any]:
    """Turn every exception of an event handler into a readable ``gr.Error``."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as error:
            raise _readable(error) from error

    return wrapper


def _message(error: Exception) -> str:
    """A view's unavailability as Markdown (unexpected failures are logged too)."""
    if not isinstance(error, views.ViewUnavailable):
        LOGGER.exception("Demo view failed")
        return f"⚠️ Something went wrong ({type(error).__name__}): {error}"
    return f"ℹ️ {error}"


def _close_session(state: Session | None) -> None:
    if state is not None:
        state.close()


def run_options(
    input_size: str, dpseg_pass: str, theta: float, prompt_types: list[str], top_m: float
) -> RunOptions:
    return RunOptions(
        input_size=None if input_size in (None, METHOD_DEFAULT_SIZE) else int(input_size),
        dpseg_inference=dpseg_pass,
        dcp_theta=float(theta),
        esc_prompt_types=tuple(prompt_types or ()),
        ldvc_top_m=int(top_m),
    )


def _method_order(chosen: list[str]) -> list[str]:
    return sorted(chosen, key=lambda name: SLOW_LAST.index(name) + 1 if name in SLOW_LAST else 0)


def _config_value(methods: dict[str, SegmentationMethod], name: str, key: str, default: Any) -> Any:
    return getattr(methods[name].config, key, default) if name in methods else default


def build_demo(
    methods: dict[str, SegmentationMethod] | None = None,
    status: dict[str, str] | None = None,
    *,
    concurrency: int = 1,
) -> gr.Blocks:
    """Build the Blocks app around already loaded methods.

    Arguments:
        methods: display name → loaded method (default: every registered method, default
            weights; see :func:`ovseg.demo.settings.load_methods` for flags and variables).
        status: method name → status line (trained head, training-free, unavailable: why).
        concurrency: how many model-running requests are processed at once.
    """
    if methods is None:
        from ovseg.demo.settings import DemoSettings, load_methods

        loaded = load_methods(DemoSettings())
        methods, status = loaded.methods, loaded.status
    status = dict(status or {name: describe(method) for name, method in methods.items()})
    gradio_fixes.install()
    space = ScratchSpace()
    scratch = space.folder("examples-")
    heavy = {"concurrency_limit": concurrency, "concurrency_id": "models"}

    # Gradio's copies of uploads and served files: pruned when older than a day, and at exit.
    with gr.Blocks(title="ovseg: open-vocabulary segmentation", delete_cache=CACHE_PRUNING) as demo:
        gr.Markdown(INTRODUCTION)
        gr.Markdown(
            "\n".join(f"- **{name}**: {line}" for name, line in status.items()),
            elem_id="method-status",
        )
        session = gr.State(None, time_to_live=SESSION_TTL_S, delete_callback=_close_session)
        with gr.Tabs():
            # ------------------------------------------------------------------ Segment tab
            with gr.Tab("Segment", id="segment"), gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(
                        label="Image", type="numpy", sources=["upload", "clipboard", "webcam"]
                    )
                    preset = gr.Dropdown(
                        choices=preset_names(), value=preset_names()[0], label="Preset"
                    )
                    vocabulary = gr.Textbox(
                        value=DEFAULT_VOCABULARY,
                        label="Vocabulary",
                        info="Classes separated by commas or new lines; synonyms by ';'.",
                        lines=3,
                        elem_id="vocabulary",
                    )
                    chosen = gr.CheckboxGroup(
                        choices=list(methods), value=list(methods), label="Methods"
                    )
                    with gr.Accordion("Options", open=False):
                        input_size = gr.Dropdown(
                            INPUT_SIZES,
                            value=METHOD_DEFAULT_SIZE,
                            label="Input size",
                            info="Dense CLIP and DPSeg only (the others keep their trained "
                            "size); changing it encodes the image again.",
                        )
                        alpha = gr.Slider(0.0, 1.0, value=0.55, step=0.05, label="Opacity")
                        # II whatever the model's default: the paper's choice, and the one whose
                        # DPSeg view can show pass I against pass II.
                        dpseg_pass = gr.Radio(
                            ["I", "II"],
                            value="II",
                            label="DPSeg inference pass",
                        )
                        theta = gr.Slider(
                            0.0,
                            1.0,
                            value=_config_value(methods, "dcp-clip", "theta", 0.5),
                            step=0.01,
                            label="DCP-CLIP θ (image-level selection threshold)",
                        )
                        prompt_types = gr.CheckboxGroup(
                            list(ESC_PROMPT_TYPES),
                            value=list(
                                esc_net_prompt_types(methods["esc-net"])
                                if "esc-net" in methods
                                else ("point", "mask")
                            ),
                            label="ESC-Net pseudo prompt types",
                            info="The training-free path always uses points; masks need the "
                            "trained head.",
                        )
                        top_m = gr.Slider(
                            1,
                            64,
                            value=_config_value(methods, "ldvc", "top_m", 16),
                            step=1,
                            label="LDVC top-m routed windows",
                        )
                    run = gr.Button("Segment", variant="primary", elem_id="segment-button")
                    examples = all_examples(scratch)
                    if examples:
                        gr.Examples(examples, inputs=[image, vocabulary], label="Examples")
                with gr.Column(scale=2):
                    gallery = gr.Gallery(
                        label="Segmentations", columns=3, height="auto", elem_id="overlays"
                    )
                    legend = gr.HTML(elem_id="legend")
                    report = gr.Markdown(elem_id="run-status")
                    areas = gr.Dataframe(
                        headers=["method", "class", "area %", "mean score"],
                        label="Classes found",
                        wrap=True,
                    )
                    downloads = gr.File(
                        label="Downloads (label PNGs, overlays, JSON)",
                        file_count="multiple",
                        elem_id="downloads",
                    )
            # ------------------------------------------------------------- Cost volumes tab
            with gr.Tab("Cost volumes", id="cost-volumes"):
                gr.Markdown(
                    "Each method's score map for one class, as a heatmap over the image "
                    "(bright: high). For DPSeg the text-only, visual-only and dual-prompt cost "
                    "volumes are drawn on one colour scale (the paper's Fig. 3)."
                )
                cost_class = gr.Dropdown(
                    elem_id="cost-class", choices=[], label="Class", interactive=True
                )
                cost_note = gr.Markdown()
                cost_gallery = gr.Gallery(
                    elem_id="cost-gallery", label="Per method", columns=5, height="auto"
                )
                fig3_gallery = gr.Gallery(
                    elem_id="fig3-gallery",
                    label="DPSeg: text vs visual vs dual prompt",
                    columns=3,
                    height="auto",
                )
            # ------------------------------------------------------------- Method views tab
            with gr.Tab("Method views", id="method-views"), gr.Tabs():
                with gr.Tab("DPSeg"):
                    dpseg_note = gr.Markdown(elem_id="dpseg-note")
                    dpseg_passes = gr.Gallery(
                        elem_id="dpseg-passes", label="Pass I vs pass II", columns=3, height="auto"
                    )
                    dpseg_prompts = gr.Gallery(
                        elem_id="dpseg-prompts",
                        label="Visual prompts per class",
                        columns=6,
                        height="auto",
                    )
                with gr.Tab("DCP-CLIP"):
                    view_theta = gr.Slider(
                        0.0,
                        1.0,
                        value=_config_value(methods, "dcp-clip", "theta", 0.5),
                        step=0.01,
                        label="θ: re-run DCP-CLIP's selection (the image is not encoded again)",
                    )
                    dcp_note = gr.Markdown(elem_id="dcp-note")
                    dcp_selection = gr.Dataframe(
                        elem_id="dcp-selection",
                        headers=views.SELECTION_HEADERS,
                        label="Dynamic Category Selection",
                    )
                    dcp_labels = gr.Gallery(
                        elem_id="dcp-labels", label="Coarse vs fine", columns=3, height="auto"
                    )
                    dcp_relabels = gr.Dataframe(
                        headers=views.TAG_HEADERS, label="Tag Validation (unseen-class regions)"
                    )
                with gr.Tab("ESC-Net"):
                    with gr.Row():
                        esc_class = gr.Dropdown(choices=[], label="Class", interactive=True)
                        esc_block = gr.Slider(1, 4, value=1, step=1, label="ESC block")
                    esc_note = gr.Markdown(elem_id="esc-note")
                    esc_gallery = gr.Gallery(
                        elem_id="esc-gallery",
                        label="Pseudo prompts and activation maps",
                        columns=3,
                        height="auto",
                    )
                with gr.Tab("LDVC"):
                    ldvc_note = gr.Markdown(elem_id="ldvc-note")
                    ldvc_attention = gr.Gallery(
                        elem_id="ldvc-attention",
                        label="Cross-attention per class",
                        columns=4,
                        height="auto",
                    )
                    with gr.Row():
                        ldvc_block = gr.Slider(1, 2, value=1, step=1, label="Decoder block")
                        ldvc_window = gr.Slider(0, 63, value=0, step=1, label="Query window")
                    ldvc_routing = gr.Image(
                        elem_id="ldvc-routing",
                        label="Routing inspector (click a window)",
                        type="numpy",
                    )
            # ------------------------------------------------------------ Embedding gap tab
            with gr.Tab("Embedding gap", id="embedding-gap"):
                with gr.Row():
                    projection = gr.Radio(list(PROJECTIONS), value="PCA", label="Projection")
                    gap_button = gr.Button("Show the embedding gap")
                gap_note = gr.Markdown(elem_id="gap-note")
                with gr.Row():
                    gap_scatter = gr.Image(
                        elem_id="gap-scatter", label="2-D projection", type="numpy"
                    )
                    gap_bars = gr.Image(
                        elem_id="gap-bars", label="Similarity to the image", type="numpy"
                    )
                with gr.Row():
                    gap_table = gr.Dataframe(
                        headers=["class", "image–text", "image–visual", "image–dual"],
                        label="Cosine similarity to the image",
                    )
                    gr.Markdown(views.GAP_EXPLANATION)

        # ------------------------------------------------------------------------ handlers
        def segment(
            image_value: Any,
            vocabulary_text: str,
            preset_choice: str | None,
            chosen_methods: list[str],
            size: str,
            opacity: float,
            pass_choice: str,
            theta_value: float,
            types: list[str],
            routed: float,
            state: Session | None,
            progress: gr.Progress = gr.Progress(),  # noqa: B008  (Gradio injects it)
        ) -> Iterator[tuple]:
            """Run the chosen methods one after another, showing each result when it is ready."""
            try:
                if not chosen_methods:
                    raise DemoInputError("Choose at least one method.")
                options = run_options(size, pass_choice, theta_value, types, routed)
                parsed = resolve_vocabulary(vocabulary_text, preset_choice)
                state = state or Session.create(methods, space)
                state.set_image(image_value)
                state.vocabulary, state.options = parsed, options
                for name in list(state.results):
                    if name not in chosen_methods:
                        del state.results[name]
                order = _method_order(chosen_methods)
                for step, name in enumerate(order):
                    progress((step, len(order)), desc=f"Running {name}")
                    state.run(name, parsed, options)
                    yield (
                        views.segmentation_gallery(state, opacity),
                        views.legend_html(state),
                        views.status_markdown(state, status),
                        gr.skip(),
                        gr.skip(),
                        gr.skip(),
                        state,
                    )
                yield (
                    views.segmentation_gallery(state, opacity),
                    views.legend_html(state),
                    views.status_markdown(state, status),
                    views.area_rows(state),
                    state.write_downloads(opacity),
                    gr.Dropdown(
                        choices=views.class_choices(state), value=views.default_class(state)
                    ),
                    state,
                )
            except gr.Error:
                raise
            except Exception as error:
                raise _readable(error) from error

        @_guarded
        def restyle(opacity: float, state: Session | None) -> tuple:
            """A new opacity redraws the overlays from the kept predictions."""
            if state is None or state.vocabulary is None:
                return gr.skip(), gr.skip()
            return views.segmentation_gallery(state, opacity), state.write_downloads(opacity)

        def show_cost_volumes(class_name: str, state: Session | None) -> tuple:
            try:
                per_method = views.cost_volume_gallery(state, class_name)
            except Exception as error:
                return [], [], _message(error)
            try:
                comparison = views.dpseg_prompt_comparison(state, class_name)
                note = ""
            except Exception as error:
                comparison, note = [], _message(error)
            return per_method, comparison, note

        def show_dpseg(state: Session | None) -> tuple:
            try:
                view = views.dpseg_view(state)
            except Exception as error:
                return _message(error), [], []
            return view.summary, view.passes, view.prompts

        def show_dcp_clip(state: Session | None) -> tuple:
            try:
                view = views.dcp_clip_view(state)
            except Exception as error:
                return _message(error), [], [], []
            return view.summary, view.selection, view.labels, view.relabels

        @_guarded
        def rerun_dcp_clip(theta_value: float, opacity: float, state: Session | None) -> tuple:
            """The θ slider: DCP-CLIP alone runs again on the cached image features."""
            if state is None or state.vocabulary is None or "dcp-clip" not in methods:
                return (*show_dcp_clip(state), gr.skip(), gr.skip(), state)
            state.options = replace(state.options, dcp_theta=float(theta_value))
            state.run("dcp-clip", state.vocabulary, state.options)
            gallery_items = views.segmentation_gallery(state, opacity)
            return (*show_dcp_clip(state), float(theta_value), gallery_items, state)

        def show_esc_net(class_name: str, block: float, state: Session | None) -> tuple:
            try:
                view = views.esc_net_view(state, class_name, int(block) - 1)
            except Exception as error:
                return _message(error), []
            return view.summary, view.prompts + view.activations

        def esc_controls(state: Session | None) -> tuple:
            blocks = max(1, views.esc_net_blocks(state))
            return (
                gr.Dropdown(choices=views.class_choices(state), value=views.default_class(state)),
                # A slider needs a range; one block shows as a fixed 1 of 1..2.
                gr.Slider(1, max(2, blocks), value=1, step=1, interactive=blocks > 1),
            )

        def show_ldvc(block: float, window: float, state: Session | None) -> tuple:
            try:
                view = views.ldvc_view(state, int(block) - 1, int(window))
            except Exception as error:
                return _message(error), [], None
            return view.summary, view.attention, view.routing

        def pick_window(block: float, state: Session | None, event: gr.SelectData) -> tuple:
            """A click on the routing image picks the window under the pointer."""
            window = views.window_at(state, int(block) - 1, event.index[0], event.index[1])
            return (window, *show_ldvc(block, window, state))

        def ldvc_controls(state: Session | None) -> tuple:
            blocks, windows = views.ldvc_routing_shape(state)
            return (
                gr.Slider(1, max(2, blocks), value=1, step=1, interactive=blocks > 1),
                gr.Slider(0, max(1, windows - 1), value=0, step=1, interactive=windows > 1),
            )

        def show_gap(choice: str, state: Session | None) -> tuple:
            try:
                gap = views.embedding_gap(state, choice)
            except Exception as error:
                return _message(error), None, None, []
            return gap.summary, gap.projection, gap.similarity, gap.rows

        @_guarded
        def fill_preset(choice: str) -> Any:
            text = preset_text(choice)
            return gr.skip() if text is None else text

        # -------------------------------------------------------------------------- wiring
        preset.change(fill_preset, inputs=preset, outputs=vocabulary, api_name="vocabulary_preset")
        segment_inputs = [
            image,
            vocabulary,
            preset,
            chosen,
            input_size,
            alpha,
            dpseg_pass,
            theta,
            prompt_types,
            top_m,
            session,
        ]
        segmented = run.click(
            segment,
            inputs=segment_inputs,
            outputs=[gallery, legend, report, areas, downloads, cost_class, session],
            api_name="segment",
            **heavy,
        )
        refreshed = (
            segmented.success(
                show_cost_volumes,
                inputs=[cost_class, session],
                outputs=[cost_gallery, fig3_gallery, cost_note],
                api_visibility="private",
            )
            .then(
                show_dpseg,
                inputs=session,
                outputs=[dpseg_note, dpseg_passes, dpseg_prompts],
                api_visibility="private",
            )
            .then(
                show_dcp_clip,
                inputs=session,
                outputs=[dcp_note, dcp_selection, dcp_labels, dcp_relabels],
                api_visibility="private",
            )
            .then(
                esc_controls,
                inputs=session,
                outputs=[esc_class, esc_block],
                api_visibility="private",
            )
            .then(
                show_esc_net,
                inputs=[esc_class, esc_block, session],
                outputs=[esc_note, esc_gallery],
                api_visibility="private",
            )
            .then(
                ldvc_controls,
                inputs=session,
                outputs=[ldvc_block, ldvc_window],
                api_visibility="private",
            )
            .then(
                show_ldvc,
                inputs=[ldvc_block, ldvc_window, session],
                outputs=[ldvc_note, ldvc_attention, ldvc_routing],
                api_visibility="private",
            )
        )
        refreshed.then(
            show_gap,
            inputs=[projection, session],
            outputs=[gap_note, gap_scatter, gap_bars, gap_table],
            api_visibility="private",
            **heavy,
        )
        alpha.release(
            restyle, inputs=[alpha, session], outputs=[gallery, downloads], api_visibility="private"
        )
        cost_class.input(
            show_cost_volumes,
            inputs=[cost_class, session],
            outputs=[cost_gallery, fig3_gallery, cost_note],
            api_name="cost_volumes",
        )
        view_theta.release(
            rerun_dcp_clip,
            inputs=[view_theta, alpha, session],
            outputs=[dcp_note, dcp_selection, dcp_labels, dcp_relabels, theta, gallery, session],
            api_name="dcp_clip_selection",
            **heavy,
        )
        esc_inputs = [esc_class, esc_block, session]
        esc_class.input(
            show_esc_net,
            inputs=esc_inputs,
            outputs=[esc_note, esc_gallery],
            api_name="esc_net_prompts",
        )
        esc_block.release(
            show_esc_net,
            inputs=esc_inputs,
            outputs=[esc_note, esc_gallery],
            api_visibility="private",
        )
        for control in (ldvc_block, ldvc_window):
            control.release(
                show_ldvc,
                inputs=[ldvc_block, ldvc_window, session],
                outputs=[ldvc_note, ldvc_attention, ldvc_routing],
                api_name="ldvc_routing" if control is ldvc_window else None,
                api_visibility="public" if control is ldvc_window else "private",
            )
        projection.change(
            show_gap,
            inputs=[projection, session],
            outputs=[gap_note, gap_scatter, gap_bars, gap_table],
            api_visibility="private",
            **heavy,
        )
        ldvc_routing.select(
            pick_window,
            inputs=[ldvc_block, session],
            outputs=[ldvc_window, ldvc_note, ldvc_attention, ldvc_routing],
            api_visibility="private",
        )
        gap_button.click(
            show_gap,
            inputs=[projection, session],
            outputs=[gap_note, gap_scatter, gap_bars, gap_table],
            api_name="embedding_gap",
            **heavy,
        )
    demo.scratch_space = space  # where sessions keep their files (inspected by the load test)
    return demo


def launch(argv: list[str] | None = None) -> None:
    """Parse the command line, load the models and serve the demo (``python app.py``)."""
    from ovseg.demo.settings import argument_parser, load_methods, settings_from_arguments

    parser = argument_parser()
    arguments = parser.parse_args(argv)
    try:
        settings = settings_from_arguments(arguments)
    except ValueError as error:
        parser.error(str(error))
    loaded = load_methods(settings)
    if not loaded.methods:
        parser.error(
            "No method could be loaded:\n"
            + "\n".join(f"  {name}: {line}" for name, line in loaded.status.items())
        )
    demo = build_demo(loaded.methods, loaded.status, concurrency=settings.concurrency)
    demo.queue(default_concurrency_limit=settings.concurrency).launch(
        server_name=arguments.host,
        server_port=arguments.port,
        share=arguments.share,
        state_session_capacity=settings.max_sessions,
    )
