"""The model catalog: which models exist, which backend runs them, and their limits."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ModelSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    description: str
    backend: str = "diffusers"
    # A hub id ("stabilityai/sd-turbo"), a local folder, or "builtin:<name>" for the offline tiny pipelines.
    source: str
    random_weights: bool = False
    default_width: int = 512
    default_height: int = 512
    max_width: int = 1024
    max_height: int = 1024
    default_steps: int = 25
    max_steps: int = 100
    default_guidance: float = 7.5
    max_images: int = 8
    supports_negative_prompt: bool = True
    supports_lora: bool = False


class LoraSpec(BaseModel):
    """One LoRA of the LoRA catalog."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    name: str
    # A local .safetensors file, a folder, or a hub id.
    source: str
    image: str | None = None
    tags: tuple[str, ...] = ()
    trigger_words: tuple[str, ...] = ()
    # Model ids it applies to; empty means any model that supports LoRAs.
    models: tuple[str, ...] = ()

    def matches(self, query: str) -> bool:
        needle = query.strip().lower()
        haystack = [self.id, self.name, *self.tags, *self.trigger_words]
        return not needle or any(needle in item.lower() for item in haystack)


class Catalog(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    default: str
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    loras: dict[str, LoraSpec] = Field(default_factory=dict)

    def get(self, model_id: str | None) -> ModelSpec | None:
        return self.models.get(model_id or self.default)

    def lora(self, id_or_name: str) -> LoraSpec | None:
        """A LoRA by id, or else by its name (case-insensitive), as the weights.gg API names them."""
        found = self.loras.get(id_or_name)
        if found is not None:
            return found
        wanted = id_or_name.strip().lower()
        return next((spec for spec in self.loras.values() if spec.name.lower() == wanted), None)

    @property
    def backends(self) -> set[str]:
        return {m.backend for m in self.models.values()}
