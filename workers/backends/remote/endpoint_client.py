"""Calls to one catalog endpoint: its concurrency cap, token, timeout and retries in one place."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import httpx
import structlog

from schemas.catalog import RemoteEndpoint
from workers.backends.base import GeneratedImage
from workers.backends.remote.answers import RemoteApiError, raise_for_failure
from workers.backends.remote.retry import RetryPolicy, call_with_retries
from workers.backends.remote.spool import ImageSpool

log = structlog.get_logger(__name__)

T = TypeVar("T")
AnswerReader = Callable[[httpx.Response], Awaitable[T]]


class EndpointClient:
    def __init__(
        self,
        endpoint: RemoteEndpoint,
        http: httpx.AsyncClient,
        token: str | None,
        *,
        policy: RetryPolicy,
        spool_max_memory: int,
        on_headers: Callable[[str, Mapping[str, str]], None],
    ) -> None:
        self.endpoint = endpoint
        self._http = http
        self._token = token
        # Shared by every job of this worker: the endpoint never sees more than this many requests.
        self._slots = asyncio.Semaphore(endpoint.concurrency)
        self._policy = policy
        self._spool_max_memory = spool_max_memory
        self._on_headers = on_headers

    async def post(self, body: dict[str, Any], read_answer: AnswerReader[T]) -> T:
        """POST ``body`` and read the answer with ``read_answer``, retrying transient failures."""
        endpoint = self.endpoint
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}

        async def once() -> T:
            async with self._slots:
                # The deadline covers the whole answer, body included: a server trickling bytes
                # cannot hold a slot forever. Waiting for a slot is not counted.
                async with asyncio.timeout(endpoint.timeout_s):
                    request = self._http.stream(
                        "POST", endpoint.url, json=body, headers=headers, timeout=endpoint.timeout_s
                    )
                    async with request as response:
                        self._on_headers(endpoint.id, response.headers)
                        await raise_for_failure(response, endpoint.id, secrets=self._secrets)
                        return await read_answer(response)

        log.info("remote_request", endpoint=endpoint.id, url=endpoint.url, model=body.get("model"))
        return await call_with_retries(once, policy=self._policy, max_retries=endpoint.max_retries, what=endpoint.id)

    async def download(self, url: str, seed: int | None) -> GeneratedImage:
        """GET an image the API left at ``url``. No token: the URL is often another host's (a CDN)."""
        if not url.startswith(("https://", "http://")):
            raise RemoteApiError(f"{self.endpoint.id} answered an image URL that is not http(s): {url[:100]!r}")
        endpoint = self.endpoint
        what = f"{endpoint.id} image download"

        async def once() -> GeneratedImage:
            async with asyncio.timeout(endpoint.timeout_s):
                request = self._http.stream("GET", url, follow_redirects=True, timeout=endpoint.timeout_s)
                async with request as response:
                    await raise_for_failure(response, what, secrets=self._secrets)
                    return await self.receive_image(response, seed)

        return await call_with_retries(once, policy=self._policy, max_retries=endpoint.max_retries, what=what)

    def new_spool(self) -> ImageSpool:
        return ImageSpool(
            max_bytes=self.endpoint.max_image_bytes, max_memory=self._spool_max_memory, source=self.endpoint.id
        )

    async def receive_image(self, response: httpx.Response, seed: int | None) -> GeneratedImage:
        """Stream an answer whose body is the image itself into a spool, capped and identified."""
        spool = self.new_spool()
        try:
            spool.check_declared_length(response.headers.get("content-length"))
            async for chunk in response.aiter_bytes():
                spool.write(chunk)
            image = spool.finish(seed, response.headers.get("content-type"))
        except BaseException:
            spool.discard()
            raise
        log.info("remote_image", endpoint=self.endpoint.id, bytes=image.length, width=image.width, height=image.height)
        return image

    @property
    def _secrets(self) -> tuple[str, ...]:
        return (self._token,) if self._token else ()
