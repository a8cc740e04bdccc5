"""A versioned weight store on a local directory (a volume in Kubernetes).

Layout under ``root``::

    versions/000000000012/manifest.json   WeightsManifest (protobuf JSON)
    versions/000000000012/*.safetensors   the shards
    versions/000000000012/PINNED          present = never deleted by retention
    staging/<random>/                     publishes in progress (never visible)
    trash/                                versions being deleted

A version becomes visible only by the rename of a complete, verified staging directory
into ``versions/`` (one atomic ``rename``), so readers either see all of it or none.
Every shard's size and digest (BLAKE3; sha256 for manifests written before it) is
checked before the rename and its safetensors header is parsed; readers re-hash what
they stream (see :class:`ShardReader`), so a shard that rotted on disk is reported, not
served as good.

Retention keeps the newest ``keep_last`` versions plus pinned ones plus every version
with an active lease (a fetch in progress). Leases live in this process: one weights
service owns a store directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import blake3
from google.protobuf import json_format

from asympo.v1 import records_pb2

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
PIN_NAME = "PINNED"
SHARD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}\.safetensors$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
MAX_VERSION = 10**15  # far beyond any optimiser step count; bigger numbers are mistakes
MAX_SHARDS = 10_000
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


class WeightStoreError(Exception):
    """Base of every store error; the message is meant for the user."""


class InvalidManifest(WeightStoreError):
    """The manifest offered for publication is malformed (bad names, sizes, versions)."""


class VersionExists(WeightStoreError):
    """A different version with this number is already published."""


class StaleVersion(WeightStoreError):
    """The version is not newer than the latest one: versions never go backwards."""


class VersionNotFound(WeightStoreError):
    """No such version in the store (never published, or deleted by retention)."""


class IntegrityError(WeightStoreError):
    """Bytes do not match their manifest (size, digest, or not a safetensors file)."""


class PublishTooLarge(WeightStoreError):
    """The version's total size exceeds the configured maximum."""


def version_dirname(version: int) -> str:
    """Directory name of a version: zero-padded so names sort like numbers."""
    return f"{version:012d}"


def manifest_to_json(manifest: records_pb2.WeightsManifest) -> str:
    """Protobuf JSON of a manifest (stable field names, 64-bit ints as strings)."""
    return json_format.MessageToJson(manifest, preserving_proto_field_name=True, indent=1)


def manifest_from_json(text: str) -> records_pb2.WeightsManifest:
    """Parse a manifest written by :func:`manifest_to_json`; unknown fields are errors."""
    manifest = records_pb2.WeightsManifest()
    json_format.Parse(text, manifest)
    return manifest


HASHES = ("blake3", "sha256")


class _Digest:
    """The running hash of one algorithm (BLAKE3 multi-threaded on large buffers)."""

    def __init__(self, algorithm: str) -> None:
        if algorithm == "blake3":
            self._b3: blake3.blake3 | None = blake3.blake3(max_threads=blake3.blake3.AUTO)
            self._update: Callable[[bytes | memoryview], object] = self._b3.update
            self._hex: Callable[[], str] = self._b3.hexdigest
        elif algorithm == "sha256":
            self._b3 = None
            h = hashlib.sha256()
            self._update, self._hex = h.update, h.hexdigest
        else:
            raise ValueError(f"unknown hash {algorithm!r}; known: {', '.join(HASHES)}")

    def update(self, data: bytes | memoryview) -> None:
        self._update(data)

    def hexdigest(self) -> str:
        return self._hex()


def shard_digest(info: records_pb2.ShardInfo) -> tuple[str, str]:
    """(algorithm, hex digest) a shard is verified with: BLAKE3 when the manifest has
    it, else sha256 (manifests written before BLAKE3)."""
    return ("blake3", info.blake3) if info.blake3 else ("sha256", info.sha256)


class BackgroundHash:
    """A digest computed on a helper thread, one chunk behind the caller.

    Both hashes release the GIL on large buffers, so hashing chunk i overlaps with the
    caller receiving, writing or sending chunk i+1: verification costs far less
    wall time than a serial hash. At most one chunk waits, so memory stays bounded.
    """

    def __init__(self, algorithm: str = "blake3") -> None:
        self.algorithm = algorithm
        self._digest = _Digest(algorithm)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=algorithm)
        self._pending: Future[None] | None = None

    def update(self, data: bytes | memoryview) -> None:
        """Hash ``data`` after everything given before it."""
        if self._pending is not None:
            self._pending.result()
        self._pending = self._pool.submit(self._digest.update, data)

    def hexdigest(self) -> str:
        """The hex digest of everything given so far (waits for the helper)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        return self._digest.hexdigest()

    def close(self) -> None:
        """Stop the helper thread (after the pending chunk)."""
        self._pool.shutdown(wait=False)


def file_digest(path: Path, algorithm: str = "blake3") -> str:
    """Hex digest of a file (BLAKE3: memory-mapped and multi-threaded)."""
    if algorithm == "blake3":
        return str(blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(path).hexdigest())
    digest = BackgroundHash(algorithm)
    try:
        with path.open("rb") as f:
            while block := f.read(4 << 20):
                digest.update(block)
        return digest.hexdigest()
    finally:
        digest.close()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    return file_digest(path, "sha256")


def safetensors_dtypes(header_bytes: bytes) -> dict[str, str]:
    """Tensor name -> dtype from a safetensors JSON header; raises IntegrityError if invalid."""
    try:
        header = json.loads(header_bytes)
    except ValueError as exc:
        raise IntegrityError(f"safetensors header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise IntegrityError("safetensors header is not a JSON object")
    dtypes: dict[str, str] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or "dtype" not in info:
            raise IntegrityError(f"safetensors header entry {name!r} has no dtype")
        dtypes[name] = str(info["dtype"])
    return dtypes


def read_safetensors_header(path: Path) -> dict[str, str]:
    """Check that ``path`` starts like a safetensors file and return its tensor dtypes."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise IntegrityError(f"{path.name} is too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise IntegrityError(f"{path.name} has an impossible safetensors header length")
        return safetensors_dtypes(f.read(header_len))


def validate_manifest(manifest: records_pb2.WeightsManifest, max_total_bytes: int) -> None:
    """Reject manifests no honest publisher sends; raises InvalidManifest/PublishTooLarge."""
    if not 0 <= manifest.version <= MAX_VERSION:
        raise InvalidManifest(f"version must be in [0, {MAX_VERSION}], got {manifest.version}")
    if manifest.parent_version != -1 and not 0 <= manifest.parent_version < manifest.version:
        raise InvalidManifest(
            f"parent_version must be -1 or older than version {manifest.version}, "
            f"got {manifest.parent_version}"
        )
    if not manifest.shards:
        raise InvalidManifest("manifest lists no shards")
    if len(manifest.shards) > MAX_SHARDS:
        raise InvalidManifest(f"manifest lists {len(manifest.shards)} shards (max {MAX_SHARDS})")
    seen: set[str] = set()
    total = 0
    for shard in manifest.shards:
        if not SHARD_NAME.match(shard.name):
            raise InvalidManifest(
                f"shard name {shard.name!r} must be a plain file name ending in .safetensors"
            )
        if shard.name in seen:
            raise InvalidManifest(f"shard {shard.name!r} is listed twice")
        seen.add(shard.name)
        if not (shard.blake3 or shard.sha256):
            raise InvalidManifest(f"shard {shard.name!r}: no blake3 or sha256 digest")
        for algorithm, digest in (("blake3", shard.blake3), ("sha256", shard.sha256)):
            if digest and not SHA256_HEX.match(digest):
                raise InvalidManifest(
                    f"shard {shard.name!r}: {algorithm} must be 64 lowercase hex digits"
                )
        if shard.size < 8:
            raise InvalidManifest(f"shard {shard.name!r}: size {shard.size} is impossible")
        total += shard.size
    if total > max_total_bytes:
        raise PublishTooLarge(
            f"version totals {total} bytes, more than the {max_total_bytes} allowed"
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StagedPublish:
    """A publish in progress: shards are written into a private staging directory.

    Write each shard's bytes in order (``write``), then ``commit()`` verifies and makes
    the version visible atomically; ``abort()`` (or an exception inside ``with``) throws
    the staging directory away. Nothing is visible before ``commit()`` returns.
    """

    def __init__(self, store: WeightStore, manifest: records_pb2.WeightsManifest) -> None:
        self.store = store
        self.manifest = manifest
        self.dir = store.staging_dir / uuid.uuid4().hex
        self.dir.mkdir(parents=True)
        self._expected = {s.name: s for s in manifest.shards}
        self._written: dict[str, int] = {}
        self._hashes: dict[str, BackgroundHash] = {}
        self._files: dict[str, BinaryIO] = {}
        self.bytes_received = 0
        # False after a commit that re-published a version the store already held: callers
        # must not announce it again (watchers would see versions go backwards).
        self.is_new = True
        self._done = False

    def __enter__(self) -> StagedPublish:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._done:
            self.abort()

    def write(self, shard: str, offset: int, data: bytes) -> None:
        """Append ``data`` to ``shard`` at ``offset`` (must equal the bytes written so far)."""
        info = self._expected.get(shard)
        if info is None:
            raise InvalidManifest(f"shard {shard!r} is not in the manifest")
        done = self._written.get(shard, 0)
        if offset != done:
            raise InvalidManifest(f"shard {shard!r}: expected offset {done}, got {offset}")
        if done + len(data) > info.size:
            raise IntegrityError(
                f"shard {shard!r}: more bytes than the {info.size} the manifest declares"
            )
        f = self._files.get(shard)
        if f is None:
            f = (self.dir / shard).open("wb")
            self._files[shard] = f
            self._hashes[shard] = BackgroundHash(shard_digest(info)[0])
        f.write(data)
        self._hashes[shard].update(data)
        self._written[shard] = done + len(data)
        self.bytes_received += len(data)

    def commit(self) -> records_pb2.WeightsManifest:
        """Verify every shard, fsync, and rename into place; returns the stored manifest.

        Re-publishing an identical version (same shard hashes) is accepted as a no-op so a
        publisher may retry after a lost reply.
        """
        try:
            manifest = self._verify()
            for f in self._files.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()
            (self.dir / MANIFEST_NAME).write_text(manifest_to_json(manifest))
            with (self.dir / MANIFEST_NAME).open("rb") as mf:
                os.fsync(mf.fileno())
            _fsync_dir(self.dir)
            stored, self.is_new = self.store._install(self.dir, manifest)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return stored

    def _verify(self) -> records_pb2.WeightsManifest:
        manifest = records_pb2.WeightsManifest()
        manifest.CopyFrom(self.manifest)
        header_dtypes: dict[str, str] = {}
        for name, info in self._expected.items():
            got = self._written.get(name, 0)
            if got != info.size:
                raise IntegrityError(f"shard {name!r}: received {got} of {info.size} bytes")
            digest = self._hashes[name].hexdigest()
            self._hashes[name].close()
            algorithm, expected = shard_digest(info)
            if digest != expected:
                raise IntegrityError(
                    f"shard {name!r}: {algorithm} {digest} does not match the manifest's {expected}"
                )
            self._files[name].flush()
            header_dtypes.update(read_safetensors_header(self.dir / name))
        if manifest.dtypes and dict(manifest.dtypes) != header_dtypes:
            raise IntegrityError("manifest dtypes do not match the shards' safetensors headers")
        manifest.dtypes.clear()
        manifest.dtypes.update(header_dtypes)
        if manifest.created_at <= 0:
            manifest.created_at = time.time()
        return manifest

    def abort(self) -> None:
        """Throw the staging directory away; the store is unchanged."""
        self._done = True
        for f in self._files.values():
            with contextlib.suppress(OSError):
                f.close()
        for h in self._hashes.values():
            h.close()
        shutil.rmtree(self.dir, ignore_errors=True)


FileIdentity = tuple[int, int, int, int]


def file_identity(path: Path) -> FileIdentity:
    """(inode, size, mtime_ns, ctime_ns): changes whenever the file is rewritten."""
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ShardReader:
    """Reads one stored shard from an offset in chunks and checks it against its manifest.

    A shard whose file identity (inode, size, mtime, ctime) is unchanged since it was
    last verified is served without re-hashing (the client verifies every byte it gets
    anyway); otherwise the whole file is hashed as it streams (the bytes before
    ``offset`` first), and the last ``chunks()`` step raises IntegrityError when the
    shard no longer matches its manifest.
    """

    def __init__(
        self,
        path: Path,
        info: records_pb2.ShardInfo,
        offset: int,
        verified: dict[Path, FileIdentity] | None = None,
    ) -> None:
        if offset < 0 or offset > info.size:
            raise ValueError(f"offset {offset} outside shard {info.name!r} of {info.size} bytes")
        self.path = path
        self.info = info
        self.offset = offset
        self._verified = verified

    def chunks(self, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
        """Yield ``(offset, data)`` pairs from ``self.offset`` to the end, then verify."""
        try:
            f = self.path.open("rb")
            identity = file_identity(self.path)
        except FileNotFoundError as exc:
            raise VersionNotFound(f"shard {self.info.name!r} is gone (deleted?)") from exc
        trusted = self._verified is not None and self._verified.get(self.path) == identity
        algorithm, expected = shard_digest(self.info)
        digest = None if trusted else BackgroundHash(algorithm)
        with f:
            if digest is not None:
                remaining = self.offset
                while remaining > 0 and (block := f.read(min(4 << 20, remaining))):
                    digest.update(block)
                    remaining -= len(block)
            f.seek(self.offset)
            position = self.offset
            while block := f.read(chunk_bytes):
                if digest is not None:
                    digest.update(block)
                yield position, block
                position += len(block)
        actual = expected if digest is None else digest.hexdigest()
        if digest is not None:
            digest.close()
        if position != self.info.size or actual != expected:
            if self._verified is not None:
                self._verified.pop(self.path, None)
            raise IntegrityError(
                f"shard {self.info.name!r} is corrupted in the store "
                f"(size {position} vs {self.info.size}, {algorithm} mismatch)"
            )
        if self._verified is not None and not trusted:
            self._verified[self.path] = identity


class WeightStore:
    """Versions of the policy's weights on a local directory; thread-safe within a process."""

    def __init__(self, root: str | Path, keep_last: int = 3, max_publish_bytes: int = 256 << 30):
        if keep_last < 1:
            raise ValueError("keep_last must be at least 1")
        self.root = Path(root)
        self.keep_last = keep_last
        self.max_publish_bytes = max_publish_bytes
        self.versions_dir = self.root / "versions"
        self.staging_dir = self.root / "staging"
        self.trash_dir = self.root / "trash"
        for d in (self.versions_dir, self.staging_dir, self.trash_dir):
            d.mkdir(parents=True, exist_ok=True)
        # Leftovers of a crash: unfinished publishes and deletions are never versions.
        for leftover in (self.staging_dir, self.trash_dir):
            for child in leftover.iterdir():
                shutil.rmtree(child, ignore_errors=True)
        self._lock = threading.Condition()
        self._leases: dict[int, int] = {}
        # Shards whose bytes were hashed and matched, by file identity (see ShardReader).
        self._verified: dict[Path, FileIdentity] = {}
        self._manifests: dict[int, records_pb2.WeightsManifest] = {}
        for child in self.versions_dir.iterdir():
            manifest_path = child / MANIFEST_NAME
            if child.name.isdigit() and manifest_path.is_file():
                manifest = manifest_from_json(manifest_path.read_text())
                self._manifests[manifest.version] = manifest

    # -- reading ------------------------------------------------------------------------

    def versions(self) -> list[int]:
        """Every visible version, oldest first."""
        with self._lock:
            return sorted(self._manifests)

    def latest(self) -> records_pb2.WeightsManifest | None:
        """The newest visible version's manifest, or None for an empty store."""
        with self._lock:
            if not self._manifests:
                return None
            return self._manifests[max(self._manifests)]

    def manifest(self, version: int) -> records_pb2.WeightsManifest:
        """The manifest of ``version`` (-1 = latest); raises VersionNotFound."""
        with self._lock:
            if version == -1:
                latest = self.latest()
                if latest is None:
                    raise VersionNotFound("the store holds no version yet")
                return latest
            manifest = self._manifests.get(version)
        if manifest is None:
            raise VersionNotFound(f"version {version} is not in the store")
        return manifest

    def path(self, version: int) -> Path:
        """Directory of a visible version (hold a lease while reading from it)."""
        return self.versions_dir / version_dirname(self.manifest(version).version)

    def wait_for_newer(self, after_version: int, timeout_s: float) -> list[int]:
        """Versions newer than ``after_version``; waits up to ``timeout_s`` if there is none."""
        with self._lock:
            newer = sorted(v for v in self._manifests if v > after_version)
            if not newer:
                self._lock.wait(timeout_s)
                newer = sorted(v for v in self._manifests if v > after_version)
            return newer

    @contextlib.contextmanager
    def lease(self, version: int) -> Iterator[records_pb2.WeightsManifest]:
        """Hold ``version`` (-1 = latest) against retention while reading it."""
        with self._lock:
            manifest = self.manifest(version)
            self._leases[manifest.version] = self._leases.get(manifest.version, 0) + 1
        try:
            yield manifest
        finally:
            with self._lock:
                left = self._leases[manifest.version] - 1
                if left:
                    self._leases[manifest.version] = left
                else:
                    del self._leases[manifest.version]

    def reader(self, manifest: records_pb2.WeightsManifest, shard: str, offset: int) -> ShardReader:
        """A verifying reader of one shard of a leased version."""
        for info in manifest.shards:
            if info.name == shard:
                path = self.versions_dir / version_dirname(manifest.version) / info.name
                return ShardReader(path, info, offset, self._verified)
        raise VersionNotFound(f"version {manifest.version} has no shard {shard!r}")

    def verify(self, version: int) -> None:
        """Re-hash every shard of ``version`` (a scrub: no trust in earlier checks);
        raises IntegrityError on the first mismatch."""
        with self.lease(version) as manifest:
            directory = self.versions_dir / version_dirname(manifest.version)
            for info in manifest.shards:
                self._verified.pop(directory / info.name, None)
                for _ in self.reader(manifest, info.name, 0).chunks(4 << 20):
                    pass

    # -- writing ------------------------------------------------------------------------

    def begin_publish(self, manifest: records_pb2.WeightsManifest) -> StagedPublish:
        """Start publishing ``manifest``'s version; write shards, then ``commit()``.

        Raises InvalidManifest / PublishTooLarge for a bad manifest and StaleVersion when
        the version is older than the latest (an identical re-publish is allowed).
        """
        validate_manifest(manifest, self.max_publish_bytes)
        with self._lock:
            self._check_order(manifest)
        return StagedPublish(self, manifest)

    def _check_order(self, manifest: records_pb2.WeightsManifest) -> None:
        existing = self._manifests.get(manifest.version)
        if existing is not None:
            if _same_bytes(existing, manifest):
                return
            raise VersionExists(
                f"version {manifest.version} is already published with different shards"
            )
        if self._manifests and manifest.version < max(self._manifests):
            raise StaleVersion(
                f"version {manifest.version} is older than the latest, {max(self._manifests)}"
            )

    def _install(
        self, staged: Path, manifest: records_pb2.WeightsManifest
    ) -> tuple[records_pb2.WeightsManifest, bool]:
        """Rename ``staged`` into place: (stored manifest, whether the version is new)."""
        target = self.versions_dir / version_dirname(manifest.version)
        with self._lock:
            self._check_order(manifest)
            existing = self._manifests.get(manifest.version)
            if existing is not None:  # identical re-publish: keep the first copy
                shutil.rmtree(staged, ignore_errors=True)
                return existing, False
            os.rename(staged, target)
            _fsync_dir(self.versions_dir)
            for info in manifest.shards:  # just verified by StagedPublish.commit
                self._verified[target / info.name] = file_identity(target / info.name)
            self._manifests[manifest.version] = manifest
            self._lock.notify_all()
        log.info("published version %d (%d shards)", manifest.version, len(manifest.shards))
        self.prune()
        return manifest, True

    # -- retention ----------------------------------------------------------------------

    def pin(self, version: int) -> None:
        """Keep ``version`` whatever retention says (survives restarts)."""
        marker = self.path(version) / PIN_NAME
        marker.touch()

    def unpin(self, version: int) -> None:
        """Let retention delete ``version`` again once it is old enough."""
        (self.path(version) / PIN_NAME).unlink(missing_ok=True)

    def pinned(self) -> list[int]:
        """Pinned versions, oldest first."""
        return [v for v in self.versions() if (self.path(v) / PIN_NAME).exists()]

    def prune(self) -> list[int]:
        """Delete versions beyond the newest ``keep_last`` unless pinned or leased; returns them."""
        deleted: list[int] = []
        with self._lock:
            ordered = sorted(self._manifests)
            keep = set(ordered[-self.keep_last :])
            for version in ordered:
                if version in keep or self._leases.get(version):
                    continue
                directory = self.versions_dir / version_dirname(version)
                if (directory / PIN_NAME).exists():
                    continue
                # Out of versions/ in one rename, so no reader ever sees half a version.
                doomed = self.trash_dir / f"{directory.name}-{uuid.uuid4().hex[:8]}"
                os.rename(directory, doomed)
                del self._manifests[version]
                for path in [p for p in self._verified if p.parent == directory]:
                    del self._verified[path]
                deleted.append(version)
        for child in self.trash_dir.iterdir():
            shutil.rmtree(child, ignore_errors=True)
        if deleted:
            log.info("retention deleted versions %s", deleted)
        return deleted


def _same_bytes(a: records_pb2.WeightsManifest, b: records_pb2.WeightsManifest) -> bool:
    return [(s.name, s.blake3, s.sha256, s.size) for s in a.shards] == [
        (s.name, s.blake3, s.sha256, s.size) for s in b.shards
    ]
