"""What the catalog tells clients: the model list and each model's parameter JSON schema."""

from __future__ import annotations

from typing import Any

from schemas import Catalog, LoraSpec, ModelSpec
from schemas.api import MAX_NEGATIVE_PROMPT_CHARS, MAX_PROMPT_CHARS, LoraInfo, LoraList, ModelInfo, ModelList

MAX_LORA_RESULTS = 100


def model_list(catalog: Catalog) -> ModelList:
    return ModelList(
        models={
            spec.id: ModelInfo(**spec.model_dump(include=set(ModelInfo.model_fields)))
            for spec in catalog.models.values()
        },
        default=catalog.default,
    )


def parameter_schema(spec: ModelSpec) -> dict[str, Any]:
    """JSON Schema of POST /api/generate for this model, limits taken from the catalog."""
    properties: dict[str, Any] = {
        "prompt": {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS},
        "model": {"type": "string", "const": spec.id},
        "width": {"type": "integer", "minimum": 8, "maximum": spec.max_width, "multipleOf": 8,
                  "default": spec.default_width},
        "height": {"type": "integer", "minimum": 8, "maximum": spec.max_height, "multipleOf": 8,
                   "default": spec.default_height},
        "num_inference_steps": {"type": "integer", "minimum": 1, "maximum": spec.max_steps,
                                "default": spec.default_steps},
        "guidance_scale": (
            {"type": "number", "minimum": 0, "maximum": 50, "default": spec.default_guidance}
            if spec.supports_guidance
            else {"const": spec.default_guidance, "description": "this model does not use guidance"}
        ),
        "seed": {"type": ["integer", "null"], "minimum": 0, "default": None,
                 "description": "null for a random seed; the seed used is recorded on each image"},
        "num_images": {"type": "integer", "minimum": 1, "maximum": spec.max_images, "default": 1},
    }  # fmt: skip
    if spec.supports_negative_prompt:
        properties["negative_prompt"] = {"type": ["string", "null"], "maxLength": MAX_NEGATIVE_PROMPT_CHARS}
    if spec.supports_lora:
        properties["loras"] = {
            "type": "array",
            "maxItems": 8,
            "items": {
                "type": "object",
                "required": ["id"],
                "additionalProperties": False,
                "properties": {
                    "id": {"type": "string", "description": "A LoRA id from this model's 'loras' list"},
                    "weight": {"type": "number", "default": 1.0},
                    "trigger_weight": {"type": "number", "default": 1.0},
                },
            },
        }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"Generation parameters for {spec.id}",
        "description": spec.description,
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": False,
        "properties": properties,
    }


def lora_info(spec: LoraSpec) -> LoraInfo:
    return LoraInfo(
        id=spec.id,
        name=spec.name,
        image=spec.image,
        tags=list(spec.tags),
        trigger_words=list(spec.trigger_words),
        models=list(spec.models),
    )


def loras_for(catalog: Catalog, model: ModelSpec) -> list[LoraSpec]:
    if not model.supports_lora:
        return []
    return [lora for lora in catalog.loras.values() if not lora.models or model.id in lora.models]


def search_loras(catalog: Catalog, query: str) -> LoraList:
    found = [lora_info(spec) for spec in catalog.loras.values() if spec.matches(query)]
    return LoraList(loras=found[:MAX_LORA_RESULTS])


def info(catalog: Catalog) -> dict[str, Any]:
    """GET /api/info: every model's parameter schema and the LoRAs it accepts."""
    return {
        "default": catalog.default,
        "models": {
            spec.id: {
                "description": spec.description,
                "parameters": parameter_schema(spec),
                "loras": [lora_info(lora).model_dump() for lora in loras_for(catalog, spec)],
            }
            for spec in catalog.models.values()
        },
    }
