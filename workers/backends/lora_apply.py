"""LoRAs on a loaded pipeline for the length of one call, and gone afterwards.

Each requested LoRA is loaded as a named peft adapter with its ``weight``; its trigger words are
prepended to every prompt and emphasised by ``trigger_weight`` at the text encoders. On the way out
every adapter is unloaded, so the next job on this cached pipeline starts from the base weights
(unloading removes the adapter layers rather than subtracting a fused delta, so nothing drifts).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import structlog

from schemas import LoraRequest, LoraSpec
from workers.backends.base import RetryableError
from workers.backends.lora_files import LoraFiles
from workers.backends.prompt_weighting import prompt_with_triggers, trigger_segments, weighted_segments

log = structlog.get_logger(__name__)


@contextlib.contextmanager
def applied_loras(
    pipeline: Any, files: LoraFiles, loras: list[tuple[LoraRequest, LoraSpec]], prompts: list[str]
) -> Iterator[list[str]]:
    """Load the LoRAs, yield the prompts with trigger words, unload on exit (also on failure)."""
    if not loras:
        yield prompts
        return
    if not hasattr(pipeline, "load_lora_weights"):
        raise ValueError(f"{type(pipeline).__name__} cannot load LoRA weights")
    names: list[str] = []
    try:
        for index, (request, spec) in enumerate(loras):
            name = f"job_lora_{index}"
            try:
                pipeline.load_lora_weights(str(files.local_path(spec)), adapter_name=name)
            except RetryableError:
                raise  # a bucket that did not answer: try the job again later
            except Exception as error:
                # Never generate without a LoRA the caller asked for: the job fails and says which.
                raise ValueError(f"LoRA {request.id} cannot be applied: {error}") from error
            names.append(name)
        pipeline.set_adapters(names, adapter_weights=[request.weight for request, _ in loras])
        # Each LoRA's trigger words lead the prompt, weighted by that LoRA's trigger_weight.
        with weighted_segments(pipeline, trigger_segments(loras)):
            yield [prompt_with_triggers(prompt, loras)[0] for prompt in prompts]
    finally:
        if names:
            pipeline.unload_lora_weights()
            log.info("loras_unloaded", adapters=names)
