"""A real worker process around a scripted backend, for the poison and stall tests.

``python -m tests.scripted_worker`` runs the imagebus worker runtime (the real one: bus, S3,
settle) with a backend whose behaviour the prompt picks, so a test can make a job kill its
worker process or run long enough to be frozen mid-job:

- a prompt containing ``poison`` ends the process at once (``os._exit``), after JobStarted;
- ``slow`` runs 20 steps of 0.25 s; anything else 2 quick steps.

Configured by environment: IMAGEBUS_BUS_URL, IMAGEBUS_BUS_NAMESPACE, IMAGEBUS_ACK_WAIT_S,
IMAGEBUS_MAX_DELIVERIES, the IMAGEBUS_S3_* settings, WORKER_ID, HEARTBEAT_EVENT_INTERVAL_S and
QUEUE (default ``diffusers``: it takes the jobs the ingress routes to the catalog's tiny models).
"""

from __future__ import annotations

import asyncio
import io
import os
import time

from PIL import Image

from bus import BusOptions, connect_bus
from imagebus.roles import stop_on_signals
from schemas import GenerationParams
from storage.object_store import ObjectStore, S3Config
from workers.backends.base import CancelToken, GeneratedImage, JobRequest, Progress, ProgressCallback
from workers.runtime import Worker, WorkerOptions

BACKEND = "scripted"


class PromptScriptedBackend:
    name = BACKEND
    concurrency = 1
    max_batch_images = 1

    async def prepare(self, model: str) -> None:
        pass

    async def generate(self, job: JobRequest) -> list[GeneratedImage]:
        return await asyncio.to_thread(self._generate, job.params, job.on_progress, job.cancel)

    def batch_key(self, params: GenerationParams) -> None:
        return None

    async def generate_batch(self, jobs: list[JobRequest]) -> list[list[GeneratedImage] | BaseException]:
        raise NotImplementedError

    async def site_quota(self) -> None:
        return None

    async def close(self) -> None:
        pass

    def _generate(
        self, params: GenerationParams, on_progress: ProgressCallback, cancel: CancelToken
    ) -> list[GeneratedImage]:
        if "poison" in params.prompt:
            os._exit(13)  # what a segfaulting driver or an OOM kill looks like from outside
        steps, step_s = (20, 0.25) if "slow" in params.prompt else (2, 0.01)
        for step in range(1, steps + 1):
            time.sleep(step_s)
            cancel.raise_if_canceled()
            on_progress(Progress(step=step, total_steps=steps))
        out = io.BytesIO()
        Image.new("RGB", (8, 8), "navy").save(out, format="PNG")
        return [GeneratedImage.from_bytes(out.getvalue(), "image/png", 8, 8, seed=i) for i in range(params.num_images)]


async def main() -> None:
    env = os.environ
    options = BusOptions(
        namespace=env["IMAGEBUS_BUS_NAMESPACE"],
        ack_wait_s=float(env["IMAGEBUS_ACK_WAIT_S"]),
        max_deliveries=int(env["IMAGEBUS_MAX_DELIVERIES"]),
    )
    s3 = S3Config(
        endpoint=env["IMAGEBUS_S3_ENDPOINT"],
        access_key=env["IMAGEBUS_S3_ACCESS_KEY"],
        secret_key=env["IMAGEBUS_S3_SECRET_KEY"],
        bucket=env["IMAGEBUS_S3_BUCKET"],
    )
    bus = await connect_bus(env["IMAGEBUS_BUS_URL"], options)
    try:
        worker = Worker(
            bus,
            ObjectStore(s3),
            PromptScriptedBackend(),
            WorkerOptions(
                worker_id=env.get("WORKER_ID", "scripted"),
                heartbeat_interval_s=max(options.ack_wait_s / 3, 0.2),
                heartbeat_event_interval_s=float(env.get("HEARTBEAT_EVENT_INTERVAL_S", "60")),
                max_deliveries=options.max_deliveries,
                shutdown_grace_s=5.0,
                queue=env.get("QUEUE", "diffusers"),
            ),
        )
        print("scripted worker ready", flush=True)
        await worker.run(stop=stop_on_signals())
    finally:
        await bus.close()


if __name__ == "__main__":
    asyncio.run(main())
