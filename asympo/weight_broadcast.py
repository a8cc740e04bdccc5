"""A direct weights path: broadcast a state dict from the learner to rollout processes.

A standalone ``torch.distributed`` gloo process group over its own ``TCPStore``: no
default process group is created, so it lives beside whatever group the inference
engine (vLLM) set up for itself. Rank 0 (the learner) sends, every other rank receives
into tensors of the same names, shapes and dtypes.

The wire protocol, per version: one int64 header tensor ``[version, n_buckets]``, then
each dtype bucket as one flat tensor (a few large messages instead of one per
parameter: gloo's per-message cost dominates small tensors). The layout (names, shapes,
dtypes, order) is fixed when the group is built, from the model both sides load, so
nothing but the numbers crosses the wire.

Status: the transport and its throughput benchmark (bench/weights.py); receiving into
the vLLM worker and falling back to the store (issue 19, item 3) are not wired yet.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of a state dict, grouped in one flat bucket per dtype."""

    entries: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> Layout:
        """The layout of ``state`` (in its order)."""
        return cls(tuple((k, tuple(v.shape), v.dtype) for k, v in state.items()))

    def buckets(self) -> dict[torch.dtype, list[tuple[str, tuple[int, ...]]]]:
        """Per dtype, the (name, shape) of each tensor in bucket order."""
        out: dict[torch.dtype, list[tuple[str, tuple[int, ...]]]] = {}
        for name, shape, dtype in self.entries:
            out.setdefault(dtype, []).append((name, shape))
        return out


class BroadcastGroup:
    """One member of a standalone gloo group; rank 0 sends weights, the others receive."""

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
        self.group = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
        self._buckets = layout.buckets()
        self._flat = {
            dtype: torch.empty(sum(_numel(s) for _, s in items), dtype=dtype)
            for dtype, items in self._buckets.items()
        }

    def _broadcast(self, tensor: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        # ProcessGroupGloo.broadcast exists at run time; torch's stubs omit it.
        self.group.broadcast([tensor], opts).wait()  # type: ignore[attr-defined]

    def send(self, version: int, state: Mapping[str, torch.Tensor]) -> int:
        """Rank 0: broadcast ``state`` (matching the layout) as ``version``; bytes sent."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 sends")
        self._broadcast(torch.tensor([version, len(self._flat)], dtype=torch.int64))
        sent = 0
        for dtype, items in self._buckets.items():
            flat = self._flat[dtype]
            offset = 0
            for name, shape in items:
                n = _numel(shape)
                flat[offset : offset + n].copy_(state[name].reshape(-1))
                offset += n
            self._broadcast(flat)
            sent += flat.numel() * flat.element_size()
        return sent

    def receive(self) -> tuple[int, dict[str, torch.Tensor]]:
        """Other ranks: the next version and its tensors (views of reused buffers: copy
        them into the model before the next ``receive``)."""
        header = torch.empty(2, dtype=torch.int64)
        self._broadcast(header)
        version, n_buckets = (int(x) for x in header.tolist())
        if n_buckets != len(self._flat):
            raise RuntimeError(
                f"sender has {n_buckets} dtype buckets, this layout has {len(self._flat)}"
            )
        out: dict[str, torch.Tensor] = {}
        for dtype, items in self._buckets.items():
            flat = self._flat[dtype]
            self._broadcast(flat)
            offset = 0
            for name, shape in items:
                n = _numel(shape)
                out[name] = flat[offset : offset + n].view(shape)
                offset += n
        return version, out

    def close(self) -> None:
        """Leave the group (the peers' next operation fails, not hangs past the timeout)."""
        shutdown = getattr(self.group, "shutdown", None)
        if shutdown is not None:
            shutdown()
        del self.group


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
