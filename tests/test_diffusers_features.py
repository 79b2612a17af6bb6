"""The diffusers backend's issue-4 features on the tiny SD, SDXL and Flux pipelines: LoRAs (applied,
weighted, gone afterwards), reproducible seeds, batched calls, the model cache and pinning."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from schemas import Catalog, GenerationParams, LoraRequest, LoraSpec, ModelSpec
from tests.lora_files import write_tiny_lora
from workers.backends.base import BackendImage, GenerationCanceled, JobRequest, Progress, RenderedImage
from workers.backends.diffusers import DiffusersBackend, DiffusersOptions

FAMILIES = {"tiny-sd": "sd", "tiny-sdxl": "sdxl", "tiny-flux": "flux"}


def _spec(model_id: str) -> ModelSpec:
    return ModelSpec(
        id=model_id,
        description="tiny",
        source=f"builtin:{model_id}",
        family=FAMILIES[model_id],
        random_weights=True,
        default_width=64,
        default_height=64,
        default_steps=3,
        supports_lora=True,
        supports_negative_prompt=model_id != "tiny-flux",
    )


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    for model in FAMILIES:
        write_tiny_lora(model, folder / f"{model}-style.safetensors")
    return folder


@pytest.fixture(scope="module")
def catalog(lora_dir: Path) -> Catalog:
    loras = {
        f"{model}-style": LoraSpec(
            id=f"{model}-style",
            name=f"{model} style",
            source=str(lora_dir / f"{model}-style.safetensors"),
            trigger_words=("glowing ink",),
            models=(model,),
        )
        for model in FAMILIES
    }
    loras["missing"] = LoraSpec(id="missing", name="missing", source=str(lora_dir / "nope.safetensors"))
    return Catalog(default="tiny-sd", models={m: _spec(m) for m in FAMILIES}, loras=loras)


@pytest.fixture(scope="module")
async def backend(catalog: Catalog) -> AsyncIterator[DiffusersBackend]:
    backend = DiffusersBackend(catalog, DiffusersOptions(device="cpu", max_batch_images=8, preview_interval_s=0.0))
    yield backend
    await backend.close()


def _params(model: str, **overrides: Any) -> GenerationParams:
    fields: dict[str, Any] = {
        "prompt": "a lighthouse at dusk",
        "model": model,
        "width": 64,
        "height": 64,
        "num_inference_steps": 3,
        "guidance_scale": 3.0,
        "seed": 11,
        "num_images": 1,
    }
    return GenerationParams(**{**fields, **overrides})


async def _images(backend: DiffusersBackend, params: GenerationParams) -> list[np.ndarray]:
    return [_pixels(image) for image in await backend.generate(JobRequest("job", params, lambda _p: None))]


def _pixels(image: BackendImage) -> np.ndarray:
    assert isinstance(image, RenderedImage)  # pixels: the worker encodes them
    return np.asarray(image.pixels.convert("RGB"))


def _lora(model: str, weight: float = 1.0, trigger_weight: float = 1.0) -> tuple[LoraRequest, ...]:
    return (LoraRequest(id=f"{model}-style", weight=weight, trigger_weight=trigger_weight),)


# --- seeds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(FAMILIES))
async def test_same_seed_same_image_different_seed_different_image(backend: DiffusersBackend, model: str) -> None:
    first = await _images(backend, _params(model, seed=3))
    again = await _images(backend, _params(model, seed=3))
    other = await _images(backend, _params(model, seed=4))

    assert np.array_equal(first[0], again[0])
    assert not np.array_equal(first[0], other[0])


# --- LoRAs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(FAMILIES))
async def test_a_lora_changes_the_image_its_weight_matters_and_it_is_gone_afterwards(
    backend: DiffusersBackend, model: str
) -> None:
    # The trigger words are part of the prompt with a LoRA: compare against the same text without it.
    plain_prompt = "glowing ink, a lighthouse at dusk"
    before = await _images(backend, _params(model, prompt=plain_prompt))
    full = await _images(backend, _params(model, loras=_lora(model, weight=1.0)))
    half = await _images(backend, _params(model, loras=_lora(model, weight=0.5)))
    after = await _images(backend, _params(model, prompt=plain_prompt))

    difference = np.abs(full[0].astype(int) - before[0].astype(int)).mean()
    assert difference > 1.0, f"the LoRA barely changed the image ({difference:.2f} per channel)"
    assert not np.array_equal(full[0], half[0])
    assert np.array_equal(before[0], after[0]), "the LoRA left something behind for the next job"


async def test_trigger_weight_changes_the_image(backend: DiffusersBackend) -> None:
    strong = await _images(backend, _params("tiny-sd", loras=_lora("tiny-sd", trigger_weight=1.5)))
    neutral = await _images(backend, _params("tiny-sd", loras=_lora("tiny-sd", trigger_weight=1.0)))
    weak = await _images(backend, _params("tiny-sd", loras=_lora("tiny-sd", trigger_weight=0.5)))

    assert not np.array_equal(strong[0], neutral[0])
    assert not np.array_equal(weak[0], neutral[0])


async def test_a_lora_that_cannot_load_fails_the_job_clearly_and_leaves_nothing(backend: DiffusersBackend) -> None:
    with pytest.raises(ValueError, match="LoRA missing cannot be applied"):
        await backend.generate(JobRequest("job", _params("tiny-sd", loras=(LoraRequest(id="missing"),)), print))
    # The next job is unaffected.
    clean = await _images(backend, _params("tiny-sd", prompt="glowing ink, a lighthouse at dusk"))
    assert len(clean) == 1


# --- batching ------------------------------------------------------------------------------------


async def test_a_batch_gives_each_job_its_own_images_progress_and_seeds(backend: DiffusersBackend) -> None:
    progress: dict[str, list[Progress]] = {"a": [], "b": [], "c": []}
    jobs = [
        JobRequest("a", _params("tiny-sd", prompt="a red barn", seed=5, num_images=2), progress["a"].append),
        JobRequest("b", _params("tiny-sd", prompt="a blue boat", seed=9), progress["b"].append),
        JobRequest("c", _params("tiny-sd", prompt="a red barn", seed=5), progress["c"].append),
    ]
    assert len({backend.batch_key(job.params) for job in jobs}) == 1
    results = await backend.generate_batch(jobs)

    assert [[image.seed for image in result] for result in results if isinstance(result, list)] == [[5, 6], [9], [5]]
    a, b, c = (result for result in results if isinstance(result, list))
    # Same prompt and seed in one batch: the same image; different prompt: a different one.
    assert np.array_equal(_pixels(a[0]), _pixels(c[0]))
    assert not np.array_equal(_pixels(a[0]), _pixels(b[0]))
    for steps in progress.values():
        assert [p.step for p in steps] == [1, 2, 3]
        assert all(p.preview_jpeg is not None for p in steps)
    # Batched or alone, an image stays close to what its seed gives (float reductions may differ).
    alone = await _images(backend, _params("tiny-sd", prompt="a blue boat", seed=9))
    assert np.abs(alone[0].astype(int) - _pixels(b[0]).astype(int)).max() <= 2


async def test_jobs_that_differ_in_size_steps_or_loras_are_not_batched(backend: DiffusersBackend) -> None:
    base = _params("tiny-sd")
    key = backend.batch_key(base)
    for change in ({"width": 128}, {"num_inference_steps": 4}, {"guidance_scale": 1.0}, {"model": "tiny-sdxl"},
                   {"loras": _lora("tiny-sd")}, {"negative_prompt": "fog"}):  # fmt: skip
        assert backend.batch_key(base.model_copy(update=change)) != key, change
    assert backend.batch_key(base.model_copy(update={"prompt": "other", "seed": 1, "num_images": 3})) == key


async def test_a_member_canceled_mid_batch_gets_canceled_and_the_others_their_images(
    backend: DiffusersBackend,
) -> None:
    def cancel_at_step_two(job: JobRequest) -> Any:
        def on_progress(progress: Progress) -> None:
            if progress.step == 2:
                job.cancel.cancel("changed my mind")

        return on_progress

    keep = JobRequest("keep", _params("tiny-sd", num_inference_steps=5), lambda _p: None)
    drop = JobRequest("drop", _params("tiny-sd", num_inference_steps=5, prompt="other"), lambda _p: None)
    drop.on_progress = cancel_at_step_two(drop)
    kept, dropped = await backend.generate_batch([keep, drop])

    assert isinstance(dropped, GenerationCanceled)
    assert isinstance(kept, list) and len(kept) == 1
    alone = await _images(backend, keep.params)
    assert np.abs(alone[0].astype(int) - _pixels(kept[0]).astype(int)).max() <= 2


async def test_a_batch_stops_when_every_member_is_canceled(backend: DiffusersBackend) -> None:
    steps: list[int] = []
    jobs = [JobRequest(name, _params("tiny-sd", num_inference_steps=10), lambda _p: None) for name in "xy"]

    def cancel_all(progress: Progress) -> None:
        steps.append(progress.step)
        if progress.step == 2:
            for job in jobs:
                job.cancel.cancel("stop")

    jobs[0].on_progress = cancel_all
    results = await backend.generate_batch(jobs)
    assert all(isinstance(result, GenerationCanceled) for result in results)
    assert steps == [1, 2]


# --- the model cache and pinning ---------------------------------------------------------------


async def test_the_cache_keeps_models_within_its_budget_and_evicts_the_least_recently_used(catalog: Catalog) -> None:
    sizes = {}
    probe = DiffusersBackend(catalog, DiffusersOptions(device="cpu"))
    for model in FAMILIES:
        await probe.prepare(model)
    sizes = {model: probe.cache._known_sizes[model] for model in FAMILIES}
    await probe.close()

    # Room for tiny-sd and tiny-sdxl together, not for all three.
    budget = (sizes["tiny-sd"] + sizes["tiny-sdxl"] + min(sizes.values()) // 2) / 2**30
    backend = DiffusersBackend(catalog, DiffusersOptions(device="cpu", cache_budget_gb=budget))
    try:
        await backend.prepare("tiny-sd")
        await backend.prepare("tiny-sdxl")
        await backend.prepare("tiny-sd")  # a hit: tiny-sdxl becomes the least recently used
        assert backend.cache.loaded == ["tiny-sdxl", "tiny-sd"] and backend.cache.loads == 2
        await backend.prepare("tiny-flux")
        assert "tiny-sdxl" not in backend.cache.loaded and "tiny-flux" in backend.cache.loaded
        assert backend.cache.used_bytes <= budget * 2**30 or len(backend.cache.loaded) == 1
    finally:
        await backend.close()


async def test_a_pinned_worker_refuses_models_outside_its_pool(catalog: Catalog) -> None:
    backend = DiffusersBackend(catalog, DiffusersOptions(device="cpu", models=["tiny-sdxl"]))
    try:
        with pytest.raises(ValueError, match="not served by this worker"):
            await backend.prepare("tiny-sd")
        await backend.prepare("tiny-sdxl")
    finally:
        await backend.close()


async def test_a_model_that_will_not_load_fails_the_job_clearly_and_the_backend_goes_on(
    catalog: Catalog, tmp_path: Path
) -> None:
    broken_folder = tmp_path / "broken-model"
    broken_folder.mkdir()
    (broken_folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    broken = ModelSpec(id="broken", description="a folder that is not a model", source=str(broken_folder))
    with_broken = catalog.model_copy(update={"models": {**catalog.models, "broken": broken}})
    backend = DiffusersBackend(with_broken, DiffusersOptions(device="cpu"))
    try:
        with pytest.raises(ValueError, match=r"model broken could not be loaded from .*broken-model: "):
            await backend.generate(JobRequest("job", _params("broken"), lambda _p: None))
        assert backend.cache.loaded == []
        assert len(await _images(backend, _params("tiny-sd"))) == 1
    finally:
        await backend.close()
