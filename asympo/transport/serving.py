"""What every service serves besides its own API: HTTP health/metrics and a hardened gRPC server.

HTTP (FastAPI + uvicorn on a background thread)::

    app = make_http_app(REGISTRY, ready=lambda: store_ok, live=lambda: loop_alive)
    http = HttpServer(app, host, port, max_request_bytes=1 << 20).start()  # port 0: any free
    ...
    http.stop()

``/healthz`` answers 200 while ``live()`` is true (the process and its loops run) and 503
otherwise; ``/readyz`` answers 200 when ``ready()`` is true and 503 otherwise;
``/metrics`` exposes the given Prometheus registry. Request bodies beyond
``max_request_bytes`` get 413 before the handler sees them. Services build these
through :class:`asympo.service.Service`, which wires ``ready`` and ``live`` to their
supervised loops.

gRPC::

    grpc_server = GrpcServer(GrpcOptions.from_settings(settings, host, port),
                             token=secret, protected_methods={"/asympo.v1.Weights/Publish"})
    weights_pb2_grpc.add_WeightsServicer_to_server(servicer, grpc_server.server)
    port = grpc_server.start()
    wait_for_signal()                               # SIGTERM / SIGINT
    grpc_server.stop(grace=5)

Every gRPC server gets message size limits (RESOURCE_EXHAUSTED beyond), the standard
``grpc.health.v1.Health`` service, optional TLS, and bearer-token auth on the named
mutating methods (``authorization: Bearer <token>`` metadata, constant-time comparison).
"""

from __future__ import annotations

import hmac
import logging
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Collection, Iterable, MutableMapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import PlainTextResponse
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from asympo.config import ConfigError, Settings

log = logging.getLogger(__name__)

AUTH_METADATA_KEY = "authorization"

# ---------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodySizeLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, whether or not it
    announces its length (chunked bodies are counted as they arrive)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Reject oversized bodies; pass everything else through unchanged."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    announced = int(value)
                except ValueError:
                    await _plain_response(send, 400, b"invalid content-length\n")
                    return
                if announced > self.max_bytes:
                    await _plain_response(send, 413, self._too_large())
                    return
        # Read the whole (bounded) body first, then replay it: the app never sees a
        # partial body, and frameworks cannot turn the rejection into a parse error.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await _plain_response(send, 413, self._too_large())
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self) -> bytes:
        return f"request body larger than {self.max_bytes} bytes\n".encode()


async def _plain_response(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


def make_http_app(
    registry: CollectorRegistry,
    ready: Callable[[], bool] = lambda: True,
    *,
    live: Callable[[], bool] = lambda: True,
    title: str = "asympo",
) -> FastAPI:
    """A FastAPI app with ``/healthz``, ``/readyz`` and ``/metrics``; add routes to it freely.

    ``ready`` is called on every ``/readyz`` and ``live`` on every ``/healthz``; an
    exception counts as false.
    """
    app = FastAPI(title=title, docs_url=None, redoc_url=None)

    @app.get("/healthz", responses={503: {"description": "A main loop is dead"}})
    def healthz(response: Response) -> dict[str, str]:
        """Liveness: the process answers and none of its loops has died (503 otherwise)."""
        if not _check(live, "liveness"):
            response.status_code = 503
            return {"status": "dead"}
        return {"status": "ok"}

    # Every status and content type a client can see is in the OpenAPI document.
    @app.get("/readyz", responses={503: {"description": "Not ready"}})
    def readyz(response: Response) -> dict[str, str]:
        """Readiness: the service can do its job now (503 otherwise)."""
        if not _check(ready, "readiness"):
            response.status_code = 503
            return {"status": "not ready"}
        return {"status": "ready"}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> Response:
        """Prometheus text exposition of the service's registry."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _check(probe: Callable[[], bool], what: str) -> bool:
    try:
        return bool(probe())
    except Exception as exc:  # a failing probe means "no", never a 500
        log.warning("%s check failed: %s", what, exc)
        return False


class HttpServer:
    """Runs an ASGI app with uvicorn on a daemon thread; ``stop()`` shuts it down cleanly."""

    def __init__(
        self,
        app: FastAPI | ASGIApp,
        host: str,
        port: int,
        *,
        max_request_bytes: int = 1 << 20,
        log_level: str = "warning",
    ) -> None:
        self.host = host
        self._requested_port = port
        self.port = port
        limited = BodySizeLimit(app, max_request_bytes)
        config = uvicorn.Config(
            limited, log_level=log_level, access_log=False, lifespan="off", timeout_keep_alive=5
        )
        # Run off the main thread, uvicorn leaves signals alone: the service owns them
        # through wait_for_signal().
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 10.0) -> HttpServer:
        """Bind (port 0 picks a free port, see ``.port``) and serve in the background."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self._requested_port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"cannot listen for HTTP on {self.host}:{self._requested_port}: {exc}"
            ) from exc
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="http", daemon=True
        )
        self._thread.start()
        waited = 0.0
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"HTTP server on {self.host}:{self.port} failed to start")
            if waited > timeout_s:
                raise RuntimeError(f"HTTP server on {self.host}:{self.port} did not start")
            threading.Event().wait(0.01)
            waited += 0.01
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, finish in-flight requests, join the thread."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None


# ---------------------------------------------------------------------------------------
# gRPC
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GrpcOptions:
    """Where and how a gRPC server listens."""

    host: str
    port: int
    max_message_bytes: int = 64 << 20
    max_workers: int = 32
    max_concurrent_rpcs: int | None = None
    tls_cert_file: str = ""
    tls_key_file: str = ""

    @classmethod
    def from_settings(
        cls, settings: Settings, host: str, port: int, *, max_workers: int = 32
    ) -> GrpcOptions:
        """Size limits and TLS files from the top-level settings; host/port from a section."""
        return cls(
            host=host,
            port=port,
            max_message_bytes=settings.grpc_max_message_bytes,
            max_workers=max_workers,
            tls_cert_file=settings.tls_cert_file,
            tls_key_file=settings.tls_key_file,
        )


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that authenticates a client to a protected method."""
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on the named methods.

    Method names are full gRPC paths ("/asympo.v1.Weights/Publish"). With an empty
    server token the protected methods are refused outright: a forgotten token must
    not leave them open.
    """

    def __init__(self, token: str, protected_methods: Collection[str]) -> None:
        self._token = token.encode()
        self._protected = frozenset(protected_methods)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Pass authorised calls through; answer the rest with UNAUTHENTICATED."""
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in self._protected:
            return handler
        problem = self._problem(handler_call_details.invocation_metadata or ())
        if problem is None:
            return handler
        log.warning("rejected %s: %s", method, problem)
        return _denying_handler(handler, problem)

    def _problem(self, metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
        if not self._token:
            return (
                "this method needs a bearer token but the server has none configured "
                "(set the token in the server's settings)"
            )
        values = [value for key, value in metadata if key == AUTH_METADATA_KEY]
        if not values:
            return "missing 'authorization: Bearer <token>' metadata"
        raw = values[0]
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        scheme, _, offered = text.partition(" ")
        if scheme.lower() != "bearer" or not offered:
            return "authorization metadata must look like 'Bearer <token>'"
        if not hmac.compare_digest(offered.strip().encode(), self._token):
            return "invalid bearer token"
        return None


def _denying_handler(handler: grpc.RpcMethodHandler, problem: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that aborts with UNAUTHENTICATED."""

    def deny(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    ser = handler.response_serializer
    deser = handler.request_deserializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, deser, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, deser, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, deser, ser)
    return grpc.unary_unary_rpc_method_handler(deny, deser, ser)


class DecodeGuardInterceptor(grpc.ServerInterceptor):
    """Answers a request that is not valid protobuf with INVALID_ARGUMENT and one log line.

    Left to itself grpc answers INTERNAL ("Exception deserializing request!") and logs a
    traceback, which reads as a server fault. Here the request arrives as bytes and is
    parsed in the handler's thread, where a failure can be reported as the caller's.
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Wrap handlers that parse their requests; leave the rest alone."""
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _decoding_handler(handler, handler_call_details.method)


def _decoding_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    parse = handler.request_deserializer
    ser = handler.response_serializer

    def decode(raw: bytes, context: grpc.ServicerContext) -> Any:
        try:
            return parse(raw)
        except Exception as exc:  # protobuf raises DecodeError; any parse failure is the caller's
            log.warning("%s: rejected a request that is not valid protobuf: %s", method, exc)
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid message: {exc}"
            )

    def messages(raws: Iterable[bytes], context: grpc.ServicerContext) -> Iterable[Any]:
        for raw in raws:
            yield decode(raw, context)

    if handler.request_streaming:
        streaming = handler.stream_stream or handler.stream_unary

        def from_stream(raws: Iterable[bytes], context: grpc.ServicerContext) -> Any:
            return streaming(messages(raws, context), context)

        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(from_stream, None, ser)
        return grpc.stream_unary_rpc_method_handler(from_stream, None, ser)
    single = handler.unary_stream or handler.unary_unary

    def from_one(raw: bytes, context: grpc.ServicerContext) -> Any:
        return single(decode(raw, context), context)

    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(from_one, None, ser)
    return grpc.unary_unary_rpc_method_handler(from_one, None, ser)


class GrpcServer:
    """A ``grpc.server`` with size limits, health service, token auth and optional TLS.

    Register servicers on ``.server`` before ``start()``. ``.health`` is the standard
    health servicer: the overall status ("") and every name in ``services`` turn
    SERVING on start and NOT_SERVING on stop.
    """

    def __init__(
        self,
        options: GrpcOptions,
        *,
        token: str = "",
        protected_methods: Collection[str] = (),
        services: Collection[str] = (),
    ) -> None:
        self.options = options
        self.port = options.port
        self._services = ("", *services)
        interceptors: list[grpc.ServerInterceptor] = []
        if protected_methods:
            interceptors.append(TokenAuthInterceptor(token, protected_methods))
        # Innermost: authentication is decided before any request byte is parsed.
        interceptors.append(DecodeGuardInterceptor())
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=options.max_workers, thread_name_prefix="grpc"),
            interceptors=interceptors,
            options=message_size_options(options.max_message_bytes),
            maximum_concurrent_rpcs=options.max_concurrent_rpcs,
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for name in self._services:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def start(self) -> int:
        """Bind and start; returns the bound port (useful when the options asked for 0)."""
        address = f"{self.options.host}:{self.options.port}"
        try:
            credentials = server_credentials(self.options.tls_cert_file, self.options.tls_key_file)
            if credentials is None:
                port = self.server.add_insecure_port(address)
            else:
                port = self.server.add_secure_port(address, credentials)
        except RuntimeError as exc:  # grpc raises RuntimeError when it cannot bind
            raise ConfigError(f"cannot listen for gRPC on {address}: {exc}") from exc
        if port == 0:
            raise ConfigError(f"cannot listen for gRPC on {address} (address in use?)")
        self.port = port
        self.server.start()
        for name in self._services:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return port

    def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, refuse new calls, give in-flight calls ``grace`` seconds."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait(grace + 1.0)


def message_size_options(max_bytes: int) -> list[tuple[str, int]]:
    """Channel/server options capping messages both ways at ``max_bytes``."""
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]


def server_credentials(cert_file: str, key_file: str) -> grpc.ServerCredentials | None:
    """TLS credentials when both files are given, None for plaintext; half a pair is an error."""
    if not cert_file and not key_file:
        return None
    if not (cert_file and key_file):
        raise ConfigError("TLS needs both tls_cert_file and tls_key_file")
    cert, key = _read_pem(cert_file), _read_pem(key_file)
    return grpc.ssl_server_credentials([(key, cert)])


def client_channel(
    target: str,
    *,
    max_message_bytes: int = 64 << 20,
    tls_ca_file: str = "",
    tls: bool = False,
) -> grpc.Channel:
    """A channel to ``target`` ("host:port"): TLS when ``tls`` or a CA file is given."""
    options = message_size_options(max_message_bytes)
    if not (tls or tls_ca_file):
        return grpc.insecure_channel(target, options=options)
    root = _read_pem(tls_ca_file) if tls_ca_file else None
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(root), options=options)


def client_channel_from_settings(settings: Settings, host: str, port: int) -> grpc.Channel:
    """A channel to one service, with the size limit and TLS choice of ``settings``."""
    return client_channel(
        f"{host}:{port}",
        max_message_bytes=settings.grpc_max_message_bytes,
        tls_ca_file=settings.tls_ca_file,
        tls=bool(settings.tls_cert_file),
    )


def _read_pem(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read TLS file {path}: {exc}") from exc


# ---------------------------------------------------------------------------------------
# Process lifetime
# ---------------------------------------------------------------------------------------


def wait_for_signal(
    stop: threading.Event | None = None,
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
) -> str:
    """Block until SIGTERM/SIGINT arrives (or ``stop`` is set); return what ended the wait.

    Must be called from the main thread (Python delivers signals there). The previous
    handlers are restored before returning, so a second Ctrl-C during shutdown still
    interrupts.
    """
    event = stop or threading.Event()
    received: list[str] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        event.set()

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        while not event.wait(0.5):
            pass
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return received[0] if received else "stop requested"
