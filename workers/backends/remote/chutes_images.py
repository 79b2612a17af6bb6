"""A Chutes image endpoint (``POST https://image.chutes.ai/generate``), answered with the image bytes.

The body mirrors what the seed's proxy sent: model, prompt, negative prompt, guidance, size, steps,
plus a seed. One request makes one image, so ``num_images`` requests go out concurrently (within
the endpoint's cap), each with its own seed: seed, seed + 1, ... as the diffusers backend numbers them.
"""

from __future__ import annotations

import random
from functools import partial
from typing import Any

from schemas import GenerationParams
from schemas.catalog import ModelSpec
from workers.backends.base import GeneratedImage, JobRequest
from workers.backends.remote.endpoint_client import EndpointClient
from workers.backends.remote.fanout import ProgressCount, fetch_all

# Chutes' image chutes take seeds in 0..2**32-1.
SEED_RANGE = 2**32


def image_seeds(params: GenerationParams) -> list[int]:
    """One seed per image, chosen here when the job has none, so every image records its seed."""
    first = params.seed if params.seed is not None else random.randrange(SEED_RANGE)
    return [(first + index) % SEED_RANGE for index in range(params.num_images)]


def request_body(spec: ModelSpec, params: GenerationParams, seed: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": spec.source,
        "prompt": params.prompt,
        "guidance_scale": params.guidance_scale,
        "width": params.width,
        "height": params.height,
        "num_inference_steps": params.num_inference_steps,
        "seed": seed,
    }
    if params.negative_prompt:
        body["negative_prompt"] = params.negative_prompt
    return body


async def generate(client: EndpointClient, job: JobRequest, spec: ModelSpec) -> list[GeneratedImage]:
    seeds = image_seeds(job.params)

    async def one(seed: int) -> GeneratedImage:
        return await client.post(request_body(spec, job.params, seed), partial(client.receive_image, seed=seed))

    return await fetch_all([partial(one, seed) for seed in seeds], ProgressCount(job, len(seeds)))
