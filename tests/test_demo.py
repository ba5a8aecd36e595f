"""The demo's logic without a browser: sessions, options, views, downloads, settings, API."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

import ovseg
from ovseg.backbones import load_backbone
from ovseg.demo import views
from ovseg.demo.app import build_demo
from ovseg.demo.examples import (
    EXAMPLES_DIR,
    PRESET_CUSTOM,
    preset_names,
    preset_text,
    resolve_vocabulary,
)
from ovseg.demo.session import (
    DemoInputError,
    RunOptions,
    Session,
    esc_net_prompt_types,
    method_variant,
)
from ovseg.demo.settings import argument_parser, load_methods, settings_from_arguments

EXAMPLE = EXAMPLES_DIR / "toyworld-1.png"
VOCABULARY = "carpet, fox, peacock, ant"


def _models(trained: bool) -> dict[str, ovseg.SegmentationMethod]:
    """Every method on small random CLIPs, with the shipped toy heads' architectures (those
    heads fit only the trained toy CLIPs); ``trained`` runs the (random) heads."""
    vit = load_backbone("toy-vit", "random")
    convnext = load_backbone("toy-convnext", "random")
    models = {
        "dense-clip": ovseg.load("dense-clip", backbone=vit),
        "dpseg": ovseg.load("dpseg", backbone=convnext, input_size=192),
        "dcp-clip": ovseg.load("dcp-clip", backbone=vit, input_size=128, window_size=8),
        "esc-net": ovseg.load("esc-net", backbone=vit, input_size=128, window_size=8),
        "ldvc": ovseg.load("ldvc", backbone=vit, input_size=128, visual_prompt_tokens=16, top_m=4),
    }
    for name, method in models.items():
        if name != "dense-clip":
            method.trained_head = trained
    return models


@pytest.fixture(scope="module")
def training_free():
    return _models(trained=False)


@pytest.fixture(scope="module")
def with_heads():
    return _models(trained=True)


@pytest.fixture(scope="module")
def vocabulary():
    return ovseg.parse_vocabulary(VOCABULARY)


def _run_all(models, vocabulary, options=None):
    session = Session.create(models)
    session.set_image(EXAMPLE)
    session.vocabulary = vocabulary
    for name in models:
        session.run(name, vocabulary, options or RunOptions())
    return session


@pytest.fixture(scope="module")
def free_session(training_free, vocabulary):
    return _run_all(training_free, vocabulary)


@pytest.fixture(scope="module")
def head_session(with_heads, vocabulary):
    return _run_all(with_heads, vocabulary)


def test_a_new_vocabulary_or_option_reuses_the_encoded_image(training_free, vocabulary):
    session = Session.create(training_free)
    assert session.set_image(EXAMPLE)
    first = session.run("dcp-clip", vocabulary, RunOptions())
    assert first.encoded and first.prediction is not None
    again = session.run("dcp-clip", vocabulary, RunOptions())
    assert again is first  # nothing changed: the kept result
    other = session.run("dcp-clip", ovseg.parse_vocabulary("fox, sky"), RunOptions())
    assert not other.encoded and other.prediction.vocabulary.names == ("fox", "sky")
    lower = session.run("dcp-clip", vocabulary, RunOptions(dcp_theta=0.0))
    assert not lower.encoded
    assert lower.prediction.intermediates["num_selected"] == [len(vocabulary)]  # θ = 0: all
    assert not session.set_image(EXAMPLE)  # the same pixels: nothing to encode


def test_only_a_new_input_size_encodes_again_and_only_for_resizable_methods(
    training_free, vocabulary
):
    session = Session.create(training_free)
    session.set_image(EXAMPLE)
    session.run("dense-clip", vocabulary, RunOptions())
    esc = session.run("esc-net", vocabulary, RunOptions())
    resized = RunOptions(input_size=192)
    dense = session.run("dense-clip", vocabulary, resized)
    assert dense.encoded
    assert session.predictor.features("dense-clip").input_size == (192, 192)
    assert training_free["dense-clip"].config.input_size == 256  # the shared model is untouched
    assert session.run("esc-net", vocabulary, resized) is esc  # ESC-Net keeps its size
    size = training_free["esc-net"].config.input_size
    assert session.predictor.features("esc-net").clip.input_size == (size, size)


def test_esc_net_prompt_types_make_a_variant_that_shares_the_weights(with_heads):
    method = with_heads["esc-net"]
    variant = method_variant(method, RunOptions(esc_prompt_types=("box",)).variant(method))
    assert variant is not method
    assert variant.prompt_encoding.prompt_types == ("box",)
    assert method.prompt_encoding.prompt_types == ("point", "mask")
    shared = dict(method.named_parameters())
    for name, parameter in variant.named_parameters():
        assert parameter is shared[name]
    assert method_variant(method, {}) is method


def test_esc_net_training_free_prompt_types_switch_boxes(training_free):
    method = training_free["esc-net"]
    assert esc_net_prompt_types(method) == ("point", "box")
    changes = RunOptions(esc_prompt_types=("point",)).variant(method)
    assert changes == {"training_free_box": False}
    assert method_variant(method, changes).config.training_free_box is False
    assert method.config.training_free_box is True


def test_ldvc_without_weights_says_so_plainly_and_encodes_nothing(training_free, vocabulary):
    session = Session.create(training_free)
    session.set_image(EXAMPLE)
    result = session.run("ldvc", vocabulary, RunOptions())
    assert result.prediction is None and not result.encoded
    assert "LDVC has no trained weights here" in result.error and "train with" in result.error
    assert not session.predictor.is_encoded("ldvc")
    session.vocabulary = vocabulary
    assert "did not run: LDVC has no trained weights" in views.status_markdown(session, {})
    with pytest.raises(views.ViewUnavailable, match="LDVC has no trained weights"):
        views.ldvc_view(session, 0, 0)


@pytest.mark.parametrize(
    ("image", "options", "message"),
    [
        (None, {}, "Give an image"),
        (np.zeros((1, 1, 3), dtype=np.uint8), {}, "1×1"),
        (str(EXAMPLE), {"esc_prompt_types": ()}, "ESC-Net prompt type"),
        (str(EXAMPLE), {"dpseg_inference": "III"}, "pass must be I or II"),
        (str(EXAMPLE), {"input_size": 100}, "multiple of 32"),
    ],
)
def test_bad_input_is_refused_in_words(training_free, image, options, message):
    with pytest.raises(DemoInputError, match=message):
        Session.create(training_free).set_image(image)
        RunOptions(**options)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (" , ", "empty"),
        ("\n\t ;; ,", "empty"),
        ("x" * 300, "at most 200"),
        (", ".join(f"class {i}" for i in range(5000)), "at most"),
    ],
)
def test_unusable_vocabularies_are_refused_in_words(text, message):
    with pytest.raises(ovseg.VocabularyError, match=message):
        resolve_vocabulary(text, PRESET_CUSTOM)


def test_unicode_vocabularies_and_odd_images_segment_in_the_demo(training_free, tmp_path):
    session = Session.create({"dense-clip": training_free["dense-clip"]})
    cmyk = tmp_path / "cmyk.jpg"
    Image.open(EXAMPLE).convert("CMYK").save(cmyk)
    session.set_image(str(cmyk))
    vocabulary = resolve_vocabulary("狐狸; fox, 🟫 carpet, pavo real, ant, ant", PRESET_CUSTOM)
    assert vocabulary.names == ("狐狸", "🟫 carpet", "pavo real", "ant")
    result = session.run("dense-clip", vocabulary, RunOptions())
    assert result.prediction is not None and result.prediction.label_map.shape == (256, 256)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(DemoInputError, match="not an image"):
        session.set_image(str(not_an_image))
    assert session.image is not None  # the earlier image is kept


def test_the_segment_view_shows_every_method_with_its_time_and_areas(free_session):
    gallery = views.segmentation_gallery(free_session, 0.5)
    captions = [caption for _, caption in gallery]
    assert [c.split(" · ")[0] for c in captions] == ["dense-clip", "dpseg", "dcp-clip", "esc-net"]
    assert all("ms (training-free" in caption for caption in captions)
    assert all(image.shape == (256, 256, 3) for image, _ in gallery)
    rows = views.area_rows(free_session)
    for method in ("dense-clip", "dpseg", "dcp-clip", "esc-net"):
        areas = [row[2] for row in rows if row[0] == method]
        assert sum(areas) == pytest.approx(100, abs=0.1)
    legend = views.legend_html(free_session)
    assert all(name in legend for name in VOCABULARY.split(", "))


def test_cost_volume_views_draw_a_heatmap_per_method_and_dpseg_fig3(head_session):
    items = views.cost_volume_gallery(head_session, "fox")
    assert len(items) == 5
    assert all(image.shape == (256, 256, 3) for image, _ in items)
    captions = " ".join(caption for _, caption in items)
    assert "dual-prompt cost volume" in captions and "score map" in captions
    fig3 = views.dpseg_prompt_comparison(head_session, "fox")
    assert [caption.split(" ")[0] for _, caption in fig3] == ["text", "visual", "dual"]
    with pytest.raises(views.ViewUnavailable, match="not in the current vocabulary"):
        views.cost_volume_gallery(head_session, "unicorn")


def test_dpseg_view_shows_prompts_and_where_pass_two_differs(head_session):
    view = views.dpseg_view(head_session)
    assert len(view.passes) == 3
    first, _, changed = (image for image, _ in view.passes)
    assert changed.shape == first.shape
    assert any("visual prompt 1" in caption for _, caption in view.prompts)
    assert "changed label" in view.summary
    crops = head_session.result("dpseg").prediction.intermediates["refined_prompt_images"][0]
    shown = [image for image, caption in view.prompts if "pass-II prompt" in caption]
    assert len(shown) == len(crops) > 0
    for image, crop in zip(shown, crops.values(), strict=True):
        assert image.dtype == np.uint8 and image.shape == (*crop.shape[1:], 3)
        np.testing.assert_allclose(image / 255, crop.permute(1, 2, 0).numpy(), atol=1 / 255)


def test_dcp_clip_view_tables_follow_theta(head_session, vocabulary):
    view = views.dcp_clip_view(head_session)
    assert len(view.selection) == len(vocabulary)
    assert {row[4] for row in view.selection} <= {True, False}
    assert len(view.labels) == 3
    head_session.run("dcp-clip", vocabulary, RunOptions(dcp_theta=0.0))
    everything = views.dcp_clip_view(head_session)
    assert all(row[4] for row in everything.selection)
    assert "θ = 0.00" in everything.summary


def test_esc_net_view_draws_prompts_per_block_and_activation_maps(head_session):
    blocks = views.esc_net_blocks(head_session)
    assert blocks == head_session.models["esc-net"].config.num_blocks
    view = views.esc_net_view(head_session, "fox", blocks - 1)
    assert f"block {blocks} of {blocks}" in view.prompts[0][1]
    assert len(view.activations) == blocks + 1  # S_0 … S_N


def test_esc_net_view_draws_the_training_free_prompts_and_sam_mask(free_session):
    assert views.esc_net_blocks(free_session) == 1  # one set of prompts, from the cost volume
    view = views.esc_net_view(free_session, "fox", 0)
    assert "from the cost volume" in view.prompts[0][1]
    assert [label for _, label in view.activations] == ["cost volume", "SAM mask"]


def test_ldvc_view_draws_attention_maps_and_the_routed_windows(head_session, vocabulary):
    blocks, windows = views.ldvc_routing_shape(head_session)
    assert blocks >= 1 and windows > 1
    view = views.ldvc_view(head_session, blocks - 1, windows - 1)
    assert len(view.attention) == len(vocabulary)
    intermediates = head_session.result("ldvc").prediction.intermediates
    class_maps = views.ldvc_class_attention_maps(intermediates)  # Fig. 1
    assert class_maps.shape == (1, len(vocabulary), *intermediates["score_map"].shape[-2:])
    np.testing.assert_allclose(  # the last block's cross-attention, averaged over heads
        class_maps.flatten(2).transpose(1, 2).numpy(),
        intermediates["cross_attention"][-1].mean(1).numpy(),
    )
    assert view.routing.shape == (256, 256, 3)
    assert f"window {windows - 1}" in view.summary
    rows = round(windows**0.5)
    assert views.window_at(head_session, 0, 0, 0) == 0
    assert views.window_at(head_session, 0, 255, 255) == windows - 1
    assert views.window_at(head_session, 0, 256 // rows, 0) == 1


def test_embedding_gap_projects_image_and_prompts_and_compares_them(head_session, vocabulary):
    for projection in ("PCA", "t-SNE"):
        gap = views.embedding_gap(head_session, projection)
        assert gap.projection.ndim == 3 and gap.similarity.ndim == 3
        assert len(gap.rows) == len(vocabulary)
        assert all(-1 <= value <= 1 for row in gap.rows for value in row[1:])
    assert "Mean cosine to the image" in gap.summary


def test_downloads_hold_the_label_maps_overlays_and_a_json(free_session):
    files = free_session.write_downloads(0.5)
    by_name = {path.rsplit("/", 1)[1]: path for path in files}
    summary = json.loads(Path(by_name["ovseg-results.json"]).read_text(encoding="utf-8"))
    assert summary["methods"]["ldvc"]["error"].startswith("LDVC has no trained weights")
    dense = summary["methods"]["dense-clip"]
    assert {"classes", "timings_s", "wall_time_s"} <= set(dense)
    labels = np.asarray(Image.open(by_name["dense-clip-labels.png"]))
    assert np.array_equal(labels, free_session.results["dense-clip"].prediction.label_map)
    assert Image.open(by_name["dpseg-overlay.png"]).size == (256, 256)


def test_presets_fill_the_vocabulary():
    names = preset_names()
    assert {"ToyWorld seen classes", "COCO-Stuff-171", "ADE-847", "VOC-20"} <= set(names)
    # ADE-847 repeats display names for different senses: the unedited preset keeps all 847
    assert len(resolve_vocabulary(preset_text("ADE-847"), "ADE-847")) == 847
    assert resolve_vocabulary("cat, dog", "ADE-847").names == ("cat", "dog")
    seen = ovseg.parse_vocabulary(preset_text("ToyWorld seen classes"))
    everything = ovseg.parse_vocabulary(preset_text("ToyWorld all classes"))
    assert 0 < len(seen) < len(everything)
    assert preset_text(names[0]) is None


def test_flags_and_environment_choose_models(monkeypatch):
    monkeypatch.setenv("OVSEG_WEIGHTS", "ldvc=heads/ldvc.safetensors, dpseg=heads/d.safetensors")
    arguments = argument_parser().parse_args(
        ["--methods", "dense-clip,ldvc", "--backbone", "vit-b-16", "--backbone", "dpseg=toy"]
    )
    settings = settings_from_arguments(arguments)
    assert settings.methods == ["dense-clip", "ldvc"]
    assert settings.weights == {"ldvc": "heads/ldvc.safetensors", "dpseg": "heads/d.safetensors"}
    assert settings.value_for(settings.backbones, "ldvc") == "vit-b-16"
    assert settings.value_for(settings.backbones, "dpseg") == "toy"
    with pytest.raises(ValueError, match="unknown method 'segformer'"):
        settings_from_arguments(argument_parser().parse_args(["--weights", "segformer=x"]))
    with pytest.raises(ValueError, match="--methods must name"):
        settings_from_arguments(argument_parser().parse_args(["--methods", "sam"]))


def test_a_method_that_cannot_load_is_reported_not_raised(tmp_path):
    arguments = argument_parser().parse_args(
        ["--methods", "dense-clip,ldvc", "--weights", f"ldvc={tmp_path / 'missing.safetensors'}"]
    )
    loaded = load_methods(settings_from_arguments(arguments))
    assert list(loaded.methods) == ["dense-clip"]
    assert loaded.status["ldvc"].startswith("unavailable: No ldvc weights file")
    assert loaded.status["dense-clip"].startswith("training-free")


@pytest.mark.slow
def test_the_named_endpoints_answer_gradio_client(training_free):
    from gradio_client import Client, handle_file

    models = {name: training_free[name] for name in ("dense-clip", "dpseg", "ldvc")}
    demo = build_demo(models).queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        client = Client(url, verbose=False)
        endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        for name in ("/segment", "/cost_volumes", "/embedding_gap", "/dcp_clip_selection"):
            assert name in endpoints
        gallery, _, report, _, files, *_ = client.predict(
            handle_file(str(EXAMPLE)),
            VOCABULARY,
            PRESET_CUSTOM,
            list(models),
            "each method's own",
            0.5,
            "I",
            0.5,
            ["point", "mask"],
            16,
            api_name="/segment",
        )
        assert [item["caption"].split(" · ")[0] for item in gallery] == ["dense-clip", "dpseg"]
        assert "LDVC has no trained weights here" in report
        assert any(path.endswith("ovseg-results.json") for path in files)
        per_method, fig3, _ = client.predict("fox", api_name="/cost_volumes")
        assert len(per_method) == 2 and len(fig3) == 3
        _, scatter, bars, table = client.predict("PCA", api_name="/embedding_gap")
        assert scatter and bars and len(table["data"]) == 4
        with pytest.raises(Exception, match="vocabulary is empty"):
            client.predict(
                handle_file(str(EXAMPLE)),
                " , ",
                PRESET_CUSTOM,
                ["dense-clip"],
                "each method's own",
                0.5,
                "I",
                0.5,
                ["point"],
                16,
                api_name="/segment",
            )
    finally:
        demo.close()


def test_the_demo_builds_without_examples_or_dpseg(training_free):
    demo = build_demo({"dense-clip": training_free["dense-clip"]}, {"dense-clip": "training-free"})
    assert isinstance(demo, gr.Blocks)


def test_the_predictor_swaps_a_method_keeping_or_dropping_its_features(training_free):
    predictor = ovseg.Predictor({"dense-clip": training_free["dense-clip"]})
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.features("dense-clip")
    predictor.set_image(EXAMPLE)
    features = predictor.features("dense-clip")
    assert predictor.is_encoded("dense-clip") and predictor.features("dense-clip") is features
    predictor.replace_method("dense-clip", training_free["dense-clip"], keep_features=True)
    assert predictor.features("dense-clip") is features
    predictor.replace_method("dense-clip", training_free["dense-clip"])
    assert not predictor.is_encoded("dense-clip")
    with pytest.raises(ValueError, match="Unknown method 'sam'"):
        predictor.replace_method("sam", training_free["dense-clip"])


def test_weights_given_on_the_command_line_run_the_trained_head(tmp_path):
    from ovseg.methods.weights import save_weights

    path = save_weights(ovseg.load("ldvc"), tmp_path / "ldvc-head")
    arguments = argument_parser().parse_args(["--methods", "ldvc", "--weights", f"ldvc={path}"])
    loaded = load_methods(settings_from_arguments(arguments))
    assert loaded.status == {"ldvc": "trained head"}
    session = Session.create(loaded.methods)
    session.set_image(EXAMPLE)
    session.vocabulary = ovseg.parse_vocabulary("fox, carpet")
    result = session.run("ldvc", session.vocabulary, RunOptions(ldvc_top_m=2))
    assert result.error is None and result.prediction.trained_head
    assert views.ldvc_view(session, 0, 3).routing is not None


def test_prompts_drawn_for_names_toyworld_lacks_are_said_to_be_so():
    drawn = "diffusers:toy-diffusion@0123456789abcdef:res128:steps10"
    note = views.drawn_prompts_note(drawn, [("cat",), ("person",), ("necktie", "tie")])
    assert note and "person, necktie" in note and "cat" not in note.split("are")[0]
    assert views.drawn_prompts_note(drawn, [("cat",), ("kitty",)]) is None  # a ToyWorld synonym
    # Sprites refuse unknown names outright, and Stable Diffusion knows the world: no note.
    assert views.drawn_prompts_note("toyworld-sprites:random:res128", [("person",)]) is None
    assert views.drawn_prompts_note("diffusers:stable-diffusion-v1-5", [("person",)]) is None
