"""The long chaos run: a big batch through a stack of real processes while workers are SIGKILLed
again and again and the broker is restarted, then an audit of every job.

Every role is a process of its own (ingress, projector, ``--workers`` workers), on a broker of the
run's own (a nats-server, or a RabbitMQ node with its own port and data) and a SeaweedFS S3 server.
A worker that is running a job is SIGKILLed every ``--kill-every`` seconds and replaced at once; the
broker goes down ``--broker-restarts`` times (alternately stopped and SIGKILLed) for two seconds,
with a few submits made while it is away. Afterwards the event log and the API are compared:

    python bench/chaos.py --bus nats
    python bench/chaos.py --bus amqp --jobs 100 --kill-every 2,5 --broker-restarts 2

The figures printed at the end are the ones docs/reliability.md reports. The exit status is 1 when a
job was lost, did not complete, or an image was visible twice. The short versions of these runs are
tests/test_chaos.py; both share tests/chaos_rig.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/chaos_rig.py, shared with the tests

from bus import BusOptions, connect_bus
from imagebus.process import ManagedProcess, free_port
from imagebus.s3_server import start_s3_server
from storage.object_store import S3Config
from tests.chaos_rig import (
    TERMINAL_STATUSES,
    ChaosFigures,
    NatsBroker,
    RabbitNode,
    RunningJobs,
    Submitted,
    WorkerPool,
    audit,
    kill_workers,
    listed,
    role_env,
    start_role,
    submit,
    wait_until_terminal,
)

API_KEY = "ib_chaos_" + secrets.token_hex(12)
HEADERS = {"X-API-Key": API_KEY}
OUTAGE_S = 2.0
OUTAGE_SUBMITS = 2


def job_body(index: int, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "prompt": f"chaos {index}",
        "width": args.size,
        "height": args.size,
        "num_inference_steps": args.steps,
        "num_images": 2 if index % 3 == 0 else 1,
        "seed": index,
    }


async def completed_count(client: httpx.AsyncClient, job_ids: set[str]) -> int:
    with contextlib.suppress(httpx.TransportError):
        views = await listed(client, HEADERS, "/api/jobs", "jobs")
        return sum(1 for view in views if view["id"] in job_ids and view["status"] in TERMINAL_STATUSES)
    return 0


async def restart_broker_during_batch(
    broker: NatsBroker | RabbitNode,
    client: httpx.AsyncClient,
    jobs: list[Submitted],
    figures: ChaosFigures,
    args: argparse.Namespace,
    check: Callable[[], None],
) -> None:
    """Restart the broker when 1/(n+1), 2/(n+1), ... of the batch is done; submit during each outage."""
    for restart in range(args.broker_restarts):
        wanted = len(jobs) * (restart + 1) // (args.broker_restarts + 1)
        while True:
            check()
            if await completed_count(client, {job.job_id for job in jobs}) >= wanted:
                break
            await asyncio.sleep(1.0)
        crash = restart % 2 == (1 if isinstance(broker, RabbitNode) else 0)
        print(f"  broker {'SIGKILL' if crash else 'stop'} at {wanted}/{len(jobs)} jobs done", flush=True)
        await asyncio.to_thread(broker.down, crash=crash)
        began = time.monotonic()
        outage_submits = [
            asyncio.create_task(client.post("/api/generate", json=job_body(10_000 + i, args), headers=HEADERS))
            for i in range(OUTAGE_SUBMITS)
        ]
        await asyncio.sleep(OUTAGE_S)
        await asyncio.to_thread(broker.start)
        figures.broker_restarts += 1
        print(f"  broker back after {time.monotonic() - began:.1f} s", flush=True)
        for task in outage_submits:
            response = await task
            if response.status_code == 202:
                jobs.append(Submitted(response.json()["job_id"], response.json()["num_images"]))
            elif response.status_code == 503 and response.json().get("status") == "error":
                figures.submits_refused += 1
            else:
                figures.problems.append(f"outage submit answered {response.status_code}: {response.text[:200]}")


async def run(args: argparse.Namespace) -> ChaosFigures:
    root = Path(tempfile.mkdtemp(prefix=f"imagebus-chaos-{args.bus}-"))
    print(f"logs and data in {root}", flush=True)
    rng = random.Random(args.seed)
    broker: NatsBroker | RabbitNode = (
        NatsBroker(root / "nats").start() if args.bus == "nats" else RabbitNode(root / "rabbit").start()
    )
    s3_server = start_s3_server(
        root / "s3", access_key="chaos", secret_key=secrets.token_urlsafe(24), log_path=root / "weed.log"
    )
    s3 = S3Config(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, bucket="chaos")
    options = BusOptions(namespace="chaos", ack_wait_s=args.ack_wait, max_deliveries=args.max_deliveries)
    port = free_port()
    env = role_env(
        broker.url,
        options,
        s3,
        {
            "IMAGEBUS_DATABASE_URL": f"sqlite:///{root}/readmodel.db",
            "IMAGEBUS_API_KEYS": API_KEY,
            "IMAGEBUS_KEY_SECRET": secrets.token_urlsafe(24),
            "IMAGEBUS_INGRESS_PORT": str(port),
            "IMAGEBUS_INGRESS_QUOTA_ACTIVE_JOBS": "100000",
            "IMAGEBUS_INGRESS_QUOTA_DAILY_IMAGES": "100000",
            "IMAGEBUS_INGRESS_RATE_LIMIT_KEY": "0",
            "IMAGEBUS_INGRESS_RATE_LIMIT_IP": "0",
            "IMAGEBUS_WORKER_TORCH_THREADS": "1",
            "IMAGEBUS_WORKER_SHUTDOWN_GRACE_S": "10",
        },
    )
    roles: list[ManagedProcess] = [
        start_role("projector", ["projector"], env, root),
        start_role("ingress", ["ingress"], env, root),
    ]
    pool = WorkerPool(env, root, args.workers).start()
    figures = ChaosFigures()
    started = time.monotonic()
    bus = None
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            await wait_until_answering(client, roles[1])
            bus = await connect_bus(broker.url, options)
            running = RunningJobs()
            follower = asyncio.create_task(running.follow(bus))
            jobs = [await submit(client, HEADERS, job_body(index, args)) for index in range(args.jobs)]
            print(f"  {len(jobs)} jobs submitted in {time.monotonic() - started:.1f} s", flush=True)
            done = asyncio.Event()
            killer = asyncio.create_task(
                kill_workers(pool, running, rng, kills=10**9, every_s=args.kill_every, until=done)
            )
            check = crash_check(pool, roles)
            restarter = asyncio.create_task(restart_broker_during_batch(broker, client, jobs, figures, args, check))
            try:
                await restarter  # the batch goes on meanwhile; its jobs list grows with accepted outage submits
                await wait_until_terminal(
                    client,
                    HEADERS,
                    [job.job_id for job in jobs],
                    timeout_s=args.timeout,
                    check=check,
                )
            finally:
                done.set()
                await killer
                restarter.cancel()
                follower.cancel()
            figures.wall_s = time.monotonic() - started
            figures.worker_kills = pool.kills
            crashed = pool.died_on_their_own() + [role.name for role in roles if not role.alive()]
            figures.problems += [f"{name} exited on its own" for name in crashed]
            await audit(bus, client, HEADERS, jobs, figures)
    finally:
        stop_codes = pool.stop(grace_s=20)
        stop_codes.update({role.name: role.stop(grace_s=20) for role in roles})
        print(f"  exit codes on SIGTERM: {stop_codes}", flush=True)
        if bus is not None:
            await bus.close()
        s3_server.stop(grace_s=3.0)
        broker.close()
    return figures


def crash_check(pool: WorkerPool, roles: list[ManagedProcess]) -> Callable[[], None]:
    """Raises once a worker or role exits on its own: the batch would never end."""

    def check() -> None:
        pool.raise_if_any_crashed()
        for role in roles:
            if not role.alive():
                raise RuntimeError(f"{role.name} exited on its own:\n{role.tail()}")

    return check


async def wait_until_answering(client: httpx.AsyncClient, ingress: ManagedProcess, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if (await client.get("/health")).status_code == 200:
                return
        if not ingress.alive():
            break
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the ingress did not answer:\n{ingress.tail()}")


def seconds_range(text: str) -> tuple[float, float]:
    low, _, high = text.partition(",")
    return float(low), float(high or low)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bus", choices=["nats", "amqp"], default="nats")
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--kill-every", type=seconds_range, default=(2.0, 5.0), help="seconds, drawn uniformly: LOW,HIGH"
    )
    parser.add_argument("--broker-restarts", type=int, default=2)
    parser.add_argument("--size", type=int, default=128, help="image width and height (tiny-sd)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--ack-wait", type=float, default=2.0)
    parser.add_argument("--max-deliveries", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the batch to end")
    parser.add_argument("--seed", type=int, default=None, help="for the choice of victims and kill times")
    args = parser.parse_args()
    figures = asyncio.run(run(args))
    print(f"\nchaos run on {args.bus}: {args.jobs} jobs, {args.workers} workers, kills every {args.kill_every} s")
    print("\n".join(figures.lines()))
    for problem in figures.problems:
        print(f"PROBLEM {problem}")
    clean = not figures.problems and figures.jobs_lost == figures.jobs_not_completed == figures.duplicates_visible == 0
    raise SystemExit(0 if clean else 1)


if __name__ == "__main__":
    main()
