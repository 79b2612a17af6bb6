"""Cold start: how long `imagebus up` takes to say it is ready, and to finish a first job.

Each repeat launches `imagebus up` in a fresh temporary data dir on free ports and measures

    banner     launch until the banner (URL and API key) is printed
    first job  launch until a job submitted right at the banner shows `completed` in the API

against the floor of any diffusers service on this machine:

    bare       a fresh `python` importing diffusers and building the default tiny pipeline the
               way the worker does (load_pipeline with the worker's device choice)

Runs are interleaved (bare, then each code tree in turn, per repeat) so a busy moment of the
machine hits all of them; the per-repeat ratios still swing when other work comes and goes within
a repeat, so the ratio of the fastest runs is printed too.

`--code DIR` runs the stack of another checkout of imagebus (e.g. `git worktree add /tmp/old-cold
HEAD` before a change): its `python -m imagebus` is run with that folder first on the path; the
bare build always uses this checkout.

Usage: python bench/cold_start.py [--repeats 3] [--code /tmp/old-cold --code .]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent.parent
BODY = {"prompt": "a red fox in snow", "width": 64, "height": 64, "num_inference_steps": 4, "num_images": 1}
BARE = """
import diffusers
from imagebus.catalog import load_catalog
from workers.backends.devices import choose_placement
from workers.backends.diffusers import load_pipeline
load_pipeline(load_catalog().models["tiny-sd"], choose_placement())
"""
TIMEOUT_S = 300.0


@dataclass
class StackRun:
    banner_s: float
    first_job_s: float


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bare_build() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", BARE], cwd=HERE, check=True, capture_output=True)
    return time.perf_counter() - start


def stack_run(code: Path) -> StackRun:
    data_dir = Path(tempfile.mkdtemp(prefix="imagebus-cold-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBUS_")}
    # Polling the first job must not meet the per-key rate limit.
    env["IMAGEBUS_INGRESS_RATE_LIMIT_KEY"] = "0"
    env["PYTHONPATH"] = str(code)
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "imagebus", "up", "--port", str(port), "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=code,
    )
    output: list[str] = []
    try:
        assert process.stdout is not None
        key = ""
        for line in process.stdout:
            output.append(line)
            if line.startswith("API key: "):
                key = line.split()[2]
                break
        banner_s = time.perf_counter() - start
        if not key:
            raise RuntimeError("imagebus up printed no banner:\n" + "".join(output))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": key}, timeout=30) as client:
            response = client.post("/api/generate", json=BODY)
            response.raise_for_status()
            job_id = response.json()["job_id"]
            while True:
                status = client.get(f"/api/jobs/{job_id}").json()["status"]
                if status == "completed":
                    break
                if status == "failed" or time.perf_counter() - start > TIMEOUT_S:
                    raise RuntimeError(f"first job ended {status}")
                time.sleep(0.02)
        return StackRun(banner_s, time.perf_counter() - start)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def spread(values: list[float]) -> str:
    return f"{min(values):6.2f} {statistics.median(values):6.2f} {max(values):6.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--code", type=Path, action="append", help="checkout(s) whose stack to launch (default .)")
    args = parser.parse_args()
    codes = [path.resolve() for path in (args.code or [HERE])]

    bare: list[float] = []
    runs: dict[Path, list[StackRun]] = {code: [] for code in codes}
    for repeat in range(1, args.repeats + 1):
        bare.append(bare_build())
        print(f"repeat {repeat}: bare import + build {bare[-1]:.2f}s", flush=True)
        for code in codes:
            run = stack_run(code)
            runs[code].append(run)
            print(f"repeat {repeat}: {code}: banner {run.banner_s:.2f}s, first job {run.first_job_s:.2f}s", flush=True)

    print()
    print(f"{'seconds (min median max)':48} {'min':>6} {'median':>6} {'max':>6}")
    print(f"{'bare import diffusers + tiny pipeline build':48} {spread(bare)}")
    for code, code_runs in runs.items():
        label = str(code) if len(codes) > 1 else "imagebus up"
        print(f"{label + ': banner':48} {spread([r.banner_s for r in code_runs])}")
        print(f"{label + ': first job completed':48} {spread([r.first_job_s for r in code_runs])}")
        # Ratios per repeat (each against the bare build of its own repeat), then their spread.
        ratios = [r.first_job_s / b for r, b in zip(code_runs, bare, strict=True)]
        print(f"{label + ': first job / bare (ratio)':48} {spread(ratios)}")
        early = [r.first_job_s - r.banner_s for r in code_runs]
        print(f"{label + ': first job after banner':48} {spread(early)}")
        # On a shared machine the fastest run of each is the one least disturbed by others.
        best = min(r.first_job_s for r in code_runs) / min(bare)
        print(f"{label + ': fastest first job / fastest bare':48} {best:6.2f}")


if __name__ == "__main__":
    main()
