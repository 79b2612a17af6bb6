"""The tiny builtin pipelines (SD, SDXL, Flux shaped), LoRA files for them, and per-family previews.

Everything runs the real diffusers, transformers and peft code on the CPU; nothing is downloaded.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from schemas.catalog import ModelFamily
from tests.lora_files import write_tiny_lora
from workers.backends import tiny
from workers.backends.preview import PROJECTIONS, preview_jpeg, unpack_flux_latents

BUILTIN_NAMES = ["tiny-sd", "tiny-sdxl", "tiny-flux"]
FAMILY_OF: dict[str, ModelFamily] = {"tiny-sd": "sd", "tiny-sdxl": "sdxl", "tiny-flux": "flux"}
PROMPT = "a red fox in snow"


def build(name: str) -> Any:
    pipeline = tiny.BUILTINS[name]()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(pipeline: Any, *, seed: int = 0, width: int = 64, height: int = 64, **options: Any) -> np.ndarray:
    """(N, height, width, 3) floats in [0, 1], before any rounding to 8 bits hides small differences."""
    options = {"num_inference_steps": 4, "output_type": "np", **options}
    generator = torch.Generator().manual_seed(seed)
    return np.asarray(pipeline(PROMPT, width=width, height=height, generator=generator, **options).images)


def latents(pipeline: Any, *, width: int, height: int, num_images: int) -> torch.Tensor:
    """The latents as the pipeline iterates on them (Flux's still packed), from a 1-step run."""
    generator = torch.Generator().manual_seed(0)
    output = pipeline(
        PROMPT,
        width=width,
        height=height,
        num_inference_steps=1,
        num_images_per_prompt=num_images,
        generator=generator,
        output_type="latent",
    )
    return output.images


# --- the builtins ----------------------------------------------------------------------------


def test_every_builtin_is_registered() -> None:
    assert set(BUILTIN_NAMES) <= set(tiny.BUILTINS)


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_makes_images_of_the_requested_size(name: str) -> None:
    images = generate(build(name), width=96, height=64, num_images_per_prompt=2)

    assert images.shape == (2, 64, 96, 3)
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert not np.array_equal(images[0], images[1])


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_two_builds_give_bit_identical_images_for_the_same_seed(name: str) -> None:
    assert np.array_equal(generate(build(name), seed=7), generate(build(name), seed=7))


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_different_seeds_give_different_images(name: str) -> None:
    pipeline = build(name)
    assert not np.array_equal(generate(pipeline, seed=1), generate(pipeline, seed=2))


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_building_leaves_the_global_random_stream_alone(name: str) -> None:
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    tiny.BUILTINS[name]()
    assert torch.equal(torch.rand(3), expected)


def test_sdxl_has_two_text_encoders_and_size_conditioning() -> None:
    pipeline = build("tiny-sdxl")

    assert type(pipeline.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipeline.unet.config.addition_embed_type == "text_time"
    assert pipeline.config.force_zeros_for_empty_prompt
    assert pipeline.vae_scale_factor == 8


def test_flux_has_a_t5_encoder_and_a_16_channel_vae() -> None:
    pipeline = build("tiny-flux")
    tokens = pipeline.tokenizer_2.convert_ids_to_tokens(pipeline.tokenizer_2("a red Fox!").input_ids)

    assert tokens == ["▁a", "▁red", "▁F", "o", "x", "!", "</s>"]
    assert type(pipeline.text_encoder_2).__name__ == "T5EncoderModel"
    assert pipeline.vae.config.latent_channels == 16
    assert pipeline.transformer.config.in_channels == 64
    assert pipeline.vae_scale_factor == 8


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_a_1024_pixel_image_takes_seconds_not_minutes(name: str) -> None:
    # The guard against a VAE that does not downscale 8x or attention over a full-size grid.
    pipeline = build(name)
    started = time.perf_counter()
    images = generate(pipeline, width=1024, height=1024)
    assert images.shape == (1, 1024, 1024, 3)
    assert time.perf_counter() - started < 60


# --- LoRA ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_lora_file_is_seeded_and_targets_the_denoiser_attention(name: str, tmp_path: Path) -> None:
    first = load_file(write_tiny_lora(name, tmp_path / "first.safetensors", seed=3))
    again = load_file(write_tiny_lora(name, tmp_path / "again.safetensors", seed=3))
    other = load_file(write_tiny_lora(name, tmp_path / "other.safetensors", seed=4))

    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)
    prefix = "transformer." if name == "tiny-flux" else "unet."
    assert all(key.startswith(prefix) for key in first)
    assert {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in first} >= {"to_q", "to_k", "to_v"}
    assert any(key.endswith("to_out.0.lora_B.weight") for key in first)
    assert all(first[key].abs().sum() > 0 for key in first if ".lora_B." in key)


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_lora_changes_the_image_by_weight_and_unload_restores_it_exactly(name: str, tmp_path: Path) -> None:
    lora = write_tiny_lora(name, tmp_path / "style.safetensors")
    pipeline = build(name)
    before = generate(pipeline)

    pipeline.load_lora_weights(str(lora), adapter_name="a")
    pipeline.set_adapters(["a"], [1.0])
    full = generate(pipeline)
    pipeline.set_adapters(["a"], [0.5])
    half = generate(pipeline)
    pipeline.set_adapters(["a"], [0.0])
    off = generate(pipeline)
    pipeline.unload_lora_weights()
    after = generate(pipeline)

    # Visible: a few levels of 255 on average, much more in places.
    assert np.abs(full - before).mean() > 2 / 255
    assert np.abs(full - before).max() > 16 / 255
    assert np.abs(full - half).mean() > 1 / 255
    assert np.array_equal(off, before)
    assert np.array_equal(after, before)
    # Gone, not just switched off: the denoiser holds no adapter configuration any more.
    assert not getattr(getattr(pipeline, "transformer" if name == "tiny-flux" else "unet"), "peft_config", None)


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_two_loras_combine_and_deleting_one_leaves_the_other_exactly(name: str, tmp_path: Path) -> None:
    pipeline = build(name)
    before = generate(pipeline)
    pipeline.load_lora_weights(str(write_tiny_lora(name, tmp_path / "a.safetensors", seed=1)), adapter_name="a")
    pipeline.set_adapters(["a"], [1.0])
    only_a = generate(pipeline)
    pipeline.load_lora_weights(str(write_tiny_lora(name, tmp_path / "b.safetensors", seed=2)), adapter_name="b")
    pipeline.set_adapters(["a", "b"], [1.0, 0.7])
    both = generate(pipeline)

    pipeline.delete_adapters("b")
    pipeline.set_adapters(["a"], [1.0])
    a_again = generate(pipeline)
    pipeline.delete_adapters("a")
    none_left = generate(pipeline)

    assert not np.array_equal(both, only_a)
    assert np.array_equal(a_again, only_a)
    assert np.array_equal(none_left, before)


# --- previews --------------------------------------------------------------------------------


def jpeg_size(data: bytes | None) -> tuple[int, int]:
    assert data is not None
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    return image.size


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_preview_of_each_member_of_a_real_latent_batch(name: str) -> None:
    width, height = 96, 64
    batch = latents(build(name), width=width, height=height, num_images=2)
    family = FAMILY_OF[name]

    first, second = (
        preview_jpeg(batch, family=family, width=width, height=height, index=index, max_side=96) for index in (0, 1)
    )

    assert jpeg_size(first) == jpeg_size(second) == (96, 64)
    assert first != second
    assert preview_jpeg(batch, family=family, width=width, height=height, index=2) is None


@pytest.mark.parametrize(("family", "channels"), [("sd3", 16), ("other", 4), ("other", 16)])
def test_preview_of_unpacked_latents_without_a_builtin(family: Any, channels: int) -> None:
    batch = torch.randn(2, channels, 8, 12, generator=torch.Generator().manual_seed(0))

    first, second = (preview_jpeg(batch, family=family, width=96, height=64, index=i) for i in (0, 1))

    assert jpeg_size(first) == jpeg_size(second) == (128, 85)
    assert first != second


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_each_family_uses_its_own_projection(family: Any) -> None:
    # Zero latents show the projection's bias colour; the generic fallback would show flat black.
    channels = len(PROJECTIONS[family].factors)
    data = preview_jpeg(torch.zeros(1, channels, 8, 8), family=family, width=64, height=64)
    assert data is not None
    pixel = np.asarray(Image.open(io.BytesIO(data)))[32, 32].astype(float)
    expected = (np.asarray(PROJECTIONS[family].bias) + 1.0) / 2.0 * 255.0
    assert np.abs(pixel - expected).max() <= 3  # JPEG rounding


def test_flux_unpacking_matches_the_pipeline() -> None:
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    width, height = 96, 64
    packed = torch.randn(2, (height // 16) * (width // 16), 64)

    ours = unpack_flux_latents(packed, width=width, height=height)

    assert ours is not None
    assert torch.equal(ours, FluxPipeline._unpack_latents(packed, height, width, 8))


@pytest.mark.parametrize(
    ("shape", "family", "size"),
    [
        ((4, 8), "sd", (64, 64)),  # no batch or channel axes
        ((1, 96, 64), "sd", (64, 64)),  # a sequence, but not a family that packs
        ((1, 24, 64), "flux", None),  # packed, without the size to unpack it
        ((1, 24, 64), "flux", (64, 64)),  # 24 tokens are not the 16 of a 64x64 image
        ((1, 16, 62), "flux", (64, 64)),  # channels that are not whole 2x2 patches
        ((1, 4, 2, 8, 8), "sd", (64, 64)),  # video-shaped
        ((0, 4, 8, 8), "sd", (64, 64)),  # empty batch
    ],
)
def test_preview_is_none_for_shapes_it_cannot_read(
    shape: tuple[int, ...], family: Any, size: tuple[int, int] | None
) -> None:
    width, height = size or (None, None)
    assert preview_jpeg(torch.randn(shape), family=family, width=width, height=height) is None
