"""A longer schemathesis campaign than the test's, against a real ``imagebus ingress`` process.

The ingress runs as the CLI starts it (its settings from the environment, uvicorn with the
hardening options of ``imagebus/roles.py``) over its own NATS and SeaweedFS S3 and a SQLite read
model; no workers, so jobs stay pending. Every operation of /docs/openapi.json is fuzzed as four
callers: a user key, an admin key, no key and a wrong key, each with the checks of
``tests/fuzz_campaign.py`` (no 5xx; status code, content type and body as documented).

Usage: python bench/fuzz.py [--max-examples 50] [--seed N] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

import httpx

from imagebus.nats_server import start_nats
from imagebus.process import ManagedProcess, free_port
from imagebus.s3_server import start_s3_server
from storage.object_store import ObjectStore, S3Config

# The campaign itself is the test's (tests/ is not an installed package): run from anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fuzz_campaign import CampaignResult, run_campaign

USER_KEY = "ib_fuzz_user_" + secrets.token_hex(16)
ADMIN_KEY = "ib_fuzz_admin_" + secrets.token_hex(16)
CALLERS = {
    "user key": {"X-API-Key": USER_KEY},
    "admin key": {"X-API-Key": ADMIN_KEY},
    "no key": {},
    "wrong key": {"X-API-Key": "ib_fuzz_wrong_" + secrets.token_hex(16)},
}


def start_ingress(root: Path, nats_url: str, s3: S3Config) -> tuple[ManagedProcess, str]:
    port = free_port()
    env = {
        "IMAGEBUS_BUS_URL": nats_url,
        "IMAGEBUS_BUS_NAMESPACE": "fuzz",
        "IMAGEBUS_S3_ENDPOINT": s3.endpoint,
        "IMAGEBUS_S3_ACCESS_KEY": s3.access_key,
        "IMAGEBUS_S3_SECRET_KEY": s3.secret_key,
        "IMAGEBUS_S3_BUCKET": s3.bucket,
        "IMAGEBUS_DATABASE_URL": f"sqlite:///{root}/readmodel.db",
        "IMAGEBUS_API_KEYS": USER_KEY,
        "IMAGEBUS_ADMIN_KEYS": ADMIN_KEY,
        "IMAGEBUS_KEY_SECRET": secrets.token_hex(16),
        # The campaign sends far more than a client may: rate limits would answer most of it 429.
        "IMAGEBUS_INGRESS_RATE_LIMIT_KEY": "0",
        "IMAGEBUS_INGRESS_RATE_LIMIT_IP": "0",
        "IMAGEBUS_LOG_FORMAT": "json",
    }
    process = ManagedProcess(
        name="ingress",
        argv=[sys.executable, "-m", "imagebus", "ingress", "--port", str(port)],
        log_path=root / "ingress.log",
        env=env,
    ).start()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return process, base_url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or process.process is None or process.process.poll() is not None:
            raise SystemExit(f"the ingress did not start; see {root / 'ingress.log'}")
        time.sleep(0.2)


def report(name: str, result: CampaignResult) -> None:
    print(f"{name:>10}: {result.operations} operations, {result.cases} cases, {len(result.failures)} failures")
    for failure in result.failures:
        print(f"    {failure}")
    for error in result.errors:
        print(f"    engine error: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-examples", type=int, default=50, help="per operation and phase (default 50)")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: random)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)

    with tempfile.TemporaryDirectory(prefix="imagebus-fuzz-") as tmp:
        root = Path(tmp)
        nats_port = free_port()
        nats = start_nats(root / "nats", nats_port, root / "nats.log")
        s3_server = start_s3_server(
            root / "s3", access_key="fuzz", secret_key=secrets.token_hex(16), log_path=root / "weed.log"
        )
        ingress: ManagedProcess | None = None
        try:
            s3 = S3Config(
                endpoint=s3_server.endpoint,
                access_key=s3_server.access_key,
                secret_key=s3_server.secret_key,
                bucket="fuzz",
            )
            asyncio.run(ObjectStore(s3).ensure_bucket())
            ingress, base_url = start_ingress(root, f"nats://127.0.0.1:{nats_port}", s3)
            print(f"schemathesis over {base_url}/docs/openapi.json, max {args.max_examples} examples, seed {seed}")
            results: dict[str, CampaignResult] = {}
            started = time.monotonic()
            for name, headers in CALLERS.items():
                results[name] = run_campaign(base_url, headers=headers, max_examples=args.max_examples, seed=seed)
                report(name, results[name])
            healthy = httpx.get(f"{base_url}/health", timeout=5).status_code == 200
            alive = ingress.process is not None and ingress.process.poll() is None
        finally:
            if ingress is not None:
                ingress.stop(grace_s=10)
            s3_server.stop(grace_s=3)
            nats.stop(grace_s=5)

    operations = max(result.operations for result in results.values())
    cases = sum(result.cases for result in results.values())
    failures = sum(len(result.failures) for result in results.values())
    errors = sum(len(result.errors) for result in results.values())
    print(
        f"total: {operations} operations, {cases} cases, {failures} failures, {errors} engine errors "
        f"in {time.monotonic() - started:.0f} s; ingress {'healthy' if healthy and alive else 'NOT healthy'} after"
    )
    if args.json is not None:
        figures = {
            "operations": operations,
            "cases": cases,
            "failures": failures,
            "engine_errors": errors,
            "max_examples": args.max_examples,
            "seed": seed,
            "healthy_after": healthy and alive,
            "callers": {
                name: {"cases": r.cases, "failures": [str(f) for f in r.failures]} for name, r in results.items()
            },
        }
        args.json.write_text(json.dumps(figures, indent=2))
    if failures or errors or not (healthy and alive):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
