"""Loading the model catalog: the shipped default, a user file, and a one-flag override."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from schemas import Catalog, ModelSpec


def load_catalog(path: Path | None = None, default_model: str | None = None) -> Catalog:
    """The catalog at ``path`` (else the shipped one), with ``default_model`` made the default.

    ``default_model`` may be a catalog id ("sd-turbo"), or a hub id / local folder that is then
    added as model "custom", so a real model is one env var away (``IMAGEBUS_MODEL``).
    """
    if path is not None:
        raw = json.loads(Path(path).read_text())
    else:
        raw = json.loads(resources.files("imagebus").joinpath("models.json").read_text())
    catalog = Catalog.model_validate(raw)
    if not default_model:
        return catalog
    if default_model in catalog.models:
        return catalog.model_copy(update={"default": default_model})
    custom = ModelSpec(
        id="custom",
        description=f"{default_model} (set by IMAGEBUS_MODEL)",
        source=default_model,
    )
    return catalog.model_copy(update={"default": "custom", "models": {**catalog.models, "custom": custom}})
