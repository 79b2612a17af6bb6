"""Images/s of the same tiny pipeline served by LitServe and by imagebus, side by side (issue 14, goal 1).

Both serve the built-in tiny-sd pipeline (random weights, 64x64, 4 steps, guidance 7.5, one image
per request), built by the same code (``workers.backends.diffusers.load_pipeline``), on the same
CPU threads, batching up to 4 images per pipeline call:

    LitServe: max_batch_size 4, batch_timeout --batch-timeout-s (0.05 s: imagebus's default linger);
              a client POSTs {"prompt", "seed"} to /predict and gets the PNG in the answer.
    imagebus: `imagebus up --backends diffusers --workers 1` (NATS, SeaweedFS, SQLite, ingress, one
              diffusers worker batching up to 4 images, projector, reaper), durable as shipped; a
              client POSTs /api/generate, follows /api/sse/{job_id} until the terminal event, then
              GETs the image bytes through the API.

The same client, in this process, keeps N requests in flight for each (N in --concurrency): a
minimal HTTP/1.1 keep-alive client (RawHttp in bench/worker_runs.py), since httpx would spend more
of the shared cores than the servers' own overheads.
Both servers stay up for the whole run and are measured in turn (ABBA order over the repeats), so
each sees the same machine; the idle one's CPU during the other's window is reported too. A window
counts the images whose bytes reached a client in it, after a warm-up; in-flight requests finish
before the next window starts. CPU per image is from /proc/<pid>/stat over the same window.

The ingress's rate limits and quotas are set high (counted, never reached), the rest as shipped.
Both model processes run with OMP_WAIT_POLICY=PASSIVE (--omp-wait-policy): on a machine whose
cores are shared, OpenMP threads spinning at torch's barriers while their partner waits for a core
made the same call up to 7x slower, on both sides alike, and the figures noise.

--profile DIR adds one imagebus window at the highest concurrency under py-spy (ingress, worker,
projector) and prints where each spends its CPU, as bench/control_plane.py --profile does.

Usage: python bench/vs_litserve.py [--seconds 15] [--warmup-s 3] [--repeats 3] [--concurrency 8 32] [--profile DIR]
"""

# No `from __future__ import annotations` here: LitServe reads decode_request's annotation as given
# to build its request model, and a string there makes every request a 422.
import argparse
import asyncio
import base64
import io
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import litserve as ls
from control_plane import start_profilers, stop_profilers, summarise
from pydantic import BaseModel
from worker_runs import GENEROUS_LIMITS, CpuMeter, EmbeddedStack, RawHttp, process_tree

from imagebus.process import free_port

MODEL = "tiny-sd"
PROMPT = "a red fox in snow"
SIZE, STEPS, GUIDANCE = 64, 4, 7.5
BATCH = 4
IMAGEBUS_BODY = {"prompt": PROMPT, "model": MODEL, "width": SIZE, "height": SIZE, "num_inference_steps": STEPS,
                 "guidance_scale": GUIDANCE, "num_images": 1}  # fmt: skip
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROFILED = ("ingress", "worker-diffusers", "projector")


# --- the LitServe side (runs in its own process tree) -------------------------------------------


class PromptRequest(BaseModel):
    prompt: str
    seed: int


class TinySdApi(ls.LitAPI):
    """The tiny pipeline behind LitServe, as its docs write an image API: batch in, PNGs out."""

    def setup(self, device: str) -> None:
        import torch

        from imagebus.catalog import load_catalog
        from workers.backends.devices import choose_placement
        from workers.backends.diffusers import load_pipeline

        # What `imagebus up` gives its one diffusers worker (IMAGEBUS_WORKER_TORCH_THREADS).
        torch.set_num_threads(os.cpu_count() or 1)
        self.torch = torch
        self.pipeline = load_pipeline(load_catalog().models[MODEL], choose_placement(None, None))

    def decode_request(self, request: PromptRequest) -> tuple[str, int]:
        return request.prompt, request.seed

    def predict(self, batch: list[tuple[str, int]]) -> list[str]:
        images = self.pipeline(
            prompt=[prompt for prompt, _ in batch],
            width=SIZE,
            height=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=[self.torch.Generator(device="cpu").manual_seed(seed) for _, seed in batch],
            output_type="pil",
        ).images
        encoded = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            encoded.append(base64.b64encode(buffer.getvalue()).decode())  # LitServe answers JSON
        return encoded

    def encode_response(self, output: str) -> dict[str, str]:
        return {"png_base64": output}


def serve_litserve(port: int, batch_timeout_s: float) -> None:
    api = TinySdApi(max_batch_size=BATCH, batch_timeout=batch_timeout_s)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=120)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)


class LitServeProcess:
    def __init__(self, batch_timeout_s: float, env: dict[str, str], start_timeout_s: float = 300.0) -> None:
        self.port = free_port()
        argv = [sys.executable, __file__, "--serve-litserve", str(self.port), "--batch-timeout-s", str(batch_timeout_s)]
        # Its own session: LitServe starts its API server and inference worker as children.
        self.process = subprocess.Popen(argv, start_new_session=True, env={**os.environ, **env})
        self.base_url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"LitServe exited while starting ({self.process.returncode})")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError("LitServe did not become healthy")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


# --- one client, two servers ----------------------------------------------------------------------


@dataclass
class Server:
    name: str
    connect: Callable[[], RawHttp]
    one_image: Callable[[RawHttp], Awaitable[int]]
    # Process groups whose CPU is counted for this server.
    processes: Callable[[], dict[str, list[int]]]


@dataclass
class Window:
    server: str
    concurrency: int
    repeat: int
    images: int
    seconds: float
    cpu_s: dict[str, float]
    neighbour_cpu_s: float
    client_cpu_s: float
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.images / self.seconds


async def litserve_image(http: RawHttp) -> int:
    body = json.dumps({"prompt": PROMPT, "seed": random.randrange(2**32)}).encode()
    answer = await http.json("POST", "/predict", body)
    if not base64.b64decode(answer["png_base64"]).startswith(PNG_SIGNATURE):
        raise RuntimeError("LitServe answered something that is not a PNG")
    return 1


async def imagebus_image(http: RawHttp) -> int:
    job_id = (await http.json("POST", "/api/generate", json.dumps(IMAGEBUS_BODY).encode(), expect=202))["job_id"]
    # The stream ends after the terminal event; reading it to its end keeps the connection reusable.
    views = [view async for view in http.events(f"/api/sse/{job_id}")]
    view: dict[str, Any] = views[-1] if views else {}
    if view.get("status") != "completed":
        raise RuntimeError(f"job {job_id} ended {view.get('status')}: {view.get('error')}")
    for image in view["images"]:
        status, content = await http.request("GET", image["download_url"])
        if status != 200 or not content.startswith(PNG_SIGNATURE):
            raise RuntimeError(f"job {job_id}'s image answered {status}")
    return len(view["images"])


async def measure(server: Server, neighbour: Server, concurrency: int, repeat: int, args: argparse.Namespace) -> Window:
    done = 0
    stopping = False

    async def client_loop() -> None:
        nonlocal done
        http = server.connect()
        try:
            while not stopping:
                # Not `done += await ...`: that reads `done` before the wait and loses the
                # other clients' counts made meanwhile.
                images = await server.one_image(http)
                done += images
        finally:
            await http.close()

    loops = [asyncio.create_task(client_loop()) for _ in range(concurrency)]
    try:
        await asyncio.sleep(args.warmup_s)
        groups = server.processes()
        meter = CpuMeter({**groups, "neighbour": [pid for pids in neighbour.processes().values() for pid in pids]})
        meter.start()
        client_before, before, started = time.process_time(), done, time.perf_counter()
        await asyncio.sleep(args.seconds)
        images, seconds, client_cpu = done - before, time.perf_counter() - started, time.process_time() - client_before
        cpu = meter.stop()
        stopping = True
        await asyncio.gather(*loops)  # in-flight requests finish before the next window
    finally:
        for task in loops:
            task.cancel()
    neighbour_cpu = cpu.pop("neighbour")
    return Window(server.name, concurrency, repeat, images, seconds, cpu, neighbour_cpu, client_cpu)


def spread(values: list[float], digits: int = 1) -> str:
    return f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f} / {max(values):.{digits}f}"


def report(windows: list[Window], concurrencies: list[int], repeats: int) -> None:
    by = {(w.server, w.concurrency, w.repeat): w for w in windows}
    print()
    print("| repeat | clients | LitServe images/s | imagebus images/s | imagebus / LitServe |")
    print("|---|---|---|---|---|")
    for repeat in range(repeats):
        for c in concurrencies:
            lit, bus = by[("LitServe", c, repeat)], by[("imagebus", c, repeat)]
            print(f"| {repeat + 1} | {c} | {lit.rate:.1f} | {bus.rate:.1f} | {_ratio(bus.rate, lit.rate)} |")
    print()
    print("min / median / max over the repeats (ratio: imagebus / LitServe within each repeat):")
    print()
    print("| clients | LitServe images/s | imagebus images/s | imagebus / LitServe |")
    print("|---|---|---|---|")
    for c in concurrencies:
        lit_rates = [by[("LitServe", c, r)].rate for r in range(repeats)]
        bus_rates = [by[("imagebus", c, r)].rate for r in range(repeats)]
        ratios = [b / a for a, b in zip(lit_rates, bus_rates, strict=True) if a > 0]
        ratio_cell = spread(ratios, 2) if ratios else "n/a"
        print(f"| {c} | {spread(lit_rates)} | {spread(bus_rates)} | {ratio_cell} |")
    print()
    print("CPU-ms per image (median over the repeats); idle neighbour: the other server's CPU meanwhile, in cores")
    for name in ("LitServe", "imagebus"):
        groups = sorted({g for w in windows if w.server == name for g in w.cpu_s})
        header = [f"{name}: clients", *groups, "all server processes", "bench client", "idle neighbour"]
        print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for c in concurrencies:
            runs = [by[(name, c, r)] for r in range(repeats)]
            cells = [_per_image(runs, lambda w, g=g: w.cpu_s.get(g, 0.0)) for g in groups]  # type: ignore[misc]
            cells.append(_per_image(runs, lambda w: sum(w.cpu_s.values())))
            cells.append(_per_image(runs, lambda w: w.client_cpu_s))
            neighbour = statistics.median(w.neighbour_cpu_s / w.seconds for w in runs)
            print(f"| {c} | " + " | ".join(cells) + f" | {neighbour:.2f} |")


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator > 0 else "n/a"


def _per_image(runs: list[Window], cpu_s: Callable[[Window], float]) -> str:
    return f"{statistics.median(cpu_s(w) * 1000 / max(w.images, 1) for w in runs):.1f}"


async def profile_imagebus(
    imagebus: Server, neighbour: Server, stack: EmbeddedStack, folder: Path, args: argparse.Namespace
) -> None:
    """One more imagebus window at the highest concurrency, with py-spy on its Python roles."""
    roles = stack.roles()
    profilers = start_profilers({role: roles[role] for role in PROFILED}, folder, args.profile_rate)
    try:
        await asyncio.sleep(1.0)  # py-spy attaches
        window = await measure(imagebus, neighbour, max(args.concurrency), -1, args)
    finally:
        stop_profilers(profilers)
    cpu_ms = {role: window.cpu_s.get(role, 0.0) * 1000 / max(window.images, 1) for role in PROFILED}
    (folder / "cpu_ms_per_job.json").write_text(json.dumps(cpu_ms))
    print(f"\nimagebus under py-spy ({args.profile_rate} Hz), {window.concurrency} clients: {window.rate:.1f} images/s")
    print("(a job is one image here; raw stacks in", folder, ")")
    summarise(folder)


async def run(args: argparse.Namespace) -> None:
    both = {"OMP_WAIT_POLICY": args.omp_wait_policy} if args.omp_wait_policy else {}
    env = {**GENEROUS_LIMITS, **both, "IMAGEBUS_WORKER_MAX_BATCH_IMAGES": str(BATCH)}
    if args.batch_linger_s is not None:
        env["IMAGEBUS_WORKER_BATCH_LINGER_S"] = str(args.batch_linger_s)
    print("starting LitServe and imagebus up ...", flush=True)
    litserve = LitServeProcess(args.batch_timeout_s, both)
    stack = None
    try:
        stack = EmbeddedStack(["--backends", "diffusers", "--workers", "1", "--model", MODEL], env)
        bus_stack = stack
        servers = {
            "LitServe": Server(
                "LitServe",
                lambda: RawHttp("127.0.0.1", litserve.port),
                litserve_image,
                lambda: {"litserve": process_tree(litserve.process.pid)},
            ),
            "imagebus": Server(
                "imagebus",
                lambda: RawHttp("127.0.0.1", bus_stack.port, bus_stack.api_key),
                imagebus_image,
                lambda: {name: [pid] for name, pid in bus_stack.roles().items()},
            ),
        }
        # First calls pay for lazy initialisation on both sides (and the worker's model load).
        for server in servers.values():
            warm = [server.connect() for _ in range(2 * BATCH)]
            await asyncio.gather(*(server.one_image(http) for http in warm))
            for http in warm:
                await http.close()
        print(
            f"tiny-sd {SIZE}x{SIZE}, {STEPS} steps, 1 image per request, batches of {BATCH}; "
            f"{args.seconds:.0f} s windows after {args.warmup_s:.0f} s warm-up; {os.cpu_count()} CPUs, "
            f"shared with whatever else runs here",
            flush=True,
        )
        windows: list[Window] = []
        for repeat in range(args.repeats):
            order = ["LitServe", "imagebus"] if repeat % 2 == 0 else ["imagebus", "LitServe"]
            for concurrency in args.concurrency:
                for name in order:
                    other = servers["imagebus" if name == "LitServe" else "LitServe"]
                    window = await measure(servers[name], other, concurrency, repeat, args)
                    windows.append(window)
                    print(
                        f"  repeat {repeat + 1}, {concurrency} clients, {name}: {window.rate:.1f} images/s", flush=True
                    )
        report(windows, args.concurrency, args.repeats)
        if args.profile:
            await profile_imagebus(servers["imagebus"], servers["LitServe"], bus_stack, Path(args.profile), args)
    finally:
        if stack is not None:
            stack.stop()
        litserve.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each measured window")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="load before each window starts counting")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--batch-timeout-s", type=float, default=0.05, help="LitServe's batch_timeout")
    parser.add_argument("--batch-linger-s", type=float, default=None, help="imagebus's batch linger (default: shipped)")
    parser.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY of both model processes ('' leaves it unset)",
    )
    parser.add_argument("--profile", metavar="DIR", help="profile one more imagebus window with py-spy into DIR")
    parser.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--serve-litserve", type=int, default=None, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_litserve is not None:
        serve_litserve(args.serve_litserve, args.batch_timeout_s)
        return
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
