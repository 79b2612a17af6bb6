"""A local stand-in for hosted image APIs: the OpenAI Images API and a Chutes image endpoint.

It is served over real HTTP (uvicorn on 127.0.0.1, a port of its own, in the test's event loop), so
the remote backend's client, streaming, timeouts and disconnects are exercised for real. It answers
as the real services do, error shapes included:

- ``POST /v1/images/generations``: OpenAI's body and checks (unknown parameters, ``n``, sizes of
  the real models, ``response_format`` refused for ``gpt-image-*``), ``{"created", "data": [...]}``
  with ``b64_json`` or ``url`` (the URL served here, ``GET /files/<name>``, no token needed), errors
  as ``{"error": {"message", "type", "param", "code"}}``, and ``x-ratelimit-*`` headers.
- ``POST /generate``: a Chutes image chute; JSON in, JPEG bytes out; errors as ``{"detail": ...}``.

Images are valid PNGs (JPEGs for Chutes) whose pixels depend on the prompt and the seed (or the
image's index where the API has no seed). ``script(*faults)`` makes the next generation requests
misbehave: 429 with Retry-After, 500, 503, a 400, a non-image body, an endless body, a slow answer.
The fake records every request and the most generation requests it ever had in flight at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from PIL import Image

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

OPENAI_PATH = "/v1/images/generations"
CHUTES_PATH = "/generate"
FILES_PATH = "/files/"

# The sizes the real models accept; any other model name takes any WxH (tests use small images).
MODEL_SIZES = {
    "dall-e-2": {"256x256", "512x512", "1024x1024"},
    "dall-e-3": {"1024x1024", "1792x1024", "1024x1792"},
    "gpt-image-1": {"1024x1024", "1536x1024", "1024x1536", "auto"},
}
OPENAI_PARAMETERS = {
    "model",
    "prompt",
    "n",
    "size",
    "response_format",
    "quality",
    "style",
    "user",
    "background",
    "moderation",
    "output_format",
    "output_compression",
}
RATE_LIMIT = 500


@dataclass(frozen=True)
class Fault:
    """What the next generation request gets instead of a good answer (used once)."""

    status: int = 200
    retry_after: str | None = None
    message: str | None = None
    code: str | None = None
    delay_s: float = 0.0
    # Answer 200 with this body instead of an image.
    body: bytes | None = None
    content_type: str = "text/html; charset=utf-8"
    # Answer 200 with an image body this long (a PNG signature, then zeros), streamed.
    endless_bytes: int = 0
    declare_length: bool = False

    @classmethod
    def rate_limited(cls, retry_after: str | None = "1") -> Fault:
        return cls(status=429, retry_after=retry_after)

    @classmethod
    def server_error(cls, status: int = 500) -> Fault:
        return cls(status=status)

    @classmethod
    def bad_request(cls, message: str, code: str | None = None) -> Fault:
        return cls(status=400, message=message, code=code)

    @classmethod
    def not_an_image(cls) -> Fault:
        return cls(body=b"<html><body><h1>Service temporarily unavailable</h1></body></html>")

    @classmethod
    def oversized(cls, total_bytes: int, *, declare_length: bool = False) -> Fault:
        return cls(endless_bytes=total_bytes, declare_length=declare_length)

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        return cls(delay_s=seconds)


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any = None
    received_at: float = field(default_factory=time.monotonic)


class FakeImageApi:
    def __init__(
        self,
        *,
        tokens: tuple[str, ...] = ("sk-test-token",),
        latency_s: float = 0.0,
        chunk_bytes: int = 64 * 1024,
        escape_slashes: bool = False,
    ) -> None:
        # No tokens: the API takes anonymous requests.
        self.tokens = set(tokens)
        self.latency_s = latency_s
        self.chunk_bytes = chunk_bytes
        # Some servers write "/" as "\/" in JSON strings (PHP does); base64 is full of slashes.
        self.escape_slashes = escape_slashes
        self._made_with = (set(tokens), latency_s, chunk_bytes, escape_slashes)
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        # Generation requests whose client went away before the answer was complete.
        self.aborted = 0
        # Bytes of the last endless answer that went out before the client hung up.
        self.endless_sent = 0
        self.base_url = ""
        self._faults: deque[Fault] = deque()
        self._download_faults: deque[Fault] = deque()
        self._files: dict[str, bytes] = {}
        self._remaining = RATE_LIMIT

    # --- the test's handles ------------------------------------------------------------------

    @property
    def openai_url(self) -> str:
        return self.base_url + OPENAI_PATH

    @property
    def chutes_url(self) -> str:
        return self.base_url + CHUTES_PATH

    def script(self, *faults: Fault) -> None:
        self._faults.extend(faults)

    def script_downloads(self, *faults: Fault) -> None:
        self._download_faults.extend(faults)

    def generation_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == "POST"]

    def reset(self) -> None:
        """Back to how it was made, for the next test: settings, script, records and counters."""
        tokens, self.latency_s, self.chunk_bytes, self.escape_slashes = self._made_with
        self.tokens = set(tokens)
        self.requests = []
        self.max_in_flight = self.in_flight
        self.aborted = 0
        self.endless_sent = 0
        self._faults.clear()
        self._download_faults.clear()
        self._files.clear()
        self._remaining = RATE_LIMIT

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FakeImageApi]:
        config = uvicorn.Config(
            self,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the fake image API did not start")
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        try:
            yield self
        finally:
            server.should_exit = True
            await task

    # --- ASGI ----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        raw = await _read_body(receive)
        recorded = RecordedRequest(method, path, headers)
        self.requests.append(recorded)
        if method == "GET" and path.startswith(FILES_PATH):
            await self._file(path[len(FILES_PATH) :], send)
        elif method == "POST" and path in (OPENAI_PATH, CHUTES_PATH):
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await self._generation(path == OPENAI_PATH, headers, raw, recorded, receive, send)
            finally:
                self.in_flight -= 1
        else:
            await _json(send, 404, {"detail": "Not Found"})

    async def _generation(
        self, openai: bool, headers: dict[str, str], raw: bytes, recorded: RecordedRequest, receive: Receive, send: Send
    ) -> None:
        error = _openai_error if openai else _chutes_error
        token_error = self._token_error(headers.get("authorization"))
        if token_error is not None:
            await error(send, 401, token_error, "invalid_api_key" if token_error.startswith("Incorrect") else None)
            return
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            await error(send, 400, "We could not parse the JSON body of your request.", None)
            return
        recorded.body = body
        fault = self._faults.popleft() if self._faults else Fault()
        if not await _wait_unless_gone(receive, self.latency_s + fault.delay_s):
            self.aborted += 1
            return
        if fault.status != 200:
            await self._fault_status(openai, fault, send)
        elif fault.body is not None:
            await _send(send, 200, fault.body, fault.content_type)
        elif fault.endless_bytes:
            await self._endless(openai, fault, receive, send)
        elif openai:
            await self._openai_images(body, send)
        else:
            await self._chutes_image(body, send)

    def _token_error(self, authorization: str | None) -> str | None:
        if not self.tokens:
            return None
        if not authorization or not authorization.startswith("Bearer "):
            return (
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        token = authorization.removeprefix("Bearer ")
        if token in self.tokens:
            return None
        # As the real API does: never the whole key, only its ends.
        masked = f"{token[:3]}*****{token[-2:]}" if len(token) > 8 else "*****"
        return f"Incorrect API key provided: {masked}. You can find your API key at https://platform.openai.com/account/api-keys."

    async def _fault_status(self, openai: bool, fault: Fault, send: Send) -> None:
        extra = {"retry-after": fault.retry_after} if fault.retry_after is not None else {}
        code: str | None
        if fault.status == 429:
            message = fault.message or (
                "Rate limit exceeded for images per minute in organization org-fake. Limit: 5/1min. Current: 6/1min."
                if openai
                else "Too many requests, slow down."
            )
            code = fault.code or "rate_limit_exceeded"
        elif fault.status >= 500:
            message = fault.message or (
                "The server had an error while processing your request. Sorry about that!"
                if fault.status == 500
                else "The engine is currently overloaded, please try again later."
            )
            code = fault.code
        else:
            message, code = fault.message or "Bad request", fault.code
        if openai:
            await _openai_error(send, fault.status, message, code, extra, kind=_openai_type(fault.status))
        else:
            await _chutes_error(send, fault.status, message, code, extra)

    async def _endless(self, openai: bool, fault: Fault, receive: Receive, send: Send) -> None:
        """An answer far over any sane cap, streamed until the client hangs up."""
        self.endless_sent = 0
        if openai:
            head, filler, content_type = b'{"created": 1, "data": [{"b64_json": "', b"A", "application/json"
        else:
            head, filler, content_type = b"\x89PNG\r\n\x1a\n", b"\x00", "image/png"
        headers = [(b"content-type", content_type.encode())]
        if fault.declare_length:
            headers.append((b"content-length", str(fault.endless_bytes).encode()))
        piece = head + filler * (self.chunk_bytes - len(head))
        async with _watch_disconnect(receive) as gone:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            while self.endless_sent < fault.endless_bytes and not gone.is_set():
                size = min(len(piece), fault.endless_bytes - self.endless_sent)
                # uvicorn waits here while the client's socket is full, and returns at once once it is gone.
                await send({"type": "http.response.body", "body": piece[:size], "more_body": True})
                self.endless_sent += size
                piece = filler * self.chunk_bytes
                await asyncio.sleep(0)
            if gone.is_set():
                self.aborted += 1
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _openai_images(self, body: dict[str, Any], send: Send) -> None:
        problem = _openai_problem(body)
        if problem is not None:
            message, param, code = problem
            await _openai_error(send, 400, message, code, param=param)
            return
        model, prompt, count = body["model"], body["prompt"], int(body.get("n", 1))
        gpt_image = model.startswith("gpt-image")
        response_format = "b64_json" if gpt_image else body.get("response_format", "url")
        dimensions = _size(body.get("size", "1024x1024"))
        assert dimensions is not None  # checked by _openai_problem
        width, height = dimensions
        data: list[dict[str, Any]] = []
        for index in range(count):
            png = fake_image(width, height, f"{prompt}|{index}")
            if response_format == "b64_json":
                item: dict[str, Any] = {"b64_json": base64.b64encode(png).decode()}
            else:
                name = f"{uuid.uuid4().hex}.png"
                self._files[name] = png
                item = {"url": f"{self.base_url}{FILES_PATH}{name}"}
            if model == "dall-e-3":
                item["revised_prompt"] = f"A detailed rendering of: {prompt}"
            data.append(item)
        answer: dict[str, Any] = {"created": int(time.time()), "data": data}
        if gpt_image:
            answer["usage"] = {"total_tokens": 100, "input_tokens": 50, "output_tokens": 50}
        text = json.dumps(answer)
        if self.escape_slashes:
            text = text.replace("/", "\\/")
        self._remaining = max(self._remaining - 1, 0)
        rate_headers = {
            "x-ratelimit-limit-requests": str(RATE_LIMIT),
            "x-ratelimit-remaining-requests": str(self._remaining),
            "x-ratelimit-reset-requests": "120ms",
        }
        await _send(send, 200, text.encode(), "application/json", rate_headers, chunk_bytes=self.chunk_bytes)

    async def _chutes_image(self, body: dict[str, Any], send: Send) -> None:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            detail = [{"type": "missing", "loc": ["body", "prompt"], "msg": "Field required", "input": None}]
            await _json(send, 422, {"detail": detail})
            return
        width, height = int(body.get("width", 1024)), int(body.get("height", 1024))
        if not (16 <= width <= 2048 and 16 <= height <= 2048):
            detail = [{"type": "less_than_equal", "loc": ["body", "width"], "msg": "Input should be <= 2048"}]
            await _json(send, 422, {"detail": detail})
            return
        seed = body.get("seed")
        jpeg = fake_image(width, height, f"{prompt}|{seed}", kind="JPEG")
        await _send(send, 200, jpeg, "image/jpeg", chunk_bytes=self.chunk_bytes)

    async def _file(self, name: str, send: Send) -> None:
        fault = self._download_faults.popleft() if self._download_faults else None
        if fault is not None and fault.status != 200:
            await _send(send, fault.status, b"<Error><Code>InternalError</Code></Error>", "application/xml")
            return
        data = self._files.get(name)
        if data is None:
            await _send(send, 404, b"<Error><Code>BlobNotFound</Code></Error>", "application/xml")
            return
        await _send(send, 200, data, "image/png", chunk_bytes=self.chunk_bytes)


def fake_image(width: int, height: int, key: str, *, kind: str = "PNG") -> bytes:
    """A noise image that is a pure function of ``key`` (prompt and seed), ``width`` and ``height``."""
    rng = random.Random(hashlib.sha256(key.encode()).digest())
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return buffer.getvalue()


def _openai_problem(body: dict[str, Any]) -> tuple[str, str | None, str | None] | None:
    """What the real API would refuse in ``body``: (message, param, code), or None."""
    for name in body:
        if name not in OPENAI_PARAMETERS:
            return f"Unknown parameter: '{name}'.", name, "unknown_parameter"
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return "You must provide a model parameter.", "model", None
    if model.startswith("gpt-image") and "response_format" in body:
        return "Unknown parameter: 'response_format'.", "response_format", "unknown_parameter"
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return "Invalid 'prompt': string too short. Expected a string with minimum length 1.", "prompt", None
    if "forbidden" in prompt:
        return (
            "Your request was rejected as a result of our safety system. Your prompt may contain text that is "
            "not allowed by our safety system.",
            None,
            "content_policy_violation",
        )
    count = body.get("n", 1)
    most = 1 if model == "dall-e-3" else 10
    if not isinstance(count, int) or count < 1 or count > most:
        return (
            f"Invalid 'n': integer above maximum value. Expected a value <= {most}, but got {count} instead.",
            "n",
            "integer_above_max_value",
        )
    if body.get("response_format", "url") not in ("url", "b64_json"):
        return "Invalid value for 'response_format': must be one of 'url' or 'b64_json'.", "response_format", None
    size = body.get("size", "1024x1024")
    allowed = MODEL_SIZES.get(model)
    if (allowed is not None and size not in allowed) or _size(size) is None:
        return f"Invalid value: '{size}'. Supported values are: {sorted(allowed or [])}.", "size", "invalid_value"
    return None


def _size(size: Any) -> tuple[int, int] | None:
    if size == "auto":
        return 1024, 1024
    try:
        width, height = (int(part) for part in str(size).split("x"))
    except ValueError:
        return None
    if not (16 <= width <= 2048 and 16 <= height <= 2048):
        return None
    return width, height


def _openai_type(status: int) -> str:
    if status == 429:
        return "requests"
    return "server_error" if status >= 500 else "invalid_request_error"


async def _openai_error(
    send: Send,
    status: int,
    message: str,
    code: str | None,
    headers: dict[str, str] | None = None,
    *,
    kind: str = "invalid_request_error",
    param: str | None = None,
) -> None:
    error = {"message": message, "type": kind, "param": param, "code": code}
    await _json(send, status, {"error": error}, headers)


async def _chutes_error(
    send: Send, status: int, message: str, code: str | None, headers: dict[str, str] | None = None
) -> None:
    await _json(send, status, {"detail": message}, headers)


async def _json(send: Send, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
    await _send(send, status, json.dumps(payload).encode(), "application/json", headers)


async def _send(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    headers: dict[str, str] | None = None,
    *,
    chunk_bytes: int | None = None,
) -> None:
    """A whole answer, in pieces of ``chunk_bytes`` when given (so clients see it arrive in parts)."""
    raw_headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    raw_headers += [(name.encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    step = chunk_bytes or len(body) or 1
    for start in range(0, len(body), step):
        await send({"type": "http.response.body", "body": body[start : start + step], "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


@contextlib.asynccontextmanager
async def _watch_disconnect(receive: Receive) -> AsyncIterator[asyncio.Event]:
    """An event set when the client disconnects (uvicorn's ``send`` says nothing after that)."""
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.create_task(watch())
    try:
        yield gone
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def _wait_unless_gone(receive: Receive, seconds: float) -> bool:
    """Sleep ``seconds``; False as soon as the client disconnects (a canceled request)."""
    if seconds <= 0:
        return True
    async with _watch_disconnect(receive) as gone:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gone.wait(), timeout=seconds)
        return not gone.is_set()
