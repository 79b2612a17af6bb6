"""The ``remote`` backend: images from hosted APIs (OpenAI Images, Chutes) named in the catalog.

Which endpoint serves a model, with which model name, cap, timeout and retries, is catalog data;
tokens come from the worker's secrets. Nothing in a request can point the worker elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Hashable, Mapping

import httpx
import structlog

from schemas import GenerationParams
from schemas.catalog import Catalog, ModelSpec
from workers.backends.base import GeneratedImage, GenerationCanceled, JobRequest, SiteQuota
from workers.backends.remote import chutes_images, openai_images
from workers.backends.remote.answers import RemoteApiError
from workers.backends.remote.endpoint_client import EndpointClient
from workers.backends.remote.quota import quota_from_headers
from workers.backends.remote.retry import RetryPolicy

log = structlog.get_logger(__name__)

DEFAULT_SPOOL_MAX_MEMORY = 1024 * 1024


class RemoteBackend:
    name = "remote"
    max_batch_images = 1

    def __init__(
        self,
        catalog: Catalog,
        tokens: Mapping[str, str],
        *,
        concurrency: int | None = None,
        spool_max_memory: int = DEFAULT_SPOOL_MAX_MEMORY,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        self._catalog = catalog
        used = {spec.endpoint for spec in catalog.models.values() if spec.backend == self.name and spec.endpoint}
        # Jobs at once: enough to fill every endpoint's cap; more would only queue on the caps.
        self.concurrency = concurrency or max(1, sum(catalog.endpoints[e].concurrency for e in used))
        # Connections are not limited here: the per-endpoint caps are the limit.
        self._http = httpx.AsyncClient(
            trust_env=False, limits=httpx.Limits(max_connections=None, max_keepalive_connections=self.concurrency)
        )
        self._tokens = {endpoint: token for endpoint, token in tokens.items() if token}
        self._quotas: dict[str, SiteQuota] = {}
        self._last_quota: str | None = None
        policy = retry_policy or RetryPolicy()
        self._clients = {
            endpoint.id: EndpointClient(
                endpoint,
                self._http,
                tokens.get(endpoint.id) or None,
                policy=policy,
                spool_max_memory=spool_max_memory,
                on_headers=self._record_quota,
            )
            for endpoint in catalog.endpoints.values()
        }

    async def prepare(self, model: str) -> None:
        spec = self._spec(model)
        log.info("remote_model_ready", model=spec.id, endpoint=spec.endpoint)

    async def generate(self, job: JobRequest) -> list[GeneratedImage]:
        spec = self._spec(job.params.model)
        assert spec.endpoint is not None  # the catalog guarantees it for remote models
        client = self._clients[spec.endpoint]
        if client.endpoint.token_required and not self._tokens.get(spec.endpoint):
            raise RemoteApiError(
                f"endpoint {spec.endpoint!r} needs an API token and this worker has none: "
                f'set IMAGEBUS_WORKER_REMOTE_TOKENS=\'{{"{spec.endpoint}": "<token>"}}\''
            )
        job.cancel.raise_if_canceled()
        dialect = openai_images if client.endpoint.kind == "openai" else chutes_images
        work = asyncio.ensure_future(dialect.generate(client, job, spec))
        loop = asyncio.get_running_loop()

        def interrupt() -> None:
            # The token may be set from another thread; a closed loop means the job is long over.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(work.cancel)

        job.cancel.on_cancel(interrupt)
        try:
            return await work
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if job.cancel.canceled and not (current is not None and current.cancelling()):
                log.info("remote_canceled", reason=job.cancel.reason)
                raise GenerationCanceled(job.cancel.reason) from None
            raise

    def batch_key(self, params: GenerationParams) -> Hashable | None:
        return None

    async def generate_batch(self, jobs: list[JobRequest]) -> list[list[GeneratedImage] | BaseException]:
        raise NotImplementedError("the remote backend does not batch: each job is its own API call")

    async def site_quota(self) -> SiteQuota | None:
        return self._quotas.get(self._last_quota) if self._last_quota else None

    async def close(self) -> None:
        await self._http.aclose()

    def _spec(self, model: str) -> ModelSpec:
        spec = self._catalog.get(model)
        if spec is None:
            raise RemoteApiError(f"model {model!r} is not in the catalog")
        if spec.backend != self.name or spec.endpoint is None:
            raise RemoteApiError(f"model {spec.id!r} is served by the {spec.backend!r} backend, not {self.name!r}")
        if spec.endpoint not in self._clients:
            raise RemoteApiError(f"model {spec.id!r} names endpoint {spec.endpoint!r}, which the catalog lacks")
        return spec

    def _record_quota(self, endpoint_id: str, headers: Mapping[str, str]) -> None:
        quota = quota_from_headers(endpoint_id, headers)
        if quota is not None:
            self._quotas[endpoint_id] = quota
            self._last_quota = endpoint_id
