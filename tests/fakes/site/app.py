"""A fake image-generator website for the browser backend's tests, shaped like weights.com's create page.

A login wall unless the session cookie is present; a create page with a prompt box, a LoRA search
dialog, an applied-LoRAs list with remove buttons and a Generate button; previews swapped in frame
by frame; a final PNG whose pixels depend on the prompt and the applied LoRAs; a quota page. Faults
are set on the ``FakeSite`` object by the test: a failure message, a share of random failures, a
generation that never finishes.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from litestar import Litestar, Request, Response, get, post
from litestar.datastructures import Cookie
from litestar.exceptions import NotAuthorizedException, NotFoundException
from litestar.response import Redirect

STATIC = Path(__file__).parent / "static"
COOKIE = "fake_session"
USERNAME, PASSWORD = "painter", "correct horse"


@dataclass
class Generation:
    id: str
    prompt: str
    loras: tuple[str, ...]
    started_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.finished_at is not None


@dataclass
class FakeSite:
    """The site's state and the faults a test sets on it."""

    loras: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "Pixel Art": ("style", "8-bit"),
            "Watercolor Dream": ("style", "paint"),
            "Neon Noir": ("mood",),
        }
    )
    session_token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    generations: list[Generation] = field(default_factory=list)
    credits_used: int = 12
    credits_limit: int = 50
    frames: int = 4
    frame_delay_s: float = 0.25
    image_size: tuple[int, int] = (96, 64)
    # "url": the final <img> points at the site (readable only with the session); "data": a data: URL.
    final_image: Literal["url", "data"] = "url"
    # Faults: the next generation fails with this message; a share of all generations fail; the
    # next generation stops after its previews and never delivers the image.
    fail_next: str | None = None
    failure_rate: float = 0.0
    hang_next: bool = False
    rng: random.Random = field(default_factory=lambda: random.Random(4))
    generation_started: asyncio.Event = field(default_factory=asyncio.Event)

    def signed_in(self, request: Request[Any, Any, Any]) -> bool:
        return request.cookies.get(COOKIE) == self.session_token

    def storage_state(self, base_url: str) -> dict[str, Any]:
        """A Playwright storage state holding a valid session, as an operator's saved file would."""
        host = base_url.split("//", 1)[1].split(":", 1)[0]
        cookie = {
            "name": COOKIE,
            "value": self.session_token,
            "domain": host,
            "path": "/",
            "expires": -1,
            "httpOnly": True,
            "secure": False,
            "sameSite": "Lax",
        }
        return {"cookies": [cookie], "origins": []}

    async def wait_for_generations(self, count: int, timeout_s: float = 20.0) -> Generation:
        """The ``count``-th generation, once the page has started it."""
        async with asyncio.timeout(timeout_s):
            while len(self.generations) < count:
                self.generation_started.clear()
                await self.generation_started.wait()
        return self.generations[count - 1]


def final_png(prompt: str, loras: tuple[str, ...], size: tuple[int, int]) -> bytes:
    """A PNG whose colours follow the prompt, with one stripe per applied LoRA."""
    from PIL import Image, ImageDraw

    digest = hashlib.sha256(prompt.encode()).digest()
    image = Image.new("RGB", size, tuple(digest[:3]))
    draw = ImageDraw.Draw(image)
    for index, name in enumerate(sorted(loras)):
        colour = tuple(hashlib.sha256(name.encode()).digest()[:3])
        draw.rectangle((0, index * 8, size[0] - 1, index * 8 + 5), fill=colour)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def preview_frame(prompt: str, step: int, frames: int, size: tuple[int, int]) -> bytes:
    """A JPEG that fades from grey towards the final colour."""
    from PIL import Image

    target = hashlib.sha256(prompt.encode()).digest()[:3]
    share = (step + 1) / (frames + 1)
    colour = tuple(round(128 + (channel - 128) * share) for channel in target)
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="JPEG", quality=70)
    return out.getvalue()


def create_app(site: FakeSite) -> Litestar:
    def require_session(request: Request[Any, Any, Any]) -> None:
        if not site.signed_in(request):
            raise NotAuthorizedException("sign in first")

    def generation(generation_id: str) -> Generation:
        found = next((g for g in site.generations if g.id == generation_id), None)
        if found is None:
            raise NotFoundException(f"no generation {generation_id}")
        return found

    @get("/")
    async def home() -> Redirect:
        return Redirect("/create")

    @get("/login", media_type="text/html")
    async def login_page() -> str:
        return (STATIC / "login.html").read_text()

    @post("/login", status_code=303)
    async def login(request: Request[Any, Any, Any]) -> Response[Any]:
        form = await request.form()
        if form.get("username") != USERNAME or form.get("password") != PASSWORD:
            return Redirect("/login?failed=1")
        return Redirect("/create", cookies=[Cookie(key=COOKIE, value=site.session_token, httponly=True)])

    @get("/create", media_type="text/html")
    async def create_page(request: Request[Any, Any, Any]) -> Response[Any] | str:
        if not site.signed_in(request):
            return Redirect("/login")
        return (STATIC / "create.html").read_text()

    @get("/site.js", media_type="text/javascript")
    async def script() -> str:
        return (STATIC / "site.js").read_text()

    @get("/quota", media_type="text/html")
    async def quota(request: Request[Any, Any, Any]) -> Response[Any] | str:
        if not site.signed_in(request):
            return Redirect("/login")
        return (
            "<!doctype html><title>Credits</title><main><h1>Your plan</h1>"
            f'<p id="credits">{site.credits_used} / {site.credits_limit} credits used today</p></main>'
        )

    @get("/api/loras")
    async def search_loras(request: Request[Any, Any, Any]) -> list[dict[str, Any]]:
        require_session(request)
        needle = request.query_params.get("q", "").strip().lower()
        return [
            {"name": name, "tags": list(tags)}
            for name, tags in site.loras.items()
            if needle and (needle in name.lower() or any(needle in tag for tag in tags))
        ]

    @post("/api/generate")
    async def start_generation(request: Request[Any, Any, Any]) -> dict[str, Any]:
        require_session(request)
        data = await request.json()
        prompt, loras = str(data["prompt"]), tuple(data.get("loras") or ())
        unknown = [name for name in loras if name not in site.loras]
        error = f"unknown LoRA {unknown[0]}" if unknown else None
        if error is None and site.fail_next is not None:
            error, site.fail_next = site.fail_next, None
        if error is None and site.rng.random() < site.failure_rate:
            error = "The generator is busy, please try again"
        entry = Generation(id=secrets.token_hex(6), prompt=prompt, loras=loras)
        site.generations.append(entry)
        site.generation_started.set()
        hang, site.hang_next = site.hang_next, False
        if error is None:
            site.credits_used += 1
        return {
            "id": entry.id,
            "error": error,
            "frames": site.frames,
            "frameDelayMs": round(site.frame_delay_s * 1000),
            "hang": hang,
            "finalImage": site.final_image,
        }

    @get("/api/generations/{generation_id:str}/preview/{step:int}", media_type="image/jpeg")
    async def preview(request: Request[Any, Any, Any]) -> bytes:
        require_session(request)
        entry = generation(request.path_params["generation_id"])
        return preview_frame(entry.prompt, request.path_params["step"], site.frames, (48, 32))

    @get("/api/generations/{generation_id:str}/image.png", media_type="image/png")
    async def final_image(request: Request[Any, Any, Any]) -> bytes:
        require_session(request)
        entry = generation(request.path_params["generation_id"])
        entry.finished_at = time.monotonic()
        return final_png(entry.prompt, entry.loras, site.image_size)

    return Litestar(
        route_handlers=[
            home,
            login_page,
            login,
            create_page,
            script,
            quota,
            search_loras,
            start_generation,
            preview,
            final_image,
        ],
        debug=False,
    )


@asynccontextmanager
async def serve_site(site: FakeSite) -> AsyncIterator[str]:
    """Serve ``site`` on 127.0.0.1 at a random port, in this event loop; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(site), log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()
