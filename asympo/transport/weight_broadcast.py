"""The direct weights path: broadcast each version from the learner into rollout workers.

Standalone ``torch.distributed`` gloo process groups over a ``TCPStore``: no default
process group is created, so they live beside whatever group the inference engine
(vLLM) set up for itself.

* :class:`BroadcastGroup` — one group of a fixed size; rank 0 sends, the others receive
  into tensors of the same names, shapes and dtypes.
* :class:`BroadcastHub` (learner rank 0) and :class:`BroadcastReceiver` (inside a vLLM
  worker, asympo/engines/vllm_worker.py) — the membership the running system uses. The
  hub serves a ``TCPStore`` (its address is registered with the weights service, where
  a starting replica asks for it) holding the layout as JSON and a member counter. A
  worker that joins takes the next member number and forms a two-rank group with the
  hub under that number's key prefix. One group per member, not one for all: replicas
  come and go while the learner runs, and a fixed-size gloo group cannot grow; a member
  that fails is dropped alone. (gloo's broadcast from a root is a send to every other
  rank either way, so the bytes on the learner's link are the same.)

The wire protocol, per version: one int64 header ``[version, n_buckets, n_probe]``; when
``n_probe`` > 0 the probe's tokens (int64) and ``[tolerance, log-probs...]`` (float64);
then each dtype bucket as one flat tensor (a few large messages instead of one per
parameter: gloo's per-message cost dominates small tensors). The layout (names, shapes,
dtypes, order) is the learner's state dict, fixed when the group is built, so nothing
but the numbers crosses the wire — never a pickle.

A failure anywhere (a timeout, a peer gone) ends that member's group; the replica gets
the version from the durable store instead (services/rollout/versions.py) and joins again.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

LAYOUT_KEY = "layout"
MEMBERS_KEY = "members"
# A receiver waits this long for the next version's header: versions come at the
# learner's pace, and a learner that dies closes the connection (which ends the wait).
IDLE_TIMEOUT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of a state dict, grouped in one flat bucket per dtype."""

    entries: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> Layout:
        """The layout of ``state`` (in its order)."""
        return cls(tuple((k, tuple(v.shape), v.dtype) for k, v in state.items()))

    def to_json(self) -> str:
        """The layout as JSON (what a joining member reads from the rendezvous store)."""
        return json.dumps([[n, list(s), str(d).removeprefix("torch.")] for n, s, d in self.entries])

    @classmethod
    def from_json(cls, text: str | bytes) -> Layout:
        """The layout :meth:`to_json` wrote."""
        entries = []
        for name, shape, dtype in json.loads(text):
            torch_dtype = getattr(torch, str(dtype), None)
            if not isinstance(torch_dtype, torch.dtype):
                raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
            entries.append((str(name), tuple(int(d) for d in shape), torch_dtype))
        return cls(tuple(entries))

    def buckets(self) -> dict[torch.dtype, list[tuple[str, tuple[int, ...]]]]:
        """Per dtype, the (name, shape) of each tensor in bucket order."""
        out: dict[torch.dtype, list[tuple[str, tuple[int, ...]]]] = {}
        for name, shape, dtype in self.entries:
            out.setdefault(dtype, []).append((name, shape))
        return out

    def flat_buffers(self) -> dict[torch.dtype, torch.Tensor]:
        """One empty flat tensor per dtype bucket."""
        return {
            dtype: torch.empty(sum(_numel(s) for _, s in items), dtype=dtype)
            for dtype, items in self.buckets().items()
        }

    def pack(
        self, state: Mapping[str, torch.Tensor], flats: Mapping[torch.dtype, torch.Tensor]
    ) -> None:
        """Copy ``state`` into the flat buffers."""
        for dtype, items in self.buckets().items():
            offset = 0
            for name, shape in items:
                n = _numel(shape)
                flats[dtype][offset : offset + n].copy_(state[name].reshape(-1))
                offset += n

    def unpack(
        self, flats: Mapping[torch.dtype, torch.Tensor]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, view into the flat buffers) for every tensor, in layout order."""
        for dtype, items in self.buckets().items():
            offset = 0
            for name, shape in items:
                n = _numel(shape)
                yield name, flats[dtype][offset : offset + n].view(shape)
                offset += n


@dataclass(frozen=True)
class ProbeData:
    """The learner's probe for a version (see asympo/rl/probe.py), as it crosses the wire."""

    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    tolerance: float


@dataclass(frozen=True)
class BroadcastState:
    """A rollout engine's membership, as its workers report it."""

    joined: bool  # the group was formed
    alive: bool  # still receiving (False after a failure: see ``error``)
    error: str
    version: int  # the version staged in the workers, waiting to be loaded (-1 = none)
    probe: ProbeData | None

    @classmethod
    def of_workers(cls, reports: list[dict[str, object]]) -> BroadcastState:
        """One state from each worker's report (a version only when every worker has it)."""
        if not reports:
            return cls(False, False, "no workers", -1, None)
        first = reports[0]
        versions = {int(str(r["version"])) for r in reports}
        tokens = first.get("probe_tokens") or []
        probe = None
        if isinstance(tokens, list) and tokens:
            logprobs = first.get("probe_logprobs") or []
            assert isinstance(logprobs, list)
            probe = ProbeData(
                tuple(int(t) for t in tokens),
                tuple(float(v) for v in logprobs),
                float(str(first.get("probe_tolerance", 0.0))),
            )
        return cls(
            joined=all(bool(r["joined"]) for r in reports),
            alive=all(bool(r["alive"]) for r in reports),
            error="; ".join(str(r["error"]) for r in reports if r["error"]),
            version=versions.pop() if len(versions) == 1 else -1,
            probe=probe,
        )


class _Channel:
    """A gloo group and the broadcast of one version over it."""

    def __init__(
        self, store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta
    ) -> None:
        self.rank = rank
        self.timeout = timeout
        self.group = dist.ProcessGroupGloo(store, rank, world_size, timeout)

    def broadcast(self, tensor: torch.Tensor, timeout: datetime.timedelta | None = None) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.timeout = timeout or self.timeout
        # ProcessGroupGloo.broadcast exists at run time; torch's stubs omit it.
        self.group.broadcast([tensor], opts).wait()  # type: ignore[attr-defined]

    def send(
        self, version: int, flats: Mapping[torch.dtype, torch.Tensor], probe: ProbeData | None
    ) -> int:
        n_probe = len(probe.tokens) if probe is not None else 0
        self.broadcast(torch.tensor([version, len(flats), n_probe], dtype=torch.int64))
        if probe is not None and n_probe:
            self.broadcast(torch.tensor(probe.tokens, dtype=torch.int64))
            self.broadcast(torch.tensor([probe.tolerance, *probe.logprobs], dtype=torch.float64))
        sent = 0
        for flat in flats.values():
            self.broadcast(flat)
            sent += flat.numel() * flat.element_size()
        return sent

    def receive_header(self, timeout: datetime.timedelta | None = None) -> tuple[int, int, int]:
        header = torch.empty(3, dtype=torch.int64)
        self.broadcast(header, timeout)
        version, n_buckets, n_probe = (int(x) for x in header.tolist())
        return version, n_buckets, n_probe

    def receive_body(
        self, n_buckets: int, n_probe: int, flats: Mapping[torch.dtype, torch.Tensor]
    ) -> ProbeData | None:
        if n_buckets != len(flats):
            raise RuntimeError(
                f"sender has {n_buckets} dtype buckets, this layout has {len(flats)}"
            )
        probe = None
        if n_probe:
            tokens = torch.empty(n_probe, dtype=torch.int64)
            self.broadcast(tokens)
            values = torch.empty(n_probe, dtype=torch.float64)
            self.broadcast(values)
            probe = ProbeData(
                tuple(int(t) for t in tokens.tolist()),
                tuple(float(v) for v in values[1:].tolist()),
                float(values[0]),
            )
        for flat in flats.values():
            self.broadcast(flat)
        return probe

    def close(self) -> None:
        shutdown = getattr(self.group, "shutdown", None)
        if shutdown is not None:
            shutdown()


class BroadcastGroup:
    """One member of a fixed-size gloo group; rank 0 sends weights, the others receive."""

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        layout: Layout,
        timeout_s: float = 60.0,
    ) -> None:
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank = rank
        self.world_size = world_size
        self.layout = layout
        self.store = dist.TCPStore(
            host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=True
        )
        self._channel = _Channel(self.store, rank, world_size, timeout)
        self._flat = layout.flat_buffers()

    def send(self, version: int, state: Mapping[str, torch.Tensor]) -> int:
        """Rank 0: broadcast ``state`` (matching the layout) as ``version``; bytes sent."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 sends")
        self.layout.pack(state, self._flat)
        return self._channel.send(version, self._flat, None)

    def receive(self) -> tuple[int, dict[str, torch.Tensor]]:
        """Other ranks: the next version and its tensors (views of reused buffers: copy
        them into the model before the next ``receive``)."""
        version, n_buckets, n_probe = self._channel.receive_header()
        self._channel.receive_body(n_buckets, n_probe, self._flat)
        return version, dict(self.layout.unpack(self._flat))

    def close(self) -> None:
        """Leave the group together with the other ranks (they all call ``close``), then
        shut it down. Without that rendezvous a rank that exits while a peer still tears
        down its pairs aborts in gloo's destructor; a peer already gone makes the
        rendezvous fail at once, and the group is shut down all the same."""
        with contextlib.suppress(RuntimeError):
            self._channel.broadcast(torch.zeros(1), datetime.timedelta(seconds=10))
        self._channel.close()


class BroadcastHub:
    """Learner rank 0: the rendezvous store and one two-rank group per joined member.

    ``port`` 0 picks a free one (see :attr:`port`). Members join at any time (a thread
    forms each group); :meth:`send` reaches every member and drops those that fail.
    """

    def __init__(self, layout: Layout, port: int = 0, timeout_s: float = 60.0) -> None:
        self.layout = layout
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.epoch = uuid.uuid4().hex  # a new learner process is a new group
        store = dist.TCPStore(
            "0.0.0.0", port, None, is_master=True, timeout=self.timeout, wait_for_workers=False
        )
        store.set(LAYOUT_KEY, layout.to_json())
        store.add(MEMBERS_KEY, 0)
        self.port: int = int(store.port)  # what members connect to
        self._store: dist.TCPStore | None = store
        self._flat = layout.flat_buffers()
        self._members: dict[int, _Channel] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._seen = 0
        self._thread = threading.Thread(target=self._accept, name="broadcast-hub", daemon=True)
        self._thread.start()

    def members(self) -> int:
        """How many members are in the group now."""
        with self._lock:
            return len(self._members)

    def _accept(self) -> None:
        store = self._store
        assert store is not None
        while not self._stop.wait(0.05):
            try:
                joined = int(store.add(MEMBERS_KEY, 0))
            except RuntimeError as exc:  # the store is closing
                log.warning("broadcast hub: %s", exc)
                return
            while self._seen < joined:
                member = self._seen
                self._seen += 1
                try:
                    channel = _Channel(_member_store(store, member), 0, 2, self.timeout)
                except RuntimeError as exc:
                    log.warning("broadcast member %d did not complete its join: %s", member, exc)
                    continue
                with self._lock:
                    self._members[member] = channel
                log.info("broadcast member %d joined", member)

    def send(self, version: int, state: Mapping[str, torch.Tensor], probe: ProbeData | None) -> int:
        """Broadcast ``version`` to every member; returns how many received it. A member
        that fails (timeout, gone) is dropped: its replica falls back to the store."""
        with self._lock:
            if not self._members:
                return 0
            self.layout.pack(state, self._flat)
            reached = 0
            for member, channel in list(self._members.items()):
                try:
                    channel.send(version, self._flat, probe)
                    reached += 1
                except RuntimeError as exc:  # gloo raises RuntimeError (DistError) subclasses
                    log.warning(
                        "broadcast of version %d to member %d failed: %s", version, member, exc
                    )
                    channel.close()
                    del self._members[member]
            return reached

    def close(self) -> None:
        """Stop accepting, leave every group (members see their peer gone) and stop the
        rendezvous store (with the last reference to it)."""
        self._stop.set()
        self._thread.join(timeout=self.timeout.total_seconds() + 5)
        with self._lock:
            for channel in self._members.values():
                channel.close()
            self._members.clear()
            self._store = None


class BroadcastReceiver:
    """One worker's membership: joins the hub at ``host:port`` and receives, on its own
    thread, each version into one set of buffers where it waits to be loaded.

    A newer version overwrites one not yet loaded (the newest wins); :meth:`staged`
    holds the lock while the caller loads, so a version is never overwritten mid-load
    (the learner's send waits, within its timeout). After a failure :attr:`error` says
    why and the thread has ended; join again with a new receiver.
    """

    def __init__(self, host: str, port: int, timeout_s: float = 60.0) -> None:
        self.host, self.port = host, port
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.lock = threading.Lock()
        self.version = -1  # the staged version (-1 = none)
        self.probe: ProbeData | None = None
        self.error = ""
        self.joined = threading.Event()
        self.layout: Layout | None = None
        self._flat: dict[torch.dtype, torch.Tensor] = {}
        self._thread = threading.Thread(target=self._run, name="broadcast-receiver", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        """Whether the receiving thread still runs."""
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            store = dist.TCPStore(self.host, self.port, None, is_master=False, timeout=self.timeout)
            member = int(store.add(MEMBERS_KEY, 1)) - 1
            self.layout = Layout.from_json(store.get(LAYOUT_KEY))
            self._flat = self.layout.flat_buffers()
            channel = _Channel(_member_store(store, member), 1, 2, self.timeout)
            self.joined.set()
            log.info(
                "joined the broadcast group at %s:%d as member %d", self.host, self.port, member
            )
            while True:
                version, n_buckets, n_probe = channel.receive_header(IDLE_TIMEOUT)
                with self.lock:
                    self.version, self.probe = -1, None  # the buffers are being overwritten
                    probe = channel.receive_body(n_buckets, n_probe, self._flat)
                    self.version, self.probe = version, probe
        except Exception as exc:  # reported through ``error``; the caller falls back
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("broadcast receiver at %s:%d stopped: %s", self.host, self.port, self.error)

    @contextmanager
    def staged(self, version: int) -> Iterator[Iterator[tuple[str, torch.Tensor]] | None]:
        """While held: the staged tensors of ``version`` (views; load them before leaving),
        or None when that version is not the one staged."""
        with self.lock:
            if self.version != version or self.layout is None:
                yield None
                return
            yield self.layout.unpack(self._flat)


def _member_store(store: dist.Store, member: int) -> dist.Store:
    return dist.PrefixStore(f"member-{member}/", store)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
