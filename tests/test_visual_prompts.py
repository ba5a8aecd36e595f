"""Visual prompt generators and the prompt bank (DPSeg spec §3, acceptance check 12)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import torch

from ovseg.caching import WeightsFingerprint
from ovseg.data.toyworld import ToyWorld
from ovseg.prompts.visual import (
    DEFAULT_SD_MODEL,
    BlackPromptImageError,
    MissingVisualPromptsError,
    NoisyPromptGenerator,
    PromptEncoderId,
    PromptMemo,
    StableDiffusionGenerator,
    ToyWorldSpriteGenerator,
    VisualPromptBank,
    VisualPromptError,
    VisualPromptGenerator,
    add_prompt_noise,
    is_black_image,
    make_generator,
)

TEMPLATES = ("a photo of a {}.", "a {} in the scene.", "a photo of many {}.")


@pytest.fixture(scope="module")
def world():
    return ToyWorld(image_size=64)


@pytest.fixture(scope="module")
def sprites(world):
    return ToyWorldSpriteGenerator(world=world, resolution=32)


def colour_encoder(images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A stand-in frozen encoder: channel means and standard deviations, two 'stages'."""
    means, stds = images.mean(dim=(2, 3)), images.std(dim=(2, 3))
    return torch.cat([means, stds], dim=1), [means, stds[:, :2]]


def make_bank(generator, tmp_path, **kwargs) -> VisualPromptBank:
    return VisualPromptBank(
        generator=generator,
        encoder=colour_encoder,
        encoder_id="colour-stats",
        cache_dir=tmp_path,
        progress=False,
        **kwargs,
    )


class ListGenerator:
    """Flat-colour images; classes named in ``black`` come back black."""

    resolution = 16
    id = "flat-colours"

    def __init__(self, black: tuple[str, ...] = ()) -> None:
        self.black = black
        self.calls = 0

    def subject(self, synonyms):
        return synonyms if isinstance(synonyms, str) else synonyms[0]

    def generate(self, synonyms, template_index, template, seed):
        self.calls += 1
        if self.subject(synonyms) in self.black:
            return np.zeros((16, 16, 3), np.uint8)
        colour = np.random.default_rng(seed).integers(10, 255, 3)
        return np.broadcast_to(colour.astype(np.uint8), (16, 16, 3)).copy()


# ------------------------------------------------------------------------------ ToyWorld sprites


def test_toyworld_generator_finds_classes_by_name_or_synonym(world, sprites):
    cat = world.class_names.index("cat")
    synonym = world.classes[cat].synonyms[0]
    assert sprites.class_id("cat") == cat
    assert sprites.class_id(synonym.upper()) == cat
    assert sprites.class_id(("no such thing", "  Cat ")) == cat
    assert sprites.subject((synonym,)) == "cat"
    image = sprites.generate(("cat",), 3, "a photo of a {}.", seed=11)
    np.testing.assert_array_equal(image, world.sprite_image(cat, 11, size=32))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert isinstance(sprites, VisualPromptGenerator)


def test_toyworld_generator_refuses_unknown_names_unless_asked_for_noise(world):
    strict = ToyWorldSpriteGenerator(world=world, resolution=32)
    with pytest.raises(VisualPromptError, match=r"no class named 'catt'.*cat"):
        strict.subject("catt")
    lenient = ToyWorldSpriteGenerator(world=world, resolution=32, unknown="noise")
    first = lenient.generate("mirror", 0, "a photo of a {}.", seed=5)
    np.testing.assert_array_equal(first, lenient.generate("mirror", 0, "x {}", seed=5))
    assert not np.array_equal(first, lenient.generate("mirror", 0, "x {}", seed=6))
    assert lenient.subject("mirror") != lenient.subject("cat")


# -------------------------------------------------------------------------------------- noise


def test_prompt_noise_is_variance_preserving_mixing():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    np.testing.assert_array_equal(add_prompt_noise(image, 0.0, seed=1), image)
    other = 255 - image
    pure = add_prompt_noise(image, 1.0, seed=1)
    np.testing.assert_array_equal(pure, add_prompt_noise(other, 1.0, seed=1))  # no image left
    mixed = add_prompt_noise(image, 0.6, seed=1).astype(np.float64) / 127.5 - 1
    epsilon = np.random.default_rng([1, 0x5EED]).standard_normal(image.shape, np.float32)
    expected = np.clip(np.sqrt(0.4) * (image / 127.5 - 1) + np.sqrt(0.6) * epsilon, -1, 1)
    np.testing.assert_allclose(mixed, expected, atol=1 / 127.5)


def test_noisy_generator_keys_the_cache_separately(sprites, tmp_path):
    noisy = NoisyPromptGenerator(sprites, noise=0.2)
    assert noisy.id != sprites.id and noisy.resolution == sprites.resolution
    clean = sprites.generate("cat", 0, TEMPLATES[0], seed=3)
    np.testing.assert_array_equal(
        noisy.generate("cat", 0, TEMPLATES[0], seed=3), add_prompt_noise(clean, 0.2, 3)
    )
    clean_bank, noisy_bank = make_bank(sprites, tmp_path), make_bank(noisy, tmp_path)
    entry = clean_bank.entries(["cat"], TEMPLATES)[0][0]
    assert clean_bank.image_path(entry) != noisy_bank.image_path(entry)


def test_a_generator_setting_names_its_generator_and_adds_the_noise():
    sprites = make_generator("toyworld", resolution=48)
    assert isinstance(sprites, ToyWorldSpriteGenerator) and sprites.resolution == 48
    drawn = make_generator("sd15", resolution=64, dtype="float16")
    assert isinstance(drawn, StableDiffusionGenerator) and drawn._pipeline is None  # lazy
    assert (drawn.model, drawn.resolution, drawn.dtype) == (DEFAULT_SD_MODEL, 64, torch.float16)
    given = ListGenerator()
    assert make_generator(given, resolution=8) is given
    noisy = make_generator(given, resolution=8, noise=0.6)
    assert isinstance(noisy, NoisyPromptGenerator) and noisy.base is given and noisy.noise == 0.6
    with pytest.raises(ValueError, match="LayerDiffuse"):
        make_generator("layerdiffuse", resolution=64)


# --------------------------------------------------------------------------------------- bank


def test_bank_is_deterministic_and_caches_exactly_k_times_m_entries(sprites, tmp_path):
    vocabulary = [("cat",), ("grass", "lawn"), "sky"]
    first = make_bank(sprites, tmp_path / "a").embeddings(vocabulary, TEMPLATES)
    again = make_bank(sprites, tmp_path / "b").embeddings(vocabulary, TEMPLATES)
    assert first.embeddings.shape == (3, 3, 6)
    assert [p.shape for p in first.pooled] == [(3, 3, 3), (3, 3, 2)]
    assert torch.equal(first.embeddings, again.embeddings)
    assert all(torch.equal(a, b) for a, b in zip(first.pooled, again.pooled, strict=True))
    for root in (tmp_path / "a", tmp_path / "b"):
        assert len(list((root / "images").rglob("*.png"))) == 3 * 3
        assert len(list((root / "embeddings").rglob("*.safetensors"))) == 3 * 3
    bank = make_bank(sprites, tmp_path / "a")
    images = bank.images(vocabulary, TEMPLATES)
    again_images = make_bank(sprites, tmp_path / "b").images(vocabulary, TEMPLATES)
    for row, other in zip(images, again_images, strict=True):
        for image, same in zip(row, other, strict=True):
            np.testing.assert_array_equal(image, same)
    # The stored embedding is the encoder's output for the stored image.
    expected, _ = colour_encoder(torch.from_numpy(images[1][2]).permute(2, 0, 1)[None] / 255.0)
    torch.testing.assert_close(first.embeddings[1, 2], expected[0])
    # Templates give different prompts; the seed is a stable function of (subject, template).
    assert not torch.equal(first.embeddings[0, 0], first.embeddings[0, 1])
    assert bank.entry_seed("cat", 1) == make_bank(sprites, tmp_path / "c").entry_seed("cat", 1)
    assert bank.entry_seed("cat", 1) != make_bank(sprites, tmp_path, seed=1).entry_seed("cat", 1)


def test_bank_reads_back_without_regenerating(tmp_path):
    generator = ListGenerator()
    bank = make_bank(generator, tmp_path)
    first = bank.embeddings(["red", "blue"], TEMPLATES)
    calls = generator.calls
    assert calls == 6
    fresh = make_bank(generator, tmp_path).embeddings(["red", "blue"], TEMPLATES, generate=False)
    assert generator.calls == calls
    assert torch.equal(first.embeddings, fresh.embeddings)


def test_shipped_embeddings_answer_without_drawing_or_a_cache(tmp_path):
    shipped = tmp_path / "shipped.safetensors"
    written = make_bank(ListGenerator(), tmp_path / "maker")
    assert written.export_embeddings(shipped, ["red", "blue"], TEMPLATES, 2) == 4
    expected = written.embeddings(["red", "blue"], TEMPLATES, 2)

    # A user's bank: an empty cache, the shipped file, and a generator that must not run.
    generator = ListGenerator()
    bank = make_bank(generator, tmp_path / "user", shipped=shipped)
    found = bank.embeddings(["blue", "red"], TEMPLATES, 2, generate=False)
    assert generator.calls == 0 and not (tmp_path / "user").exists()
    # float16 storage: equal to what the maker encoded up to half-precision rounding.
    torch.testing.assert_close(found.embeddings, expected.embeddings[[1, 0]], rtol=1e-3, atol=1e-3)
    for ours, theirs in zip(found.pooled, expected.pooled, strict=True):
        torch.testing.assert_close(ours, theirs[[1, 0]], rtol=1e-3, atol=1e-3)

    # A class the file lacks is drawn and cached as before; the shipped ones still are not.
    bank.embeddings(["red", "green"], TEMPLATES, 2)
    assert generator.calls == 2
    # Keys carry the generator and encoder: another encoder finds nothing in the file.
    other = make_bank(ListGenerator(), tmp_path / "other", shipped=shipped)
    other._encoder_id = "another-encoder"
    with pytest.raises(MissingVisualPromptsError):
        other.embeddings(["red"], TEMPLATES, 2, generate=False)


def test_a_damaged_shipped_file_is_a_clear_error(tmp_path):
    shipped = tmp_path / "shipped.safetensors"
    shipped.write_bytes(b"not a safetensors file")
    bank = make_bank(ListGenerator(), tmp_path, shipped=shipped)
    with pytest.raises(VisualPromptError, match="shipped prompt embeddings"):
        bank.embeddings(["red"], TEMPLATES, 2)
    from safetensors.torch import save_file

    save_file({"embedding": torch.zeros(2, 3)}, shipped, metadata={"keys": '["a"]'})
    with pytest.raises(VisualPromptError, match="one row per key"):
        make_bank(ListGenerator(), tmp_path, shipped=shipped).embeddings(["red"], TEMPLATES, 2)


def test_the_encoder_id_is_the_clip_name_and_a_digest_of_the_weights():
    encoder = torch.nn.Linear(3, 2)
    encoder_id = PromptEncoderId("toy-convnext", encoder)
    first = encoder_id()
    assert first == f"toy-convnext@{WeightsFingerprint()(encoder)}" and len(first) == 13 + 16
    with torch.no_grad():
        encoder.weight[0, 0] += 1
    assert encoder_id() != first and encoder_id() == f"toy-convnext@{WeightsFingerprint()(encoder)}"


def test_the_memo_remembers_a_vocabulary_until_the_bank_changes(tmp_path, monkeypatch):
    bank = make_bank(ListGenerator(), tmp_path)
    calls = []
    embeddings = bank.embeddings
    monkeypatch.setattr(bank, "embeddings", lambda *a: calls.append(a) or embeddings(*a))
    memo = PromptMemo()
    settings = {"device": torch.device("cpu"), "dtype": torch.float64}

    def remembered():
        return memo.embeddings(bank, ["red", ("blue",)], TEMPLATES, 2, **settings)

    with torch.inference_mode():  # the remembered tensors may enter a later training step
        first = remembered()
    assert not first.embeddings.is_inference() and first.embeddings.dtype == torch.float64
    torch.testing.assert_close(
        first.embeddings, embeddings(["red", "blue"], TEMPLATES, 2).embeddings.double()
    )
    assert remembered() is first and len(calls) == 1
    assert memo.embeddings(bank, ["red", "blue"], TEMPLATES, 2, **settings) is first
    bank.seed = 1  # other images
    assert not torch.equal(remembered().embeddings, first.embeddings) and len(calls) == 2
    bank.seed = 0
    assert remembered() is first
    memo.clear()
    assert remembered() is not first and len(calls) == 3


def test_missing_entries_are_reported_never_zero_filled(tmp_path):
    bank = make_bank(ListGenerator(), tmp_path)
    bank.embeddings(["red"], TEMPLATES)
    assert bank.missing(["red"], TEMPLATES) == []
    missing = bank.missing(["red", "green"], TEMPLATES)
    assert [(e.subject, e.template_index) for e in missing] == [("green", m) for m in range(3)]
    with pytest.raises(MissingVisualPromptsError, match="3 visual prompt") as error:
        bank.embeddings(["red", "green"], TEMPLATES, generate=False)
    assert {e.prompt for e in error.value.missing} == {t.format("green") for t in TEMPLATES}
    with pytest.raises(MissingVisualPromptsError):
        bank.images(["green"], TEMPLATES, generate=False)


def test_black_images_are_detected_and_not_cached(tmp_path):
    bank = make_bank(ListGenerator(black=("person",)), tmp_path)
    with pytest.raises(BlackPromptImageError, match="black") as error:
        bank.embeddings(["dog", "person"], TEMPLATES)
    assert {e.subject for e in error.value.entries} == {"person"}
    assert len(error.value.entries) == 3
    assert bank.missing(["dog"], TEMPLATES, kind="images") == []
    assert len(bank.missing(["person"], TEMPLATES, kind="images")) == 3
    assert is_black_image(np.full((4, 4, 3), 2, np.uint8))
    assert not is_black_image(np.full((4, 4, 3), 3, np.uint8))


def test_fewer_prompts_than_templates_are_reused_cyclically(tmp_path):
    templates = tuple(f"picture {i} of a {{}}." for i in range(5))
    bank = make_bank(ListGenerator(), tmp_path)
    prompts = bank.embeddings(["red", "blue"], templates, prompts_per_class=2)
    assert prompts.embeddings.shape == (2, 5, 6)
    assert [len(row) for row in prompts.entries] == [2, 2]
    for m in range(5):
        assert torch.equal(prompts.embeddings[:, m], prompts.embeddings[:, m % 2])
        assert torch.equal(prompts.pooled[0][:, m], prompts.pooled[0][:, m % 2])
    assert not torch.equal(prompts.embeddings[:, 0], prompts.embeddings[:, 1])
    assert len(list(tmp_path.rglob("*.png"))) == 4
    gallery = bank.gallery(["red", "blue"], templates, prompts_per_class=2)
    assert len(gallery) == 2 and len(gallery[1]) == 2


def test_wrong_generator_output_is_a_clear_error(tmp_path):
    generator = ListGenerator()
    generator.generate = lambda *args: np.zeros((8, 8, 3), np.float32)
    with pytest.raises(VisualPromptError, match=r"expected uint8 of shape \(16, 16, 3\)"):
        make_bank(generator, tmp_path).embeddings(["red"], TEMPLATES)


# ------------------------------------------------------------------------- crash safety


def test_a_crash_mid_write_leaves_no_entry_and_the_next_run_completes_it(tmp_path, monkeypatch):
    import safetensors.torch

    clean = make_bank(ListGenerator(), tmp_path / "clean").embeddings(["red", "blue"], TEMPLATES)
    real_save = safetensors.torch.save_file
    writes = []

    def crashing_save(tensors, filename, metadata=None):
        writes.append(filename)
        if len(writes) == 4:  # the process dies halfway through writing the fourth entry
            real_save(tensors, filename, metadata=metadata)
            written = Path(filename)
            written.write_bytes(written.read_bytes()[: written.stat().st_size // 2])
            raise KeyboardInterrupt("killed mid-write")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        make_bank(ListGenerator(), tmp_path / "crash").embeddings(["red", "blue"], TEMPLATES)
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    stored = list((tmp_path / "crash" / "embeddings").rglob("*.safetensors"))
    assert len(stored) == 3  # the interrupted entry is not there under its real name
    assert not list((tmp_path / "crash").rglob("*.tmp"))  # nor its temporary file
    resumed = make_bank(ListGenerator(), tmp_path / "crash").embeddings(["red", "blue"], TEMPLATES)
    assert torch.equal(resumed.embeddings, clean.embeddings)


def test_a_corrupt_cache_entry_is_made_again_not_trusted(tmp_path):
    generator = ListGenerator()
    first = make_bank(generator, tmp_path).embeddings(["red", "blue"], TEMPLATES)
    bank = make_bank(generator, tmp_path)
    red, blue = bank.entries(["red", "blue"], TEMPLATES)
    # a truncated embedding, a PNG overwritten with garbage, and another entry's embedding
    truncated = bank.embedding_path(red[0])
    truncated.write_bytes(truncated.read_bytes()[:40])
    bank.image_path(red[1]).write_bytes(b"not a png at all")
    bank.embedding_path(red[1]).unlink()  # so the garbage image has to be read again
    bank.embedding_path(blue[2]).write_bytes(bank.embedding_path(blue[0]).read_bytes())
    calls = generator.calls
    again = make_bank(generator, tmp_path).embeddings(["red", "blue"], TEMPLATES)
    assert torch.equal(again.embeddings, first.embeddings)
    assert all(torch.equal(a, b) for a, b in zip(again.pooled, first.pooled, strict=True))
    assert generator.calls == calls + 1  # only the garbage image was drawn again
    assert make_bank(generator, tmp_path).images(["red"], TEMPLATES)[0][1].shape == (16, 16, 3)


def test_a_corrupt_image_is_reported_when_it_may_not_be_regenerated(tmp_path):
    bank = make_bank(ListGenerator(), tmp_path)
    bank.images(["red"], TEMPLATES)
    entry = bank.entries(["red"], TEMPLATES)[0][0]
    bank.image_path(entry).write_bytes(b"garbage")
    with pytest.raises(MissingVisualPromptsError, match="corrupt"):
        make_bank(ListGenerator(), tmp_path).images(["red"], TEMPLATES, generate=False)


# --------------------------------------------------------------------------- Stable Diffusion


def test_importing_the_module_does_not_import_diffusers():
    code = "import sys, ovseg.prompts.visual; print('diffusers' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def tiny_pipeline_folder(folder):
    """Save a randomly initialised, tiny Stable Diffusion pipeline built from configs."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    characters = "abcdefghijklmnopqrstuvwxyz.{}'-"
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += [c for c in characters] + [f"{c}</w>" for c in characters]
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    merges_file.write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=32)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokens),
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


def test_stable_diffusion_generator_loads_lazily_and_is_deterministic(tmp_path):
    folder = tiny_pipeline_folder(tmp_path)
    generator = StableDiffusionGenerator(
        model=folder, resolution=32, steps=2, device="cpu", progress=False
    )
    assert generator._pipeline is None  # nothing loaded at construction
    image = generator.generate(("cat", "kitty"), 0, "a photo of a {}.", seed=7)
    assert generator._pipeline is not None
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, generator.generate("cat", 0, "a photo of a {}.", seed=7))
    assert not np.array_equal(image, generator.generate("cat", 0, "a photo of a {}.", seed=8))
    assert generator.subject(("cat", "kitty")) == "cat"
    # Through the bank: batches of several prompts give the same images as single calls.
    bank = VisualPromptBank(
        generator=generator,
        encoder=colour_encoder,
        encoder_id="colour-stats",
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    images = bank.images([("cat", "kitty"), "dog"], TEMPLATES[:2])
    entry = bank.entries(["cat"], TEMPLATES[:2])[0][1]
    np.testing.assert_array_equal(
        images[0][1], generator.generate("cat", 1, TEMPLATES[1], seed=entry.seed)
    )
    assert "res32:steps2" in generator.id


def fake_pipeline(black_calls: int):
    """A pipeline stand-in whose first ``black_calls`` calls return black (filtered) images."""
    calls = []

    def pipeline(*, prompt, height, width, generator, **kwargs):
        calls.append(list(prompt))
        value = 0.0 if len(calls) <= black_calls else 0.5
        return SimpleNamespace(images=np.full((len(prompt), height, width, 3), value, np.float32))

    pipeline.set_progress_bar_config = lambda **kwargs: None
    pipeline.calls = calls
    return pipeline


def test_black_stable_diffusion_images_are_reseeded_then_reported():
    pipeline = fake_pipeline(black_calls=1)
    generator = StableDiffusionGenerator(
        pipeline=pipeline, model="fake", resolution=8, reseeds=2, progress=False
    )
    with pytest.warns(UserWarning, match="black .*'a photo of a person.'"):
        image = generator.generate("person", 0, "a photo of a {}.", seed=3)
    assert not is_black_image(image) and len(pipeline.calls) == 2
    assert generator.black_images == [("a photo of a person.", 3)]

    always_black = StableDiffusionGenerator(
        pipeline=fake_pipeline(black_calls=99), model="fake", resolution=8, reseeds=2
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BlackPromptImageError, match="person"):
            always_black.generate("person", 0, "a photo of a {}.", seed=3)
    assert len(always_black.black_images) == 3


@pytest.mark.parametrize(
    ("changes", "named"),
    [({"dtype": torch.float16}, "float16"), ({"safety_checker": False}, "safety=off")],
)
def test_stable_diffusion_settings_that_change_the_images_key_the_cache(tmp_path, changes, named):
    """Half precision draws other images, and without the safety checker an image it would
    black out is kept: neither may be served from the other's cache."""
    settings = {"model": "fake", "resolution": 8, "device": "cpu", "progress": False}
    reference = StableDiffusionGenerator(pipeline=fake_pipeline(0), **settings)
    other = StableDiffusionGenerator(pipeline=fake_pipeline(0), **settings)
    assert reference.id == other.id and "float32" in reference.id and "safety=on" in reference.id
    if "dtype" in changes:
        other = StableDiffusionGenerator(pipeline=fake_pipeline(0), **settings, **changes)
    else:  # a ready pipeline is keyed by its own safety checker, here none
        pipeline = fake_pipeline(0)
        pipeline.safety_checker = None
        other = StableDiffusionGenerator(pipeline=pipeline, **settings)
    assert named in other.id and other.id != reference.id
    lazy = StableDiffusionGenerator(**settings, **changes)  # nothing loaded: keyed by the setting
    assert lazy._pipeline is None and named in lazy.id
    first, second = make_bank(reference, tmp_path), make_bank(other, tmp_path)
    first.images(["cat"], TEMPLATES[:1])
    assert len(reference._pipeline.calls) == 1
    assert second.missing(["cat"], TEMPLATES[:1], kind="images")
    second.images(["cat"], TEMPLATES[:1])
    assert len(other._pipeline.calls) == 1


def test_toyworld_generators_default_to_a_few_small_prompts_per_class():
    from ovseg.prompts.visual import TOY_PROMPT_RESOLUTION, TOY_PROMPTS_PER_CLASS, prompt_defaults

    for generator in ("toyworld", "toy-diffusion"):
        settings = prompt_defaults(generator, None, None, toy=True, templates=80, input_size=192)
        assert settings == {
            "prompt_generator": generator,
            "prompts_per_class": TOY_PROMPTS_PER_CLASS,
            "prompt_resolution": TOY_PROMPT_RESOLUTION,
        }
    # Stable Diffusion: one prompt per template at the network's input size (the paper).
    settings = prompt_defaults("auto", None, None, toy=False, templates=80, input_size=192)
    assert settings == {
        "prompt_generator": "sd15",
        "prompts_per_class": 80,
        "prompt_resolution": 192,
    }
    with pytest.raises(ValueError, match="between 1 and the 80 templates"):
        prompt_defaults("toy-diffusion", 81, None, toy=True, templates=80, input_size=192)


def test_shipped_embeddings_are_not_reported_missing(tmp_path):
    shipped = tmp_path / "shipped.safetensors"
    make_bank(ListGenerator(), tmp_path / "maker").export_embeddings(shipped, ["red"], TEMPLATES, 2)
    bank = make_bank(ListGenerator(), tmp_path / "user", shipped=shipped)
    assert bank.missing(["red"], TEMPLATES, 2) == []
    assert [e.subject for e in bank.missing(["red", "green"], TEMPLATES, 2)] == ["green"] * 2


class RecordedTorchGenerator:
    """Stands in for torch.Generator where no GPU is: records the device it was asked for."""

    devices: ClassVar[list[str]] = []

    def __init__(self, device="cpu") -> None:
        self.devices.append(torch.device(device).type)

    def manual_seed(self, seed):
        return self


def test_stable_diffusion_seeds_on_its_device_unless_the_generator_says_otherwise(monkeypatch):
    monkeypatch.setattr(torch, "Generator", RecordedTorchGenerator)
    monkeypatch.setattr(RecordedTorchGenerator, "devices", [])
    settings = {"model": "fake", "resolution": 8, "device": "cuda", "progress": False}
    StableDiffusionGenerator(pipeline=fake_pipeline(0), **settings).generate("cat", 0, "{}", 1)
    assert RecordedTorchGenerator.devices == ["cuda"]

    class DeviceFreeGenerator(StableDiffusionGenerator):
        seed_device = "cpu"

    DeviceFreeGenerator(pipeline=fake_pipeline(0), **settings).generate("cat", 0, "{}", 1)
    assert RecordedTorchGenerator.devices == ["cuda", "cpu"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_toy_diffusion_generator_refuses_a_dtype_it_would_ignore(dtype):
    with pytest.raises(ValueError, match="float32 only"):
        make_generator("toy-diffusion", resolution=32, dtype=dtype)
