"""The diffusers backend: catalog models run through Hugging Face diffusers pipelines.

All torch work happens on one thread of the backend's own, so the event loop never blocks and one
pipeline holds the accelerator at a time. Loaded pipelines stay in an LRU cache within a memory
budget. One pipeline call makes a whole batch (a job's ``num_images``, or several compatible jobs);
a step callback reports progress, attaches cheap latent previews and checks cancel tokens. The
thread runs nothing but that: the images go back as pixels, and the worker runtime encodes them
on threads of its own while this one makes the next batch.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import time
from collections.abc import Callable, Collection, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from schemas import Catalog, GenerationParams, LoraSpec, ModelFamily, ModelSpec
from workers.backends.base import (
    GenerationCanceled,
    JobRequest,
    Progress,
    RenderedImage,
    SiteQuota,
)
from workers.backends.devices import (
    Placement,
    apply_memory_options,
    choose_placement,
    default_cache_budget_bytes,
    is_out_of_memory,
    release_cached_memory,
)
from workers.backends.lora_apply import applied_loras
from workers.backends.lora_files import LoraFiles
from workers.backends.model_cache import GIB, ModelCache
from workers.backends.preview import PREVIEW_MAX_SIDE, preview_jpeg

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

log = structlog.get_logger(__name__)

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class DiffusersOptions:
    device: str | None = None
    dtype: str | None = None
    preview_interval_s: float = 0.5
    # Memory for resident pipelines; None: most of the accelerator's memory (half the RAM on CPU).
    cache_budget_gb: float | None = None
    # A hard cap on resident models besides the budget (None: the budget alone decides).
    max_loaded_models: int | None = None
    # Images one pipeline call may make across batched jobs (1: no dynamic batching).
    max_batch_images: int = 1
    # Models this worker serves (its pool); None: every diffusers model in the catalog.
    models: Collection[str] | None = None
    # Offload idle submodules to the CPU (big models on small cards; slower).
    cpu_offload: bool = False


class DiffusersBackend:
    """Runs catalog models with diffusers on the best local device (or the one given)."""

    name = "diffusers"
    concurrency = 1  # one pipeline call at a time per accelerator; batching is how it goes wider

    def __init__(
        self,
        catalog: Catalog,
        options: DiffusersOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        lora_files: LoraFiles | None = None,
    ) -> None:
        self._catalog = catalog
        self._options = options or DiffusersOptions()
        self.placement = choose_placement(self._options.device, self._options.dtype)
        self.max_batch_images = max(1, self._options.max_batch_images)
        self._clock = clock
        # Local LoRA files only, unless the worker role passes LoraFiles with a bucket client.
        self._loras = lora_files or LoraFiles(default_lora_cache_dir(), None)
        budget = self._options.cache_budget_gb
        self.cache = ModelCache(
            self._load,
            budget_bytes=int(budget * GIB) if budget is not None else default_cache_budget_bytes(self.placement),
            max_models=self._options.max_loaded_models,
            estimate=self._estimate,
            release=lambda: release_cached_memory(self.placement),
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffusers")

    # --- the Backend protocol ----------------------------------------------------------------

    async def prepare(self, model: str) -> None:
        await self._in_thread(self.cache.get, self._check_model(model))

    async def generate(self, job: JobRequest) -> list[RenderedImage]:
        results = await self._in_thread(self._generate, [job])
        result = results[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def batch_key(self, params: GenerationParams) -> Hashable | None:
        """Jobs one pipeline call can serve together: everything but prompt, seed and image count.

        Whether a negative prompt is given is part of it: some pipelines (SDXL) use zeros when it is
        absent and an encoded empty prompt when it is "", so mixing them would change the images.
        """
        loras = tuple((lora.id, lora.weight, lora.trigger_weight) for lora in params.loras)
        return (params.model, params.width, params.height, params.num_inference_steps, params.guidance_scale,
                params.negative_prompt is not None, loras)  # fmt: skip

    async def generate_batch(self, jobs: list[JobRequest]) -> list[list[RenderedImage] | BaseException]:
        keys = {self.batch_key(job.params) for job in jobs}
        if len(keys) != 1:
            raise ValueError("generate_batch needs jobs with one batch key")
        return await self._in_thread(self._generate, jobs)

    async def site_quota(self) -> SiteQuota | None:
        return None

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _in_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # --- loading -------------------------------------------------------------------------------

    def _check_model(self, model: str) -> str:
        spec = self._spec(model)
        served = self._options.models
        if served is not None and spec.id not in served:
            raise ValueError(f"model {model!r} is not served by this worker (it serves {', '.join(sorted(served))})")
        return spec.id

    def _spec(self, model: str) -> ModelSpec:
        spec = self._catalog.models.get(model)
        if spec is None:
            known = ", ".join(sorted(self._catalog.models)) or "none"
            raise ValueError(f"unknown model {model!r}; the catalog has: {known}")
        if spec.backend != self.name:
            raise ValueError(f"model {model!r} belongs to backend {spec.backend!r}, not {self.name!r}")
        return spec

    def _estimate(self, model: str) -> int | None:
        spec = self._catalog.models.get(model)
        return int(spec.memory_gb * GIB) if spec is not None and spec.memory_gb else None

    def _load(self, model: str) -> Any:
        spec = self._spec(model)
        started = time.perf_counter()
        try:
            pipeline = load_pipeline(spec, self.placement, cpu_offload=self._options.cpu_offload)
        except Exception as error:
            release_cached_memory(self.placement)
            if is_out_of_memory(error):
                raise RuntimeError(f"out of memory loading model {model} on {self.placement.device}") from None
            raise ValueError(f"model {model} could not be loaded from {spec.source}: {error}") from error
        log.info("pipeline_built", model=model, seconds=round(time.perf_counter() - started, 3))
        return pipeline

    # --- generating ----------------------------------------------------------------------------

    def _generate(self, jobs: list[JobRequest]) -> list[list[RenderedImage] | BaseException]:
        """One pipeline call for every job (one job, or a batch sharing a batch key)."""
        live = [job for job in jobs if not job.cancel.canceled]
        results: dict[int, list[RenderedImage] | BaseException] = {
            id(job): GenerationCanceled(job.cancel.reason) for job in jobs if job.cancel.canceled
        }
        if live:
            try:
                images = self._call_pipeline(live)
            except Exception as error:  # every job of the call gets it as its result
                for job in live:
                    canceled = isinstance(error, GenerationCanceled) or job.cancel.canceled
                    results[id(job)] = GenerationCanceled(job.cancel.reason) if canceled else error
            else:
                for job, job_images in zip(live, images, strict=True):
                    results[id(job)] = GenerationCanceled(job.cancel.reason) if job.cancel.canceled else job_images
        return [results[id(job)] for job in jobs]

    def _call_pipeline(self, jobs: list[JobRequest]) -> list[list[RenderedImage]]:
        import torch

        params = jobs[0].params  # the batch key makes size, steps, guidance, LoRAs common to all
        spec = self._spec(self._check_model(params.model))
        pipeline = self.cache.get(spec.id)
        lora_specs = [self._lora_spec(lora.id) for lora in params.loras]
        prompts, negatives, seeds, owners = [], [], [], []
        for index, job in enumerate(jobs):
            first_seed = job.params.seed if job.params.seed is not None else secrets.randbelow(2**32)
            for image_index in range(job.params.num_images):
                prompts.append(job.params.prompt)
                negatives.append(job.params.negative_prompt or "")
                seeds.append(first_seed + image_index)
                owners.append(index)
        # One CPU generator per image: image i depends only on its seed, and CPU noise is the same
        # on every device, so a seed means the same starting point wherever (and with whomever) it runs.
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        reporter = _StepReporter(
            jobs,
            first_image=[owners.index(index) for index in range(len(jobs))],
            clock=self._clock,
            interval_s=self._options.preview_interval_s,
            expected_steps=params.num_inference_steps,
            family=spec.family,
            width=params.width,
            height=params.height,
        )
        arguments: dict[str, Any] = {
            "width": params.width,
            "height": params.height,
            "num_inference_steps": params.num_inference_steps,
            "guidance_scale": params.guidance_scale,
            "num_images_per_prompt": 1,
            "generator": generators,
            "callback_on_step_end": reporter,
            "callback_on_step_end_tensor_inputs": ["latents"],
            "output_type": "pil",
        }
        # Only when given: some pipelines (Flux) take no negative prompt at all.
        if params.negative_prompt is not None:
            arguments["negative_prompt"] = negatives
        try:
            with applied_loras(pipeline, self._loras, list(zip(params.loras, lora_specs, strict=True)),
                               prompts) as weighted_prompts:  # fmt: skip
                arguments["prompt"] = weighted_prompts
                images: list[Image] = pipeline(**arguments).images
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            message = (
                f"out of memory generating {params.width}x{params.height} x{len(prompts)} "
                f"on {self.placement.device}: {error}"
            )
        else:
            per_job: list[list[RenderedImage]] = [[] for _ in jobs]
            for image, seed, owner in zip(images, seeds, owners, strict=True):
                per_job[owner].append(RenderedImage(image, seed))
            return per_job
        # Raised outside the except block on purpose: a chained traceback would keep the failed
        # step's frames, and with them its tensors, alive past the cache release.
        release_cached_memory(self.placement)
        raise RuntimeError(message)

    def _lora_spec(self, lora_id: str) -> LoraSpec:
        spec = self._catalog.lora(lora_id)
        if spec is None:
            # The ingress accepted it, so the two catalogs differ: say so rather than drop the LoRA.
            raise ValueError(f"LoRA {lora_id} cannot be applied: this worker's catalog does not have it")
        return spec


class _StepReporter:
    """The ``callback_on_step_end`` hook: progress every step, a preview at most every interval,
    for every job of the call; stops the call only when every job in it is canceled."""

    def __init__(
        self,
        jobs: list[JobRequest],
        *,
        first_image: list[int],
        clock: Callable[[], float],
        interval_s: float,
        expected_steps: int,
        family: ModelFamily,
        width: int,
        height: int,
    ) -> None:
        self._jobs = jobs
        self._first_image = first_image
        self._clock = clock
        self._interval_s = interval_s
        self._expected_steps = expected_steps
        self._family = family
        self._width = width
        self._height = height
        self._preview_side = min(PREVIEW_MAX_SIDE, max(width, height))
        self._last_preview_at: float | None = None

    def __call__(
        self, pipeline: Any, step_index: int, timestep: Any, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        # Steps actually run: differs from the request for second-order schedulers or strength < 1.
        total = getattr(pipeline, "num_timesteps", None) or self._expected_steps
        now = self._clock()
        with_preview = self._last_preview_at is None or now - self._last_preview_at >= self._interval_s
        if with_preview:
            self._last_preview_at = now
        latents = tensors.get("latents")
        for job, first in zip(self._jobs, self._first_image, strict=True):
            if job.cancel.canceled:
                continue
            preview = None
            if with_preview and latents is not None:
                preview = preview_jpeg(latents, family=self._family, width=self._width, height=self._height,
                                       index=first, max_side=self._preview_side)  # fmt: skip
            job.on_progress(Progress(step=step_index + 1, total_steps=total, preview_jpeg=preview))
        # Diffusers does not catch exceptions from the callback, so GenerationCanceled ends the call.
        if all(job.cancel.canceled for job in self._jobs):
            raise GenerationCanceled(self._jobs[0].cancel.reason)
        return {}  # nothing to replace in the pipeline's tensors


def load_pipeline(spec: ModelSpec, placement: Placement, *, cpu_offload: bool = False) -> Any:
    """A text-to-image pipeline from ``builtin:<name>``, a local folder, or a Hugging Face hub id."""
    source = spec.source
    if source.startswith(BUILTIN_PREFIX):
        from workers.backends.tiny import BUILTINS

        name = source.removeprefix(BUILTIN_PREFIX)
        if name not in BUILTINS:
            raise ValueError(f"unknown builtin pipeline {name!r}; known: {', '.join(sorted(BUILTINS))}")
        # Built in float32; cast only when asked to, since diffusers warns on every cast via to().
        pipeline: Any = BUILTINS[name]()
        if placement.dtype != pipeline.dtype:
            pipeline = pipeline.to(dtype=placement.dtype)
    else:
        folder = Path(source).expanduser()
        if folder.is_dir():
            source = str(folder)
        elif source.startswith(("/", ".", "~")):
            raise ValueError(f"model folder {source!r} does not exist")
        pipeline_class = _pipeline_class(spec.pipeline)
        extra: dict[str, Any] = {"variant": spec.variant} if spec.variant else {}
        # A hub id loads from the local Hugging Face cache, or downloads when the network allows.
        pipeline = pipeline_class.from_pretrained(source, dtype=placement.dtype, **extra)
    # Inference only. Besides saving memory, it keeps LoRA unloading exact: peft turns gradients off
    # on the layers it wraps and leaves them off, and on the CPU a layer that wants gradients takes
    # another kernel path, so a model that started out "trainable" would drift after one LoRA job.
    for component in pipeline.components.values():
        if hasattr(component, "requires_grad_"):
            component.requires_grad_(False)
    if cpu_offload and placement.kind == "cuda":
        # Submodules move to the card only while they run: big models on small cards, slower.
        pipeline.enable_model_cpu_offload(device=placement.device)
    else:
        pipeline = pipeline.to(device=placement.device)
    # We report progress ourselves; tqdm bars would only clutter the worker's log.
    pipeline.set_progress_bar_config(disable=True)
    apply_memory_options(pipeline, placement)
    return pipeline


def default_lora_cache_dir() -> Path:
    """Where bucket-held LoRAs are kept when no folder is configured."""
    return Path(tempfile.gettempdir()) / "imagebus-loras"


def _pipeline_class(name: str | None) -> Any:
    import diffusers

    if name is None:
        return diffusers.AutoPipelineForText2Image
    found = getattr(diffusers, name, None)
    if found is None or not hasattr(found, "from_pretrained"):
        raise ValueError(f"diffusers has no pipeline class {name!r} (installed: diffusers {diffusers.__version__})")
    return found
