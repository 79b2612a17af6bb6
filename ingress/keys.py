"""API keys kept in the database (``imagebus keys``, ``/api/keys``): issue, list, revoke, verify.

A key reads ``ib_<id>_<secret>``: ``id`` (12 hex digits) is public, the row's primary key and
what ``revoke`` takes; ``secret`` is 256 random bits. The row keeps only an HMAC-SHA256 of the
whole key under the server secret (IMAGEBUS_KEY_SECRET), so neither a database dump nor a log
line holds anything that authenticates. The key itself is shown once, when it is made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import structlog
from sqlalchemy import Connection, RowMapping, select, update

from projector.database import Database
from projector.tables import api_keys

log = structlog.get_logger(__name__)

Role = Literal["user", "admin"]
KEY_PREFIX = "ib_"
# The IngressSettings default: fine on a laptop, but anyone who reads the source can mint owner
# ids with it, so the ingress warns when it runs with it.
DEVELOPMENT_KEY_SECRET = "imagebus-dev-secret"
# ``[A-Za-z0-9_-]``: what ``secrets.token_urlsafe`` writes (43 characters for 32 bytes).
_KEY = re.compile(r"^ib_(?P<id>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_-]{20,200})$")
_NAME_CHARS = 200


@dataclass(frozen=True)
class ApiKey:
    """What may be shown about a key: everything but its hash."""

    id: str
    name: str
    role: Role
    # Per-key quotas; None: the ingress's defaults.
    daily_images: int | None
    active_jobs: int | None
    created_at: datetime
    revoked_at: datetime | None

    @property
    def owner(self) -> str:
        """The owner id its jobs and images are recorded under."""
        return f"key_{self.id}"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class IssuedKey:
    record: ApiKey
    # The only copy there will ever be: hand it to the caller, never log or store it.
    key: str


@dataclass(frozen=True)
class StoredKey:
    record: ApiKey
    key_hash: str


def key_id_of(key: str) -> str | None:
    """The id part of a key shaped like ours, else None (env keys and garbage alike)."""
    match = _KEY.match(key)
    return match["id"] if match else None


def key_hash(server_secret: str, key: str) -> str:
    return hmac.new(server_secret.encode(), key.encode(), hashlib.sha256).hexdigest()


def _record(row: RowMapping) -> ApiKey:
    return ApiKey(
        id=row["id"],
        name=row["name"],
        role=row["role"],
        daily_images=row["daily_images"],
        active_jobs=row["active_jobs"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


class KeyStore:
    """The ``api_keys`` table, and the one place a presented key is checked against it."""

    def __init__(self, database: Database, server_secret: str) -> None:
        self._database = database
        self._secret = server_secret

    async def create(
        self, name: str, *, role: Role = "user", daily_images: int | None = None, active_jobs: int | None = None
    ) -> IssuedKey:
        name = name.strip()
        if not 0 < len(name) <= _NAME_CHARS:
            raise ValueError(f"a key's name must be 1 to {_NAME_CHARS} characters")
        for label, value in (("daily_images", daily_images), ("active_jobs", active_jobs)):
            if value is not None and value < 0:
                raise ValueError(f"{label} must be 0 or more, got {value}")
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        record = ApiKey(key_id, name, role, daily_images, active_jobs, datetime.now(UTC), None)
        row = {**dataclasses.asdict(record), "key_hash": key_hash(self._secret, key)}
        await self._database.write(lambda conn: conn.execute(api_keys.insert(), row))
        log.info("api_key_created", key_id=key_id, name=name, role=role)
        return IssuedKey(record, key)

    async def list(self) -> list[ApiKey]:
        """Every key, oldest first, revoked ones included."""

        def select_all(conn: Connection) -> list[ApiKey]:
            rows = conn.execute(select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)).mappings()
            return [_record(row) for row in rows]

        return await self._database.read(select_all)

    async def revoke(self, key_id: str) -> ApiKey | None:
        """Mark the key revoked (once; a second revoke keeps the first time). None: no such key."""

        def mark(conn: Connection) -> ApiKey | None:
            conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            )
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).mappings().first()
            return None if row is None else _record(row)

        revoked = await self._database.write(mark)
        if revoked is not None:
            log.info("api_key_revoked", key_id=key_id)
        return revoked

    async def lookup(self, key_id: str) -> StoredKey | None:
        """The row of ``key_id`` with its hash, for ``matches`` (and for a caller's cache)."""

        def select_one(conn: Connection) -> StoredKey | None:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).mappings().first()
            return None if row is None else StoredKey(_record(row), row["key_hash"])

        return await self._database.read(select_one)

    def matches(self, stored: StoredKey, key: str) -> bool:
        """The presented key is this row's, and the row is not revoked (constant-time comparison)."""
        same = hmac.compare_digest(key_hash(self._secret, key), stored.key_hash)
        return same and stored.record.revoked_at is None

    async def verify(self, key: str) -> ApiKey | None:
        """The live key ``key`` is, or None (unknown, wrong secret part, or revoked). Uncached."""
        key_id = key_id_of(key)
        stored = None if key_id is None else await self.lookup(key_id)
        return stored.record if stored is not None and self.matches(stored, key) else None
