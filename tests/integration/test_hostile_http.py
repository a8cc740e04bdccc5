"""Hostile input on every HTTP endpoint: schemathesis over the services' own OpenAPI.

Each service serves ``/healthz`` ``/readyz`` ``/metrics`` (and its OpenAPI document at
``/openapi.json``) through :func:`asympo.transport.serving.make_http_app` behind the body-size
limit of :class:`asympo.transport.serving.HttpServer`. Here the real servers run on free local
ports: the weights service as a whole, and the reward and learner apps on their own
metric registries. schemathesis derives valid and invalid requests (wrong methods,
junk query strings and headers, unexpected bodies) from the served schema and checks
that no answer is a server error and that every answer matches the schema. Offline:
the schema is read from the local server.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis.core.result import Ok
from schemathesis.generation.modes import GenerationMode
from schemathesis.schemas import BaseSchema

from asympo.config import Settings
from asympo.transport.serving import HttpServer, make_http_app
from services.learner import metrics as learner_metrics
from services.reward import metrics as reward_metrics
from services.weights.server import WeightsService

MAX_REQUEST_BYTES = 4096


@pytest.fixture(scope="module", params=["weights", "reward", "learner"])
def base_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The base URL of one service's real HTTP server."""
    if request.param == "weights":
        store = Path(tmp_path_factory.mktemp("hostile-http-weights"))
        cfg = Settings(
            weights={"store_dir": str(store)},  # type: ignore[arg-type]
            http_max_request_bytes=MAX_REQUEST_BYTES,
        )
        service = WeightsService(cfg, grpc_port=0, http_port=0).start()
        yield f"http://127.0.0.1:{service.http.port}"
        service.stop(grace=0.5)
        return
    registry = {"reward": reward_metrics, "learner": learner_metrics}[request.param].REGISTRY
    app = make_http_app(registry, title=f"asympo {request.param}")
    server = HttpServer(app, "127.0.0.1", 0, max_request_bytes=MAX_REQUEST_BYTES).start()
    yield f"http://127.0.0.1:{server.port}"
    server.stop()


@pytest.fixture(scope="module")
def api_schema(base_url: str) -> BaseSchema:
    """The OpenAPI document the server itself serves."""
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json")


def test_endpoints_conform_to_their_schema(api_schema: BaseSchema) -> None:
    """Valid and schema-violating requests: never a 5xx, answers as documented."""
    cases = st.one_of(
        api_schema.as_strategy(GenerationMode.POSITIVE),
        api_schema.as_strategy(GenerationMode.NEGATIVE),
    )

    @given(case=cases)
    @hypothesis_settings(
        max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
    )
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(timeout=10)

    check()


def test_schema_lists_every_endpoint(api_schema: BaseSchema) -> None:
    paths = {
        result.ok().path for result in api_schema.get_all_operations() if isinstance(result, Ok)
    }
    assert {"/healthz", "/readyz", "/metrics"} <= paths


def raw_status(base_url: str, request: bytes) -> int:
    """Send ``request`` bytes as they are (no client-side checks); the answer's status."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        head = sock.recv(4096)
    return int(head.split(b" ", 2)[1])


def test_oversized_odd_and_unknown_requests_get_clear_client_errors(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=10) as http:
        big = b"x" * (MAX_REQUEST_BYTES + 1)
        for path in ("/healthz", "/readyz", "/metrics", "/nope"):
            assert http.post(path, content=big).status_code == 413
            assert http.request("GET", path, content=big).status_code == 413

        def chunked() -> Iterator[bytes]:
            for _ in range(8):
                yield b"y" * 1024

        assert http.post("/metrics", content=chunked()).status_code == 413
        assert (
            raw_status(
                base_url, b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"
            )
            == 400
        )
        assert raw_status(base_url, b"\x16\x03\x01\x00\xa5garbage\r\n\r\n") == 400
        assert http.post("/healthz", content=b"\xff\xfe{").status_code == 405
        assert http.delete("/metrics").status_code == 405
        assert http.get("/healthz?x=" + "%00" * 500).status_code == 200
        assert http.get("/../../etc/passwd").status_code == 404
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.get("/metrics").status_code == 200
