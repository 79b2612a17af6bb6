"""The OpenAI Images API: ``POST /v1/images/generations``, answered with ``b64_json`` or ``url`` images.

One request asks for all ``n`` images. The API has no seed, steps, guidance or negative prompt: the
catalog marks such models (``supports_negative_prompt: false``, ``supports_guidance: false``) so
ingress refuses what would be dropped here.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import httpx
import structlog

from schemas import GenerationParams
from schemas.catalog import ModelSpec
from workers.backends.base import GeneratedImage, JobRequest
from workers.backends.remote.answers import RemoteApiError
from workers.backends.remote.endpoint_client import EndpointClient
from workers.backends.remote.fanout import ProgressCount, close_images, fetch_all
from workers.backends.remote.images_json import ImagesAnswerReader
from workers.backends.remote.spool import ImageSpool

log = structlog.get_logger(__name__)

# Room for "created", "usage", revised prompts and the like around the base64 text.
_ANSWER_OVERHEAD_BYTES = 256 * 1024


def request_body(spec: ModelSpec, params: GenerationParams, response_format: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": spec.source,
        "prompt": params.prompt,
        "n": params.num_images,
        "size": f"{params.width}x{params.height}",
    }
    # The GPT image models always answer b64_json and refuse the parameter ("Unknown parameter").
    if not spec.source.startswith("gpt-image"):
        body["response_format"] = response_format
    return body


async def generate(client: EndpointClient, job: JobRequest, spec: ModelSpec) -> list[GeneratedImage]:
    params = job.params
    endpoint = client.endpoint
    body = request_body(spec, params, endpoint.response_format)
    # base64 is 4 bytes of text per 3 of image.
    answer_cap = params.num_images * (endpoint.max_image_bytes * 4 // 3 + 4) + _ANSWER_OVERHEAD_BYTES

    async def read_answer(response: httpx.Response) -> list[ImageSpool | str]:
        reader = ImagesAnswerReader(client.new_spool, endpoint.id)
        received = 0
        try:
            async for chunk in response.aiter_bytes():
                received += len(chunk)
                if received > answer_cap:
                    raise RemoteApiError(
                        f"{endpoint.id} answered more than {answer_cap} bytes for {params.num_images} image(s) "
                        f"(max_image_bytes is {endpoint.max_image_bytes}); download aborted"
                    )
                reader.feed(chunk)
            return reader.finish()
        except BaseException:
            reader.discard()
            raise

    outputs = await client.post(body, read_answer)
    for extra in outputs[params.num_images :]:
        if isinstance(extra, ImageSpool):
            extra.discard()
    wanted = outputs[: params.num_images]
    return await _images(client, wanted, ProgressCount(job, len(wanted)))


async def _images(
    client: EndpointClient, outputs: list[ImageSpool | str], progress: ProgressCount
) -> list[GeneratedImage]:
    """Identify the decoded images and download the URL ones, in the answer's order."""
    decoded: dict[int, GeneratedImage] = {}
    try:
        for index, output in enumerate(outputs):
            if isinstance(output, ImageSpool):
                image = decoded[index] = output.finish(seed=None)
                log.info(
                    "remote_image",
                    endpoint=client.endpoint.id,
                    bytes=image.length,
                    width=image.width,
                    height=image.height,
                )
                progress.image_ready()
    except BaseException:
        for output in outputs:
            if isinstance(output, ImageSpool):
                output.discard()
        raise
    urls = [(index, output) for index, output in enumerate(outputs) if isinstance(output, str)]
    try:
        downloaded = await fetch_all([partial(client.download, url, None) for _, url in urls], progress)
    except BaseException:
        close_images(decoded.values())
        raise
    decoded.update((index, image) for (index, _), image in zip(urls, downloaded, strict=True))
    return [decoded[index] for index in range(len(outputs))]
