"""deploy/ is right without a cluster: every YAML parses, the Serve configs validate with Ray's own
schema and their import paths resolve to our application builders, the Kubernetes manifests and
every Ray head/worker pod template validate against the Kubernetes schemas that
``kubernetes-validate`` ships (strict: unknown fields are errors), and the pieces agree with each
other (secrets and config maps exist, settings parse, the CPU group offers what the consumers ask for).
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import shlex
import socket
from collections.abc import Iterator
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
import typer
import yaml
from pydantic import ValidationError
from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema, ServeApplicationSchema, ServeDeploySchema

from schemas.settings import SERVING_VARIABLES, Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
"""The oldest Kubernetes we claim (deploy/README.md) and the newest the package knows."""
RAY_KINDS = {"RayService", "RayJob"}
NOT_VALIDATED_KINDS = {"Kustomization"}
SETTINGS_VARIABLES = {
    "REDIS_URL",
    "S3_ENDPOINT",
    "S3_ACCESS_KEY",
    "S3_SECRET_KEY",
    "S3_SECURE",
    "S3_REGION",
    "ANOMAP_BUCKET",
    "ANOMAP_REFERENCE_BUCKETS",
    "RAY_ADDRESS",
    "ANOMAP_STREAM_PREFIX",
    "ANOMAP_MODEL_NAME",
    "ANOMAP_STATE_DIR",
    *SERVING_VARIABLES.values(),
}
"""Every variable `Settings.from_env` reads (schemas/settings.py)."""


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """``("file kind/name", object)`` for every Kubernetes object under deploy/k8s/."""
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in documents(path):
            meta = doc.get("metadata", {})
            name = meta.get("name") or meta.get("generateName") or "-"
            found.append((f"{path.name} {doc['kind']}/{name}", doc))
    return found


def objects(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def the(kind: str, name: str | None = None) -> dict[str, Any]:
    [obj] = [doc for doc in objects(kind) if name is None or doc["metadata"].get("name") == name]
    return obj


def ray_cluster_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["rayClusterConfig" if obj["kind"] == "RayService" else "rayClusterSpec"]


def pod_templates() -> list[tuple[str, dict[str, Any]]]:
    """``("RayService/anomap head", template)`` for every head and worker group of the Ray objects."""
    found = []
    for _, obj in manifests():
        if obj["kind"] not in RAY_KINDS:
            continue
        label = f"{obj['kind']}/{obj['metadata'].get('name') or obj['metadata']['generateName']}"
        spec = ray_cluster_spec(obj)
        found.append((f"{label} head", spec["headGroupSpec"]["template"]))
        for group in spec.get("workerGroupSpecs", []):
            found.append((f"{label} {group['groupName']}", group["template"]))
    return found


def serve_configs() -> list[tuple[str, dict[str, Any]]]:
    """deploy/serve.yaml and the config embedded in the RayService."""
    [serve_yaml] = documents(DEPLOY / "serve.yaml")
    embedded = yaml.safe_load(the("RayService")["spec"]["serveConfigV2"])
    return [("serve.yaml", serve_yaml), ("rayservice.yaml serveConfigV2", embedded)]


def ids(pairs: list[tuple[str, Any]]) -> list[str]:
    return [label for label, _ in pairs]


@cache
def pod_template_validator(version: str) -> jsonschema.protocols.Validator:
    """A validator for io.k8s.api.core.v1.PodTemplateSpec from kubernetes-validate's bundled (strict) schemas.

    Its public ``validate`` picks a schema by ``kind``/``apiVersion``, which a pod template does not
    carry (and the strict schema forbids), so the schema file is loaded the same way by hand.
    """
    root = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}-local-strict"
    schema = json.loads((root / "podtemplatespec-v1.json").read_text())
    definitions = json.loads((root / "_definitions.json").read_text())
    registry = referencing.Registry().with_resources(
        (resource["$id"], referencing.Resource.from_contents(resource)) for resource in (schema, definitions)
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate_pod_template(template: dict[str, Any], version: str) -> None:
    pod_template_validator(version).validate(template)


# ---------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses_into_mappings(path: Path) -> None:
    docs = documents(path)
    assert docs, f"{path} has no YAML documents"
    assert all(isinstance(doc, dict) for doc in docs)


def test_deploy_has_the_manifests_the_docs_describe() -> None:
    kinds = sorted(doc["kind"] for _, doc in manifests())
    for kind in ("RayService", "RayJob", "StatefulSet", "Service", "Secret", "ConfigMap", "PersistentVolumeClaim"):
        assert kind in kinds
    assert {s["metadata"]["name"] for s in objects("StatefulSet")} == {"valkey", "minio"}


def test_kustomization_lists_existing_manifests() -> None:
    [kustomization] = documents(K8S / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource


# ---------------------------------------------------------------------------------------- Serve configs


def _unknown_keys(config: dict[str, Any]) -> list[str]:
    """Keys Ray's schema would silently ignore (it allows extra fields): typos, mostly."""
    problems = [f"top: {key}" for key in set(config) - set(ServeDeploySchema.model_fields)]
    for app in config.get("applications", []):
        problems += [f"{app.get('name')}: {key}" for key in set(app) - set(ServeApplicationSchema.model_fields)]
        for deployment in app.get("deployments", []):
            where = f"{app.get('name')}.{deployment.get('name')}"
            problems += [f"{where}: {key}" for key in set(deployment) - set(DeploymentSchema.model_fields)]
            options = deployment.get("ray_actor_options", {})
            problems += [
                f"{where}.ray_actor_options: {key}" for key in set(options) - set(RayActorOptionsSchema.model_fields)
            ]
    return problems


@pytest.mark.parametrize(("label", "config"), serve_configs(), ids=ids(serve_configs()))
def test_serve_config_validates_with_rays_schema(label: str, config: dict[str, Any]) -> None:
    schema = ServeDeploySchema.model_validate(config)
    assert {app.name for app in schema.applications} >= {"anomap", "anomap-consumers"}
    for app in config["applications"]:
        ServeApplicationSchema.model_validate(app)
    assert _unknown_keys(config) == []


@pytest.mark.parametrize(("label", "config"), serve_configs(), ids=ids(serve_configs()))
def test_serve_config_import_paths_resolve_to_application_builders(label: str, config: dict[str, Any]) -> None:
    from workers import consumer_app, http_api, serve_app

    builders = {"anomap": serve_app.app_builder, "anomap-consumers": consumer_app.app_builder}
    builders["anomap-http"] = http_api.app_builder
    for app in config["applications"]:
        module_name, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module_name), attr)
        assert builder is builders[app["name"]], app["import_path"]


def test_consumer_app_builder_accepts_the_config_args_and_rejects_unknown_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from workers.consumer_app import app_builder

    monkeypatch.setenv("REDIS_URL", "redis://valkey:6379/0")
    monkeypatch.setenv("S3_ENDPOINT", "http://minio:9000")
    for _, config in serve_configs():
        [app] = [a for a in config["applications"] if a["name"] == "anomap-consumers"]
        app_builder(app["args"])  # builds the graph; nothing runs until serve.run
    with pytest.raises(ValueError, match="unknown app_builder args"):
        app_builder({"consumers": "2"})
    with pytest.raises(ValueError, match="comma-separated line ids"):
        app_builder({"lines": "Line A"})


def test_rayservice_runs_the_applications_of_serve_yaml() -> None:
    (_, serve_yaml), (_, embedded) = serve_configs()
    embedded_apps = {app["name"]: app for app in embedded["applications"]}
    for app in serve_yaml["applications"]:
        twin = embedded_apps[app["name"]]
        assert twin["import_path"] == app["import_path"]
        assert twin["args"] == app["args"], f"{app['name']}: args differ between serve.yaml and the RayService"
    assert embedded_apps["anomap-http"]["route_prefix"] == "/"


def test_broken_serve_config_is_rejected() -> None:
    _, config = serve_configs()[0]
    bad_path = copy.deepcopy(config)
    bad_path["applications"][0]["import_path"] = "no_module_separator"
    with pytest.raises(ValidationError, match="import path"):
        ServeDeploySchema.model_validate(bad_path)
    typo = copy.deepcopy(config)
    typo["applications"][0]["improt_path"] = typo["applications"][0].pop("import_path")
    with pytest.raises(ValidationError):
        ServeDeploySchema.model_validate(typo)
    extra = copy.deepcopy(config)
    extra["applications"][1]["deployment"] = []
    assert _unknown_keys(extra) == ["anomap-consumers: deployment"]


# ---------------------------------------------------------------------------------------- Kubernetes schemas


def kubernetes_manifests() -> list[tuple[str, dict[str, Any]]]:
    return [(label, doc) for label, doc in manifests() if doc["kind"] not in RAY_KINDS | NOT_VALIDATED_KINDS]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("label", "manifest"), kubernetes_manifests(), ids=ids(kubernetes_manifests()))
def test_kubernetes_manifest_validates(label: str, manifest: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(manifest, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("label", "template"), pod_templates(), ids=ids(pod_templates()))
def test_ray_pod_template_validates_as_pod_template_spec(label: str, template: dict[str, Any], version: str) -> None:
    validate_pod_template(template, version)


def test_every_ray_object_has_head_and_worker_templates() -> None:
    labels = ids(pod_templates())
    for expected in (
        "RayService/anomap head",
        "RayService/anomap gpu-scorers",
        "RayService/anomap cpu-consumers",
        "RayJob/anomap-train- head",
        "RayJob/anomap-train- gpu-trainers",
    ):
        assert expected in labels


def test_broken_manifest_is_rejected() -> None:
    statefulset = copy.deepcopy(the("StatefulSet", "valkey"))
    statefulset["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError, match="'one' is not of type 'integer'"):
        kubernetes_validate.validate(statefulset, K8S_VERSIONS[0], strict=True)
    service = copy.deepcopy(the("Service", "valkey"))
    service["spec"]["ports"][0]["prot"] = 6379  # a typo: strict schemas reject unknown fields
    with pytest.raises(kubernetes_validate.ValidationError, match="prot"):
        kubernetes_validate.validate(service, K8S_VERSIONS[0], strict=True)


def test_broken_pod_template_is_rejected() -> None:
    _, template = pod_templates()[0]
    nameless = copy.deepcopy(template)
    del nameless["spec"]["containers"][0]["name"]
    with pytest.raises(jsonschema.ValidationError, match="'name' is a required property"):
        validate_pod_template(nameless, K8S_VERSIONS[0])
    typo = copy.deepcopy(template)
    typo["spec"]["containers"][0]["envfrom"] = typo["spec"]["containers"][0].pop("envFrom")
    with pytest.raises(jsonschema.ValidationError, match="envfrom"):
        validate_pod_template(typo, K8S_VERSIONS[0])


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(*args: object, **kwargs: object) -> None:
        msg = "the network was used"
        raise AssertionError(msg)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


def test_schemas_ship_with_the_package_and_nothing_is_downloaded(no_network: None) -> None:
    root = files("kubernetes_validate") / "kubernetes-json-schema"
    for version in K8S_VERSIONS:
        assert (root / f"v{version}-local-strict" / "statefulset-apps-v1.json").is_file()
    pod_template_validator.cache_clear()
    for _, manifest in kubernetes_manifests():
        kubernetes_validate.validate(manifest, K8S_VERSIONS[0], strict=True)
    for _, template in pod_templates():
        validate_pod_template(template, K8S_VERSIONS[0])


# ---------------------------------------------------------------------------------------- consistency


def _containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    return template["spec"]["containers"]


def _pod_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as Kubernetes would build it from the manifests' Secrets and ConfigMaps."""
    secrets = {s["metadata"]["name"]: s.get("stringData", {}) for s in objects("Secret")}
    config_maps = {c["metadata"]["name"]: c.get("data", {}) for c in objects("ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]])
        else:
            env.update(secrets[source["secretRef"]["name"]])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], var["value"])
        elif "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = config_maps[ref["name"]][ref["key"]]
    return env


@pytest.mark.parametrize(("label", "template"), pod_templates(), ids=ids(pod_templates()))
def test_ray_pods_get_complete_settings_from_secrets_and_config(label: str, template: dict[str, Any]) -> None:
    env = _pod_env(_containers(template)[0])  # KeyError: a Secret, ConfigMap or key the manifests lack
    anomap_like = {name for name in env if name.startswith(("ANOMAP_", "S3_")) or name in {"REDIS_URL"}}
    assert anomap_like <= SETTINGS_VARIABLES, f"not read by Settings: {sorted(anomap_like - SETTINGS_VARIABLES)}"
    settings = Settings.from_env(env)
    assert settings.redis_url is not None and settings.s3_access_key is not None and settings.s3_secret_key
    service_ports = {(s["metadata"]["name"], p["port"]) for s in objects("Service") for p in s["spec"]["ports"]}
    redis_host = re.match(r"redis://:[^@]+@([^:/]+):(\d+)/", settings.redis_url.get_secret_value())
    assert redis_host is not None
    assert (redis_host.group(1), int(redis_host.group(2))) in service_ports
    s3_host, _, s3_port = (settings.s3_host or "").partition(":")
    assert (s3_host, int(s3_port)) in service_ports
    assert env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "1", "multi-node Ray needs this at 1 (see config.yaml)"


def test_containerfile_does_not_make_ray_loopback_only() -> None:
    text = (DEPLOY / "Containerfile").read_text()
    env_lines = [line for line in text.splitlines() if line.startswith("ENV")]
    assert not any("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in line for line in env_lines)
    assert "wget" in text  # KubeRay's probes


def test_workloads_land_on_the_groups_meant_for_them() -> None:
    spec = ray_cluster_spec(the("RayService"))
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    gpu_limits = _containers(groups["gpu-scorers"]["template"])[0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) >= 1
    raw = groups["cpu-consumers"]["rayStartParams"]["resources"]
    offered = json.loads(raw.strip('"').replace('\\"', '"'))  # KubeRay's quoting for `ray start --resources`
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (_, _), (_, embedded) = serve_configs()
    deployments = {d["name"]: d for app in embedded["applications"] for d in app.get("deployments", [])}
    assert deployments["PatchScorer"]["ray_actor_options"]["num_gpus"] > 0
    for name in ("InspectionService", "StreamConsumers", "HttpGateway"):
        wanted = deployments[name]["ray_actor_options"]["resources"]
        assert set(wanted) <= set(offered), f"{name} asks for {wanted}; the CPU group offers {offered}"


def test_ray_version_matches_the_installed_ray() -> None:
    import ray

    for _, obj in manifests():
        if obj["kind"] in RAY_KINDS:
            assert ray_cluster_spec(obj)["rayVersion"] == ray.__version__


def test_rayjob_entrypoint_is_a_valid_anomap_command() -> None:
    from cluster.cli import app

    words = shlex.split(the("RayJob")["spec"]["entrypoint"])
    assert words[:2] == ["anomap", "train"]
    group = typer.main.get_command(app)
    parent = group.make_context("anomap", ["train"], resilient_parsing=True)
    command = group.get_command(parent, "train")  # type: ignore[attr-defined]
    assert command is not None
    context = command.make_context("train", words[2:], parent=parent)  # raises on unknown or bad options
    assert context.params["gpu"] is True and context.params["workers"] == 2


def test_valkey_persists_with_aof_on_a_volume_and_never_evicts() -> None:
    statefulset = the("StatefulSet", "valkey")
    [container] = _containers(statefulset["spec"]["template"])
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    data_dir = args[args.index("--dir") + 1]
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == data_dir
