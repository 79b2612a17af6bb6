"""An incremental reader for the OpenAI Images API answer: ``{"created", "data": [{"b64_json"|"url"}]}``.

``json.loads`` would hold the whole body, and with it every image as base64 text, in memory. This
reader is fed the body as it arrives and decodes each ``data[i].b64_json`` string straight into an
``ImageSpool``; ``url`` strings (short) are kept. It understands just enough JSON for that: objects,
arrays, strings with escapes, and skips every other value.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Literal

from workers.backends.remote.answers import RemoteApiError
from workers.backends.remote.spool import ImageSpool

# Any string we keep (keys, urls) longer than this means the body is not what we think it is.
MAX_KEPT_STRING_BYTES = 64 * 1024
_WHITESPACE = b" \t\r\n"

StringRole = Literal["key", "url", "b64", "skip"]


class _Base64Sink:
    """Decodes base64 text arriving in arbitrary pieces into an image spool."""

    def __init__(self, spool: ImageSpool, source: str) -> None:
        self.spool = spool
        self._source = source
        self._carry = b""

    def feed(self, text: bytes) -> None:
        text = self._carry + text
        usable = len(text) - len(text) % 4
        self._carry = text[usable:]
        if usable:
            self.spool.write(self._decode(text[:usable]))

    def finish(self) -> None:
        if self._carry:
            # Unpadded base64 is rare but legal enough to accept.
            self.spool.write(self._decode(self._carry + b"=" * (-len(self._carry) % 4)))
            self._carry = b""

    def _decode(self, text: bytes) -> bytes:
        try:
            return base64.b64decode(text, validate=True)
        except binascii.Error as exc:
            raise RemoteApiError(f"{self._source}'s b64_json is not valid base64 ({exc})") from exc


class ImagesAnswerReader:
    """Feed it the body's bytes; afterwards ``outputs`` holds, in order, a spool or a URL per image."""

    def __init__(self, new_spool: Callable[[], ImageSpool], source: str) -> None:
        self.outputs: list[ImageSpool | str] = []
        self._source = source
        self._new_spool = new_spool
        # Open containers: "{" or "[" and the key the container is the value of.
        self._stack: list[tuple[bytes, str | None]] = []
        self._expect_key = False
        self._key: str | None = None
        self._started = False
        self._done = False
        # The string being read.
        self._in_string = False
        self._role: StringRole = "skip"
        self._kept = bytearray()
        self._sink: _Base64Sink | None = None
        self._after_backslash = False

    def feed(self, chunk: bytes) -> None:
        index, end = 0, len(chunk)
        while index < end:
            if self._in_string:
                index = self._read_string(chunk, index)
                continue
            byte = chunk[index : index + 1]
            index += 1
            if byte in _WHITESPACE:
                continue
            if not self._started:
                if byte != b"{":
                    raise RemoteApiError(f"{self._source} answered 200 with a body that is not JSON: {chunk[:80]!r}")
                self._started = True
            if self._done:
                raise RemoteApiError(f"{self._source}'s answer has data after its JSON body")
            self._structural(byte)

    def finish(self) -> list[ImageSpool | str]:
        if not self._done:
            raise RemoteApiError(f"{self._source}'s answer ended before its JSON body was complete")
        if not self.outputs:
            raise RemoteApiError(f"{self._source}'s answer holds no images (no data[].b64_json or data[].url)")
        return self.outputs

    def discard(self) -> None:
        for output in self.outputs:
            if isinstance(output, ImageSpool):
                output.discard()

    def _structural(self, byte: bytes) -> None:
        in_object = bool(self._stack) and self._stack[-1][0] == b"{"
        if byte in (b"{", b"["):
            self._stack.append((byte, self._key if in_object else None))
            self._expect_key = byte == b"{"
            self._key = None
        elif byte in (b"}", b"]"):
            if not self._stack:
                raise RemoteApiError(f"{self._source}'s answer is not valid JSON (unbalanced brackets)")
            self._stack.pop()
            self._expect_key = False
            self._done = not self._stack
        elif byte == b",":
            self._expect_key = in_object
        elif byte == b":":
            self._expect_key = False
        elif byte == b'"':
            self._start_string(in_object)
        # Anything else is part of a number, true, false or null: skipped.

    def _start_string(self, in_object: bool) -> None:
        self._in_string = True
        self._kept.clear()
        if in_object and self._expect_key:
            self._role = "key"
        elif self._in_data_item() and self._key == "b64_json":
            self._role = "b64"
            spool = self._new_spool()
            self.outputs.append(spool)
            self._sink = _Base64Sink(spool, self._source)
        elif self._in_data_item() and self._key == "url":
            self._role = "url"
        else:
            self._role = "skip"

    def _in_data_item(self) -> bool:
        # {"data": [ {here} ]} at the top level of the answer.
        return len(self._stack) == 3 and self._stack[1] == (b"[", "data") and self._stack[2][0] == b"{"

    def _read_string(self, chunk: bytes, index: int) -> int:
        """Consume string content from ``index``; the index after what was consumed."""
        if self._after_backslash:
            self._after_backslash = False
            self._escaped(chunk[index : index + 1])
            return index + 1
        quote = chunk.find(b'"', index)
        backslash = chunk.find(b"\\", index)
        stops = [at for at in (quote, backslash) if at >= 0]
        stop = min(stops) if stops else len(chunk)
        self._content(chunk[index:stop])
        if stop == len(chunk):
            return stop
        if stop == backslash:
            self._after_backslash = True
            return stop + 1
        self._end_string()
        return stop + 1

    def _content(self, piece: bytes) -> None:
        if not piece or self._role == "skip":
            return
        if self._role == "b64":
            assert self._sink is not None
            self._sink.feed(piece)
            return
        self._kept += piece
        if len(self._kept) > MAX_KEPT_STRING_BYTES:
            raise RemoteApiError(
                f"{self._source}'s answer has a {self._role} string over {MAX_KEPT_STRING_BYTES} bytes"
            )

    def _escaped(self, byte: bytes) -> None:
        if self._role == "b64":
            # JSON may escape "/" as "\/"; MIME-style line breaks in base64 are skipped.
            if byte == b"/":
                self._content(b"/")
            elif byte not in (b"n", b"r"):
                raise RemoteApiError(
                    f"{self._source}'s b64_json holds an unexpected escape \\{byte.decode(errors='replace')}"
                )
            return
        self._content(b"\\" + byte)

    def _end_string(self) -> None:
        self._in_string = False
        if self._role == "b64":
            assert self._sink is not None
            self._sink.finish()
            self._sink = None
        elif self._role in ("key", "url"):
            try:
                text = json.loads(b'"' + bytes(self._kept) + b'"')
            except ValueError as exc:
                raise RemoteApiError(f"{self._source}'s answer has a malformed JSON string ({exc})") from exc
            if self._role == "key":
                self._key = text
            else:
                self.outputs.append(text)
