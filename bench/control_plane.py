"""Jobs/s through the whole control plane with a nearly free backend, and the CPU each process spends
per job, next to the raw JetStream rates of the same NATS server (issue 14, goal 2).

The stack is `imagebus up --backends remote`: NATS, SeaweedFS S3, SQLite, one ingress, one remote
worker, the projector and the reaper. The remote worker's one model points at the fake OpenAI
Images API (tests/fakes/image_api.py) in a process of its own, answering at once with a small PNG,
so what is measured is imagebus: submit, command, worker, image into S3, events, projection.

    jobs/s end to end = jobs / (first submit until GET /api/jobs?status=completed counts them all):
        each job's image stored and its completion visible through the API
    submits/s         = jobs / (first submit until the last 202)
    CPU-ms per job    = /proc/<pid>/stat user+system over the same span, per process
    raw JetStream     = nats-py on a scratch stream (file storage, like the app's) of the same
        server, before and after the load: publishes with acks awaited in bulk (publish_async),
        and a pull consumer fetching batches of 100 and acking each message; next to them, a tenth
        as many one at a time as the app does today (each publish awaits its ack; fetch(1) + ack
        + flush)

The load is light on purpose (the machine has few cores): a minimal HTTP/1.1 keep-alive client
(--submitters connections submitting back to back), and one request for the completed count
every 0.25 s. The ingress's rate limits and quotas are set high (checked, never reached).

--profile DIR runs the load once more with py-spy sampling the ingress, the worker and the
projector (raw collapsed stacks in DIR, figures of that run are under the profiler) and prints
where each spends its CPU: by library, by innermost frame, and by innermost imagebus frame
(file:line). py-spy counts a thread while the kernel has it runnable, which on a busy machine
includes waiting for a core, so shares are approximate; the CPU-ms column scales each share to the
process's CPU measured over the same load.
--summarise DIR prints that summary again from the files.

Usage: python bench/control_plane.py [--jobs 2000] [--submitters 16] [--profile DIR] [--summarise DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from worker_runs import GENEROUS_LIMITS, CpuMeter, EmbeddedStack, RawHttp

from schemas import GenerateImage, GenerationParams
from schemas.catalog import Catalog, ModelSpec, RemoteEndpoint

TOKEN = "sk-bench"
MODEL = "bench-model"
BODY = json.dumps({"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "num_inference_steps": 4}).encode()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
POLL_S = 0.25
STALL_S = 60.0
PROFILED = ("ingress", "worker-remote", "projector")
OUR_PACKAGES = ("bus", "workers", "projector", "ingress", "storage", "schemas", "imagebus", "readmodel")
# Frames every sample of a role has (process start, the loop's runner): not where time goes.
BOOTSTRAP = ("imagebus/__main__.py", "imagebus/cli.py")


# --- the fake endpoint, in a process of its own ---------------------------------------------------


async def serve_fake() -> None:
    from tests.fakes.image_api import FakeImageApi

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with FakeImageApi(tokens=(TOKEN,), latency_s=0.0).running() as api:
        print(api.openai_url, flush=True)
        await stop.wait()


class FakeEndpoint:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve-fake"], stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        if not self.url:
            raise RuntimeError("the fake image API did not start")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def catalog_file(folder: Path, url: str, concurrency: int) -> Path:
    endpoint = RemoteEndpoint(id="bench", kind="openai", url=url, response_format="b64_json", concurrency=concurrency)
    model = ModelSpec(
        id=MODEL, description="the fake image API", backend="remote", source="fake-image-1", endpoint="bench",
        default_width=64, default_height=64, default_steps=4,
    )  # fmt: skip
    path = folder / "catalog.json"
    path.write_text(Catalog(default=MODEL, models={MODEL: model}, endpoints={"bench": endpoint}).model_dump_json())
    return path


# --- raw JetStream ----------------------------------------------------------------------------------


@dataclass
class RawBus:
    publishes_per_s: float  # publish_async, acks awaited in bulk
    consumed_per_s: float  # fetch(100), each message acked
    # What the app does today, for comparison: one publish awaiting its ack before the next, and
    # fetch(1) + ack + flush per message.
    one_by_one_publishes_per_s: float
    one_by_one_consumed_per_s: float


async def raw_jetstream(bus_url: str, messages: int) -> RawBus:
    """Acked publishes/s (acks awaited in bulk) and fetched+acked messages/s on a scratch stream."""
    import nats
    from nats.js import api

    payload = GenerateImage(
        job_id=uuid.uuid4().hex, message_id=uuid.uuid4().hex, owner="bench", backend="remote",
        params=GenerationParams(prompt="a lighthouse at dusk", model=MODEL, width=64, height=64,
                                num_inference_steps=4, guidance_scale=7.5),
    ).model_dump_json().encode()  # fmt: skip
    name = f"benchraw{uuid.uuid4().hex[:8]}"
    connection = await nats.connect(bus_url)
    try:
        js = connection.jetstream()
        await js.add_stream(api.StreamConfig(name=name, subjects=[f"{name}.>"], storage=api.StorageType.FILE))
        start = time.perf_counter()
        for index in range(messages):
            await js.publish_async(f"{name}.cmd", payload, headers={"Nats-Msg-Id": f"{name}-{index}"})
        await js.publish_async_completed()
        published = messages / (time.perf_counter() - start)
        subscription = await js.pull_subscribe(f"{name}.>", durable=f"{name}c", stream=name)
        start, consumed = time.perf_counter(), 0
        while consumed < messages:
            batch = await subscription.fetch(100, timeout=5)
            for message in batch:
                await message.ack()
            consumed += len(batch)
        bulk_consumed = consumed / (time.perf_counter() - start)
        few = max(1, messages // 10)
        start = time.perf_counter()
        for index in range(few):
            await js.publish(f"{name}.cmd", payload, headers={"Nats-Msg-Id": f"{name}-one-{index}"})
        one_published = few / (time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(few):
            (message,) = await subscription.fetch(1, timeout=5)
            await message.ack()
            await connection.flush()
        one_consumed = few / (time.perf_counter() - start)
        return RawBus(published, bulk_consumed, one_published, one_consumed)
    finally:
        with contextlib.suppress(Exception):
            await connection.jetstream().delete_stream(name)
        await connection.close()


async def stream_messages(bus_url: str) -> dict[str, int]:
    """Messages ever stored in each of the app's JetStream streams (the last sequence: a work-queue
    stream deletes what was acked), scratch streams left out."""
    import nats

    connection = await nats.connect(bus_url)
    try:
        return {
            info.config.name: info.state.last_seq
            for info in await connection.jetstream().streams_info()
            if info.config.name and not info.config.name.startswith("benchraw")
        }
    finally:
        await connection.close()


# --- the load -----------------------------------------------------------------------------------------


@dataclass
class Load:
    jobs: int
    seconds: float
    submit_seconds: float
    cpu_s: dict[str, float]
    job_ids: list[str]
    # Messages each stream gained during the load (commands, events, ...).
    stored: dict[str, int] = field(default_factory=dict)
    calls: dict[str, tuple[int, int]] = field(default_factory=dict)


async def count_of(http: RawHttp, status: str) -> int:
    return int((await http.json("GET", f"/api/jobs?status={status}&limit=1"))["total"])


async def run_load(stack: EmbeddedStack, jobs: int, submitters: int, meter: CpuMeter | None) -> Load:
    clients = [RawHttp("127.0.0.1", stack.port, stack.api_key) for _ in range(submitters)]
    poller = RawHttp("127.0.0.1", stack.port, stack.api_key)
    job_ids: list[str] = []
    try:
        done_before, failed_before = await count_of(poller, "completed"), await count_of(poller, "failed")
        stored_before = await stream_messages(stack.bus_url)
        left = jobs

        async def submitter(http: RawHttp) -> None:
            nonlocal left
            while left > 0:
                left -= 1
                answer = await http.json("POST", "/api/generate", BODY, expect=202)
                job_ids.append(str(answer["job_id"]))

        if meter is not None:
            meter.start()
        client_before, start = time.process_time(), time.perf_counter()
        submitting = asyncio.gather(*(submitter(http) for http in clients))
        submit_seconds, done, moved_at = 0.0, done_before, start
        while done - done_before < jobs:
            await asyncio.sleep(POLL_S)
            if submitting.done() and not submit_seconds:
                await submitting  # raises a refused submit
                submit_seconds = time.perf_counter() - start
            # One cheap request per poll: the ingress's CPU is what is measured.
            if (now := await count_of(poller, "completed")) != done:
                done, moved_at = now, time.perf_counter()
            elif time.perf_counter() - moved_at > STALL_S:
                failed = await count_of(poller, "failed") - failed_before
                raise RuntimeError(
                    f"{done - done_before} of {jobs} jobs completed, {failed} failed, then none for {STALL_S:.0f} s"
                )
        seconds = time.perf_counter() - start
        cpu = meter.stop() if meter is not None else {}
        calls = meter.calls if meter is not None else {}
        cpu["bench client"] = time.process_time() - client_before
        stored = {
            name: count - stored_before.get(name, 0) for name, count in (await stream_messages(stack.bus_url)).items()
        }
        if (failed := await count_of(poller, "failed") - failed_before) > 0:
            raise RuntimeError(f"{failed} jobs failed")
        return Load(jobs, seconds, submit_seconds or seconds, cpu, job_ids, stored, calls)
    finally:
        for http in [*clients, poller]:
            await http.close()


async def check_results(stack: EmbeddedStack, job_ids: list[str], sample: int = 20) -> None:
    """Every job of the run completed with an image, as the API lists them; a sample's bytes are PNGs."""
    http = RawHttp("127.0.0.1", stack.port, stack.api_key)
    try:
        wanted, seen, page = set(job_ids), set[str](), 1
        while seen != wanted:
            listing = await http.json("GET", f"/api/jobs?status=completed&limit=50&page={page}")
            views = listing["jobs"]
            assert isinstance(views, list)
            if not views:
                raise RuntimeError(f"{len(wanted - seen)} jobs are not listed as completed")
            for view in views:
                if view["id"] in wanted:
                    if not view["images"]:
                        raise RuntimeError(f"job {view['id']} completed without an image")
                    seen.add(view["id"])
            page += 1
        for job_id in random.sample(job_ids, min(sample, len(job_ids))):
            view = await http.json("GET", f"/api/jobs/{job_id}")
            images = view["images"]
            assert isinstance(images, list)
            status, content = await http.request("GET", images[0]["download_url"])
            if status != 200 or not content.startswith(PNG_SIGNATURE):
                raise RuntimeError(f"job {job_id}'s image answered {status}")
    finally:
        await http.close()


# --- py-spy -------------------------------------------------------------------------------------------


def start_profilers(roles: dict[str, int], folder: Path, rate: int) -> list[subprocess.Popen[bytes]]:
    """py-spy recording each of ``roles`` (name -> pid) into <folder>/<name>.txt until stopped."""
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy (the bench extra has it)")
    folder.mkdir(parents=True, exist_ok=True)
    profilers = []
    for role, pid in roles.items():
        output = folder / f"{role}.txt"
        argv = [py_spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                "--output", str(output), "--nonblocking"]  # fmt: skip
        profilers.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return profilers


def stop_profilers(profilers: list[subprocess.Popen[bytes]]) -> None:
    for profiler in profilers:
        profiler.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
    for profiler in profilers:
        profiler.wait(timeout=60)


def _frame(frame: str) -> tuple[str, str]:
    """py-spy's 'function (path:line)' -> (its package, 'path:line function')."""
    function, _, where = frame.rpartition(" (")
    where = where.rstrip(")")
    # py-spy shortens paths to the module's own ("sqlalchemy/engine/base.py", "uuid.py").
    package = where.split("/", 1)[0].rsplit(":", 1)[0].removesuffix(".py")
    return package, f"{where} {function}"


def _stacks(path: Path) -> Iterator[tuple[str, int]]:
    """(stack, samples) of a py-spy raw file, whose frame names may hold newlines (SQL text)."""
    pending = ""
    for line in path.read_text().splitlines():
        pending += line
        stack, _, count = pending.rpartition(" ")
        if stack and count.isdigit():
            yield stack, int(count)
            pending = ""


def _ours(package: str, where: str) -> bool:
    return package in OUR_PACKAGES and not where.startswith(BOOTSTRAP)


def summarise(folder: Path, top: int = 12) -> None:
    """Where each profiled process spent its CPU samples, four ways; with the process's CPU-ms per
    job measured in the same run, a share is also shown as CPU-ms per job."""
    cpu_file = folder / "cpu_ms_per_job.json"
    cpu_ms: dict[str, float] = json.loads(cpu_file.read_text()) if cpu_file.exists() else {}
    for path in sorted(folder.glob("*.txt")):
        role = path.stem
        per_job = cpu_ms.get(role)
        tables: dict[str, Counter[str]] = {
            "library of the innermost frame": Counter(),
            "innermost frame (file:line)": Counter(),
            "innermost imagebus frame, with what it calls": Counter(),
            "imagebus frame anywhere on the stack (inclusive)": Counter(),
        }
        by_package, by_leaf, by_own, inclusive = tables.values()
        total = backend = 0
        for stack, count in _stacks(path):
            total += count
            frames = [_frame(frame) for frame in stack.split(";")]
            by_package[frames[-1][0]] += count
            by_leaf[frames[-1][1]] += count
            own = [where for package, where in frames if _ours(package, where)]
            if any(where.startswith("workers/backends/") for where in own):
                backend += count
            by_own[own[-1] if own else "(none: the event loop itself, thread wake-ups, library callbacks)"] += count
            for where in set(own):
                inclusive[where] += count
        measured = f", {per_job:.2f} CPU-ms per job measured" if per_job is not None else ""
        print(f"\n### {role}: {total} samples of a running thread{measured}\n")
        if backend:
            print(f"Samples inside the backend (a frame in workers/backends/): {backend / total:.1%}\n")
        for title, counts in tables.items():
            print(f"| share | ≈ CPU-ms per job | {title} |\n|---|---|---|")
            for name, count in counts.most_common(top):
                scaled = f"{count / total * per_job:.2f}" if per_job is not None else "-"
                print(f"| {count / total:.1%} | {scaled} | {name} |")
            print()


# --- the run ------------------------------------------------------------------------------------------


def print_load(load: Load, raw: list[RawBus], title: str) -> None:
    print(f"\n{title}\n")
    rate = load.jobs / load.seconds
    before, after = raw
    print("| jobs | seconds | jobs/s end to end | submits/s |")
    print("|---|---|---|---|")
    print(f"| {load.jobs} | {load.seconds:.1f} | {rate:.1f} | {load.jobs / load.submit_seconds:.1f} |")
    print("\nRaw JetStream on the same server, messages/s (before / after the load):\n")
    print(
        "| publish_async, acks awaited in bulk | publish, each ack awaited | fetch(100) + ack "
        "| fetch(1) + ack + flush |"
    )
    print("|---|---|---|---|")
    print(
        f"| {before.publishes_per_s:,.0f} / {after.publishes_per_s:,.0f} "
        f"| {before.one_by_one_publishes_per_s:,.0f} / {after.one_by_one_publishes_per_s:,.0f} "
        f"| {before.consumed_per_s:,.0f} / {after.consumed_per_s:,.0f} "
        f"| {before.one_by_one_consumed_per_s:,.0f} / {after.one_by_one_consumed_per_s:,.0f} |"
    )
    print()
    print("| process | CPU-ms per job | cores busy | read / write system calls per job |")
    print("|---|---|---|---|")
    for name, seconds in sorted(load.cpu_s.items(), key=lambda item: -item[1]):
        reads, writes = load.calls.get(name, (0, 0))
        calls = f"{reads / load.jobs:.1f} / {writes / load.jobs:.1f}" if name in load.calls else "-"
        print(f"| {name} | {seconds * 1000 / load.jobs:.2f} | {seconds / load.seconds:.2f} | {calls} |")
    ours = sum(load.cpu_s.get(name, 0.0) for name in PROFILED)
    everything = sum(load.cpu_s.values())
    print(f"| **ingress + worker + projector** | **{ours * 1000 / load.jobs:.2f}** | {ours / load.seconds:.2f} | |")
    print(f"| all measured processes | {everything * 1000 / load.jobs:.2f} | {everything / load.seconds:.2f} | |")
    stored = ", ".join(f"{name} {count / load.jobs:.2f}" for name, count in sorted(load.stored.items()))
    print(f"\nDurable messages stored per job, by stream: {stored}")


async def run(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="imagebus-bench-cp-"))
    fake = FakeEndpoint()
    stack = None
    try:
        env = {
            **GENEROUS_LIMITS,
            "IMAGEBUS_CATALOG": str(catalog_file(folder, fake.url, args.endpoint_concurrency)),
            "IMAGEBUS_WORKER_REMOTE_TOKENS": json.dumps({"bench": TOKEN}),
        }
        stack = EmbeddedStack(["--backends", "remote"], env)
        await run_load(stack, 3 * args.submitters, args.submitters, None)  # warm-up: connections, first calls
        roles = stack.roles()
        groups = {name: [pid] for name, pid in roles.items()} | {"fake endpoint": [fake.process.pid]}
        print(
            f"{os.cpu_count()} CPUs shared with whatever else runs here; {args.jobs} jobs, {args.submitters} "
            f"submitters, remote endpoint concurrency {args.endpoint_concurrency}",
            flush=True,
        )
        raw = [await raw_jetstream(stack.bus_url, args.raw_messages)]
        load = await run_load(stack, args.jobs, args.submitters, CpuMeter(groups))
        raw.append(await raw_jetstream(stack.bus_url, args.raw_messages))
        await check_results(stack, load.job_ids)
        print_load(load, raw, "Measured (no profiler):")
        if args.profile:
            profile_dir = Path(args.profile)
            profilers = start_profilers({role: roles[role] for role in PROFILED}, profile_dir, args.profile_rate)
            try:
                await asyncio.sleep(1.0)  # py-spy attaches
                profiled = await run_load(stack, args.jobs, args.submitters, CpuMeter(groups))
            finally:
                stop_profilers(profilers)
            print_load(profiled, raw, f"Under py-spy ({args.profile_rate} Hz, raw stacks in {profile_dir}):")
            cpu_ms = {role: profiled.cpu_s.get(role, 0.0) * 1000 / profiled.jobs for role in PROFILED}
            (profile_dir / "cpu_ms_per_job.json").write_text(json.dumps(cpu_ms))
            summarise(profile_dir)
    finally:
        if stack is not None:
            stack.stop()
        fake.stop()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--submitters", type=int, default=16, help="connections submitting back to back")
    parser.add_argument("--endpoint-concurrency", type=int, default=64, help="the remote worker's jobs in flight")
    parser.add_argument("--raw-messages", type=int, default=20_000, help="messages of each raw JetStream run")
    parser.add_argument("--profile", metavar="DIR", help="profile a second load with py-spy, raw stacks into DIR")
    parser.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--summarise", metavar="DIR", help="only summarise the py-spy stacks in DIR")
    parser.add_argument("--serve-fake", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fake:
        # The fake lives with the tests, which are not an installed package.
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        asyncio.run(serve_fake())
    elif args.summarise:
        summarise(Path(args.summarise))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
