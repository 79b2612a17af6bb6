"""What the catalog tells clients: the model list and each model's parameter JSON schema."""

from __future__ import annotations

from typing import Any

from schemas import Catalog, ModelSpec
from schemas.api import MAX_NEGATIVE_PROMPT_CHARS, MAX_PROMPT_CHARS, ModelInfo, ModelList


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
        "guidance_scale": {"type": "number", "minimum": 0, "maximum": 50, "default": spec.default_guidance},
        "seed": {"type": ["integer", "null"], "minimum": 0, "default": None,
                 "description": "null for a random seed; the seed used is recorded on each image"},
        "num_images": {"type": "integer", "minimum": 1, "maximum": spec.max_images, "default": 1},
    }  # fmt: skip
    if spec.supports_negative_prompt:
        properties["negative_prompt"] = {"type": ["string", "null"], "maxLength": MAX_NEGATIVE_PROMPT_CHARS}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"Generation parameters for {spec.id}",
        "description": spec.description,
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": False,
        "properties": properties,
    }


def info(catalog: Catalog) -> dict[str, Any]:
    """GET /api/info: every model's parameter schema (LoRAs join in with the LoRA catalog)."""
    return {
        "default": catalog.default,
        "models": {
            spec.id: {"description": spec.description, "parameters": parameter_schema(spec), "loras": []}
            for spec in catalog.models.values()
        },
    }
