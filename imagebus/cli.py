"""imagebus: run the whole embedded stack (up) or one role (ingress, worker, projector, reaper)."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any


def _parser() -> argparse.ArgumentParser:
    from imagebus.keys_cli import add_keys_parser

    parser = argparse.ArgumentParser(prog="imagebus", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the whole stack on this machine (NATS, S3, SQLite, every role)")
    up.add_argument("--port", type=int, default=8000, help="ingress port (default 8000)")
    up.add_argument("--host", default="127.0.0.1", help="ingress address (default 127.0.0.1)")
    up.add_argument("--data-dir", type=Path, default=Path(".imagebus"), help="where state lives")
    up.add_argument("--workers", type=int, default=1, help="diffusers worker processes (default 1)")
    up.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="CPU threads of each diffusers worker's model (default: the machine's cores shared among the workers)",
    )
    up.add_argument("--model", default=None, help="default model: a catalog id, hub id or local folder")
    up.add_argument(
        "--backends",
        default=None,
        help="worker pools to start, comma-separated (diffusers,remote,browser); default: each one with "
        "something to run (diffusers; remote with a usable endpoint; browser with a stored session)",
    )

    ingress = sub.add_parser("ingress", help="the HTTP API")
    ingress.add_argument("--host", default=None)
    ingress.add_argument("--port", type=int, default=None)

    worker = sub.add_parser("worker", help="a worker for one backend")
    worker.add_argument("--backend", default=None, choices=["diffusers", "remote", "browser"], help="default diffusers")
    worker.add_argument("--pool", default=None, help="serve only this catalog pool's models (its own queue)")

    projector = sub.add_parser("projector", help="events → read model")
    projector.add_argument("--rebuild", action="store_true", help="replay the whole log into a fresh model")

    sub.add_parser("reaper", help="deletes images at expiry and emits ImageExpired")
    add_keys_parser(sub)
    return parser


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run a role on uvloop where it is installed (faster bus and HTTP I/O), else on asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def _configure(role_settings: Any, role: str) -> None:
    """Logs and traces of one role process, from its settings."""
    from imagebus.logging import configure_logging
    from imagebus.observability import configure_tracing

    configure_logging(role_settings.log_format, role_settings.log_level)
    configure_tracing(role_settings.service_name or f"imagebus-{role}", role_settings.otlp_endpoint)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    from imagebus import settings
    from imagebus.logging import configure_logging

    if args.command == "up":
        from imagebus.launcher import run_stack

        launcher = settings.LauncherSettings()
        configure_logging(launcher.log_format, launcher.log_level)
        # The workers' settings too: which backends have something to run decides which start.
        raise SystemExit(run_stack(launcher, settings.WorkerSettings(), args))
    # Not imported for `up`: every module the launcher loads delays the first process it starts.
    from imagebus import roles

    if args.command == "ingress":
        overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
        ingress = settings.IngressSettings(**overrides)
        _configure(ingress, "ingress")
        _run(roles.run_ingress(ingress))
    elif args.command == "worker":
        overrides = {k: v for k, v in {"backend": args.backend, "pool": args.pool}.items() if v is not None}
        worker = settings.WorkerSettings(**overrides)
        _configure(worker, f"worker-{worker.backend}")
        _run(roles.run_worker(worker))
    elif args.command == "projector":
        projector = settings.ProjectorSettings()
        _configure(projector, "projector")
        _run(roles.run_projector(projector, rebuild_first=args.rebuild))
    elif args.command == "reaper":
        reaper = settings.ReaperSettings()
        _configure(reaper, "reaper")
        _run(roles.run_reaper(reaper))
    elif args.command == "keys":
        from imagebus.keys_cli import run_keys

        keys = settings.KeysSettings()
        configure_logging(keys.log_format, keys.log_level)
        raise SystemExit(run_keys(keys, args))


if __name__ == "__main__":
    main()
