"""Where a LoRA's weights are on this machine: a local file as is, a bucket object downloaded once.

Downloads land in a cache folder under a name derived from the object's bucket, key and ETag, so a
replaced object is fetched afresh and an unchanged one never twice. Each download goes to a temporary
file in the same folder and is renamed into place only when complete and of the stated size, so
several workers sharing the folder (or several threads of one) never see a partial file.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from pathlib import Path, PurePosixPath

import structlog
import urllib3
from minio import Minio
from minio.error import S3Error

from schemas import LoraSpec
from workers.backends.base import RetryableError

log = structlog.get_logger(__name__)

_CHUNK = 1024 * 1024
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NoSuchBucket"})
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class LoraFileError(Exception):
    """A LoRA whose weights cannot be had (missing, unsupported source): retrying will not help."""


class LoraFiles:
    """Resolves ``LoraSpec.source`` to a local ``.safetensors`` path. Blocking: call it off the loop."""

    def __init__(self, cache_dir: Path, s3: Minio | None) -> None:
        self.cache_dir = cache_dir
        self._s3 = s3
        # One download per cached file at a time within this process; other processes are safe by rename.
        self._locks: dict[Path, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def local_path(self, spec: LoraSpec) -> Path:
        """The weights of ``spec`` as a local file, downloading a bucket object on first use."""
        source = spec.source
        if source.startswith("s3://"):
            return self._cached_object(spec.id, source)
        if "://" in source:
            raise LoraFileError(
                f"LoRA {spec.id!r}: source {source!r} is not supported; "
                "use a local .safetensors path or s3://bucket/key"
            )
        return _local_file(spec.id, Path(source).expanduser())

    # --- s3 ------------------------------------------------------------------------------------

    def _cached_object(self, lora_id: str, source: str) -> Path:
        if self._s3 is None:
            raise LoraFileError(f"LoRA {lora_id!r} lives in S3 ({source}), but this worker has no S3 client")
        bucket, _, key = source.removeprefix("s3://").partition("/")
        if not bucket or not key:
            raise LoraFileError(f"LoRA {lora_id!r}: {source!r} is not of the form s3://bucket/key")
        try:
            stat = self._s3.stat_object(bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                raise LoraFileError(f"LoRA {lora_id!r}: {source} does not exist") from None
            raise RetryableError(f"LoRA {lora_id!r}: S3 answered {exc.code} for {source}", delay_s=5.0) from exc
        except urllib3.exceptions.HTTPError as exc:
            raise RetryableError(f"LoRA {lora_id!r}: S3 unreachable for {source}: {exc}", delay_s=5.0) from exc
        size = stat.size or 0
        target = self.cache_dir / _cache_name(bucket, key, stat.etag or "")
        with self._lock_for(target):
            if target.is_file() and target.stat().st_size == size:
                return target
            self._download(lora_id, bucket, key, size, target)
        return target

    def _download(self, lora_id: str, bucket: str, key: str, size: int, target: Path) -> None:
        assert self._s3 is not None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        log.info("lora.download", lora_id=lora_id, source=f"s3://{bucket}/{key}", bytes=size)
        handle, temporary = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{target.name}.", suffix=".part")
        try:
            written = 0
            with os.fdopen(handle, "wb") as file:
                response = self._s3.get_object(bucket, key)
                try:
                    for chunk in response.stream(_CHUNK):
                        file.write(chunk)
                        written += len(chunk)
                finally:
                    response.close()
                    response.release_conn()
            if written != size:
                raise RetryableError(
                    f"LoRA {lora_id!r}: downloaded {written} of {size} bytes of s3://{bucket}/{key}", delay_s=5.0
                )
            # Atomic on one filesystem: readers see the old state or the whole file, never a part.
            os.replace(temporary, target)
        except (S3Error, urllib3.exceptions.HTTPError) as exc:
            raise RetryableError(f"LoRA {lora_id!r}: download of s3://{bucket}/{key} failed: {exc}") from exc
        finally:
            # Gone already after the rename; otherwise the partial file must not linger.
            Path(temporary).unlink(missing_ok=True)

    def _lock_for(self, target: Path) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(target, threading.Lock())


def _cache_name(bucket: str, key: str, etag: str) -> str:
    """A flat, safe file name: a digest of where the object is and which version, then its own name."""
    digest = hashlib.sha256(f"{bucket}\0{key}\0{etag}".encode()).hexdigest()[:24]
    name = _UNSAFE_NAME.sub("_", PurePosixPath(key).name).lstrip(".") or "lora.safetensors"
    return f"{digest}-{name}"


def _local_file(lora_id: str, path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        # diffusers names a folder's weights file separately; one file in the folder is unambiguous.
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        raise LoraFileError(
            f"LoRA {lora_id!r}: folder {path} holds {len(files)} .safetensors files; name the file itself"
        )
    if path.is_absolute() or path.suffix == ".safetensors" or str(path).startswith("."):
        raise LoraFileError(f"LoRA {lora_id!r}: file {path} does not exist on this worker")
    raise LoraFileError(
        f"LoRA {lora_id!r}: source {str(path)!r} is neither a local file nor s3://bucket/key; "
        "Hugging Face hub ids are not supported for LoRAs (put the .safetensors file in the LoRA folder or bucket)"
    )
