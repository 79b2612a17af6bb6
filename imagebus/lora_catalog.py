"""The LoRA catalog found on disk or in a bucket: ``<stem>.safetensors`` files with optional sidecars.

Beside each ``<stem>.safetensors`` may lie a sidecar ``<stem>.json`` (name, tags, trigger_words, models,
description; A1111's ``activation text`` is read as trigger words too) and a preview
``<stem>.png|.jpg|.jpeg|.webp``. Without trigger words in a sidecar they come from the file's
safetensors header, as kohya's scripts and the modelspec standard write them; only the header is read,
never the tensors.

The public spec of a scanned LoRA names its preview by API path (``/api/loras/<id>/image``); where the
preview really lies stays in the scan's private ``previews`` map, which the ingress's image route serves.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import structlog
from minio import Minio
from minio.error import S3Error
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas import Catalog, LoraSpec

log = structlog.get_logger(__name__)

LORA_SUFFIX = ".safetensors"
PREVIEW_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# safetensors refuses headers over 100 MB; a larger length prefix means the file is not one.
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_SIDECAR_BYTES = 1024 * 1024
# Tags shared by every caption are a LoRA's trigger words; more ties than this means it has none.
MAX_TAG_TRIGGERS = 3
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def lora_image_path(lora_id: str) -> str:
    """The public URL path of a scanned LoRA's preview (served by ``ingress/routes/lora_images.py``)."""
    return f"/api/loras/{lora_id}/image"


def lora_id_for(stem: str) -> str:
    """A file stem as one safe token (letters, digits, ``_``, ``-``), as every id in imagebus is."""
    return _UNSAFE.sub("-", stem).strip("-")


@dataclass(frozen=True)
class LoraScan:
    """LoRAs found by a scan, and where their previews lie (a file path or ``s3://bucket/key``)."""

    loras: dict[str, LoraSpec] = field(default_factory=dict)
    previews: dict[str, str] = field(default_factory=dict)

    def plus(self, other: LoraScan) -> LoraScan:
        """Both scans together; on an id both found, this scan's LoRA (and preview) wins."""
        later = {lora_id: spec for lora_id, spec in other.loras.items() if lora_id not in self.loras}
        later_previews = {lora_id: where for lora_id, where in other.previews.items() if lora_id in later}
        return LoraScan({**self.loras, **later}, {**self.previews, **later_previews})

    def previews_in(self, catalog: Catalog) -> dict[str, str]:
        """The previews of the LoRAs ``catalog`` took from this scan (an inline entry may have won)."""
        return {
            lora_id: where
            for lora_id, where in self.previews.items()
            if catalog.loras.get(lora_id) == self.loras.get(lora_id)
        }


def merge_loras(catalog: Catalog, found: Mapping[str, LoraSpec]) -> Catalog:
    """``catalog`` with the ``found`` LoRAs added.

    Inline entries of the catalog file win on an id clash: an operator who wrote an entry by hand
    meant it, and a file dropped into the folder later must not silently replace it.
    """
    added = {lora_id: spec for lora_id, spec in found.items() if lora_id not in catalog.loras}
    for lora_id in found.keys() & catalog.loras.keys():
        log.info("lora.scan_shadowed", lora_id=lora_id, detail="the catalog file's inline entry wins")
    return catalog.model_copy(update={"loras": {**catalog.loras, **added}})


# --- sidecars and headers ---------------------------------------------------------------------


def _word_list(value: Any) -> Any:
    """A list of words, or one comma-separated string of them (as A1111 writes its activation text)."""
    if isinstance(value, str):
        return [word.strip() for word in value.split(",") if word.strip()]
    return value


class LoraSidecar(BaseModel):
    """``<stem>.json``. Keys other tools write (A1111's notes, weights) are allowed and ignored."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    tags: tuple[str, ...] = ()
    trigger_words: tuple[str, ...] = Field(default=(), alias="activation text")
    models: tuple[str, ...] = ()

    @field_validator("tags", "trigger_words", "models", mode="before")
    @classmethod
    def _words(cls, value: Any) -> Any:
        return _word_list(value)


def header_length(prefix: bytes) -> int:
    """The JSON header's length from a safetensors file's first 8 bytes (little-endian u64)."""
    if len(prefix) != 8:
        raise ValueError("shorter than a safetensors header")
    (length,) = struct.unpack("<Q", prefix)
    if not 2 <= length <= MAX_HEADER_BYTES:
        raise ValueError(f"not a safetensors file (header length {length})")
    return int(length)


def header_metadata(header: bytes) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors JSON header (training tools put their notes there)."""
    try:
        parsed = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a safetensors file (header is not JSON: {exc})") from None
    if not isinstance(parsed, dict):
        raise ValueError("not a safetensors file (header is not a JSON object)")
    metadata = parsed.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        return {}
    return {str(key): value for key, value in metadata.items() if isinstance(value, str)}


def read_file_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a local safetensors file, reading only the header."""
    with path.open("rb") as file:
        length = header_length(file.read(8))
        header = file.read(length)
    if len(header) != length:
        raise ValueError("not a safetensors file (truncated header)")
    return header_metadata(header)


def trigger_words_from_metadata(metadata: Mapping[str, str]) -> tuple[str, ...]:
    """Trigger words as training tools record them: ``modelspec.trigger_phrase``, else kohya's tags.

    kohya's ``ss_tag_frequency`` counts caption tags per dataset folder. A LoRA's trigger words are the
    tags every caption carries, so per folder the most frequent tags are taken, unless so many tie
    that none stands out (captions without a shared trigger).
    """
    phrase = metadata.get("modelspec.trigger_phrase", "")
    if phrase.strip():
        return tuple(_word_list(phrase))
    try:
        frequencies = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except json.JSONDecodeError:
        return ()
    if not isinstance(frequencies, dict):
        return ()
    words: list[str] = []
    for tags in frequencies.values():
        if not isinstance(tags, dict):
            continue
        counts = {str(tag).strip(): count for tag, count in tags.items() if isinstance(count, int) and str(tag).strip()}
        if not counts:
            continue
        top = max(counts.values())
        leaders = [tag for tag, count in counts.items() if count == top]
        if len(leaders) <= MAX_TAG_TRIGGERS:
            words.extend(tag for tag in leaders if tag not in words)
    return tuple(words)


def _spec(lora_id: str, stem: str, source: str, sidecar: LoraSidecar | None, header: Mapping[str, str]) -> LoraSpec:
    sidecar = sidecar or LoraSidecar()
    return LoraSpec(
        id=lora_id,
        name=sidecar.name or header.get("modelspec.title", "").strip() or stem,
        source=source,
        tags=sidecar.tags or tuple(_word_list(header.get("modelspec.tags", ""))),
        trigger_words=sidecar.trigger_words or trigger_words_from_metadata(header),
        models=sidecar.models,
    )


class _Found:
    """Collects scanned LoRAs, refusing a second file whose stem makes an id already taken."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.scan = LoraScan()

    def claim(self, stem: str, location: str) -> str | None:
        lora_id = lora_id_for(stem)
        if not lora_id:
            log.warning("lora.scan_skipped", where=self.where, file=location, reason="no usable id in the file name")
            return None
        if lora_id in self.scan.loras:
            log.warning(
                "lora.scan_skipped",
                where=self.where,
                file=location,
                reason=f"id {lora_id!r} already taken by {self.scan.loras[lora_id].source}",
            )
            return None
        return lora_id

    def add(self, spec: LoraSpec, preview: str | None) -> None:
        if preview is not None:
            spec = spec.model_copy(update={"image": lora_image_path(spec.id)})
            self.scan.previews[spec.id] = preview
        self.scan.loras[spec.id] = spec


# --- a folder ---------------------------------------------------------------------------------


def scan_lora_folder(folder: Path) -> LoraScan:
    """Every ``*.safetensors`` under ``folder`` (recursively); bad files are logged and skipped."""
    if not folder.is_dir():
        raise FileNotFoundError(f"LoRA folder {folder} does not exist or is not a folder")
    found = _Found(str(folder))
    # Shallower files first, so on an id clash the top-level file wins over one in a subfolder.
    for path in sorted(folder.rglob(f"*{LORA_SUFFIX}"), key=lambda p: (len(p.parts), p)):
        if not path.is_file():
            continue
        lora_id = found.claim(path.stem, str(path))
        if lora_id is None:
            continue
        try:
            # The header is read even when the sidecar says everything: a file that is not a safetensors
            # file is refused here, not at its first job.
            header = read_file_metadata(path)
            spec = _spec(lora_id, path.stem, str(path.resolve()), _folder_sidecar(path.with_suffix(".json")), header)
        except (OSError, ValueError) as exc:
            log.warning("lora.scan_skipped", where=found.where, file=str(path), reason=str(exc))
            continue
        preview = next((p for p in map(path.with_suffix, PREVIEW_SUFFIXES) if p.is_file()), None)
        found.add(spec, str(preview.resolve()) if preview else None)
    log.info("lora.scan_done", where=found.where, loras=len(found.scan.loras))
    return found.scan


def _folder_sidecar(path: Path) -> LoraSidecar | None:
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_SIDECAR_BYTES:
        raise ValueError(f"sidecar {path.name} is over {MAX_SIDECAR_BYTES} bytes")
    return _parse_sidecar(path.name, path.read_bytes())


def _parse_sidecar(name: str, raw: bytes) -> LoraSidecar:
    # ValidationError is a ValueError, so a bad sidecar skips its LoRA with the reason logged.
    try:
        return LoraSidecar.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"sidecar {name} is invalid: {problems}") from None


# --- a bucket ---------------------------------------------------------------------------------


def scan_lora_bucket(client: Minio, bucket: str, prefix: str = "") -> LoraScan:
    """Every ``*.safetensors`` object under ``prefix`` in ``bucket``; sidecars and previews beside them.

    Sources are ``s3://<bucket>/<key>``, which the workers' ``LoraFiles`` download and cache.
    """
    keys = sorted(
        (
            item.object_name
            for item in client.list_objects(bucket, prefix=prefix, recursive=True)
            if item.object_name and not item.is_dir
        ),
        key=lambda key: (key.count("/"), key),  # as in a folder: the shallower object wins an id clash
    )
    present = set(keys)
    found = _Found(f"s3://{bucket}/{prefix}")
    for key in keys:
        stem_key, suffix = _split_suffix(key)
        if suffix != LORA_SUFFIX:
            continue
        stem = PurePosixPath(stem_key).name
        lora_id = found.claim(stem, f"s3://{bucket}/{key}")
        if lora_id is None:
            continue
        try:
            header = _object_metadata(client, bucket, key)
            sidecar_key = stem_key + ".json"
            sidecar = _bucket_sidecar(client, bucket, sidecar_key) if sidecar_key in present else None
            spec = _spec(lora_id, stem, f"s3://{bucket}/{key}", sidecar, header)
        except (S3Error, ValueError) as exc:
            log.warning("lora.scan_skipped", where=found.where, file=key, reason=str(exc))
            continue
        preview = next((stem_key + s for s in PREVIEW_SUFFIXES if stem_key + s in present), None)
        found.add(spec, f"s3://{bucket}/{preview}" if preview else None)
    log.info("lora.scan_done", where=found.where, loras=len(found.scan.loras))
    return found.scan


def _split_suffix(key: str) -> tuple[str, str]:
    suffix = PurePosixPath(key).suffix
    return key[: len(key) - len(suffix)], suffix.lower()


def _read_range(client: Minio, bucket: str, key: str, offset: int, length: int) -> bytes:
    """At most ``length`` bytes of an object from ``offset`` (one ranged GET)."""
    response = client.get_object(bucket, key, offset=offset, length=length)
    try:
        data: bytes = response.read(length)
    finally:
        response.close()
        response.release_conn()
    return data


def _bucket_sidecar(client: Minio, bucket: str, key: str) -> LoraSidecar:
    raw = _read_range(client, bucket, key, 0, MAX_SIDECAR_BYTES + 1)
    if len(raw) > MAX_SIDECAR_BYTES:
        raise ValueError(f"sidecar {key} is over {MAX_SIDECAR_BYTES} bytes")
    return _parse_sidecar(key, raw)


def _object_metadata(client: Minio, bucket: str, key: str) -> dict[str, str]:
    """The header metadata of a safetensors object: two ranged GETs, the tensors are never fetched."""
    length = header_length(_read_range(client, bucket, key, 0, 8))
    header = _read_range(client, bucket, key, 8, length)
    if len(header) != length:
        raise ValueError("not a safetensors file (truncated header)")
    return header_metadata(header)
