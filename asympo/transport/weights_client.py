"""Client of the weights service, for the learner (publish) and rollout (fetch, watch).

Learner::

    client = WeightsClient.from_settings(settings)
    client.publish_state_dict(model.state_dict(), version=step, parent_version=prev, probe=probe)
    client.publish_dir("runs/x/final", version=step)        # every *.safetensors in it

Rollout::

    path = client.fetch(version, "runs/rollout/weights")     # verified local copy
    for announcement in client.watch(after_version=current): ...

``fetch`` stages bytes in ``<dest_root>/.partial-<version>/``, resumes shards already
partly there (after an interruption, or a restart), checks every digest (BLAKE3, or
sha256 for older manifests) and size against the manifest while the bytes arrive, and
only then renames the directory to ``<dest_root>/<version>/`` (zero-padded, see
:func:`asympo.transport.weight_store.version_dirname`). A mismatch raises
:class:`WeightsIntegrityError` and leaves every complete local version untouched. A
version of several shards is fetched over one stream per shard, in parallel. Nothing is
fsynced: a fetched copy is a cache, verified before it is renamed into place, and after
a machine crash it is fetched again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import blake3
import grpc
import torch
from safetensors.torch import save_file

from asympo.config import Settings
from asympo.transport.serving import bearer_metadata, client_channel
from asympo.transport.weight_store import (
    MANIFEST_NAME,
    BackgroundHash,
    file_digest,
    manifest_from_json,
    manifest_to_json,
    shard_digest,
    version_dirname,
)
from asympo.v1 import records_pb2, weights_pb2, weights_pb2_grpc

log = logging.getLogger(__name__)

PARTIAL_MANIFEST_NAME = "fetching.manifest.json"

# Failures worth a resumed retry; anything else is an answer, not an accident.
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}


class WeightsClientError(Exception):
    """A weights operation failed; the message says which and why."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class WeightsNotFound(WeightsClientError):
    """The version does not exist on the server (never published, or retired)."""


class WeightsIntegrityError(WeightsClientError):
    """Fetched (or stored) bytes do not match the manifest: refuse these weights."""


class PublishRejected(WeightsClientError):
    """The server refused a publish (token, stale or duplicate version, bad manifest)."""


@dataclass(frozen=True)
class FetchResult:
    """A verified local copy of one version."""

    path: Path
    manifest: records_pb2.WeightsManifest
    bytes_received: int  # 0 when the version was already complete locally


def _none_if_not_found(call: Callable[[], Any], what: str) -> Any:
    """``call()``'s reply, or None when the service answers NOT_FOUND (nothing there yet);
    any other failure as a WeightsClientError naming ``what``."""
    try:
        return call()
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise _error(exc, what) from exc


def _error(exc: grpc.RpcError, what: str) -> WeightsClientError:
    code = exc.code()
    message = f"{what}: {code.name}: {exc.details()}"
    if code == grpc.StatusCode.NOT_FOUND:
        return WeightsNotFound(message, code)
    if code == grpc.StatusCode.DATA_LOSS:
        return WeightsIntegrityError(message, code)
    return WeightsClientError(message, code)


def unshared_cpu_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of ``state`` in which no two names share memory.

    safetensors refuses shared storage: tied embeddings (one tensor under two names), but
    also two views into one storage at different offsets — so tensors are told apart by
    their storage, not by where they start in it. A loader that skips a tied duplicate
    makes the extra copy harmless.
    """
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        out[name] = t
    return out


def shard_groups(
    state_dict: Mapping[str, torch.Tensor], max_shard_bytes: int = 2 << 30
) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """``(file name, tensors)`` of each shard: ``model-00001.safetensors``, ... of at most
    ``max_shard_bytes`` (a tensor larger than that gets a shard of its own)."""
    tensors = unshared_cpu_tensors(state_dict)
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += nbytes
    return [(f"model-{i:05d}.safetensors", g) for i, g in enumerate(groups, start=1)]


def write_shards(
    state_dict: Mapping[str, torch.Tensor], directory: Path, max_shard_bytes: int = 2 << 30
) -> list[Path]:
    """Save a state dict as safetensors shards in ``directory`` (see :func:`shard_groups`)."""
    paths = []
    for name, group in shard_groups(state_dict, max_shard_bytes):
        save_file(group, str(directory / name))
        paths.append(directory / name)
    return paths


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def safetensors_parts(tensors: Mapping[str, torch.Tensor]) -> list[memoryview]:
    """The bytes of a safetensors file of ``tensors`` as parts: the header, then each
    tensor's own memory (no copy; the tensors must stay unchanged while the parts are
    used). Joined, they are a file ``safetensors.torch.load`` reads back bit for bit;
    ``safetensors.torch.save`` would copy every byte first, at a fraction of memcpy speed.
    """
    header: dict[str, object] = {}
    parts: list[memoryview] = []
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} has no safetensors name")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        flat = t.detach().reshape(-1)
        raw_bytes: Any = flat.view(torch.uint8).numpy()  # shares the tensor's memory
        parts.append(memoryview(raw_bytes) if nbytes else memoryview(b""))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return [memoryview(struct.pack("<Q", len(raw)) + raw), *parts]


def _chunks(parts: list[memoryview], chunk_bytes: int) -> Iterator[bytes]:
    """The concatenation of ``parts`` in pieces of ``chunk_bytes`` (the last one shorter)."""
    pending: list[memoryview] = []
    size = 0
    for part in parts:
        start = 0
        while start < len(part):
            take = min(chunk_bytes - size, len(part) - start)
            pending.append(part[start : start + take])
            size += take
            start += take
            if size == chunk_bytes:
                yield b"".join(pending)
                pending, size = [], 0
    if pending:
        yield b"".join(pending)


def build_manifest(
    shard_paths: list[Path],
    version: int,
    parent_version: int = -1,
    probe: records_pb2.Probe | None = None,
    metadata: Mapping[str, str] | None = None,
) -> records_pb2.WeightsManifest:
    """A manifest with the size and BLAKE3 of every shard (dtypes are filled by the server)."""
    manifest = records_pb2.WeightsManifest(
        version=version, parent_version=parent_version, created_at=time.time()
    )
    for path in shard_paths:  # each hash already uses every core
        manifest.shards.add(name=path.name, blake3=file_digest(path), size=path.stat().st_size)
    if probe is not None:
        manifest.probe.CopyFrom(probe)
    manifest.metadata.update(metadata or {})
    return manifest


class WeightsClient:
    """Talks to one weights service over gRPC."""

    def __init__(
        self,
        target: str,
        *,
        token: str = "",
        max_message_bytes: int = 64 << 20,
        chunk_bytes: int = 1 << 20,
        tls_ca_file: str = "",
        tls: bool = False,
        timeout_s: float = 600.0,
        parallel_streams: int | None = None,
    ) -> None:
        self.target = target
        # Streams of a multi-shard fetch. Each costs a core (gRPC + hashing under the GIL
        # and beside it): on 2 cores one stream measured faster than four (benchmarks.md).
        self.parallel_streams = parallel_streams or max(1, min(4, (os.cpu_count() or 1) // 2))
        self._token = token
        self.chunk_bytes = chunk_bytes
        self.timeout_s = timeout_s
        self.channel = client_channel(
            target, max_message_bytes=max_message_bytes, tls_ca_file=tls_ca_file, tls=tls
        )
        self.stub = weights_pb2_grpc.WeightsStub(self.channel)

    @classmethod
    def from_settings(cls, settings: Settings, host: str | None = None) -> WeightsClient:
        """A client for ``weights.host:weights.grpc_port`` with the publish token."""
        cfg = settings.weights
        return cls(
            f"{host or cfg.host}:{cfg.grpc_port}",
            token=cfg.publish_token.get_secret_value(),
            max_message_bytes=settings.grpc_max_message_bytes,
            chunk_bytes=cfg.chunk_bytes,
            tls_ca_file=settings.tls_ca_file,
            tls=bool(settings.tls_cert_file),
        )

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> WeightsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ------------------------------------------------------------------------

    def latest(self) -> records_pb2.WeightsManifest | None:
        """The newest version's manifest, or None while nothing is published."""
        manifest: records_pb2.WeightsManifest | None = _none_if_not_found(
            lambda: self.stub.Latest(weights_pb2.LatestRequest(), timeout=30), "Latest"
        )
        return manifest

    def watch(
        self, after_version: int = -1, timeout_s: float | None = None
    ) -> Iterator[records_pb2.VersionAnnouncement]:
        """Announcements of every version newer than ``after_version``, as they land.

        Ends after ``timeout_s`` (None = never) or when the server goes away (then raises
        WeightsClientError).
        """
        call = self.stub.Watch(
            weights_pb2.WatchRequest(after_version=after_version), timeout=timeout_s
        )
        try:
            yield from call
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return
            raise _error(exc, "Watch") from exc
        finally:
            call.cancel()

    def fetch(self, version: int, dest_root: str | Path, *, retries: int = 3) -> Path:
        """Fetch ``version`` (-1 = latest) into ``dest_root``; returns its verified directory."""
        return self.fetch_into(version, dest_root, retries=retries).path

    def fetch_into(self, version: int, dest_root: str | Path, *, retries: int = 3) -> FetchResult:
        """Like :meth:`fetch`, with the manifest and the number of bytes transferred."""
        root = Path(dest_root)
        root.mkdir(parents=True, exist_ok=True)
        if version == -1:
            latest = self.latest()
            if latest is None:
                raise WeightsNotFound("no version has been published yet")
            version = latest.version
        final = root / version_dirname(version)
        if (final / MANIFEST_NAME).is_file():
            return FetchResult(final, manifest_from_json((final / MANIFEST_NAME).read_text()), 0)
        partial = root / f".partial-{version_dirname(version)}"
        partial.mkdir(exist_ok=True)
        staged_manifest = partial / PARTIAL_MANIFEST_NAME
        digests: dict[str, BackgroundHash] = {}
        received = 0
        try:
            if staged_manifest.is_file():  # resuming an earlier, interrupted fetch
                manifest = manifest_from_json(staged_manifest.read_text())
            else:
                manifest, received = self._stream_version(version, partial, digests)
            # Shards the single stream did not bring (several shards: it stops after the
            # manifest; or it was interrupted) come over one stream each, in parallel.
            workers = max(1, min(len(manifest.shards), self.parallel_streams))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch") as pool:
                futures = [
                    pool.submit(
                        self._fetch_shard,
                        manifest,
                        info,
                        partial / info.name,
                        retries,
                        digests.get(info.name),
                    )
                    for info in manifest.shards
                ]
                received += sum(f.result() for f in futures)
        except WeightsIntegrityError:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        staged_manifest.unlink()
        (partial / MANIFEST_NAME).write_text(manifest_to_json(manifest))
        os.rename(partial, final)
        log.info("fetched version %d into %s (%d bytes)", version, final, received)
        return FetchResult(final, manifest, received)

    def _stream_version(
        self, version: int, partial: Path, digests: dict[str, BackgroundHash]
    ) -> tuple[records_pb2.WeightsManifest, int]:
        """Fetch a one-shard version in one stream (the common case); for several shards
        stop after the manifest (the caller fetches them in parallel). A transient failure
        after the manifest arrived is left to the per-shard resume; returns (manifest, bytes)."""
        call = self.stub.Fetch(
            weights_pb2.FetchRequest(version=version, chunk_bytes=self.chunk_bytes),
            timeout=self.timeout_s,
        )
        manifest: records_pb2.WeightsManifest | None = None
        received = 0
        files: dict[str, BinaryIO] = {}
        try:
            for chunk in call:
                if chunk.WhichOneof("kind") == "manifest":
                    manifest = chunk.manifest
                    if manifest.version != version:
                        raise WeightsIntegrityError(
                            f"asked for version {version}, got {manifest.version}"
                        )
                    (partial / PARTIAL_MANIFEST_NAME).write_text(manifest_to_json(manifest))
                    if len(manifest.shards) > 1 and self.parallel_streams > 1:
                        break
                    continue
                data = chunk.data
                if manifest is None or data.shard not in {s.name for s in manifest.shards}:
                    raise WeightsIntegrityError(f"unexpected data for shard {data.shard!r}")
                f = files.get(data.shard)
                if f is None:
                    f = files[data.shard] = (partial / data.shard).open("wb")
                    info = next(s for s in manifest.shards if s.name == data.shard)
                    digests[data.shard] = BackgroundHash(shard_digest(info)[0])
                if data.offset != f.tell():
                    raise WeightsIntegrityError(
                        f"out-of-order data for {data.shard}: offset {data.offset}, "
                        f"expected {f.tell()}"
                    )
                f.write(data.data)
                digests[data.shard].update(data.data)
                received += len(data.data)
        except grpc.RpcError as exc:
            if manifest is None or exc.code() not in _TRANSIENT:
                raise _error(exc, f"fetch version {version}") from exc
            log.warning("fetch of version %d interrupted (%s); resuming", version, exc.code().name)
        finally:
            for f in files.values():
                f.close()
            call.cancel()
        if manifest is None:
            raise WeightsClientError(f"server answered version {version} without its manifest")
        return manifest, received

    def _fetch_shard(
        self,
        manifest: records_pb2.WeightsManifest,
        info: records_pb2.ShardInfo,
        path: Path,
        retries: int,
        digest: BackgroundHash | None = None,
    ) -> int:
        """Bring ``path`` to the full, verified shard, resuming what is there; bytes received.

        ``digest`` is the running hash of the bytes already in ``path`` when known (else
        the part on disk is hashed first).
        """
        received = 0
        attempt = 0
        if path.exists() and path.stat().st_size > info.size:
            path.unlink()
            digest = None
        algorithm, expected = shard_digest(info)
        if digest is None or not path.exists():
            digest = BackgroundHash(algorithm)
            if path.exists():
                with path.open("rb") as f:
                    while block := f.read(4 << 20):
                        digest.update(block)
        while True:
            have = path.stat().st_size if path.exists() else 0
            if have == info.size:
                break
            try:
                received += self._stream_shard(manifest.version, info, path, have, digest)
            except grpc.RpcError as exc:
                if exc.code() not in _TRANSIENT or attempt >= retries:
                    raise _error(exc, f"fetch {info.name} of version {manifest.version}") from exc
                attempt += 1
                log.warning("fetch of %s interrupted (%s); resuming", info.name, exc.code().name)
                time.sleep(min(0.2 * 2**attempt, 5.0))
            if path.stat().st_size > info.size:
                path.unlink()
                raise WeightsIntegrityError(
                    f"shard {info.name} of version {manifest.version}: the server sent more "
                    f"than the {info.size} bytes the manifest declares"
                )
        actual = digest.hexdigest()
        digest.close()
        if actual != expected:
            path.unlink()
            raise WeightsIntegrityError(
                f"shard {info.name} of version {manifest.version}: {algorithm} {actual} "
                f"does not match the manifest's {expected}; refusing these weights"
            )
        return received

    def _stream_shard(
        self,
        version: int,
        info: records_pb2.ShardInfo,
        path: Path,
        have: int,
        digest: BackgroundHash,
    ) -> int:
        """Append the shard's bytes from ``have`` to ``path``; bytes received (even on error)."""
        request = weights_pb2.FetchRequest(
            version=version, shard=info.name, offset=have, chunk_bytes=self.chunk_bytes
        )
        received = 0
        call = self.stub.Fetch(request, timeout=self.timeout_s)
        with path.open("ab") as f:
            for chunk in call:
                kind = chunk.WhichOneof("kind")
                if kind == "manifest":
                    shards = {s.name: (shard_digest(s), s.size) for s in chunk.manifest.shards}
                    if shards.get(info.name) != (shard_digest(info), info.size):
                        raise WeightsIntegrityError(
                            f"version {version} changed on the server while being fetched"
                        )
                    continue
                data = chunk.data
                if data.shard != info.name or data.offset != have + received:
                    raise WeightsIntegrityError(
                        f"out-of-order data for {info.name}: offset {data.offset}, "
                        f"expected {have + received}"
                    )
                f.write(data.data)
                digest.update(data.data)
                received += len(data.data)
        return received

    # -- the direct broadcast's rendezvous -------------------------------------------------

    def register_broadcast(self, host: str, port: int, epoch: str) -> None:
        """Learner rank 0: tell the service where its broadcast group is joined."""
        endpoint = weights_pb2.BroadcastEndpoint(host=host, port=port, epoch=epoch)
        try:
            self.stub.RegisterBroadcast(
                endpoint, metadata=bearer_metadata(self._token) if self._token else (), timeout=30
            )
        except grpc.RpcError as exc:
            raise _error(exc, "RegisterBroadcast") from exc

    def broadcast_endpoint(self) -> weights_pb2.BroadcastEndpoint | None:
        """Where the learner's broadcast group is joined; None while none is registered."""
        endpoint: weights_pb2.BroadcastEndpoint | None = _none_if_not_found(
            lambda: self.stub.GetBroadcast(weights_pb2.BroadcastEndpointRequest(), timeout=30),
            "GetBroadcast",
        )
        return endpoint

    # -- publishing ---------------------------------------------------------------------

    def publish_dir(
        self,
        directory: str | Path,
        version: int,
        parent_version: int = -1,
        probe: records_pb2.Probe | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> records_pb2.WeightsManifest:
        """Publish every ``*.safetensors`` file of ``directory`` (e.g. a saved HF model) as
        ``version``; returns the manifest the server stored."""
        shards = sorted(Path(directory).glob("*.safetensors"))
        if not shards:
            raise WeightsClientError(f"no .safetensors files in {directory}")
        manifest = build_manifest(shards, version, parent_version, probe, metadata)
        return self.publish_manifest(manifest, Path(directory))

    def publish_state_dict(
        self,
        state_dict: Mapping[str, torch.Tensor],
        version: int,
        parent_version: int = -1,
        probe: records_pb2.Probe | None = None,
        metadata: Mapping[str, str] | None = None,
        max_shard_bytes: int = 2 << 30,
    ) -> records_pb2.WeightsManifest:
        """Publish ``state_dict`` as safetensors shards, straight from memory.

        Nothing touches the disk on this side and nothing is serialised: each shard is
        its safetensors header plus the tensors' own memory (:func:`safetensors_parts`),
        hashed (BLAKE3, every core) for the manifest, then streamed in chunks.
        """
        shards = [
            (name, safetensors_parts(g)) for name, g in shard_groups(state_dict, max_shard_bytes)
        ]
        manifest = records_pb2.WeightsManifest(
            version=version, parent_version=parent_version, created_at=time.time()
        )
        for name, parts in shards:
            digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
            for part in parts:
                digest.update(part)
            manifest.shards.add(
                name=name, blake3=digest.hexdigest(), size=sum(len(p) for p in parts)
            )
        if probe is not None:
            manifest.probe.CopyFrom(probe)
        manifest.metadata.update(metadata or {})

        def blocks() -> Iterator[tuple[str, int, bytes]]:
            for name, parts in shards:
                offset = 0
                for block in _chunks(parts, self.chunk_bytes):
                    yield name, offset, block
                    offset += len(block)

        return self._publish(manifest, blocks())

    def publish_manifest(
        self, manifest: records_pb2.WeightsManifest, directory: Path
    ) -> records_pb2.WeightsManifest:
        """Stream ``manifest`` then each listed shard from ``directory``."""

        def blocks() -> Iterator[tuple[str, int, bytes]]:
            for info in manifest.shards:
                with (directory / info.name).open("rb") as f:
                    offset = 0
                    while block := f.read(self.chunk_bytes):
                        yield info.name, offset, block
                        offset += len(block)

        return self._publish(manifest, blocks())

    def _publish(
        self, manifest: records_pb2.WeightsManifest, blocks: Iterator[tuple[str, int, bytes]]
    ) -> records_pb2.WeightsManifest:
        """Stream ``manifest`` then the ``(shard, offset, bytes)`` blocks of its shards."""

        def messages() -> Iterator[weights_pb2.PublishChunk]:
            yield weights_pb2.PublishChunk(manifest=manifest)
            for name, offset, block in blocks:
                yield weights_pb2.PublishChunk(
                    data=weights_pb2.ShardData(shard=name, offset=offset, data=block)
                )

        try:
            self.stub.Publish(
                messages(),
                metadata=bearer_metadata(self._token) if self._token else (),
                timeout=self.timeout_s,
            )
        except grpc.RpcError as exc:
            raise PublishRejected(
                f"publish of version {manifest.version} failed: {exc.code().name}: {exc.details()}",
                exc.code(),
            ) from exc
        stored = self.latest()
        if stored is not None and stored.version == manifest.version:
            return stored
        return manifest


def open_shared(store_root: str | Path, version: int) -> FetchResult | None:
    """``version`` in place in a weight store directory this process can read (the same
    node, or a ReadWriteMany volume), without a copy; None when it is not there whole.

    Checks the stored manifest (written by the store after it verified every shard) and
    that every shard has its declared size; the bytes are not re-hashed — the probe
    check after the load is what proves the weights.
    """
    directory = Path(store_root) / "versions" / version_dirname(version)
    try:
        manifest = manifest_from_json((directory / MANIFEST_NAME).read_text())
        sizes_ok = all((directory / s.name).stat().st_size == s.size for s in manifest.shards)
    except (OSError, ValueError):
        return None
    if manifest.version != version or not manifest.shards or not sizes_ok:
        return None
    return FetchResult(directory, manifest, 0)


def link_shared(shared: FetchResult, dest_root: str | Path) -> FetchResult | None:
    """Hard links to a version opened in place (:func:`open_shared`), in ``dest_root``.

    Free on the same filesystem, and the files then outlive the store's retention (it
    deletes its own directory entries, not the inodes), so a replica can always load
    the version it serves again. None when links are not possible (another filesystem):
    the caller keeps the store's path.
    """
    root = Path(dest_root)
    final = root / shared.path.name
    if (final / MANIFEST_NAME).is_file():
        return FetchResult(final, shared.manifest, 0)
    partial = root / f".partial-link-{shared.path.name}"
    try:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for child in shared.path.iterdir():
            if child.is_file():
                os.link(child, partial / child.name)
        os.replace(partial, final)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        return None
    return FetchResult(final, shared.manifest, 0)


def prune_local(dest_root: str | Path, keep: set[int]) -> list[int]:
    """Delete fetched versions in ``dest_root`` except ``keep``; returns what went."""
    removed: list[int] = []
    if not Path(dest_root).is_dir():
        return removed
    for child in Path(dest_root).iterdir():
        if child.name.isdigit() and int(child.name) not in keep:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(int(child.name))
    return sorted(removed)
