"""The toy text-to-image diffusion model: pipeline, weights, generator, training script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open

from ovseg.backbones import load_backbone
from ovseg.prompts import toy_diffusion
from ovseg.prompts.toy_diffusion import (
    ToyDiffusionGenerator,
    ToyTextToImagePipeline,
    caption_states,
    load_toy_diffusion,
    save_toy_diffusion,
    text_tower_fingerprint,
)
from ovseg.prompts.visual import (
    StableDiffusionGenerator,
    VisualPromptBank,
    VisualPromptError,
    make_generator,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))
from pretrain_diffusion import build_unet, sampling_scheduler  # noqa: E402

SIZE = 16
CAPTIONS = ["a photo of a cat.", "a photo of a grass.", ""]


@pytest.fixture(scope="module")
def clip():
    return load_backbone("toy-vit")


@pytest.fixture(scope="module")
def folder(clip, tmp_path_factory):
    """A tiny UNet trained a few steps on three captions, saved as a toy diffusion folder."""
    torch.manual_seed(0)
    unet = build_unet(image_size=SIZE, channels=(16, 32), layers_per_block=1,
                      attention_levels=1, heads=2, text_width=128)  # fmt: skip
    noise_schedule = DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    states = caption_states(clip, CAPTIONS)
    targets = torch.stack([torch.full((3, SIZE, SIZE), value) for value in (-0.8, 0.2, 0.8)])
    for _ in range(5):
        noise = torch.randn_like(targets)
        timesteps = torch.randint(0, 1000, (3,))
        noisy = noise_schedule.add_noise(targets, noise, timesteps)
        loss = (unet(noisy, timesteps, encoder_hidden_states=states).sample - noise).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("diffusion-toy")
    save_toy_diffusion(
        path, unet=unet, scheduler=sampling_scheduler(noise_schedule), clip=clip,
        facts={"steps": 5},
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def pipeline(folder, clip):
    pipeline = load_toy_diffusion(folder, clip=clip)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def seeded(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def draw(pipeline, prompts, seeds, **kwargs) -> np.ndarray:
    kwargs = {"num_inference_steps": 4, "guidance_scale": 3.0} | kwargs
    return pipeline(prompts, generator=seeded(*seeds), **kwargs).images


def test_the_text_states_are_per_token_after_the_final_norm(clip):
    states = caption_states(clip, ["a photo of a cat.", "a cat"])
    assert states.shape == (2, clip.tokenizer.context_length, 128)
    # ln_final without its affine part would give unit variance per token; the tower's own
    # pooled readout is the state at [EOS], projected.
    tokens = clip.tokenizer(["a cat"])
    eos = int(tokens.argmax(-1))
    pooled = states[1, eos] @ clip.model.text_projection
    assert torch.allclose(pooled, clip.model.encode_text(tokens)[0], atol=1e-5)


def test_a_saved_and_reloaded_model_draws_the_same_images_for_the_same_seeds(
    folder, pipeline, clip, tmp_path
):
    again = load_toy_diffusion(folder, clip=clip)
    again.set_progress_bar_config(disable=True)
    images = draw(pipeline, ["a photo of a cat.", "a photo of a person."], [3, 4])
    assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_array_equal(
        images, draw(again, ["a photo of a cat.", "a photo of a person."], [3, 4])
    )
    # Saving the loaded model writes the same weights: fp16 survives the round trip.
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as file:
        assert {file.get_tensor(name).dtype for name in file.keys()} == {torch.float16}  # noqa: SIM118
    save_toy_diffusion(tmp_path, unet=again.unet, scheduler=again.scheduler, clip=clip)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        folder / "unet" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()
    record = json.loads((folder / "text_encoder.json").read_text())
    assert record["text_encoder"] == "toy-vit" and record["training"] == {"steps": 5}


def test_each_image_depends_on_its_own_seed_only(pipeline):
    first, second = draw(pipeline, ["a photo of a cat."] * 2, [1, 2])
    assert np.abs(first - second).mean() > 0.01
    alone = draw(pipeline, ["a photo of a cat."], [2])[0]
    np.testing.assert_allclose(alone, second, atol=1e-4)


def test_guidance_uses_the_negative_prompt_and_a_scale_of_one_skips_it(pipeline):
    prompt, seed = ["a photo of a cat."], [5]
    guided = draw(pipeline, prompt, seed)
    other_negative = draw(pipeline, prompt, seed, negative_prompt="a photo of a grass.")
    assert np.abs(guided - other_negative).max() > 1e-3
    unguided = draw(pipeline, prompt, seed, guidance_scale=1.0)
    assert np.abs(guided - unguided).max() > 1e-3
    # Just above 1 the guided path runs and must give the conditional prediction, ε_c.
    np.testing.assert_allclose(
        draw(pipeline, prompt, seed, guidance_scale=1.0 + 1e-4), unguided, atol=1e-3
    )
    np.testing.assert_array_equal(
        unguided, draw(pipeline, prompt, seed, guidance_scale=1.0, negative_prompt="grass")
    )


def test_other_sizes_and_output_types(pipeline):
    large = pipeline("a cat", height=32, width=32, generator=seeded(0), num_inference_steps=2)
    assert large.images.shape == (1, 32, 32, 3)
    tensor = pipeline("a cat", generator=seeded(0), num_inference_steps=2, output_type="pt")
    assert tensor.images.shape == (1, 3, SIZE, SIZE)
    pil = pipeline("a cat", generator=seeded(0), num_inference_steps=2, output_type="pil")
    assert pil.images[0].size == (SIZE, SIZE)
    with pytest.raises(ValueError, match="generators"):
        pipeline(["a", "b"], generator=seeded(0))


def test_a_text_tower_other_than_the_trained_one_is_refused(folder):
    other = load_backbone("toy-vit", "random")
    assert (
        text_tower_fingerprint(other)
        != json.loads((folder / "text_encoder.json").read_text())["text_encoder_fingerprint"]
    )
    with pytest.raises(VisualPromptError, match="fingerprint"):
        load_toy_diffusion(folder, clip=other)


def test_a_missing_folder_says_how_to_make_it(tmp_path):
    with pytest.raises(VisualPromptError, match=r"pretrain_diffusion\.py"):
        load_toy_diffusion(tmp_path / "absent")
    with pytest.raises(VisualPromptError, match=r"pretrain_diffusion\.py"):
        ToyDiffusionGenerator(path=tmp_path / "absent", resolution=32, steps=2, guidance_scale=2)


def test_the_pipeline_draws_visual_prompts_for_a_name_toyworld_does_not_know(pipeline, tmp_path):
    def encoder(images):
        return images.mean(dim=(2, 3)), [images.std(dim=(2, 3))]

    generator = StableDiffusionGenerator(
        pipeline=pipeline, model="toy-test", resolution=SIZE, steps=3, guidance_scale=2.0,
        progress=False,
    )  # fmt: skip
    assert "safety=off" in generator.id
    bank = VisualPromptBank(
        generator=generator, encoder=encoder, encoder_id="stats", cache_dir=tmp_path,
        progress=False,
    )  # fmt: skip
    templates = ["a photo of a {}.", "a {}."]
    prompts = bank.embeddings(["person", "cat"], templates)
    assert prompts.embeddings.shape == (2, 2, 3) and torch.isfinite(prompts.embeddings).all()
    images = bank.images(["person"], templates)[0]
    assert images[0].dtype == np.uint8 and images[0].shape == (SIZE, SIZE, 3)
    assert len(list((tmp_path / "images").rglob("*.png"))) == 4
    # The entries are drawn from their own seeds: the cache holds what a fresh draw gives.
    entry = bank.entries(["person"], templates)[0][1]
    fresh = generator.generate(entry.synonyms, entry.template_index, entry.template, entry.seed)
    np.testing.assert_array_equal(fresh, images[1])


def test_make_generator_names_the_toy_model_lazily_and_keys_it_on_its_weights(
    folder, tmp_path, monkeypatch
):
    monkeypatch.setattr(toy_diffusion, "DEFAULT_TOY_DIFFUSION_DIR", folder)
    generator = make_generator("toy-diffusion", resolution=24)
    assert isinstance(generator, StableDiffusionGenerator) and generator._pipeline is None
    assert generator.id.startswith("diffusers:toy-diffusion@")
    image = generator.generate("person", 0, "a photo of a {}.", 7)
    assert image.shape == (24, 24, 3) and image.dtype == np.uint8
    assert isinstance(generator.pipeline, ToyTextToImagePipeline)

    retrained = tmp_path / "retrained"
    pipeline = generator.pipeline
    with torch.no_grad():
        next(pipeline.unet.parameters()).add_(0.5)
    save_toy_diffusion(retrained, unet=pipeline.unet, scheduler=pipeline.scheduler,
                       clip=pipeline.clip)  # fmt: skip
    other = ToyDiffusionGenerator(path=retrained, resolution=24, steps=2, guidance_scale=2)
    assert other.id != ToyDiffusionGenerator(path=folder, resolution=24, steps=2,
                                             guidance_scale=2).id  # fmt: skip


def test_the_training_script_writes_a_loadable_folder_with_metrics(tmp_path):
    out, run_dir = tmp_path / "out", tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable, "training/pretrain_diffusion.py", "--out", str(out),
            "--run-dir", str(run_dir), "--steps", "2", "--batch-size", "4",
            "--checkpoint-every", "1", "--image-size", "16", "--channels", "16", "32",
            "--eval-images-per-class", "1", "--eval-classes", "4", "--eval-steps", "2",
            "--eval-templates", "single",
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["images"] == 4
    assert 0 <= metrics["generated_top1_all"] <= 100 and metrics["seconds_per_image"] > 0
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / "ema.pt").is_file()
    assert len((run_dir / "train_log.csv").read_text().splitlines()) == 3
    loaded = load_toy_diffusion(out)
    assert loaded.unet.config.sample_size == 16
    assert list(loaded.unet.config.block_out_channels) == [16, 32]
