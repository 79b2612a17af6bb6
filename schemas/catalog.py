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


class Catalog(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    default: str
    models: dict[str, ModelSpec] = Field(default_factory=dict)

    def get(self, model_id: str | None) -> ModelSpec | None:
        return self.models.get(model_id or self.default)

    @property
    def backends(self) -> set[str]:
        return {m.backend for m in self.models.values()}
