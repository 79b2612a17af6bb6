"""Prompt enrichment: style templates, or an OpenAI-compatible chat endpoint when one is configured."""

from __future__ import annotations

import httpx
import structlog

from ingress.config import EnrichConfig
from ingress.errors import ApiError
from schemas.api import MAX_PROMPT_CHARS, EnrichResult

log = structlog.get_logger(__name__)

STYLES: dict[str, str] = {
    "cyberpunk": (
        "{prompt}, cyberpunk aesthetic, neon-lit rain-slicked streets, holographic signage, chrome and glass, "
        "moody teal and magenta lighting, volumetric haze, highly detailed, cinematic composition, 8k"
    ),
    "anime": (
        "{prompt}, anime style, clean line art, vibrant cel shading, expressive characters, detailed background, "
        "soft rim lighting, studio-quality key visual"
    ),
    "realistic": (
        "{prompt}, photorealistic, natural lighting, shot on a full-frame camera with a 50mm lens, shallow depth "
        "of field, fine textures, true-to-life colors, high dynamic range"
    ),
    "fantasy": (
        "{prompt}, epic fantasy setting, ancient magical atmosphere, ethereal mist, dramatic sky, golden hour "
        "lighting, richly detailed textures, digital painting, concept art, 8k resolution"
    ),
    "sci-fi": (
        "{prompt}, science fiction, advanced technology, sleek spacecraft and megastructures, distant planets, "
        "cool ambient lighting, hard surface detail, cinematic matte painting"
    ),
    "enhance": (
        "{prompt}, highly detailed, sharp focus, balanced composition, professional lighting, rich colors, "
        "masterpiece, best quality"
    ),
}

_SYSTEM = (
    "You rewrite image-generation prompts. Keep the subject, add concrete visual detail in the requested "
    "style, answer with the prompt only, one paragraph, under 400 characters."
)


def template_enrich(prompt: str, style: str) -> str:
    return STYLES[style].format(prompt=prompt.strip().rstrip(","))[:MAX_PROMPT_CHARS]


async def enrich(prompt: str, style: str, config: EnrichConfig) -> EnrichResult:
    style = style.strip().lower()
    if style not in STYLES:
        raise ApiError(400, f"unknown style {style!r}; available styles: {', '.join(STYLES)}")
    if config.url:
        try:
            enriched = await _ask_llm(prompt, style, config)
            return EnrichResult(original_prompt=prompt, enriched_prompt=enriched, style=style, source="llm")
        except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
            # The template answer is still a good answer; the endpoint's trouble goes to the log.
            log.warning("enrich_llm_failed", error=str(exc))
    return EnrichResult(
        original_prompt=prompt, enriched_prompt=template_enrich(prompt, style), style=style, source="template"
    )


async def _ask_llm(prompt: str, style: str, config: EnrichConfig) -> str:
    assert config.url is not None
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    body = {
        "model": config.model,
        "messages": [
            {"role": "system", "content": _SYSTEM},
            {"role": "user", "content": f"Style: {style}\nPrompt: {prompt}"},
        ],
        "temperature": 0.7,
    }
    url = config.url.rstrip("/")
    if not url.endswith("/chat/completions"):
        url += "/chat/completions"
    async with httpx.AsyncClient(timeout=config.timeout_s) as client:
        response = await client.post(url, json=body, headers=headers)
        response.raise_for_status()
        text = str(response.json()["choices"][0]["message"]["content"]).strip()
    if not text:
        raise ValueError("empty completion")
    return text[:MAX_PROMPT_CHARS]
