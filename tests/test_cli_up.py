"""`imagebus up` as a user runs it: the whole embedded stack, one job through it, clean Ctrl-C."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

from imagebus.process import free_port


def _read_banner(process: subprocess.Popen[str], timeout_s: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    banner: dict[str, str] = {}
    assert process.stdout is not None
    while time.monotonic() < deadline and "key" not in banner:
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith("imagebus is up: "):
            banner["url"] = line.split()[3]
        elif line.startswith("API key: "):
            banner["key"] = line.split()[2]
    return banner


def test_up_serves_a_job_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBUS_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "imagebus", "up", "--port", str(port), "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        banner = _read_banner(process, timeout_s=180)
        assert banner.get("url") == f"http://127.0.0.1:{port}", banner
        key = banner["key"]
        assert (data_dir / "api_key").read_text().strip() == key
        env_file = (data_dir / "env").read_text()
        assert "IMAGEBUS_BUS_URL=nats://127.0.0.1:" in env_file and "IMAGEBUS_S3_ENDPOINT=" in env_file

        with httpx.Client(base_url=banner["url"], headers={"X-API-Key": key}, timeout=10) as client:
            body = {"prompt": "a red fox in snow", "num_images": 2, "width": 64, "height": 64}
            response = client.post("/api/generate", json={**body, "num_inference_steps": 4})
            assert response.status_code == 202, response.text
            job_id = response.json()["job_id"]
            seen_steps: set[int] = set()
            deadline = time.monotonic() + 120
            while True:
                job = client.get(f"/api/jobs/{job_id}").json()
                seen_steps.add(job["progress"]["step"])
                if job["status"] in ("completed", "failed") or time.monotonic() > deadline:
                    break
                # Under the default rate limit (600 requests a minute per key), as a real client is.
                time.sleep(0.15)
            assert job["status"] == "completed", job
            assert len(job["images"]) == 2
            for image in job["images"]:
                data = client.get(f"/api/images/{image['id']}").content
                assert Image.open(io.BytesIO(data)).size == (64, 64)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode == 0, output
    assert "stopped." in output
