"""What the ingress needs to run, built by the CLI from IngressSettings and passed in."""

from __future__ import annotations

from dataclasses import dataclass

from bus import BusOptions
from schemas import Catalog
from storage.object_store import S3Config


@dataclass(frozen=True)
class IngressConfig:
    bus_url: str
    bus_options: BusOptions
    s3: S3Config
    database_url: str
    catalog: Catalog
    api_keys: tuple[str, ...]
    key_secret: str
    max_body_bytes: int = 64 * 1024
