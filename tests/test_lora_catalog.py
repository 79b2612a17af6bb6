"""The LoRA catalog: folder and bucket scans, the workers' download cache, the preview route."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import AsyncIterator, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
from litestar import Litestar
from litestar.datastructures import State
from litestar.testing import AsyncTestClient
from minio import Minio
from safetensors.numpy import save

from imagebus.lora_catalog import (
    LoraScan,
    lora_image_path,
    merge_loras,
    scan_lora_bucket,
    scan_lora_folder,
    trigger_words_from_metadata,
)
from ingress.errors import EXCEPTION_HANDLERS
from ingress.routes.lora_images import LoraPreviews, lora_image_handlers
from schemas import Catalog, LoraSpec, ModelSpec
from storage.object_store import S3Config
from tests.fixtures.s3 import raw_client, remove_bucket
from workers.backends.lora_files import LoraFileError, LoraFiles

PNG = b"\x89PNG\r\n\x1a\n" + b"preview-of-pixel" * 8
WEBP = b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"kohya-preview" * 8
KOHYA_TAGS = {
    "10_mychar": {"mychar": 12, "1girl": 12, "smile": 5, "outdoors": 3},
    "5_style": {"mychar": 6, "sketch": 4},
}


def safetensors_bytes(metadata: dict[str, str] | None = None, size: int = 64) -> bytes:
    """A real safetensors file (the library's own writer), with training metadata in its header."""
    return save({"lora_down.weight": np.arange(size, dtype=np.float32).reshape(8, -1)}, metadata=metadata)


def lora_files() -> dict[str, bytes]:
    """One LoRA folder's contents by relative path: good LoRAs of every kind and bad files."""
    return {
        # A sidecar says everything; a PNG preview.
        "pixel.safetensors": safetensors_bytes({"ss_tag_frequency": json.dumps(KOHYA_TAGS)}),
        "pixel.json": json.dumps(
            {
                "name": "Pixel Art XL",
                "description": "chunky pixels",
                "tags": ["style", "retro"],
                "trigger_words": ["pixel art", "8-bit"],
                "models": ["tiny-sd"],
            }
        ).encode(),
        "pixel.png": PNG,
        # No sidecar: trigger words from kohya's tag counts; a file name that is no safe token.
        "characters/My Char v2.safetensors": safetensors_bytes({"ss_tag_frequency": json.dumps(KOHYA_TAGS)}),
        "characters/My Char v2.webp": WEBP,
        # modelspec metadata: title, tags and trigger phrase.
        "spec.safetensors": safetensors_bytes(
            {"modelspec.title": "Spec Style", "modelspec.trigger_phrase": "spec style, glossy", "modelspec.tags": "a,b"}
        ),
        # A1111's sidecar names trigger words "activation text"; its other keys are ignored.
        "a1111.safetensors": safetensors_bytes(),
        "a1111.json": json.dumps({"activation text": "ink wash, sumi-e", "preferred weight": 0.8}).encode(),
        # Bad: not a safetensors file, a cut-off header, a sidecar of the wrong shape, an id clash.
        "broken.safetensors": b"this is not a safetensors file at all",
        "cutoff.safetensors": safetensors_bytes()[:20],
        "badsidecar.safetensors": safetensors_bytes(),
        "badsidecar.json": json.dumps({"tags": {"not": "a list"}}).encode(),
        "other/pixel.safetensors": safetensors_bytes(),
        # Not LoRAs at all.
        "readme.txt": b"hello",
    }


def write_folder(root: Path) -> Path:
    for relative, content in lora_files().items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


GOOD_IDS = {"pixel", "My-Char-v2", "spec", "a1111"}
BAD_FILES = {"broken.safetensors", "cutoff.safetensors", "badsidecar.safetensors", "other/pixel.safetensors"}


def assert_scanned(scan: LoraScan, source_of: dict[str, str]) -> None:
    assert set(scan.loras) == GOOD_IDS
    pixel = scan.loras["pixel"]
    assert pixel == LoraSpec(
        id="pixel",
        name="Pixel Art XL",
        source=source_of["pixel.safetensors"],
        image="/api/loras/pixel/image",
        tags=("style", "retro"),
        trigger_words=("pixel art", "8-bit"),  # the sidecar's, not the header's
        models=("tiny-sd",),
    )
    char = scan.loras["My-Char-v2"]
    assert (char.name, char.trigger_words, char.image) == ("My Char v2", ("mychar", "1girl"), lora_image_path(char.id))
    spec = scan.loras["spec"]
    assert (spec.name, spec.trigger_words, spec.tags, spec.image) == (
        "Spec Style",
        ("spec style", "glossy"),
        ("a", "b"),
        None,
    )
    assert scan.loras["a1111"].trigger_words == ("ink wash", "sumi-e")
    assert set(scan.previews) == {"pixel", "My-Char-v2"}
    assert scan.previews["pixel"] == source_of["pixel.png"]
    assert scan.previews["My-Char-v2"] == source_of["characters/My Char v2.webp"]


def assert_bad_files_logged(logs: list[MutableMapping[str, Any]]) -> None:
    skipped = {str(entry["file"]) for entry in logs if entry["event"] == "lora.scan_skipped"}
    assert {name.split("/")[-1] for name in BAD_FILES} == {Path(name).name for name in skipped}
    reasons = " | ".join(str(entry["reason"]) for entry in logs if entry["event"] == "lora.scan_skipped")
    assert "not a safetensors file" in reasons
    assert "badsidecar.json is invalid: tags" in reasons
    assert "already taken" in reasons


# --- the folder -------------------------------------------------------------------------------


def test_folder_scan_reads_sidecars_headers_and_previews_and_skips_bad_files(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "loras")
    with structlog.testing.capture_logs() as logs:
        scan = scan_lora_folder(root)
    assert_scanned(scan, {name: str((root / name).resolve()) for name in lora_files()})
    assert_bad_files_logged(logs)


def test_a_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"LoRA folder .* does not exist"):
        scan_lora_folder(tmp_path / "nowhere")


def test_trigger_words_from_kohya_tags_need_a_tag_that_stands_out() -> None:
    assert trigger_words_from_metadata({"ss_tag_frequency": json.dumps(KOHYA_TAGS)}) == ("mychar", "1girl")
    every_tag_once = {"dir": {"cat": 1, "dog": 1, "tree": 1, "sky": 1}}
    assert trigger_words_from_metadata({"ss_tag_frequency": json.dumps(every_tag_once)}) == ()
    assert trigger_words_from_metadata({"ss_tag_frequency": "not json"}) == ()
    assert trigger_words_from_metadata({}) == ()


def test_inline_catalog_entries_win_over_scanned_ones(tmp_path: Path) -> None:
    scan = scan_lora_folder(write_folder(tmp_path / "loras"))
    inline = LoraSpec(id="pixel", name="Hand-written Pixel", source="/elsewhere/pixel.safetensors")
    catalog = Catalog(
        default="tiny-sd",
        models={"tiny-sd": ModelSpec(id="tiny-sd", description="tiny", source="builtin:tiny-sd")},
        loras={"pixel": inline},
    )
    merged = merge_loras(catalog, scan.loras)
    assert merged.loras["pixel"] == inline
    assert merged.loras["spec"] == scan.loras["spec"]
    assert set(merged.loras) == GOOD_IDS
    # The shadowed LoRA's preview is not served under the inline entry's id.
    assert set(scan.previews_in(merged)) == {"My-Char-v2"}


def test_two_scans_combine_and_the_first_wins(tmp_path: Path) -> None:
    first = scan_lora_folder(write_folder(tmp_path / "a"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "pixel.safetensors").write_bytes(safetensors_bytes())
    (tmp_path / "b" / "pixel.png").write_bytes(PNG)
    (tmp_path / "b" / "extra.safetensors").write_bytes(safetensors_bytes())
    combined = first.plus(scan_lora_folder(tmp_path / "b"))
    assert combined.loras["pixel"] == first.loras["pixel"]
    assert combined.previews["pixel"] == first.previews["pixel"]
    assert set(combined.loras) == {*GOOD_IDS, "extra"}


# --- the bucket -------------------------------------------------------------------------------


@pytest.fixture
def lora_bucket(storage_config: S3Config) -> Iterator[tuple[Minio, str]]:
    client = raw_client(storage_config)
    client.make_bucket(storage_config.bucket)
    yield client, storage_config.bucket
    remove_bucket(storage_config)


def upload(client: Minio, bucket: str, key: str, content: bytes) -> None:
    client.put_object(bucket, key, io.BytesIO(content), len(content))


def upload_folder(client: Minio, bucket: str, prefix: str) -> None:
    for relative, content in lora_files().items():
        upload(client, bucket, prefix + relative, content)


def test_bucket_scan_reads_sidecars_headers_and_previews_and_skips_bad_objects(
    lora_bucket: tuple[Minio, str],
) -> None:
    client, bucket = lora_bucket
    upload_folder(client, bucket, "loras/")
    upload(client, bucket, "elsewhere/outside.safetensors", safetensors_bytes())
    with structlog.testing.capture_logs() as logs:
        scan = scan_lora_bucket(client, bucket, "loras/")
    assert_scanned(scan, {name: f"s3://{bucket}/loras/{name}" for name in lora_files()})
    assert_bad_files_logged(logs)


# --- the workers' download cache --------------------------------------------------------------


def s3_spec(bucket: str, key: str) -> LoraSpec:
    return LoraSpec(id="pixel", name="Pixel", source=f"s3://{bucket}/{key}")


def downloads(logs: list[MutableMapping[str, Any]]) -> int:
    return sum(1 for entry in logs if entry["event"] == "lora.download")


def test_bucket_loras_are_downloaded_once_and_again_when_replaced(
    lora_bucket: tuple[Minio, str], tmp_path: Path
) -> None:
    client, bucket = lora_bucket
    weights = safetensors_bytes(size=4096)
    upload(client, bucket, "loras/pixel.safetensors", weights)
    files = LoraFiles(tmp_path / "cache", client)
    spec = s3_spec(bucket, "loras/pixel.safetensors")
    with structlog.testing.capture_logs() as logs:
        first = files.local_path(spec)
        assert files.local_path(spec) == first
    assert downloads(logs) == 1
    assert first.read_bytes() == weights
    assert first.parent == tmp_path / "cache" and first.name.endswith("-pixel.safetensors")

    # A partial file left by a crash (wrong size) is fetched again.
    first.write_bytes(weights[:100])
    with structlog.testing.capture_logs() as logs:
        assert files.local_path(spec).read_bytes() == weights
    assert downloads(logs) == 1

    # A replaced object has another ETag, so it is another cache entry.
    replaced = safetensors_bytes({"v": "2"}, size=4096)
    upload(client, bucket, "loras/pixel.safetensors", replaced)
    second = files.local_path(spec)
    assert second != first
    assert second.read_bytes() == replaced
    assert not list((tmp_path / "cache").glob(".*part"))


def test_concurrent_workers_sharing_the_cache_see_only_whole_files(
    lora_bucket: tuple[Minio, str], tmp_path: Path
) -> None:
    client, bucket = lora_bucket
    weights = safetensors_bytes(size=256 * 1024)
    upload(client, bucket, "pixel.safetensors", weights)
    spec = s3_spec(bucket, "pixel.safetensors")
    # Two LoraFiles stand for two worker processes (no shared lock); each is used by four threads.
    workers = [LoraFiles(tmp_path / "cache", client), LoraFiles(tmp_path / "cache", client)]
    results: list[bytes] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def fetch(files: LoraFiles) -> None:
        try:
            start.wait()
            results.append(files.local_path(spec).read_bytes())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetch, args=(workers[i % 2],)) for i in range(8)]
    with structlog.testing.capture_logs() as logs:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert results == [weights] * 8
    assert 1 <= downloads(logs) <= 2  # at most one per process
    assert [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".part")] == []


def test_unavailable_loras_fail_clearly(lora_bucket: tuple[Minio, str], tmp_path: Path) -> None:
    client, bucket = lora_bucket
    files = LoraFiles(tmp_path / "cache", client)
    with pytest.raises(LoraFileError, match=r"s3://.*/missing.safetensors does not exist"):
        files.local_path(s3_spec(bucket, "missing.safetensors"))
    with pytest.raises(LoraFileError, match="has no S3 client"):
        LoraFiles(tmp_path / "cache", None).local_path(s3_spec(bucket, "pixel.safetensors"))
    with pytest.raises(LoraFileError, match="does not exist on this worker"):
        files.local_path(LoraSpec(id="gone", name="Gone", source=str(tmp_path / "gone.safetensors")))
    with pytest.raises(LoraFileError, match="hub ids are not supported"):
        files.local_path(LoraSpec(id="hub", name="Hub", source="someone/pixel-lora"))
    with pytest.raises(LoraFileError, match="not supported"):
        files.local_path(LoraSpec(id="web", name="Web", source="https://example.com/pixel.safetensors"))


def test_local_loras_are_used_where_they_are(tmp_path: Path) -> None:
    files = LoraFiles(tmp_path / "cache", None)
    path = tmp_path / "pixel.safetensors"
    path.write_bytes(safetensors_bytes())
    assert files.local_path(LoraSpec(id="pixel", name="Pixel", source=str(path))) == path
    # A folder holding exactly one weights file (diffusers' layout) means that file.
    assert files.local_path(LoraSpec(id="pixel", name="Pixel", source=str(tmp_path))) == path
    (tmp_path / "second.safetensors").write_bytes(safetensors_bytes())
    with pytest.raises(LoraFileError, match=r"holds 2 \.safetensors files"):
        files.local_path(LoraSpec(id="pixel", name="Pixel", source=str(tmp_path)))
    assert not (tmp_path / "cache").exists()


# --- the preview route ------------------------------------------------------------------------


@pytest.fixture
async def preview_client(lora_bucket: tuple[Minio, str], tmp_path: Path) -> AsyncIterator[AsyncTestClient[Litestar]]:
    """An app with just the preview route, serving a folder scan and a bucket scan together."""
    client, bucket = lora_bucket
    upload_folder(client, bucket, "")
    upload(client, bucket, "bucket-only.safetensors", safetensors_bytes())
    upload(client, bucket, "bucket-only.jpg", b"\xff\xd8\xff jpeg bytes")
    scan = scan_lora_folder(write_folder(tmp_path / "loras")).plus(scan_lora_bucket(client, bucket))
    app = Litestar(
        route_handlers=lora_image_handlers,
        exception_handlers=EXCEPTION_HANDLERS,
        state=State({"lora_previews": LoraPreviews(scan.previews, client)}),
    )
    async with AsyncTestClient(app) as test_client:
        yield test_client


async def test_previews_are_served_from_the_folder_and_the_bucket(
    preview_client: AsyncTestClient[Litestar],
) -> None:
    response = await preview_client.get("/api/loras/pixel/image")
    assert response.status_code == 200
    assert (response.content, response.headers["content-type"]) == (PNG, "image/png")
    assert "public" in response.headers["cache-control"]
    response = await preview_client.get("/api/loras/My-Char-v2/image")
    assert (response.content, response.headers["content-type"]) == (WEBP, "image/webp")
    response = await preview_client.get("/api/loras/bucket-only/image")
    assert (response.status_code, response.headers["content-type"]) == (200, "image/jpeg")
    assert response.content == b"\xff\xd8\xff jpeg bytes"


async def test_no_preview_is_a_404_json_error(
    preview_client: AsyncTestClient[Litestar], lora_bucket: tuple[Minio, str]
) -> None:
    client, bucket = lora_bucket
    client.remove_object(bucket, "bucket-only.jpg")  # gone since the scan
    for lora_id in ("spec", "no-such-lora", "bucket-only"):
        response = await preview_client.get(f"/api/loras/{lora_id}/image")
        assert response.status_code == 404, lora_id
        body = response.json()
        assert body["status"] == "error"
        assert "has no preview image" in body["message"]
