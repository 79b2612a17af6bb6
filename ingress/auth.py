"""API keys: who is calling (an owner id that never reveals the key), in which role, with which quota.

Two sources of keys: the ingress's configuration (IMAGEBUS_API_KEYS / IMAGEBUS_ADMIN_KEYS, what
tests and ``imagebus up`` use) and the database (``imagebus keys create``, ``POST /api/keys``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import time
from collections import OrderedDict
from dataclasses import dataclass

import structlog
from litestar.connection import ASGIConnection

from ingress.config import KEY_CACHE_S, QuotaLimits
from ingress.errors import ApiError
from ingress.keys import DEVELOPMENT_KEY_SECRET, ApiKey, KeyStore, StoredKey, key_id_of

log = structlog.get_logger(__name__)

# The owner of every keyless request when anonymous access is allowed.
ANONYMOUS_OWNER = "anonymous"
# Remembered ids, unknown ones included (a stream of made-up ids must not grow memory without end).
_CACHED_IDS = 10_000


@dataclass(frozen=True)
class Principal:
    """The caller, as routes need it."""

    owner: str
    is_admin: bool
    # This key's limits: its own where it has them, the ingress's defaults otherwise.
    quota: QuotaLimits


class KeyRing:
    """Maps presented API keys to principals.

    A configured key's owner id is an HMAC of the key under the server secret: the read model
    stores owner ids, never keys, and a lookup by digest does not leak key bytes through
    comparison timing. A database key's owner id is ``key_<id>`` (its public part); the row is
    read at most once per ``cache_s`` per id and its hash compared in constant time.
    """

    def __init__(
        self,
        keys: tuple[str, ...],
        secret: str,
        *,
        admin_keys: tuple[str, ...] = (),
        allow_anonymous: bool = False,
        store: KeyStore | None = None,
        quota: QuotaLimits | None = None,
        cache_s: float = KEY_CACHE_S,
    ) -> None:
        if not keys and store is None and not allow_anonymous:
            raise ValueError("no API keys configured: set IMAGEBUS_API_KEYS (refusing to run open)")
        if secret == DEVELOPMENT_KEY_SECRET:
            log.warning(
                "key_secret_is_the_development_default",
                message="IMAGEBUS_KEY_SECRET is the built-in development value: anyone who has read the source "
                "can forge owner ids. Set IMAGEBUS_KEY_SECRET to a long random value before serving real traffic.",
            )
        self._secret = secret.encode()
        self._owners = {self._digest(key): self._digest(key)[:32] for key in (*keys, *admin_keys)}
        self._admins = {self._digest(key)[:32] for key in admin_keys}
        self.allow_anonymous = allow_anonymous
        self.store = store
        self.quota = quota or QuotaLimits()
        self._cache_s = cache_s
        self._cached: OrderedDict[str, tuple[float, StoredKey | None]] = OrderedDict()

    def _digest(self, key: str) -> str:
        return hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()

    async def principal_for_key(self, key: str | None) -> Principal | None:
        """Who ``key`` is, or None when it is no live key."""
        if not key:
            return None
        owner = self._owners.get(self._digest(key))
        if owner is not None:
            return Principal(owner, owner in self._admins, self.quota)
        record = await self._database_key(key)
        if record is None:
            return None
        limits = {name: getattr(record, name) for name in ("daily_images", "active_jobs")}
        quota = dataclasses.replace(self.quota, **{k: v for k, v in limits.items() if v is not None})
        return Principal(record.owner, record.is_admin, quota)

    async def _database_key(self, key: str) -> ApiKey | None:
        key_id = key_id_of(key)
        if self.store is None or key_id is None:
            return None
        now = time.monotonic()
        cached = self._cached.get(key_id)
        if cached is None or now - cached[0] > self._cache_s:
            cached = (now, await self.store.lookup(key_id))
            self._cached[key_id] = cached
            self._cached.move_to_end(key_id)
            while len(self._cached) > _CACHED_IDS:
                self._cached.popitem(last=False)
        stored = cached[1]
        return stored.record if stored is not None and self.store.matches(stored, key) else None

    def forget(self, key_id: str) -> None:
        """Drop what this replica remembers of a key (after revoking it here)."""
        self._cached.pop(key_id, None)


def presented_key(connection: ASGIConnection) -> str | None:
    """The key from ``X-API-Key`` or ``Authorization: Bearer <key>`` (the first of each header).

    Read from the ASGI scope's raw headers (their names are lower case there), not through
    ``connection.headers``: building that mapping cost more than the rest of the key check.
    """
    api_key: bytes | None = None
    authorization: bytes | None = None
    for name, value in connection.scope["headers"]:
        if name == b"x-api-key":
            if api_key is None:
                api_key = value
        elif name == b"authorization" and authorization is None:
            authorization = value
    if api_key is not None and (key := api_key.decode("latin-1").strip()):
        return key
    scheme, _, token = (authorization or b"").decode("latin-1").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


async def require_owner(keyring: KeyRing, connection: ASGIConnection) -> Principal:
    key = presented_key(connection)
    if key is None and keyring.allow_anonymous:
        return Principal(ANONYMOUS_OWNER, False, keyring.quota)
    principal = await keyring.principal_for_key(key)
    if principal is None:
        raise ApiError(401, "missing or invalid API key: send X-API-Key or Authorization: Bearer")
    return principal


async def require_admin(keyring: KeyRing, connection: ASGIConnection) -> Principal:
    principal = await require_owner(keyring, connection)
    if not principal.is_admin:
        raise ApiError(403, "this route needs an admin key (IMAGEBUS_ADMIN_KEYS or `imagebus keys create --admin`)")
    return principal
