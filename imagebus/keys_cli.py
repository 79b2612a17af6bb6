"""``imagebus keys create | list | revoke``: API keys in the database every ingress replica reads.

The new key goes alone to stdout (``KEY=$(imagebus keys create --name ci)``); everything said
about it goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imagebus.settings import KeysSettings
    from ingress.keys import ApiKey, KeyStore


def add_keys_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="API keys: create, list, revoke (IMAGEBUS_DATABASE_URL, IMAGEBUS_KEY_SECRET)")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser("create", help="make a key and print it (once: only its hash is kept)")
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument("--admin", action="store_true", help="may manage keys, reset the queue, read any owner's jobs")
    create.add_argument("--daily-images", type=_count, default=None, help="images per UTC day (default: ingress's)")
    create.add_argument("--active-jobs", type=_count, default=None, help="jobs queued or running at once")
    actions.add_parser("list", help="every key: id, name, role, quotas, created, revoked (never the key)")
    revoke = actions.add_parser("revoke", help="stop accepting a key")
    revoke.add_argument("key_id", metavar="ID", help="the key's id (the 12 hex digits after ib_)")


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def run_keys(settings: KeysSettings, args: argparse.Namespace) -> int:
    # Imported here: the parser above is built for every imagebus command, this only for `keys`.
    from ingress.keys import DEVELOPMENT_KEY_SECRET

    secret = settings.key_secret.get_secret_value()
    if secret == DEVELOPMENT_KEY_SECRET:
        print(
            "warning: IMAGEBUS_KEY_SECRET is not set; keys are hashed with the development default and only an "
            "ingress running with that same default will accept them (for a stack `imagebus up` started, "
            "load its settings first: `set -a; . .imagebus/env; set +a`)",
            file=sys.stderr,
        )
    return asyncio.run(_run(settings.database_url, secret, args))


async def _run(database_url: str, secret: str, args: argparse.Namespace) -> int:
    from ingress.keys import KeyStore
    from projector.database import create_database, create_schema

    database = create_database(database_url)
    try:
        await create_schema(database)
        store = KeyStore(database, secret)
        if args.keys_command == "create":
            return await _create(store, args)
        if args.keys_command == "list":
            _print_table(await store.list())
            return 0
        return await _revoke(store, args.key_id)
    finally:
        await database.dispose()


async def _create(store: KeyStore, args: argparse.Namespace) -> int:
    try:
        issued = await store.create(
            args.name,
            role="admin" if args.admin else "user",
            daily_images=args.daily_images,
            active_jobs=args.active_jobs,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    record = issued.record
    print(issued.key)
    print(
        f"Created {record.role} key {record.id} ({record.name}); quotas: {_quotas(record)}.\n"
        "This is the only time the key is shown: it is stored as a hash and cannot be recovered.",
        file=sys.stderr,
    )
    return 0


async def _revoke(store: KeyStore, key_id: str) -> int:
    from ingress.config import KEY_CACHE_S

    revoked = await store.revoke(key_id)
    if revoked is None:
        print(f"error: no key with id {key_id!r} (see `imagebus keys list`)", file=sys.stderr)
        return 1
    print(
        f"Revoked key {revoked.id} ({revoked.name}) at {_time(revoked.revoked_at)}. Ingress replicas "
        f"remember keys for up to {KEY_CACHE_S:g} s, so each refuses it within that time."
    )
    return 0


def _quotas(record: ApiKey) -> str:
    daily = "default" if record.daily_images is None else str(record.daily_images)
    active = "default" if record.active_jobs is None else str(record.active_jobs)
    return f"daily images {daily}, active jobs {active}"


def _time(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _print_table(records: list[ApiKey]) -> None:
    header = ("ID", "NAME", "ROLE", "DAILY_IMAGES", "ACTIVE_JOBS", "CREATED", "REVOKED")
    rows = [
        (
            record.id,
            record.name,
            record.role,
            "default" if record.daily_images is None else str(record.daily_images),
            "default" if record.active_jobs is None else str(record.active_jobs),
            _time(record.created_at),
            _time(record.revoked_at),
        )
        for record in records
    ]
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
