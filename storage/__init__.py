"""Image bytes in S3 (object store, presigned URLs) and the reaper that deletes them at expiry."""

from storage.object_store import (
    ExpiringObject,
    ObjectMissing,
    ObjectStore,
    S3Config,
    StoredObject,
)
from storage.reaper import reap_expired, run_reaper

__all__ = [
    "ExpiringObject",
    "ObjectMissing",
    "ObjectStore",
    "S3Config",
    "StoredObject",
    "reap_expired",
    "run_reaper",
]
