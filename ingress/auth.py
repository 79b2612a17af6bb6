"""API keys: who is calling, as an owner id that never reveals the key."""

from __future__ import annotations

import hashlib
import hmac

from litestar.connection import ASGIConnection

from ingress.errors import ApiError

# The owner of every keyless request when anonymous access is allowed.
ANONYMOUS_OWNER = "anonymous"


class KeyRing:
    """Maps presented API keys to owner ids.

    The owner id is an HMAC of the key under a server secret: the read model stores owner ids,
    never keys, and a lookup by digest does not leak key bytes through comparison timing.
    """

    def __init__(
        self,
        keys: tuple[str, ...],
        secret: str,
        *,
        admin_keys: tuple[str, ...] = (),
        allow_anonymous: bool = False,
    ) -> None:
        if not keys and not allow_anonymous:
            raise ValueError("no API keys configured: set IMAGEBUS_API_KEYS (refusing to run open)")
        self._secret = secret.encode()
        self._owners = {self._digest(key): self._digest(key)[:32] for key in (*keys, *admin_keys)}
        self._admins = {self._digest(key)[:32] for key in admin_keys}
        self.allow_anonymous = allow_anonymous

    def _digest(self, key: str) -> str:
        return hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()

    def owner_for_key(self, key: str | None) -> str | None:
        if not key:
            return None
        return self._owners.get(self._digest(key))

    def is_admin(self, owner: str) -> bool:
        return owner in self._admins


def presented_key(connection: ASGIConnection) -> str | None:
    """The key from ``X-API-Key`` or ``Authorization: Bearer <key>``."""
    key = connection.headers.get("x-api-key")
    if key:
        return key.strip()
    authorization = connection.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def require_owner(keyring: KeyRing, connection: ASGIConnection) -> str:
    key = presented_key(connection)
    if key is None and keyring.allow_anonymous:
        return ANONYMOUS_OWNER
    owner = keyring.owner_for_key(key)
    if owner is None:
        raise ApiError(401, "missing or invalid API key: send X-API-Key or Authorization: Bearer")
    return owner


def require_admin(keyring: KeyRing, connection: ASGIConnection) -> str:
    owner = require_owner(keyring, connection)
    if not keyring.is_admin(owner):
        raise ApiError(403, "this route needs an admin key (IMAGEBUS_ADMIN_KEYS)")
    return owner
