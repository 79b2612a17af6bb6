"""`imagebus up` as a user runs it: the whole embedded stack, one job through it, clean Ctrl-C; it
says it is up only once a worker can take a job, starts only the backends that have something to
run, and fails with a message when a role dies while starting."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from pydantic import SecretStr

from imagebus.backend_choice import BackendChoice, choose_backends
from imagebus.catalog import load_catalog
from imagebus.launcher import RoleProcess, StartupFailed, wait_until_ready
from imagebus.process import ManagedProcess, free_port
from imagebus.settings import WorkerSettings


def _launch(data_dir: Path, *extra: str) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBUS_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "imagebus", "up", "--port", str(port), "--data-dir", str(data_dir), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    return process, port


def _worker_events(data_dir: Path, name: str) -> list[dict[str, object]]:
    lines = (data_dir / "logs" / f"{name}.log").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def _stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGINT)
    try:
        output, _ = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output


def test_up_is_ready_at_its_banner_serves_a_job_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    process, port = _launch(data_dir)
    before_banner: list[str] = []
    banner: dict[str, str] = {}
    output = ""
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("imagebus is up: "):
                banner["url"] = line.split()[3]
                # The moment the banner is read, the worker has said itself (in its own log) that
                # its model is loaded and it takes work.
                ready = [e for e in _worker_events(data_dir, "worker-diffusers-1") if e["event"] == "worker_ready"]
                assert ready and ready[0]["models"] == ["tiny-sd"], ready
            elif line.startswith("API key: "):
                banner["key"] = line.split()[2]
                break
            else:
                before_banner.append(line)
        assert banner.get("url") == f"http://127.0.0.1:{port}", before_banner
        key = banner["key"]
        assert any(line.startswith("  ready: worker-diffusers-1, tiny-sd loaded") for line in before_banner)
        # Nothing is configured for them, so they were not started, and the launcher says why.
        assert any(line.startswith("  remote: not started (") for line in before_banner), before_banner
        assert any(line.startswith("  browser: not started (") for line in before_banner), before_banner
        assert sorted(path.name for path in (data_dir / "logs").glob("worker-*.log")) == ["worker-diffusers-1.log"]
        assert (data_dir / "api_key").read_text().strip() == key
        env_file = (data_dir / "env").read_text()
        assert "IMAGEBUS_BUS_URL=nats://127.0.0.1:" in env_file and "IMAGEBUS_S3_ENDPOINT=" in env_file

        with httpx.Client(base_url=banner["url"], headers={"X-API-Key": key}, timeout=10) as client:
            body = {"prompt": "a red fox in snow", "num_images": 2, "width": 64, "height": 64}
            response = client.post("/api/generate", json={**body, "num_inference_steps": 4})
            assert response.status_code == 202, response.text
            job_id = response.json()["job_id"]
            deadline = time.monotonic() + 120
            while True:
                job = client.get(f"/api/jobs/{job_id}").json()
                if job["status"] in ("completed", "failed") or time.monotonic() > deadline:
                    break
                # Under the default rate limit (600 requests a minute per key), as a real client is.
                time.sleep(0.15)
            assert job["status"] == "completed", job
            assert len(job["images"]) == 2
            for image in job["images"]:
                data = client.get(f"/api/images/{image['id']}").content
                assert Image.open(io.BytesIO(data)).size == (64, 64)
        # The job ran on the model loaded before the banner: it was built once, at start.
        built = [e for e in _worker_events(data_dir, "worker-diffusers-1") if e["event"] == "pipeline_built"]
        assert len(built) == 1, built
    finally:
        output = _stop(process)
    assert process.returncode == 0, output
    assert "stopped." in output


def test_up_fails_with_a_message_when_a_worker_dies_while_starting(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    missing = tmp_path / "no-such-model"
    process, _ = _launch(data_dir, "--model", str(missing))
    try:
        output, _ = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        output = _stop(process)
        pytest.fail(f"imagebus up did not give up:\n{output}")
    assert process.returncode == 1, output
    assert "imagebus is up" not in output
    assert "imagebus up failed: worker-diffusers-1 exited (code 1) before it was ready" in output
    assert f"model folder '{missing}' does not exist" in output
    assert "stopped." in output


def test_ctrl_c_while_starting_stops_everything_started_so_far(tmp_path: Path) -> None:
    process, _ = _launch(tmp_path / "data")
    assert process.stdout is not None
    assert process.stdout.readline().startswith("starting imagebus")
    output = _stop(process)
    assert process.returncode == 130, output
    assert "imagebus is up" not in output and "failed" not in output
    assert output.rstrip().endswith("stopped.")


def _script(tmp_path: Path, name: str, code: str) -> RoleProcess:
    ready_file = tmp_path / "run" / f"{name}.ready"
    env = {"IMAGEBUS_READY_FILE": str(ready_file)}
    process = ManagedProcess(name, [sys.executable, "-c", code], tmp_path / f"{name}.log", env=env)
    return RoleProcess(process, ready_file=ready_file)


def test_wait_until_ready_returns_once_every_role_reported(tmp_path: Path) -> None:
    report = "import os, time; from pathlib import Path; from imagebus.readiness import report_ready\n"
    report += "time.sleep(0.3); report_ready(Path(os.environ['IMAGEBUS_READY_FILE']), models=['m'])\n"
    report += "time.sleep(30)"
    children = [_script(tmp_path, f"role-{index}", report).start() for index in range(2)]
    try:
        wait_until_ready(children, timeout_s=60, started_at=time.monotonic(), stopping=lambda: False)
        assert all(child.process.alive() for child in children)
    finally:
        for child in children:
            child.process.kill()


def test_wait_until_ready_fails_when_a_role_exits_first(tmp_path: Path) -> None:
    crash = _script(tmp_path, "crasher", "import sys; print('cannot load the model'); sys.exit(3)").start()
    idle = _script(tmp_path, "idle", "import time; time.sleep(30)").start()
    try:
        with pytest.raises(StartupFailed) as failure:
            wait_until_ready([idle, crash], timeout_s=60, started_at=time.monotonic(), stopping=lambda: False)
        assert "crasher exited (code 3) before it was ready" in str(failure.value)
        assert "cannot load the model" in str(failure.value)
    finally:
        idle.process.kill()


def test_wait_until_ready_gives_up_after_its_timeout(tmp_path: Path) -> None:
    idle = _script(tmp_path, "idle", "import time; time.sleep(30)").start()
    try:
        with pytest.raises(StartupFailed, match=r"idle not ready after 0.5 s \(IMAGEBUS_UP_READY_TIMEOUT_S"):
            wait_until_ready([idle], timeout_s=0.5, started_at=time.monotonic(), stopping=lambda: False)
    finally:
        idle.process.kill()


def test_a_stale_ready_report_does_not_count(tmp_path: Path) -> None:
    child = _script(tmp_path, "idle", "import time; time.sleep(30)")
    assert child.ready_file is not None
    child.ready_file.parent.mkdir(parents=True)
    child.ready_file.write_text("{}")  # left by an earlier run that was killed
    child.start()
    try:
        with pytest.raises(StartupFailed, match="not ready"):
            wait_until_ready([child], timeout_s=0.5, started_at=time.monotonic(), stopping=lambda: False)
    finally:
        child.process.kill()


# --- which backends start ------------------------------------------------------------------------


def _started(choices: list[BackendChoice]) -> set[str]:
    return {choice.name for choice in choices if choice.start}


def test_unconfigured_backends_do_not_start_by_default() -> None:
    choices = {
        choice.name: choice
        for choice in choose_backends(load_catalog(), WorkerSettings(remote_tokens={}, storage_state_dir=None))
    }
    assert _started(list(choices.values())) == {"diffusers"}
    assert "IMAGEBUS_WORKER_REMOTE_TOKENS" in choices["remote"].reason
    assert "IMAGEBUS_WORKER_STORAGE_STATE_DIR" in choices["browser"].reason


def test_remote_starts_with_a_token_or_an_endpoint_that_needs_none() -> None:
    catalog = load_catalog()
    with_token = WorkerSettings(remote_tokens={"openai": SecretStr("sk-test")})
    choices = {choice.name: choice for choice in choose_backends(catalog, with_token)}
    assert choices["remote"].start and "via openai" in choices["remote"].reason
    assert "chutes" not in choices["remote"].reason  # still no token for it

    local = catalog.endpoints["chutes"].model_copy(update={"token_required": False})
    keyless = catalog.model_copy(update={"endpoints": {**catalog.endpoints, "chutes": local}})
    assert "remote" in _started(choose_backends(keyless, WorkerSettings(remote_tokens={})))


def test_browser_starts_only_with_a_stored_session(tmp_path: Path) -> None:
    catalog = load_catalog()
    choices = {c.name: c for c in choose_backends(catalog, WorkerSettings(storage_state_dir=tmp_path))}
    assert not choices["browser"].start and "weights.json" in choices["browser"].reason
    (tmp_path / "weights.json").write_text('{"cookies": [], "origins": []}')
    assert "browser" in _started(choose_backends(catalog, WorkerSettings(storage_state_dir=tmp_path)))


def test_backends_flag_forces_the_set() -> None:
    catalog = load_catalog()
    assert _started(choose_backends(catalog, WorkerSettings(), ["remote", "browser"])) == {"remote", "browser"}
    with pytest.raises(ValueError, match="unknown backend gpu"):
        choose_backends(catalog, WorkerSettings(), ["gpu"])
