"""The model catalog: which models exist, which backend runs them, and their limits."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Latent spaces the diffusers backend knows (previews, prompt weighting); "other" gets the generic path.
ModelFamily = Literal["sd", "sdxl", "sd3", "flux", "other"]


class ModelSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    description: str
    backend: str = "diffusers"
    # The command queue this model's jobs go to; None means the backend's shared queue. Models with
    # a pool of their own are served only by workers started for that pool (``--pool``), so a pool
    # per model (or per family) is a catalog change. Pools never overlap: each model names one.
    pool: str | None = None
    # diffusers: a hub id ("stabilityai/sd-turbo"), a local folder, or "builtin:<name>" for the
    # offline tiny pipelines. remote: the model name sent to the endpoint. browser: unused.
    source: str
    random_weights: bool = False
    family: ModelFamily = "sd"
    # diffusers pipeline class ("FluxPipeline"); None lets AutoPipelineForText2Image pick it.
    pipeline: str | None = None
    # Weight file variant on the hub ("fp16"), where the repository has one.
    variant: str | None = None
    # Resident size estimate, for the worker's model-cache budget before the first load measures it.
    memory_gb: float | None = None
    # remote: which catalog endpoint serves it. browser: which site profile drives it.
    endpoint: str | None = None
    site: str | None = None
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
    # Distilled models (turbo, schnell) ignore guidance; a non-default value is refused at ingress.
    supports_guidance: bool = True

    @property
    def queue(self) -> str:
        return self.pool or self.backend

    @model_validator(mode="after")
    def _backend_fields(self) -> ModelSpec:
        if self.backend == "remote" and not self.endpoint:
            raise ValueError(f"remote model {self.id!r} needs an endpoint")
        if self.backend == "browser" and not self.site:
            raise ValueError(f"browser model {self.id!r} needs a site")
        return self


class RemoteEndpoint(BaseModel):
    """A hosted image API the remote backend calls. Its token comes from the worker's secrets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    # "openai": POST {url} with a JSON body, answers b64_json or url. "chutes": POST {url} with a
    # JSON body, answers the image bytes.
    kind: Literal["openai", "chutes"]
    url: str
    response_format: Literal["b64_json", "url"] = "b64_json"
    # Requests in flight at once, across every job of one worker (the Chutes proxy allowed 10).
    concurrency: int = Field(default=10, ge=1, le=256)
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=3, ge=0, le=10)
    max_image_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    # Hosted APIs refuse keyless calls: fail such jobs at once instead of asking (local servers may not).
    token_required: bool = False


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
    endpoints: dict[str, RemoteEndpoint] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references(self) -> Catalog:
        for spec in self.models.values():
            if spec.endpoint is not None and spec.backend == "remote" and spec.endpoint not in self.endpoints:
                raise ValueError(f"model {spec.id!r} names endpoint {spec.endpoint!r}, which the catalog lacks")
        pools: dict[str, str] = {}
        for spec in self.models.values():
            if pools.setdefault(spec.queue, spec.backend) != spec.backend:
                raise ValueError(f"pool {spec.queue!r} holds models of two backends")
        return self

    def models_in(self, queue: str) -> list[ModelSpec]:
        """The models whose jobs go to ``queue``."""
        return [spec for spec in self.models.values() if spec.queue == queue]

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
