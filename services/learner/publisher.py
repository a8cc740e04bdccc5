"""Publishing policy versions off the learner's critical path.

The learner calls :meth:`BackgroundPublisher.submit` between steps: it copies the weights
into host buffers (in the model's dtype; pinned memory when the model is on CUDA, so the
copy is a DMA) and computes the probe log-probs on the live model — that much is the
learner's blocked time — then returns to training. A publisher thread hands the snapshot
to a :data:`SnapshotSink` (write, hash, upload, wait for the store to verify it). Rules:

* At most one publish is in flight. While it runs, at most one snapshot waits; a newer
  submit *replaces* the waiting one (overwriting its buffers in place), so the store
  receives the newest weights, never a version twice, and never a half-published one
  (the store makes a version visible only complete and verified; a crash mid-publish
  leaves only the staging directory, which the store discards).
* :meth:`published` is the newest version the sink finished, i.e. verified in the store
  and announced. Admission bounds staleness by this version, not by the learner's
  (see services/learner/learner.py), because rollout can only be held to published ones.
* A sink failure (after the sink's own retries) is raised in the learner's thread at its
  next :meth:`submit` / :meth:`check`, so a learner never trains on while publishing died.

Sinks: :func:`store_sink` publishes to the weights service; :func:`broadcast_sink`
(``weights.transport=broadcast``) first sends the snapshot straight into the rollout
engines over the broadcast group (asympo/transport/weight_broadcast.py), then hands it to the
store sink — the store still gets every version, for late joiners and as the fallback.

:class:`InlinePublisher` adapts a plain ``publish(version, parent, model)`` function
(tests, tools) to the same interface, published when it returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from asympo.transport.weight_broadcast import BroadcastHub, ProbeData
from asympo.transport.weights_client import PublishRejected, WeightsClient, WeightsClientError
from asympo.v1 import records_pb2
from services.learner import metrics
from services.learner.sharding import full_state_dict, is_sharded

log = logging.getLogger(__name__)

PUBLISH_RETRY_S = 120.0

# publish(version, parent_version, model): make ``version`` available to rollout, inline.
PublishFn = Callable[[int, int, torch.nn.Module], None]
# probe(model) -> the probe record of the live weights (None = publish without a probe).
ProbeFn = Callable[[torch.nn.Module], "records_pb2.Probe | None"]


@dataclass
class Snapshot:
    """One version's weights on the host, waiting for (or in) publication."""

    version: int
    state: dict[str, torch.Tensor]
    probe: records_pb2.Probe | None
    taken_at: float = field(default_factory=time.monotonic)  # when the learner submitted it
    parent_version: int = -1  # filled by the publisher thread: the last version it published

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data."""
        return sum(t.numel() * t.element_size() for t in self.state.values())


# sink(snapshot): write, hash and upload the snapshot; returns once the version is
# verified in the store (and announced), raises when it could not be published.
SnapshotSink = Callable[[Snapshot], None]


class VersionPublisher(Protocol):
    """What the learner needs of a publisher."""

    def submit(self, version: int, model: torch.nn.Module) -> float:
        """Start publishing the model's current weights as ``version``; returns the seconds
        the caller was blocked."""

    def published(self) -> int:
        """The newest version verified in the store (-1 = none yet)."""

    def resumed(self, published_version: int) -> None:
        """A resumed learner's checkpoint says ``published_version`` is in the store."""

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until nothing is queued or in flight; False on timeout."""

    def check(self) -> None:
        """Raise the failure of the last publish, if it failed."""

    def close(self) -> None:
        """Stop the publisher (what is queued is dropped; call ``wait`` first to flush)."""


def _bare(model: torch.nn.Module) -> torch.nn.Module:
    # The bare module: a forward through the DDP wrapper on rank 0 alone would hang.
    inner: torch.nn.Module = getattr(model, "module", model)
    return inner


def snapshot_state(
    model: torch.nn.Module, into: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The model's state dict copied to host memory in its own dtype.

    ``into`` (an earlier snapshot of the same model) is overwritten in place, so a steady
    run allocates its host buffers once. Tensors that share storage on the model (tied
    embeddings) get a buffer each: safetensors refuses shared storage.
    """
    if is_sharded(model):
        # Collective (the other ranks join it): gathered one parameter at a time into
        # fresh host tensors on rank 0, so there is one full copy and nothing to reuse.
        return full_state_dict(model)
    state = _bare(model).state_dict()
    pin = torch.cuda.is_available() and any(t.is_cuda for t in state.values())
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        src = tensor.detach()
        dst = into.get(name) if into is not None else None
        if dst is None or dst.shape != src.shape or dst.dtype != src.dtype:
            dst = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=pin)
        dst.copy_(src, non_blocking=pin)
        out[name] = dst
    if pin:
        torch.cuda.synchronize()  # the non-blocking copies must land before anyone reads
    return out


class InlinePublisher:
    """A ``publish(version, parent, model)`` function behind the publisher interface:
    each submit publishes before it returns (all of it is blocked time)."""

    def __init__(self, fn: PublishFn) -> None:
        self.fn = fn
        self._published = -1

    def submit(self, version: int, model: torch.nn.Module) -> float:
        """Publish ``version`` now."""
        start = time.monotonic()
        self.fn(version, self._published, model)
        self._published = version
        return time.monotonic() - start

    def published(self) -> int:
        """The last version published."""
        return self._published

    def resumed(self, published_version: int) -> None:
        """Count from the checkpoint's published version."""
        self._published = max(self._published, published_version)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Nothing is ever in flight."""
        return True

    def check(self) -> None:
        """Failures were raised by ``submit`` itself."""

    def close(self) -> None:
        """Nothing to stop."""


class BackgroundPublisher:
    """Snapshots on the caller's thread, publishes on its own (see the module docstring)."""

    def __init__(
        self,
        sink: SnapshotSink,
        probe: ProbeFn | None = None,
        *,
        published_version: int = -1,
        name: str = "publisher",
    ) -> None:
        self.sink = sink
        self.probe = probe
        self._published = published_version
        self._cond = threading.Condition()
        self._queued: Snapshot | None = None
        self._in_flight: Snapshot | None = None
        self._spare: dict[str, torch.Tensor] | None = None  # buffers of a finished snapshot
        self._error: BaseException | None = None
        self._closed = False
        self.replaced = 0  # queued snapshots superseded before they were published
        self.published_versions: list[int] = []  # in order, for tests and logs
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- the learner's side ---------------------------------------------------------------

    def submit(self, version: int, model: torch.nn.Module) -> float:
        """Snapshot the weights as ``version`` and queue them; returns the blocked seconds."""
        start = time.monotonic()
        self.check()
        probe = self.probe(_bare(model)) if self.probe is not None else None
        with self._cond:
            if self._closed:
                raise RuntimeError("the publisher is closed")
            queued = self._queued
            if queued is not None:
                # Overwrite the waiting snapshot in place: it was never published, so
                # nobody reads its buffers; the newest weights take its slot.
                self.replaced += 1
                metrics.PUBLISH_REPLACED.inc()
                log.info("version %d replaces queued version %d", version, queued.version)
                buffers: Mapping[str, torch.Tensor] | None = queued.state
            else:
                buffers, self._spare = self._spare, None
            # Copying under the lock: the publisher thread only needs it to take the
            # queued snapshot, which it would otherwise see half overwritten.
            state = snapshot_state(model, buffers)
            self._queued = Snapshot(version, state, probe, taken_at=start)
            self._cond.notify_all()
        blocked = time.monotonic() - start
        metrics.PUBLISH_BLOCKED_SECONDS.observe(blocked)
        return blocked

    def published(self) -> int:
        """The newest version verified in the store (-1 = none yet)."""
        with self._cond:
            return self._published

    def resumed(self, published_version: int) -> None:
        """Count from the checkpoint's published version."""
        with self._cond:
            self._published = max(self._published, published_version)

    def busy(self) -> bool:
        """Whether a snapshot is queued or in flight."""
        with self._cond:
            return self._queued is not None or self._in_flight is not None

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until nothing is queued or in flight (raises a publish failure)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while (self._queued is not None or self._in_flight is not None) and not (
                self._error or self._closed
            ):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        self.check()
        return True

    def check(self) -> None:
        """Raise the failure of the last publish, if it failed (once)."""
        with self._cond:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Stop the thread once the publish in flight ends; a queued snapshot is dropped."""
        with self._cond:
            self._closed = True
            self._queued = None
            self._cond.notify_all()
        self._thread.join()

    # -- the publisher thread -------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._queued is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                snap, self._queued = self._queued, None
                assert snap is not None
                snap.parent_version = self._published
                self._in_flight = snap
            try:
                self.sink(snap)
            except BaseException as exc:  # handed to the learner's thread
                log.error("publish of version %d failed: %s", snap.version, exc)
                with self._cond:
                    self._error = exc
                    self._in_flight = None
                    self._cond.notify_all()
                continue
            latency = time.monotonic() - snap.taken_at
            metrics.PUBLISH_LATENCY_SECONDS.observe(latency)
            metrics.PUBLISHED_VERSION.set(snap.version)
            log.info(
                "published version %d (%.1f MB, %.2f s after its snapshot)",
                snap.version,
                snap.nbytes / 1e6,
                latency,
            )
            with self._cond:
                self._published = max(self._published, snap.version)
                self.published_versions.append(snap.version)
                self._in_flight = None
                if self._queued is None:
                    self._spare = snap.state  # reuse its buffers for the next snapshot
                self._cond.notify_all()


def store_sink(
    client: WeightsClient,
    metadata: Mapping[str, str] | None = None,
    retry_s: float = PUBLISH_RETRY_S,
) -> SnapshotSink:
    """Publish snapshots through the weights service, retrying for ``retry_s`` while it is
    unreachable; a version the store already holds (a resumed learner re-reaching a
    version it published before a crash) is kept, not an error."""

    def sink(snap: Snapshot) -> None:
        deadline = time.monotonic() + retry_s
        while True:
            try:
                client.publish_state_dict(
                    snap.state, snap.version, snap.parent_version, snap.probe, metadata
                )
                return
            except PublishRejected as exc:
                latest = client.latest()
                if latest is not None and latest.version >= snap.version:
                    log.warning(
                        "version %d already in the store (%s); keeping it", snap.version, exc
                    )
                    return
                if time.monotonic() > deadline:
                    raise
                log.warning("publish of version %d failed (%s); retrying", snap.version, exc)
            except WeightsClientError as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("weights service not reachable (%s); retrying", exc)
            time.sleep(1.0)

    return sink


def probe_data(probe: records_pb2.Probe | None) -> ProbeData | None:
    """The probe record as the broadcast carries it."""
    if probe is None:
        return None
    return ProbeData(tuple(probe.tokens), tuple(probe.logprobs), probe.tolerance)


def broadcast_sink(
    hub: BroadcastHub, register: Callable[[], None], store: SnapshotSink
) -> SnapshotSink:
    """Broadcast each snapshot to the hub's members, then publish it through ``store``.

    ``register`` tells the weights service where the hub is; it runs with every version,
    so a restarted weights service learns it again. A broadcast that fails is logged and
    left to the store path (the members it missed fall back to the store); only the
    store's failure fails the publish.
    """

    def sink(snap: Snapshot) -> None:
        start = time.monotonic()
        try:
            register()
            reached = hub.send(snap.version, snap.state, probe_data(snap.probe))
        except Exception as exc:  # the store path below still carries the version
            log.warning("broadcast of version %d failed: %s", snap.version, exc)
        else:
            if reached:
                log.info(
                    "broadcast version %d to %d member(s) in %.3f s",
                    *(snap.version, reached, time.monotonic() - start),
                )
        store(snap)

    return sink
