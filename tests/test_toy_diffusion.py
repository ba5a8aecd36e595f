"""The toy text-to-image diffusion model: pipeline, weights, generator, training script."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open
from torch import nn

from ovseg.backbones import load_backbone
from ovseg.data.toyworld import ToyWorld
from ovseg.prompts import toy_diffusion
from ovseg.prompts.toy_diffusion import (
    ToyDiffusionGenerator,
    ToyTextToImagePipeline,
    caption_states,
    evaluate_toy_diffusion,
    load_toy_diffusion,
    save_toy_diffusion,
    text_tower_fingerprint,
    weights_digest,
)
from ovseg.prompts.visual import (
    StableDiffusionGenerator,
    VisualPromptBank,
    VisualPromptError,
    make_generator,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))
from pretrain_diffusion import (  # noqa: E402
    build_unet,
    replace_folder,
    sampling_scheduler,
)

SIZE = 16
# Each caption's image is one flat colour (RGB in [-1, 1]); "" is the unconditional one.
COLOURS = {
    "a photo of a cat.": (-0.6, 0.2, 0.4),
    "a photo of a grass.": (0.4, -0.4, -0.2),
    "": (0.0, 0.0, 0.0),
}
TRAIN_STEPS = 150


@pytest.fixture(scope="module")
def clip():
    return load_backbone("toy-vit")


@pytest.fixture(scope="module")
def trained(clip, tmp_path_factory):
    """A tiny v-prediction UNet trained (150 steps, seconds) to draw each caption of COLOURS as
    its flat colour, saved as a toy diffusion folder; and the UNet as trained, before saving."""
    torch.manual_seed(0)
    unet = build_unet(image_size=SIZE, channels=(16, 32), layers_per_block=1,
                      attention_levels=1, heads=2, text_width=128)  # fmt: skip
    noise_schedule = DDPMScheduler(
        beta_schedule="squaredcos_cap_v2", clip_sample=False, prediction_type="v_prediction"
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    states = caption_states(clip, list(COLOURS)).repeat(4, 1, 1)
    colours = torch.tensor(list(COLOURS.values()))[:, :, None, None]
    targets = colours.expand(-1, 3, SIZE, SIZE).repeat(4, 1, 1, 1)
    for _ in range(TRAIN_STEPS):
        noise = torch.randn_like(targets)
        timesteps = torch.randint(0, 1000, (len(targets),))
        noisy = noise_schedule.add_noise(targets, noise, timesteps)
        velocity = noise_schedule.get_velocity(targets, noise, timesteps)
        predicted = unet(noisy, timesteps, encoder_hidden_states=states).sample
        loss = (predicted - velocity).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("diffusion-toy")
    save_toy_diffusion(
        path, unet=unet, scheduler=sampling_scheduler(noise_schedule), clip=clip,
        facts={"steps": TRAIN_STEPS},
    )  # fmt: skip
    return path, unet.eval()


@pytest.fixture(scope="module")
def folder(trained):
    return trained[0]


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


def test_the_trained_model_draws_each_caption_in_its_colour(pipeline):
    captions = [caption for caption in COLOURS for _ in range(3)]
    images = draw(
        pipeline, captions, range(len(captions)), guidance_scale=1.0, num_inference_steps=10
    )
    drawn = images.reshape(len(COLOURS), 3, -1, 3).mean(axis=(1, 2))
    expected = np.array(list(COLOURS.values())) / 2 + 0.5
    np.testing.assert_allclose(drawn, expected, atol=0.1)


class OracleUNet(nn.Module):
    """The exact denoiser of flat-colour images: for each caption, the noise (or v) that its
    colour and the training schedule imply. Stands in for a perfectly trained UNet, which a test
    cannot afford for noise prediction (150 steps of the fixture's UNet miss by 0.2-0.5)."""

    def __init__(self, clip, schedule: DDPMScheduler) -> None:
        super().__init__()
        self.register_buffer("states", caption_states(clip, list(COLOURS)))
        self.register_buffer("colours", torch.tensor(list(COLOURS.values())))
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod.clone())
        self.prediction_type = schedule.config.prediction_type
        self.config = SimpleNamespace(sample_size=SIZE, in_channels=3, cross_attention_dim=128)

    @property
    def device(self) -> torch.device:
        return self.states.device

    @property
    def dtype(self) -> torch.dtype:
        return self.states.dtype

    def forward(self, sample, timestep, encoder_hidden_states):
        distance = (encoder_hidden_states[:, None] - self.states[None]).flatten(2).norm(dim=-1)
        clean = self.colours[distance.argmin(dim=1)][:, :, None, None].expand_as(sample)
        alpha_bar = self.alphas_cumprod[timestep.long()].expand(len(sample))[:, None, None, None]
        noise = (sample - alpha_bar.sqrt() * clean) / (1 - alpha_bar).sqrt()
        if self.prediction_type == "v_prediction":
            noise = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * clean
        return SimpleNamespace(sample=noise)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_shipped_sampler_turns_either_prediction_into_the_caption_colour(
    clip, prediction_type, tmp_path
):
    schedule = DDPMScheduler(
        beta_schedule="squaredcos_cap_v2", clip_sample=False, prediction_type=prediction_type
    )
    # Through the saved config, as a shipped folder holds it.
    sampling_scheduler(schedule).save_pretrained(tmp_path)
    scheduler = type(sampling_scheduler(schedule)).from_pretrained(tmp_path)
    oracle = ToyTextToImagePipeline(unet=OracleUNet(clip, schedule), scheduler=scheduler, clip=clip)
    oracle.set_progress_bar_config(disable=True)
    # Two steps end on a clean-image estimate from half noise, where reading v as the noise (or
    # the reverse) is far off; ten steps end so close to the image that it hardly matters.
    for guidance, steps in ((1.0, 2), (1.5, 2), (1.5, 10)):
        images = draw(
            oracle, list(COLOURS), [0, 1, 2], guidance_scale=guidance, num_inference_steps=steps
        )
        # Guidance extrapolates from the unconditional colour, here 0: w × colour.
        expected = np.clip(guidance * np.array(list(COLOURS.values())), -1, 1) / 2 + 0.5
        np.testing.assert_allclose(images.mean(axis=(1, 2)), expected, atol=0.02)


def test_a_saved_and_reloaded_model_is_the_trained_one_in_half_precision(
    trained, pipeline, clip, tmp_path
):
    folder, unet = trained
    for name, loaded in pipeline.unet.state_dict().items():
        torch.testing.assert_close(loaded, unet.state_dict()[name], rtol=1e-3, atol=1e-4)
    as_trained = ToyTextToImagePipeline(unet=unet, scheduler=pipeline.scheduler, clip=clip)
    as_trained.set_progress_bar_config(disable=True)
    prompts = ["a photo of a cat.", "a photo of a person."]
    images = draw(pipeline, prompts, [3, 4])
    assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_allclose(images, draw(as_trained, prompts, [3, 4]), atol=0.01)
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as file:
        assert {file.get_tensor(name).dtype for name in file.keys()} == {torch.float16}  # noqa: SIM118
    # Saving the loaded model writes the same weights: fp16 survives the round trip.
    save_toy_diffusion(tmp_path, unet=pipeline.unet, scheduler=pipeline.scheduler, clip=clip)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        folder / "unet" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()
    record = json.loads((folder / "text_encoder.json").read_text())
    assert record["text_encoder"] == "toy-vit" and record["training"] == {"steps": TRAIN_STEPS}


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


def test_the_toy_generator_draws_its_noise_on_the_cpu_whatever_its_device(folder):
    # Its id names no device: a CUDA generator's stream would cache other images under it.
    generator = ToyDiffusionGenerator(path=folder, resolution=SIZE, steps=2, guidance_scale=2,
                                      device="cuda", progress=False)  # fmt: skip
    devices = []

    def recording_pipeline(*, prompt, height, width, generator, **kwargs):
        devices.extend(g.device.type for g in generator)
        return SimpleNamespace(images=np.full((len(prompt), height, width, 3), 0.5, np.float32))

    generator._pipeline = recording_pipeline
    generator.generate("person", 0, "a photo of a {}.", 7)
    assert devices == ["cpu"]


def copy_folder(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def test_a_folder_rewritten_before_first_use_is_refused(folder, tmp_path):
    path = copy_folder(folder, tmp_path / "model")
    generator = ToyDiffusionGenerator(path=path, resolution=SIZE, steps=2, guidance_scale=2)
    record = json.loads((path / "text_encoder.json").read_text())
    record["training"]["steps"] += 1
    (path / "text_encoder.json").write_text(json.dumps(record))
    with pytest.raises(VisualPromptError, match="changed after this generator was made"):
        generator.pipeline  # noqa: B018
    unchanged = ToyDiffusionGenerator(path=path, resolution=SIZE, steps=2, guidance_scale=2)
    assert isinstance(unchanged.pipeline, ToyTextToImagePipeline)


@pytest.mark.parametrize("part", ["unet/config.json", "scheduler/scheduler_config.json"])
def test_the_weights_digest_covers_the_configs(folder, tmp_path, part):
    path = copy_folder(folder, tmp_path / "model")
    config = json.loads((path / part).read_text())
    config["_ovseg_edit"] = 1
    (path / part).write_text(json.dumps(config))
    assert weights_digest(path) != weights_digest(folder)


@pytest.mark.parametrize(
    ("part", "damage", "message"),
    [
        ("text_encoder.json", {"text_encoder": "toy-vit"}, "lacks text_encoder_fingerprint"),
        ("text_encoder.json", "{not json", "not valid JSON"),
        ("scheduler/scheduler_config.json", {"_class_name": "UNet2DModel"}, "not a diffusers"),
        ("scheduler/scheduler_config.json", {"_class_name": "NoSuchScheduler"}, "not a diffusers"),
    ],
)
def test_a_damaged_folder_is_a_clear_error(folder, clip, tmp_path, part, damage, message):
    path = copy_folder(folder, tmp_path / "model")
    (path / part).write_text(damage if isinstance(damage, str) else json.dumps(damage))
    with pytest.raises(VisualPromptError, match=message):
        load_toy_diffusion(path, clip=clip)


class PipelineOnGpu:
    """A pipeline that says it is on CUDA and records the devices of the generators it gets."""

    def __init__(self, pipeline) -> None:
        self.pipeline, self.unet, self.device = pipeline, pipeline.unet, torch.device("cuda")
        self.generator_devices: list[str] = []

    def __call__(self, prompts, *, generator, **kwargs):
        self.generator_devices += [g.device.type for g in generator]
        return self.pipeline(prompts, generator=generator, **kwargs)


def test_the_evaluation_renders_on_the_trained_background_with_cpu_noise(pipeline, clip):
    world, backgrounds = ToyWorld(), []
    sprite_image = world.sprite_image

    def recording_sprite_image(*args, background="random", **kwargs):
        backgrounds.append(background)
        return sprite_image(*args, background=background, **kwargs)

    world.sprite_image = recording_sprite_image
    on_gpu = PipelineOnGpu(pipeline)
    metrics = evaluate_toy_diffusion(
        on_gpu, clip, world, class_ids=[0, 1], images_per_class=1, steps=1, templates="single",
        background="white",
    )  # fmt: skip
    assert backgrounds == ["white", "white"] and on_gpu.generator_devices == ["cpu", "cpu"]
    assert metrics["images"] == 2


def test_replacing_a_folder_keeps_the_old_one_whole_when_writing_fails(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").write_text("old")

    def fail(folder: Path) -> None:
        (folder / "weights").write_text("half")
        raise RuntimeError("evaluation died")

    with pytest.raises(RuntimeError, match="evaluation died"):
        replace_folder(out, fail)
    assert (out / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    replace_folder(out, lambda folder: (folder / "metrics.json").write_text("{}"))
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def train(out: Path, run_dir: Path, steps: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable, "training/pretrain_diffusion.py", "--out", str(out),
            "--run-dir", str(run_dir), "--steps", str(steps), "--batch-size", "4",
            "--checkpoint-every", "3", "--image-size", "16", "--channels", "16", "32",
            "--eval-images-per-class", "1", "--eval-classes", "2", "--eval-steps", "1",
            "--eval-templates", "single", "--warmup", "1",
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_the_training_script_resumes_and_a_finished_run_trains_nothing_more(tmp_path):
    out, run_dir = tmp_path / "out", tmp_path / "run"
    train(out, run_dir, 2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["images"] == 2 and metrics["background"] == "plain"
    assert {"seed", "prediction_type", "heads", "warmup", "minutes"} <= metrics.keys()
    assert 0 <= metrics["generated_top1_all"] <= 100 and metrics["seconds_per_image"] > 0
    loaded = load_toy_diffusion(out)
    assert loaded.unet.config.sample_size == 16
    assert list(loaded.unet.config.block_out_channels) == [16, 32]

    # Resumed in the same run dir: the checkpoint of the finished 2 steps, then steps 3 and 4
    # (an interim model at step 3 in the run dir only).
    train(out, run_dir, 4)
    rows = (run_dir / "train_log.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["1", "2", "3", "4"]
    ema = torch.load(run_dir / "ema.pt", weights_only=True)
    assert ema["optimization_step"] == 4
    assert (
        json.loads((run_dir / "model" / "text_encoder.json").read_text())["training"]["steps"] == 3
    )
    record = json.loads((out / "text_encoder.json").read_text())
    assert (
        record["training"]["steps"] == 4 == json.loads((out / "metrics.json").read_text())["steps"]
    )

    # The same command again: nothing trained, the same model shipped.
    digest, log = weights_digest(out), (run_dir / "train_log.csv").read_text()
    train(out, run_dir, 4)
    assert weights_digest(out) == digest and (run_dir / "train_log.csv").read_text() == log
    assert torch.load(run_dir / "ema.pt", weights_only=True)["optimization_step"] == 4
