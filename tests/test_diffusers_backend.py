"""The diffusers backend on the built-in tiny pipeline: real diffusers code, random weights, CPU."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from schemas import Catalog, GenerationParams, ModelSpec
from workers.backends import tiny
from workers.backends.base import CancelToken, GenerationCanceled, JobRequest, Progress, RenderedImage
from workers.backends.devices import choose_placement
from workers.backends.diffusers import DiffusersBackend, DiffusersOptions
from workers.encoding import ImageFormat


def _spec(model_id: str, source: str) -> ModelSpec:
    return ModelSpec(
        id=model_id,
        description="tiny random-weight pipeline",
        source=source,
        random_weights=True,
        default_width=64,
        default_height=64,
        default_steps=4,
    )


CATALOG = Catalog(
    default="tiny-sd",
    models={
        "tiny-sd": _spec("tiny-sd", "builtin:tiny-sd"),
        "tiny-oom": _spec("tiny-oom", "builtin:tiny-oom"),
        "not-ours": ModelSpec(id="not-ours", description="x", backend="openai", source="dall-e-3"),
    },
)


def params(**overrides: Any) -> GenerationParams:
    fields: dict[str, Any] = {
        "prompt": "a red cat",
        "model": "tiny-sd",
        "width": 64,
        "height": 64,
        "num_inference_steps": 4,
        "guidance_scale": 7.5,
        "seed": 1234,
        "num_images": 2,
    }
    fields.update(overrides)
    return GenerationParams(**fields)


class FakeClock:
    """Advances a fixed amount every time it is read (the backend reads it once per step)."""

    def __init__(self, step_s: float) -> None:
        self._readings = 0
        self._step_s = step_s

    def __call__(self) -> float:
        now = self._readings * self._step_s
        self._readings += 1
        return now


@pytest.fixture(scope="module")
async def backend() -> AsyncIterator[DiffusersBackend]:
    backend = DiffusersBackend(CATALOG, DiffusersOptions(device="cpu"))
    await backend.prepare("tiny-sd")
    yield backend
    await backend.close()


def pixels(image: RenderedImage) -> np.ndarray:
    return np.asarray(image.pixels.convert("RGB"))


async def run(backend: DiffusersBackend, request: GenerationParams) -> tuple[list[RenderedImage], list[Progress]]:
    events: list[Progress] = []
    return await backend.generate(JobRequest("job", request, events.append)), events


# --- images and seeds ----------------------------------------------------------------------------


async def test_batch_is_pixels_of_the_requested_size_with_consecutive_seeds(backend: DiffusersBackend) -> None:
    """Pixels, not files: the worker encodes them off the model's thread (losslessly by default)."""
    images, _ = await run(backend, params(seed=1234))

    assert [image.seed for image in images] == [1234, 1235]
    for image in images:
        assert (image.width, image.height) == (64, 64)
        encoded = ImageFormat().encode(image)
        assert (encoded.content_type, encoded.width, encoded.height, encoded.seed) == ("image/png", 64, 64, image.seed)
        decoded = Image.open(io.BytesIO(encoded.read_all()))
        assert decoded.format == "PNG" and encoded.length == len(encoded.read_all())
        assert np.array_equal(np.asarray(decoded.convert("RGB")), pixels(image))


async def test_same_seed_same_image_and_different_seed_different_image(backend: DiffusersBackend) -> None:
    first, _ = await run(backend, params(seed=7, num_images=1))
    again, _ = await run(backend, params(seed=7, num_images=1))
    other, _ = await run(backend, params(seed=8, num_images=1))

    assert np.array_equal(pixels(first[0]), pixels(again[0]))
    assert not np.array_equal(pixels(first[0]), pixels(other[0]))


async def test_each_image_of_a_batch_is_reproducible_from_its_own_seed(backend: DiffusersBackend) -> None:
    batch, _ = await run(backend, params(seed=40, num_images=2))
    single, _ = await run(backend, params(seed=41, num_images=1))

    assert batch[1].seed == single[0].seed == 41
    assert np.array_equal(pixels(batch[1]), pixels(single[0]))


async def test_a_random_seed_is_chosen_and_recorded_when_none_is_given(backend: DiffusersBackend) -> None:
    images, _ = await run(backend, params(seed=None))

    first = images[0].seed
    assert first is not None
    assert [image.seed for image in images] == [first, first + 1]
    replay, _ = await run(backend, params(seed=first))
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(replay, images, strict=True))


async def test_negative_prompt_reaches_the_pipeline(backend: DiffusersBackend) -> None:
    plain, _ = await run(backend, params(num_images=1))
    negative, _ = await run(backend, params(num_images=1, negative_prompt="blurry"))

    assert not np.array_equal(pixels(plain[0]), pixels(negative[0]))


# --- progress and previews -------------------------------------------------------------------


async def test_progress_is_reported_for_every_step_in_order(backend: DiffusersBackend) -> None:
    _, events = await run(backend, params())

    assert [(event.step, event.total_steps) for event in events] == [(1, 4), (2, 4), (3, 4), (4, 4)]


async def test_previews_are_throttled_by_the_injected_clock() -> None:
    # 0.2 s per step against a 0.5 s interval: t=0.0 (first), 0.2, 0.4, 0.6 (0.6 s since the last one).
    backend = DiffusersBackend(CATALOG, DiffusersOptions(device="cpu", preview_interval_s=0.5), clock=FakeClock(0.2))
    _, events = await run(backend, params())

    assert [event.preview_jpeg is not None for event in events] == [True, False, False, True]
    for event in events:
        if event.preview_jpeg is not None:
            preview = Image.open(io.BytesIO(event.preview_jpeg))
            assert preview.format == "JPEG"
            assert max(preview.size) <= 128


async def test_every_step_gets_a_preview_when_the_interval_is_zero() -> None:
    backend = DiffusersBackend(CATALOG, DiffusersOptions(device="cpu", preview_interval_s=0.0), clock=FakeClock(0.0))
    _, events = await run(backend, params(width=128, height=64, num_images=1, num_inference_steps=2))

    assert [Image.open(io.BytesIO(e.preview_jpeg)).size for e in events if e.preview_jpeg] == [(128, 64)] * 2


# --- cancellation and failures ---------------------------------------------------------------


async def test_cancel_after_step_two_stops_the_run(backend: DiffusersBackend) -> None:
    cancel = CancelToken()
    steps: list[int] = []

    def on_progress(progress: Progress) -> None:
        steps.append(progress.step)
        if progress.step == 2:
            cancel.cancel("user asked")

    with pytest.raises(GenerationCanceled, match="user asked"):
        await backend.generate(JobRequest("job", params(), on_progress, cancel))
    assert steps == [1, 2]


async def test_cancel_before_start_makes_nothing(backend: DiffusersBackend) -> None:
    cancel = CancelToken()
    cancel.cancel("too late")
    steps: list[Progress] = []

    with pytest.raises(GenerationCanceled):
        await backend.generate(JobRequest("job", params(), steps.append, cancel))
    assert steps == []


async def test_unknown_model_is_a_clear_value_error(backend: DiffusersBackend) -> None:
    with pytest.raises(ValueError, match=r"unknown model 'nope'.*tiny-sd"):
        await backend.prepare("nope")
    with pytest.raises(ValueError, match="unknown model"):
        await run(backend, params(model="nope"))
    with pytest.raises(ValueError, match="backend 'openai'"):
        await backend.prepare("not-ours")


async def test_invalid_size_fails_and_the_backend_keeps_working(backend: DiffusersBackend) -> None:
    with pytest.raises(ValueError, match="divisible by 8"):
        await run(backend, params(width=60))

    images, events = await run(backend, params())
    assert len(images) == 2
    assert len(events) == 4


@pytest.fixture
def oom_once(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A tiny pipeline whose UNet runs out of memory on its first forward pass only."""

    def build() -> Any:
        pipeline = tiny.build_tiny_sd()
        failures = [RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")]

        def run_out_of_memory(module: Any, inputs: Any) -> None:
            if failures:
                raise failures.pop()

        pipeline.unet.register_forward_pre_hook(run_out_of_memory)
        return pipeline

    builders: dict[str, Callable[[], Any]] = {**tiny.BUILTINS, "tiny-oom": build}
    monkeypatch.setattr(tiny, "BUILTINS", builders)
    yield


@pytest.mark.usefixtures("oom_once")
async def test_out_of_memory_is_reported_clearly_and_the_backend_recovers() -> None:
    backend = DiffusersBackend(CATALOG, DiffusersOptions(device="cpu"))

    with pytest.raises(RuntimeError, match=r"out of memory generating 64x64 x2 on cpu: CUDA out of memory"):
        await run(backend, params(model="tiny-oom"))

    images, events = await run(backend, params(model="tiny-oom"))
    assert len(images) == 2
    assert [event.step for event in events] == [1, 2, 3, 4]


# --- the tiny pipelines and placement --------------------------------------------------------


async def test_tiny_pipelines_are_identical_across_builds() -> None:
    first, second = tiny.build_tiny_sd(), tiny.build_tiny_sd()

    for name in ("unet", "vae", "text_encoder"):
        left, right = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        assert left.keys() == right.keys()
        assert all(torch.equal(left[key], right[key]) for key in left), name
    assert first.tokenizer("a red cat").input_ids == second.tokenizer("a red cat").input_ids


async def test_building_a_tiny_pipeline_leaves_the_global_random_stream_alone() -> None:
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    tiny.build_tiny_sd()
    assert torch.equal(torch.rand(3), expected)


async def test_tiny_tokenizer_is_byte_level_bpe_with_clip_specials() -> None:
    tokenizer = tiny.build_clip_tokenizer()
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("The cat and dog, ünïcode!").input_ids)

    assert tokens[0] == "<|startoftext|>"
    assert tokens[-1] == "<|endoftext|>"
    assert {"the</w>", "cat</w>", "and</w>", "dog</w>"} <= set(tokens)
    assert tokenizer.model_max_length == 77
    assert len(tokenizer) <= 1000


async def test_placement_defaults_and_overrides() -> None:
    assert choose_placement("cpu").dtype == torch.float32
    assert choose_placement("cpu", "bfloat16").dtype == torch.bfloat16
    assert choose_placement().kind in {"cuda", "mps", "cpu"}
    with pytest.raises(ValueError, match="unknown device"):
        choose_placement("tpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        choose_placement("cpu", "float8")


async def test_a_model_loads_from_a_local_folder(backend: DiffusersBackend, tmp_path: Any) -> None:
    """A diffusers folder (as save_pretrained writes it) is a model source, with no network."""
    folder = tmp_path / "tiny-sd-folder"
    tiny.build_tiny_sd().save_pretrained(folder)
    catalog = Catalog(default="local", models={"local": _spec("local", str(folder))})
    from_folder = DiffusersBackend(catalog)
    request = params(seed=5)
    folder_images, folder_progress = await run(from_folder, request.model_copy(update={"model": "local"}))
    builtin_images, _ = await run(backend, request)
    assert [p.step for p in folder_progress] == [1, 2, 3, 4]
    # Same weights, same seed: the folder round-trip changes nothing.
    assert np.array_equal(pixels(folder_images[0]), pixels(builtin_images[0]))
