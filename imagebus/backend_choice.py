"""Which worker pools ``imagebus up`` starts: each backend that has something to run, and why.

A worker for a backend nobody configured only costs memory and start-up CPU and then fails every
job it takes, so by default a backend starts only when one of its catalog models can run: the
remote backend when an endpoint needs no token or has one, the browser backend when a site it
drives has a signed-in session stored. ``--backends`` overrides the choice.
"""

from __future__ import annotations

from dataclasses import dataclass

from imagebus.settings import WorkerSettings
from schemas import Catalog

BACKENDS = ("diffusers", "remote", "browser")


@dataclass(frozen=True)
class BackendChoice:
    name: str
    start: bool
    reason: str


def choose_backends(catalog: Catalog, worker: WorkerSettings, forced: list[str] | None = None) -> list[BackendChoice]:
    """One choice per known backend; ``forced`` (from ``--backends``) starts exactly those."""
    if forced is not None:
        unknown = sorted(set(forced) - set(BACKENDS))
        if unknown:
            raise ValueError(f"unknown backend {', '.join(unknown)}; available: {', '.join(BACKENDS)}")
        return [
            BackendChoice(name, name in forced, "asked for by --backends" if name in forced else "not in --backends")
            for name in BACKENDS
        ]
    return [_diffusers(catalog), _remote(catalog, worker), _browser(catalog, worker)]


def _diffusers(catalog: Catalog) -> BackendChoice:
    models = [spec.id for spec in catalog.models.values() if spec.backend == "diffusers"]
    default = catalog.get(None)
    if default is not None and default.backend == "diffusers":
        return BackendChoice("diffusers", True, f"the default model {default.id} is a diffusers model")
    if models:
        return BackendChoice("diffusers", True, f"{len(models)} diffusers models in the catalog")
    return BackendChoice("diffusers", False, "no diffusers model in the catalog")


def _remote(catalog: Catalog, worker: WorkerSettings) -> BackendChoice:
    specs = [spec for spec in catalog.models.values() if spec.backend == "remote" and spec.endpoint]
    if not specs:
        return BackendChoice("remote", False, "no remote model in the catalog")
    usable: list[str] = []
    need_token: set[str] = set()
    for spec in specs:
        endpoint = catalog.endpoints.get(spec.endpoint or "")
        if endpoint is None:
            continue
        token = worker.remote_tokens.get(endpoint.id)
        if not endpoint.token_required or (token is not None and token.get_secret_value()):
            usable.append(f"{spec.id} via {endpoint.id}")
        else:
            need_token.add(endpoint.id)
    if usable:
        return BackendChoice("remote", True, ", ".join(usable))
    return BackendChoice(
        "remote",
        False,
        f"{', '.join(sorted(need_token))} need a token: set IMAGEBUS_WORKER_REMOTE_TOKENS",
    )


def _browser(catalog: Catalog, worker: WorkerSettings) -> BackendChoice:
    # The site a browser model drives is its `site` (else its id); the worker restores the
    # signed-in session from <storage_state_dir>/<site>.json and meets a login wall without it.
    sites = {spec.site or spec.id for spec in catalog.models.values() if spec.backend == "browser"}
    if not sites:
        return BackendChoice("browser", False, "no browser model in the catalog")
    folder = worker.storage_state_dir
    if folder is None:
        return BackendChoice("browser", False, "no signed-in session: IMAGEBUS_WORKER_STORAGE_STATE_DIR is unset")
    stored = sorted(site for site in sites if (folder / f"{site}.json").is_file())
    if stored:
        return BackendChoice("browser", True, f"stored session for {', '.join(stored)}")
    return BackendChoice(
        "browser", False, f"no signed-in session in {folder} ({', '.join(f'{site}.json' for site in sorted(sites))})"
    )
