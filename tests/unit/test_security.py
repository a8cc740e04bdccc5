"""Security (issue 12): tokens on mutating RPCs, gRPC TLS, rediss://, verifiers never run output.

The code-base scan for pickle / unsafe torch.load / eval is in ``test_no_pickle.py``;
this file checks the running pieces.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import pytest
import redis
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from asympo.config import Settings
from asympo.transport.serving import bearer_metadata, client_channel, client_channel_from_settings
from asympo.transport.weights_client import WeightsClient
from asympo.v1 import (
    learner_pb2,
    learner_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    weights_pb2,
    weights_pb2_grpc,
)
from asympo.verifiers import BUILTIN, VerifierPool, run_verifier
from services.learner.learner import Learner
from services.learner.server import start_grpc
from services.reward.server import RewardServicer
from services.weights.server import WeightsService

TOKEN = "security-test-token"


def _publish_chunks() -> Iterator[weights_pb2.PublishChunk]:
    yield weights_pb2.PublishChunk()


@pytest.fixture
def weights(tmp_path: Path) -> Iterator[WeightsService]:
    cfg = Settings(weights={"store_dir": str(tmp_path / "store"), "publish_token": TOKEN})  # type: ignore[arg-type]
    service = WeightsService(cfg, grpc_port=0, http_port=0).start()
    yield service
    service.stop(grace=0.5)


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        bearer_metadata(""),
        bearer_metadata("x" + TOKEN),
        bearer_metadata(TOKEN[:-1]),
        (("authorization", TOKEN),),
    ],
    ids=["missing", "empty", "longer", "prefix", "no-scheme"],
)
def test_weights_publish_needs_the_token(
    weights: WeightsService, metadata: tuple[tuple[str, str], ...]
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{weights.grpc_port}") as channel:
        stub = weights_pb2_grpc.WeightsStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Publish(_publish_chunks(), metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # With the token the same (empty) stream reaches the handler and is judged on content.
        with pytest.raises(grpc.RpcError) as err:
            stub.Publish(_publish_chunks(), metadata=bearer_metadata(TOKEN), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert weights.store.versions() == []


def test_learner_checkpoint_needs_the_service_token() -> None:
    settings = Settings(service_token=TOKEN)  # type: ignore[arg-type]
    # No learner behind the server: an unauthenticated call must be refused before any
    # handler runs (if it were not, the handler would fail with UNKNOWN, not UNAUTHENTICATED).
    server = start_grpc(settings, cast(Learner, None), port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = learner_pb2_grpc.LearnerStub(channel)
            for metadata in [(), bearer_metadata("wrong"), (("authorization", f"Basic {TOKEN}"),)]:
                with pytest.raises(grpc.RpcError) as err:
                    stub.Checkpoint(learner_pb2.CheckpointRequest(), metadata=metadata, timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(grace=0.5)


def test_token_comparison_is_constant_time() -> None:
    import inspect

    from asympo.transport import serving

    source = inspect.getsource(serving.TokenAuthInterceptor)
    assert "hmac.compare_digest" in source
    assert "== self._token" not in source and "!= self._token" not in source


# ---------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost/127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_weights_over_tls_from_settings(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    settings = Settings(
        weights={"store_dir": str(tmp_path / "store"), "publish_token": TOKEN},  # type: ignore[arg-type]
        tls_cert_file=str(cert),
        tls_key_file=str(key),
        tls_ca_file=str(cert),
    )
    service = WeightsService(settings, grpc_port=0, http_port=0).start()
    try:
        port = service.grpc_port
        # A client trusting the CA publishes and reads back over TLS.
        with WeightsClient(f"localhost:{port}", token=TOKEN, tls_ca_file=str(cert)) as client:
            client.publish_state_dict({"w": torch.ones(3)}, version=0)
        # The channel the services build from the same settings trusts the CA too.
        with client_channel_from_settings(settings, "localhost", port) as channel:
            latest = weights_pb2_grpc.WeightsStub(channel).Latest(
                weights_pb2.LatestRequest(), timeout=10
            )
            assert latest.version == 0
        # A plaintext client cannot talk to the TLS port.
        with grpc.insecure_channel(f"localhost:{port}") as plain:
            with pytest.raises(grpc.RpcError) as err:
                weights_pb2_grpc.WeightsStub(plain).Latest(weights_pb2.LatestRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # A TLS client that does not trust this certificate is refused too.
        with client_channel(f"localhost:{port}", tls=True) as untrusting:
            with pytest.raises(grpc.RpcError) as err:
                weights_pb2_grpc.WeightsStub(untrusting).Latest(
                    weights_pb2.LatestRequest(), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        service.stop(grace=0.5)


# ---------------------------------------------------------------------------------------
# rediss://
# ---------------------------------------------------------------------------------------


def test_rediss_url_makes_a_tls_connection_pool() -> None:
    for url in ("rediss://:secret@redis.example:6380/2", "rediss://redis.example"):
        client = redis.Redis.from_url(url)
        assert client.connection_pool.connection_class is redis.SSLConnection
    assert redis.Redis.from_url("redis://x").connection_pool.connection_class is redis.Connection


def test_connect_accepts_rediss_and_tries_tls(tmp_path: Path) -> None:
    from asympo.transport.redis_conn import RedisUnavailable, connect

    # Nothing listens there: connect must fail cleanly (RedisUnavailable), not reject the
    # scheme, and must not leak the password into the message.
    with pytest.raises(RedisUnavailable) as err:
        connect("rediss://:hunter2@127.0.0.1:1/0", str(tmp_path))
    assert "hunter2" not in str(err.value)
    assert "rediss://" in str(err.value)


# ---------------------------------------------------------------------------------------
# Verifiers never run model output
# ---------------------------------------------------------------------------------------


def _hostile_outputs(marker: Path) -> list[str]:
    command = f"touch {marker}"
    return [
        f"__import__('os').system('{command}')",
        f"\\boxed{{__import__('os').system('{command}')}}",
        f"#### __import__('os').system('{command}')",
        f"$\\boxed{{{{exec(\"import os; os.system('{command}')\")}}}}$",
        f"eval(\"__import__('os').system('{command}')\")",
        f"{{{{ ''.__class__.__mro__[1].__subclasses__() }}}} ; $({command})",
        f"`{command}`",
    ]


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_verifiers_never_execute_model_output(name: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for text in _hostile_outputs(marker):
        for response, reference in ((text, "3"), ("3", text), (text, text)):
            verdict = run_verifier(BUILTIN[name], name, response, reference)
            assert verdict.reward in (0.0, 1.0)
    assert not marker.exists(), f"verifier {name!r} executed model output"


def test_score_rpc_refuses_code_paths_as_verifier_names(tmp_path: Path) -> None:
    """``module:function`` names from a client never run: Score answers NOT_FOUND."""
    from asympo.transport.serving import GrpcOptions, GrpcServer

    marker = tmp_path / "pwned"
    with VerifierPool(size=1, time_limit_s=5.0) as pool:
        server = GrpcServer(GrpcOptions("127.0.0.1", 0))
        reward_pb2_grpc.add_RewardServicer_to_server(RewardServicer(pool), server.server)
        port = server.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = reward_pb2_grpc.RewardStub(channel)
                for verifier, reference in [
                    ("os:popen", "r"),
                    ("subprocess:getoutput", ""),
                    ("os:system", ""),
                ]:
                    item = reward_pb2.ScoreItem(
                        verifier=verifier, response=f"touch {marker}", reference_answer=reference
                    )
                    with pytest.raises(grpc.RpcError) as err:
                        stub.Score(reward_pb2.ScoreRequest(items=[item]), timeout=30)
                    assert err.value.code() == grpc.StatusCode.NOT_FOUND
                for name in sorted(BUILTIN):
                    for text in _hostile_outputs(marker):
                        item = reward_pb2.ScoreItem(
                            verifier=name, response=text, reference_answer="3"
                        )
                        reply = stub.Score(reward_pb2.ScoreRequest(items=[item]), timeout=30)
                        assert reply.scores[0].reward == 0.0
        finally:
            server.stop(grace=0.5)
    assert not marker.exists()
