"""The catalog the seed-dialect tests run with: the seeds' model names, all backed by tiny-sd.

Each seed README names its own models ("flux-1", "sd-3.5", "qwen-image", ...). Here they are
aliases of the built-in tiny pipeline (random weights, seconds per 1024-pixel image on a CPU),
so every documented request runs as written. Small default sizes keep the undecorated examples fast.
"""

from __future__ import annotations

from imagebus.catalog import load_catalog
from schemas import Catalog, LoraSpec, ModelSpec

# A LoRA the catalog knows (so it is accepted) but the tiny worker cannot load (so the job fails).
SEED_LORAS = {
    "civitai_1963644": LoraSpec(
        id="civitai_1963644",
        name="Pixel Portrait",
        source="loras/civitai_1963644.safetensors",
        image="https://example.invalid/civitai_1963644.png",
        tags=("portrait", "pixel art"),
        trigger_words=("pixel portrait",),
    ),
}


def _alias(model_id: str, *, negative_prompt: bool = True, lora: bool = False) -> ModelSpec:
    return ModelSpec(
        id=model_id,
        description=f"{model_id} (tiny random-weight stand-in for tests)",
        source="builtin:tiny-sd",
        random_weights=True,
        default_width=64,
        default_height=64,
        max_width=1024,
        max_height=1024,
        default_steps=4,
        max_steps=50,
        max_images=8,
        supports_negative_prompt=negative_prompt,
        supports_lora=lora,
    )


def seed_catalog() -> Catalog:
    shipped = load_catalog()
    tiny = shipped.models["tiny-sd"].model_copy(update={"max_width": 1024, "max_height": 1024, "supports_lora": True})
    models = {
        "tiny-sd": tiny,
        "flux-1": _alias("flux-1", negative_prompt=False),
        "flux-2": _alias("flux-2", negative_prompt=False),
        "sd-3.5": _alias("sd-3.5"),
        "flux-abliterated": _alias("flux-abliterated", negative_prompt=False),
        "qwen-image": _alias("qwen-image"),
    }
    return Catalog(default="tiny-sd", models=models, loras=SEED_LORAS)
