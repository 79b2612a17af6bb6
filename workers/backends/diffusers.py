"""The diffusers backend: catalog models run through Hugging Face diffusers pipelines.

One pipeline call makes the whole batch; a step callback reports progress, attaches throttled latent
previews and checks the cancel token between steps.
"""

from __future__ import annotations

import io
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schemas import Catalog, GenerationParams, ModelSpec
from workers.backends.base import CancelToken, GeneratedImage, Progress, ProgressCallback
from workers.backends.devices import (
    Placement,
    apply_memory_options,
    choose_placement,
    is_out_of_memory,
    release_cached_memory,
)
from workers.backends.preview import PREVIEW_MAX_SIDE, preview_jpeg

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

BUILTIN_PREFIX = "builtin:"


class DiffusersBackend:
    """Runs catalog models with diffusers on the best local device (or the one given).

    Calls are serialised by a lock: one pipeline holds the accelerator at a time, and ``prepare`` from
    another thread waits for a running ``generate`` instead of swapping the model under it.
    """

    name = "diffusers"

    def __init__(
        self,
        catalog: Catalog,
        *,
        device: str | None = None,
        dtype: str | None = None,
        preview_interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        max_loaded_models: int = 1,
    ) -> None:
        self._catalog = catalog
        self.placement = choose_placement(device, dtype)
        self._preview_interval_s = preview_interval_s
        self._clock = clock
        # One model by default: two SDXL-sized pipelines rarely fit on one card together.
        self._max_loaded_models = max(1, max_loaded_models)
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.RLock()

    def prepare(self, model: str) -> None:
        self._pipeline_for(model)

    def generate(
        self, params: GenerationParams, on_progress: ProgressCallback, cancel: CancelToken
    ) -> list[GeneratedImage]:
        cancel.raise_if_canceled()
        if params.loras:
            # Never generate without a LoRA the caller asked for: the job fails and says which.
            names = ", ".join(lora.id for lora in params.loras)
            raise ValueError(f"LoRA {names} cannot be applied: this diffusers worker does not load LoRA weights")
        with self._lock:
            pipeline = self._pipeline_for(params.model)
            return self._run(pipeline, params, on_progress, cancel)

    # --- loading ---------------------------------------------------------------------------

    def _spec(self, model: str) -> ModelSpec:
        spec = self._catalog.models.get(model)
        if spec is None:
            known = ", ".join(sorted(self._catalog.models)) or "none"
            raise ValueError(f"unknown model {model!r}; the catalog has: {known}")
        if spec.backend != self.name:
            raise ValueError(f"model {model!r} belongs to backend {spec.backend!r}, not {self.name!r}")
        return spec

    def _pipeline_for(self, model: str) -> Any:
        with self._lock:
            if model in self._loaded:
                self._loaded.move_to_end(model)
                return self._loaded[model]
            spec = self._spec(model)
            # Evict before loading so the old and the new model never share the memory.
            while len(self._loaded) >= self._max_loaded_models:
                self._loaded.popitem(last=False)
                release_cached_memory(self.placement)
            pipeline = load_pipeline(spec.source, self.placement)
            self._loaded[model] = pipeline
            return pipeline

    # --- generating ------------------------------------------------------------------------

    def _run(
        self, pipeline: Any, params: GenerationParams, on_progress: ProgressCallback, cancel: CancelToken
    ) -> list[GeneratedImage]:
        import torch

        first_seed = params.seed if params.seed is not None else secrets.randbelow(2**32)
        seeds = [first_seed + index for index in range(params.num_images)]
        # One CPU generator per image: image i depends only on seed + i, and CPU noise is the same
        # on every device, so a seed means the same starting point wherever the job runs.
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        reporter = _StepReporter(
            on_progress,
            cancel,
            clock=self._clock,
            interval_s=self._preview_interval_s,
            expected_steps=params.num_inference_steps,
            preview_side=min(PREVIEW_MAX_SIDE, max(params.width, params.height)),
        )
        arguments: dict[str, Any] = {
            "prompt": params.prompt,
            "width": params.width,
            "height": params.height,
            "num_inference_steps": params.num_inference_steps,
            "guidance_scale": params.guidance_scale,
            "num_images_per_prompt": params.num_images,
            "generator": generators,
            "callback_on_step_end": reporter,
            "callback_on_step_end_tensor_inputs": ["latents"],
            "output_type": "pil",
        }
        # Only when given: some pipelines (Flux) take no negative prompt at all.
        if params.negative_prompt:
            arguments["negative_prompt"] = params.negative_prompt
        try:
            images: list[Image] = pipeline(**arguments).images
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            message = (
                f"out of memory generating {params.width}x{params.height} x{params.num_images} "
                f"on {self.placement.device}: {error}"
            )
        else:
            return [_encode_png(image, seed) for image, seed in zip(images, seeds, strict=True)]
        # Raised outside the except block on purpose: a chained traceback would keep the failed
        # step's frames, and with them its tensors, alive past the cache release.
        release_cached_memory(self.placement)
        raise RuntimeError(message)


class _StepReporter:
    """The ``callback_on_step_end`` hook: progress every step, a preview at most every interval."""

    def __init__(
        self,
        on_progress: ProgressCallback,
        cancel: CancelToken,
        *,
        clock: Callable[[], float],
        interval_s: float,
        expected_steps: int,
        preview_side: int,
    ) -> None:
        self._on_progress = on_progress
        self._cancel = cancel
        self._clock = clock
        self._interval_s = interval_s
        self._expected_steps = expected_steps
        self._preview_side = preview_side
        self._last_preview_at: float | None = None

    def __call__(
        self, pipeline: Any, step_index: int, timestep: Any, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        # Steps actually run: differs from the request for second-order schedulers or strength < 1.
        total = getattr(pipeline, "num_timesteps", None) or self._expected_steps
        now = self._clock()
        preview = None
        if self._last_preview_at is None or now - self._last_preview_at >= self._interval_s:
            self._last_preview_at = now
            latents = tensors.get("latents")
            if latents is not None:
                preview = preview_jpeg(latents, max_side=self._preview_side)
        self._on_progress(Progress(step=step_index + 1, total_steps=total, preview_jpeg=preview))
        # Diffusers does not catch exceptions from the callback, so GenerationCanceled ends the call.
        self._cancel.raise_if_canceled()
        return {}  # nothing to replace in the pipeline's tensors


def load_pipeline(source: str, placement: Placement) -> Any:
    """A text-to-image pipeline from ``builtin:<name>``, a local folder, or a Hugging Face hub id."""
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
        from diffusers import AutoPipelineForText2Image

        folder = Path(source).expanduser()
        if folder.is_dir():
            source = str(folder)
        elif source.startswith(("/", ".", "~")):
            raise ValueError(f"model folder {source!r} does not exist")
        # A hub id loads from the local Hugging Face cache, or downloads when the network allows.
        pipeline = AutoPipelineForText2Image.from_pretrained(source, dtype=placement.dtype)
    pipeline = pipeline.to(device=placement.device)
    # We report progress ourselves; tqdm bars would only clutter the worker's log.
    pipeline.set_progress_bar_config(disable=True)
    apply_memory_options(pipeline, placement)
    return pipeline


def _encode_png(image: Image, seed: int) -> GeneratedImage:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return GeneratedImage(buffer.getvalue(), "image/png", image.width, image.height, seed)
