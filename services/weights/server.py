"""The weights service: gRPC Publish / Fetch / Latest / Watch over a :class:`WeightStore`.

Publish (and RegisterBroadcast) need ``authorization: Bearer <weights.publish_token>``;
everything else is read-only. RegisterBroadcast / GetBroadcast are the rendezvous of the
direct path (``weights.transport=broadcast``, asympo/transport/weight_broadcast.py): the learner
says where its broadcast group is, a starting rollout replica asks. Each new version is
announced on Watch streams and, when Redis is configured, on the run's weights stream as
a ``VersionAnnouncement``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import redis

from asympo.config import Settings
from asympo.transport.serving import GrpcOptions, GrpcServer, HttpServer, make_http_app
from asympo.transport.streams import Producer
from asympo.transport.weight_store import (
    MAX_VERSION,
    IntegrityError,
    InvalidManifest,
    PublishTooLarge,
    StaleVersion,
    VersionExists,
    VersionNotFound,
    WeightStore,
    WeightStoreError,
)
from asympo.v1 import records_pb2, weights_pb2, weights_pb2_grpc
from services.weights import metrics

log = logging.getLogger("asympo.weights")

SERVICE_NAME = "asympo.v1.Weights"
PUBLISH_METHOD = f"/{SERVICE_NAME}/Publish"
REGISTER_BROADCAST_METHOD = f"/{SERVICE_NAME}/RegisterBroadcast"
# Room for the ShardData envelope (shard name, offset) inside one gRPC message.
_ENVELOPE_BYTES = 64 * 1024
MAX_WATCHERS = 64

Announcer = Callable[[records_pb2.VersionAnnouncement], None]


def _status_of(exc: WeightStoreError) -> grpc.StatusCode:
    if isinstance(exc, VersionNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, PublishTooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, VersionExists):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(exc, StaleVersion):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, IntegrityError):
        return grpc.StatusCode.DATA_LOSS
    if isinstance(exc, InvalidManifest):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


class WeightsServicer(weights_pb2_grpc.WeightsServicer):
    """gRPC handlers; every bad input ends in a status with a message, never a crash."""

    def __init__(
        self,
        store: WeightStore,
        *,
        chunk_bytes: int,
        max_message_bytes: int,
        announce: Announcer | None = None,
        source: str = "weights",
    ) -> None:
        self.store = store
        self.max_chunk_bytes = max(4096, max_message_bytes - _ENVELOPE_BYTES)
        self.chunk_bytes = min(chunk_bytes, self.max_chunk_bytes)
        self.announce = announce
        self.source = source
        self.stopping = threading.Event()
        self._watchers = 0
        self._watchers_lock = threading.Lock()
        self._broadcast: weights_pb2.BroadcastEndpoint | None = None

    # -- Publish ------------------------------------------------------------------------

    def Publish(
        self, request_iterator: Iterator[weights_pb2.PublishChunk], context: grpc.ServicerContext
    ) -> weights_pb2.PublishReply:
        """Receive a manifest then shard bytes; the version is visible only once verified."""
        started = time.perf_counter()
        try:
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("kind") != "manifest":
                raise InvalidManifest("the first Publish message must carry the manifest")
            with self.store.begin_publish(first.manifest) as staged:
                for chunk in request_iterator:
                    if chunk.WhichOneof("kind") != "data":
                        raise InvalidManifest("only shard data may follow the manifest")
                    staged.write(chunk.data.shard, chunk.data.offset, chunk.data.data)
                    metrics.PUBLISH_BYTES.inc(len(chunk.data.data))
                if not context.is_active():
                    raise InvalidManifest("the publisher went away before the end")
                manifest = staged.commit()
        except WeightStoreError as exc:
            code = _status_of(exc)
            metrics.PUBLISH_REJECTED.labels(reason=code.name.lower()).inc()
            log.warning("publish rejected (%s): %s", code.name, exc)
            context.abort(code, str(exc))
        metrics.PUBLISH_SECONDS.observe(time.perf_counter() - started)
        metrics.PUBLISHED.inc()
        self._refresh_gauges()
        if staged.is_new:  # a retried or resumed identical re-publish is not news
            self._announce(manifest)
        return weights_pb2.PublishReply(
            version=manifest.version, bytes_received=staged.bytes_received
        )

    def _announce(self, manifest: records_pb2.WeightsManifest) -> None:
        if self.announce is None:
            return
        announcement = records_pb2.VersionAnnouncement(
            version=manifest.version,
            manifest=manifest,
            source=self.source,
            announced_at=time.time(),
        )
        try:
            self.announce(announcement)
        except Exception as exc:  # the version is published; Watch and Latest still see it
            metrics.ANNOUNCE_FAILURES.inc()
            log.error("could not announce version %d on the stream: %s", manifest.version, exc)

    def _refresh_gauges(self) -> None:
        latest = self.store.latest()
        metrics.LATEST_VERSION.set(latest.version if latest else -1)
        metrics.VERSIONS_STORED.set(len(self.store.versions()))

    # -- Fetch --------------------------------------------------------------------------

    def Fetch(
        self, request: weights_pb2.FetchRequest, context: grpc.ServicerContext
    ) -> Iterator[weights_pb2.FetchChunk]:
        """The manifest, then shard bytes from ``offset``; DATA_LOSS if the store rotted."""
        problem = self._check_fetch(request)
        if problem is not None:
            metrics.FETCH_ERRORS.labels(reason="invalid_argument").inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        chunk_bytes = request.chunk_bytes or self.chunk_bytes
        try:
            with self.store.lease(request.version) as manifest:
                names = [request.shard] if request.shard else [s.name for s in manifest.shards]
                readers = [self.store.reader(manifest, n, 0) for n in names]
                if request.offset and request.offset > readers[0].info.size:
                    context.abort(
                        grpc.StatusCode.OUT_OF_RANGE,
                        f"offset {request.offset} is past the end of shard {request.shard!r} "
                        f"({readers[0].info.size} bytes)",
                    )
                readers[0].offset = request.offset
                yield weights_pb2.FetchChunk(manifest=manifest)
                for reader in readers:
                    for offset, data in reader.chunks(chunk_bytes):
                        if not context.is_active():
                            return
                        yield weights_pb2.FetchChunk(
                            data=weights_pb2.ShardData(
                                shard=reader.info.name, offset=offset, data=data
                            )
                        )
                        metrics.FETCH_BYTES.inc(len(data))
        except WeightStoreError as exc:
            code = _status_of(exc)
            if isinstance(exc, IntegrityError):
                metrics.INTEGRITY_ERRORS.inc()
                log.error("serving version %d: %s", request.version, exc)
            metrics.FETCH_ERRORS.labels(reason=code.name.lower()).inc()
            context.abort(code, str(exc))

    def _check_fetch(self, request: weights_pb2.FetchRequest) -> str | None:
        if not -1 <= request.version <= MAX_VERSION:
            return f"version must be -1 (latest) or in [0, {MAX_VERSION}], got {request.version}"
        if request.offset < 0:
            return f"offset must be >= 0, got {request.offset}"
        if request.offset and not request.shard:
            return "a non-zero offset needs a shard name (resume one shard at a time)"
        if request.chunk_bytes < 0 or request.chunk_bytes > self.max_chunk_bytes:
            return f"chunk_bytes must be in [0, {self.max_chunk_bytes}], got {request.chunk_bytes}"
        if len(request.shard) > 256:
            return "shard name too long"
        return None

    # -- Latest / Watch -----------------------------------------------------------------

    def Latest(
        self, request: weights_pb2.LatestRequest, context: grpc.ServicerContext
    ) -> records_pb2.WeightsManifest:
        """The newest visible version's manifest; NOT_FOUND while the store is empty."""
        latest = self.store.latest()
        if latest is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no version has been published yet")
            raise AssertionError("unreachable: abort raises")
        return latest

    def Watch(
        self, request: weights_pb2.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[records_pb2.VersionAnnouncement]:
        """Every stored version newer than ``after_version``, then each new one as it lands."""
        if not -1 <= request.after_version <= MAX_VERSION:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"after_version must be in [-1, {MAX_VERSION}], got {request.after_version}",
            )
        with self._watchers_lock:
            if self._watchers >= MAX_WATCHERS:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, f"more than {MAX_WATCHERS} open watches"
                )
            self._watchers += 1
            metrics.WATCHERS.set(self._watchers)
        try:
            last = request.after_version
            while context.is_active() and not self.stopping.is_set():
                for version in self.store.wait_for_newer(last, timeout_s=0.5):
                    try:
                        manifest = self.store.manifest(version)
                    except VersionNotFound:  # deleted by retention meanwhile
                        continue
                    yield records_pb2.VersionAnnouncement(
                        version=version,
                        manifest=manifest,
                        source=self.source,
                        announced_at=time.time(),
                    )
                    last = version
        finally:
            with self._watchers_lock:
                self._watchers -= 1
                metrics.WATCHERS.set(self._watchers)

    # -- the direct broadcast's rendezvous ----------------------------------------------

    def RegisterBroadcast(
        self, request: weights_pb2.BroadcastEndpoint, context: grpc.ServicerContext
    ) -> weights_pb2.BroadcastEndpoint:
        """Remember where the learner's broadcast group is joined (the newest one wins)."""
        if not request.host or len(request.host) > 255 or not 1 <= request.port <= 65535:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a broadcast endpoint needs a host and a port in [1, 65535], got "
                f"{request.host[:64]!r}:{request.port}",
            )
        if len(request.epoch) > 128:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "epoch too long")
        if self._broadcast != request:
            log.info(
                "broadcast group at %s:%d (epoch %s)", request.host, request.port, request.epoch
            )
        self._broadcast = request
        return request

    def GetBroadcast(
        self, request: weights_pb2.BroadcastEndpointRequest, context: grpc.ServicerContext
    ) -> weights_pb2.BroadcastEndpoint:
        """The registered broadcast endpoint; NOT_FOUND while none is."""
        endpoint = self._broadcast
        if endpoint is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no learner has registered a broadcast group")
            raise AssertionError("unreachable: abort raises")
        return endpoint


class StreamAnnouncer:
    """Writes announcements to the run's weights stream; connects lazily, so a Redis
    outage delays announcements without stopping the service."""

    def __init__(self, connect: Callable[[], redis.Redis], stream_key: str, maxlen: int) -> None:
        self._connect = connect
        self.stream_key = stream_key
        self.maxlen = maxlen
        self._producer: Producer[records_pb2.VersionAnnouncement] | None = None

    def __call__(self, announcement: records_pb2.VersionAnnouncement) -> None:
        """Append one announcement; raises on failure (the caller logs and counts it)."""
        if self._producer is None:
            self._producer = Producer(
                self._connect(),
                self.stream_key,
                records_pb2.VersionAnnouncement,
                maxlen=self.maxlen,
            )
        try:
            self._producer.send(announcement)
        except redis.RedisError:
            self._producer = None  # reconnect next time
            raise


class WeightsService:
    """Store + gRPC server + HTTP health/metrics, started and stopped together.

    ``grpc_port`` / ``http_port`` override the settings (0 = any free port, for tests).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        announce: Announcer | None = None,
        grpc_port: int | None = None,
        http_port: int | None = None,
    ) -> None:
        cfg = settings.weights
        self.settings = settings
        self.store = WeightStore(cfg.store_dir, cfg.keep_last, cfg.max_publish_bytes)
        self.servicer = WeightsServicer(
            self.store,
            chunk_bytes=cfg.chunk_bytes,
            max_message_bytes=settings.grpc_max_message_bytes,
            announce=announce,
        )
        self.grpc = GrpcServer(
            GrpcOptions.from_settings(
                settings,
                cfg.host,
                cfg.grpc_port if grpc_port is None else grpc_port,
                max_workers=MAX_WATCHERS + 32,
            ),
            token=cfg.publish_token.get_secret_value(),
            protected_methods={PUBLISH_METHOD, REGISTER_BROADCAST_METHOD},
            services=[SERVICE_NAME],
        )
        weights_pb2_grpc.add_WeightsServicer_to_server(self.servicer, self.grpc.server)
        self._started = False
        self.http = HttpServer(
            make_http_app(metrics.REGISTRY, ready=self.ready, title="asympo weights"),
            cfg.host,
            cfg.http_port if http_port is None else http_port,
            max_request_bytes=settings.http_max_request_bytes,
        )

    @property
    def grpc_port(self) -> int:
        """The bound gRPC port (after start)."""
        return self.grpc.port

    def ready(self) -> bool:
        """Ready while serving and the store directory is writable."""
        return self._started and _writable(self.store.staging_dir)

    def start(self) -> WeightsService:
        """Start gRPC then HTTP; announce the latest stored version (if any) once more."""
        self.grpc.start()
        self.http.start()
        self._started = True
        self.servicer._refresh_gauges()
        latest = self.store.latest()
        if latest is not None:
            self.servicer._announce(latest)
        log.info(
            "weights service: gRPC %s:%d, HTTP %s:%d, store %s (latest version %s)",
            self.settings.weights.host,
            self.grpc.port,
            self.settings.weights.host,
            self.http.port,
            self.store.root,
            latest.version if latest else "none",
        )
        return self

    def stop(self, grace: float = 5.0) -> None:
        """End watches, drain in-flight calls for ``grace`` seconds, stop HTTP."""
        self._started = False
        self.servicer.stopping.set()
        self.grpc.stop(grace)
        self.http.stop()


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK)
