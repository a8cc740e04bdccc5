"""The shared serving layer: HTTP health/metrics/size limit, gRPC auth, health and size limits."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter

from asympo.config import ConfigError
from asympo.transport.serving import (
    GrpcOptions,
    GrpcServer,
    HttpServer,
    bearer_metadata,
    client_channel,
    make_http_app,
)
from asympo.v1 import records_pb2, weights_pb2, weights_pb2_grpc


def test_http_health_ready_metrics_and_body_limit() -> None:
    registry = CollectorRegistry()
    Counter("asympo_test_things_total", "things", registry=registry).inc(3)
    ready = {"ok": False}
    app = make_http_app(registry, ready=lambda: ready["ok"])

    @app.post("/echo")
    def echo(body: dict[str, str]) -> dict[str, str]:
        return body

    server = HttpServer(app, "127.0.0.1", 0, max_request_bytes=2048).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert httpx.get(f"{base}/healthz").status_code == 200
        assert httpx.get(f"{base}/readyz").status_code == 503
        ready["ok"] = True
        assert httpx.get(f"{base}/readyz").status_code == 200
        text = httpx.get(f"{base}/metrics").text
        assert "asympo_test_things_total 3.0" in text
        assert httpx.post(f"{base}/echo", json={"a": "b"}).json() == {"a": "b"}
        big = httpx.post(f"{base}/echo", json={"a": "x" * 5000})
        assert big.status_code == 413

        def chunks() -> Iterator[bytes]:
            for _ in range(10):
                yield b"y" * 1000

        chunked = httpx.post(f"{base}/echo", content=chunks())
        assert chunked.status_code == 413
    finally:
        server.stop()


class _Echo(weights_pb2_grpc.WeightsServicer):
    def Latest(
        self, request: weights_pb2.LatestRequest, context: grpc.ServicerContext
    ) -> records_pb2.WeightsManifest:
        return records_pb2.WeightsManifest(version=7)

    def Publish(
        self, request_iterator: Iterator[weights_pb2.PublishChunk], context: grpc.ServicerContext
    ) -> weights_pb2.PublishReply:
        total = sum(len(c.data.data) for c in request_iterator)
        return weights_pb2.PublishReply(version=1, bytes_received=total)


@pytest.fixture
def grpc_server() -> Iterator[tuple[GrpcServer, weights_pb2_grpc.WeightsStub, grpc.Channel]]:
    server = GrpcServer(
        GrpcOptions("127.0.0.1", 0, max_message_bytes=64 * 1024),
        token="s3cret",
        protected_methods={"/asympo.v1.Weights/Publish"},
        services=["asympo.v1.Weights"],
    )
    weights_pb2_grpc.add_WeightsServicer_to_server(_Echo(), server.server)
    port = server.start()
    channel = client_channel(f"127.0.0.1:{port}", max_message_bytes=1 << 20)
    yield server, weights_pb2_grpc.WeightsStub(channel), channel
    channel.close()
    server.stop(grace=0.5)


def _chunks(n: int) -> Iterator[weights_pb2.PublishChunk]:
    yield weights_pb2.PublishChunk(data=weights_pb2.ShardData(shard="a", data=b"z" * n))


def test_grpc_token_auth(
    grpc_server: tuple[GrpcServer, weights_pb2_grpc.WeightsStub, grpc.Channel],
) -> None:
    _, stub, _ = grpc_server
    # unprotected methods need no token
    assert stub.Latest(weights_pb2.LatestRequest()).version == 7
    for metadata, expected in [
        ((), "missing"),
        (bearer_metadata("wrong"), "invalid bearer token"),
        ((("authorization", "Basic s3cret"),), "Bearer"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            stub.Publish(_chunks(10), metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert expected in (err.value.details() or "")
    reply = stub.Publish(_chunks(10), metadata=bearer_metadata("s3cret"))
    assert reply.bytes_received == 10


def test_grpc_empty_server_token_refuses_protected_methods() -> None:
    server = GrpcServer(
        GrpcOptions("127.0.0.1", 0), token="", protected_methods={"/asympo.v1.Weights/Publish"}
    )
    weights_pb2_grpc.add_WeightsServicer_to_server(_Echo(), server.server)
    port = server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = weights_pb2_grpc.WeightsStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.Publish(_chunks(1), metadata=bearer_metadata(""))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "none configured" in (err.value.details() or "")
    finally:
        server.stop(grace=0.5)


def test_grpc_size_limit_and_health(
    grpc_server: tuple[GrpcServer, weights_pb2_grpc.WeightsStub, grpc.Channel],
) -> None:
    server, stub, channel = grpc_server
    with pytest.raises(grpc.RpcError) as err:
        stub.Publish(_chunks(100 * 1024), metadata=bearer_metadata("s3cret"))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "asympo.v1.Weights"):
        status = health.Check(health_pb2.HealthCheckRequest(service=name)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    server.stop(grace=0.5)
    with pytest.raises(grpc.RpcError):
        health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)


def test_grpc_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    server = GrpcServer(
        GrpcOptions("127.0.0.1", 0, tls_cert_file=str(cert), tls_key_file=str(key)),
        services=["asympo.v1.Weights"],
    )
    weights_pb2_grpc.add_WeightsServicer_to_server(_Echo(), server.server)
    port = server.start()
    try:
        with client_channel(f"localhost:{port}", tls_ca_file=str(cert)) as channel:
            assert (
                weights_pb2_grpc.WeightsStub(channel)
                .Latest(weights_pb2.LatestRequest(), timeout=10)
                .version
                == 7
            )
        with client_channel(f"localhost:{port}") as plain, pytest.raises(grpc.RpcError):
            weights_pb2_grpc.WeightsStub(plain).Latest(weights_pb2.LatestRequest(), timeout=2)
    finally:
        server.stop(grace=0.5)
    with pytest.raises(ConfigError, match="both"):
        GrpcServer(GrpcOptions("127.0.0.1", 0, tls_cert_file=str(cert))).start()
