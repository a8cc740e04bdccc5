"""The versioned weight store: atomic publish, verification, ordering, retention."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from asympo.transport.weight_store import (
    IntegrityError,
    InvalidManifest,
    PublishTooLarge,
    StaleVersion,
    VersionExists,
    VersionNotFound,
    WeightStore,
    file_identity,
    manifest_from_json,
    manifest_to_json,
)
from asympo.v1 import records_pb2


def shard_bytes(seed: int, n: int = 1000) -> bytes:
    """A real safetensors file of two tensors (float32 and bfloat16)."""
    g = torch.Generator().manual_seed(seed)
    return save(
        {
            "w": torch.randn(n, generator=g),
            "b": torch.randn(7, generator=g).to(torch.bfloat16),
        }
    )


def manifest_for(
    version: int, shards: dict[str, bytes], parent: int = -1
) -> records_pb2.WeightsManifest:
    manifest = records_pb2.WeightsManifest(version=version, parent_version=parent)
    for name, data in shards.items():
        manifest.shards.add(name=name, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    return manifest


def publish(store: WeightStore, version: int, seed: int = 0) -> records_pb2.WeightsManifest:
    shards = {"a.safetensors": shard_bytes(seed), "b.safetensors": shard_bytes(seed + 1, 10)}
    with store.begin_publish(manifest_for(version, shards, parent=version - 1)) as staged:
        for name, data in shards.items():
            staged.write(name, 0, data[:100])
            staged.write(name, 100, data[100:])
        return staged.commit()


def read_all(store: WeightStore, version: int, shard: str, offset: int = 0) -> bytes:
    with store.lease(version) as manifest:
        return b"".join(d for _, d in store.reader(manifest, shard, offset).chunks(64))


def test_publish_read_back_and_reopen(tmp_path: Path) -> None:
    store = WeightStore(tmp_path, keep_last=3)
    assert store.latest() is None
    stored = publish(store, 0)
    assert store.latest() == stored
    assert dict(stored.dtypes) == {"w": "F32", "b": "BF16"}
    assert stored.created_at > 0
    assert read_all(store, 0, "a.safetensors") == shard_bytes(0)
    assert read_all(store, 0, "a.safetensors", offset=500) == shard_bytes(0)[500:]
    assert manifest_from_json(manifest_to_json(stored)) == stored
    # A fresh process sees the same versions; leftovers of a crashed publish are swept.
    junk = tmp_path / "staging" / "crashed"
    junk.mkdir()
    (junk / "a.safetensors").write_bytes(b"half")
    reopened = WeightStore(tmp_path, keep_last=3)
    assert reopened.versions() == [0]
    assert reopened.latest() == stored
    assert not junk.exists()


def test_nothing_visible_before_commit_and_aborts_leave_no_trace(tmp_path: Path) -> None:
    store = WeightStore(tmp_path)
    publish(store, 0)
    data = shard_bytes(5)
    with (
        pytest.raises(RuntimeError),
        store.begin_publish(manifest_for(1, {"a.safetensors": data})) as staged,
    ):
        staged.write("a.safetensors", 0, data[: len(data) // 2])
        assert store.versions() == [0]
        raise RuntimeError("publisher died")
    assert store.versions() == [0]
    assert list((tmp_path / "staging").iterdir()) == []
    # Incomplete bytes cannot be committed.
    staged = store.begin_publish(manifest_for(1, {"a.safetensors": data}))
    staged.write("a.safetensors", 0, data[:-1])
    with pytest.raises(IntegrityError, match="received"):
        staged.commit()
    assert store.versions() == [0]


def test_sha_mismatch_and_non_safetensors_rejected(tmp_path: Path) -> None:
    store = WeightStore(tmp_path)
    data = shard_bytes(1)
    manifest = manifest_for(0, {"a.safetensors": data})
    corrupted = bytearray(data)
    corrupted[-3] ^= 0xFF
    with pytest.raises(IntegrityError, match="sha256"), store.begin_publish(manifest) as staged:
        staged.write("a.safetensors", 0, bytes(corrupted))
        staged.commit()
    junk = b"\xff" * 64
    with (
        pytest.raises(IntegrityError, match="safetensors"),
        store.begin_publish(manifest_for(0, {"a.safetensors": junk})) as staged,
    ):
        staged.write("a.safetensors", 0, junk)
        staged.commit()
    assert store.versions() == []


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda m: setattr(m, "version", -3), InvalidManifest),
        (lambda m: setattr(m, "version", 10**17), InvalidManifest),
        (lambda m: setattr(m, "parent_version", 5), InvalidManifest),
        (lambda m: setattr(m.shards[0], "name", "../evil.safetensors"), InvalidManifest),
        (lambda m: setattr(m.shards[0], "name", "model.bin"), InvalidManifest),
        (lambda m: setattr(m.shards[0], "sha256", "xyz"), InvalidManifest),
        (lambda m: setattr(m.shards[0], "size", -1), InvalidManifest),
        (lambda m: m.shards.add().CopyFrom(m.shards[0]), InvalidManifest),
        (lambda m: m.ClearField("shards"), InvalidManifest),
        (lambda m: setattr(m.shards[0], "size", 1 << 40), PublishTooLarge),
    ],
)
def test_bad_manifests_rejected(tmp_path: Path, mutate: object, error: type[Exception]) -> None:
    store = WeightStore(tmp_path, max_publish_bytes=1 << 30)
    manifest = manifest_for(3, {"a.safetensors": shard_bytes(0)}, parent=2)
    mutate(manifest)  # type: ignore[operator]
    with pytest.raises(error):
        store.begin_publish(manifest)
    assert list((tmp_path / "staging").iterdir()) == []


def test_writes_out_of_order_or_beyond_size_rejected(tmp_path: Path) -> None:
    store = WeightStore(tmp_path)
    data = shard_bytes(0)
    with store.begin_publish(manifest_for(0, {"a.safetensors": data})) as staged:
        with pytest.raises(InvalidManifest, match="offset"):
            staged.write("a.safetensors", 10, data[10:])
        with pytest.raises(InvalidManifest, match="not in the manifest"):
            staged.write("other.safetensors", 0, data)
        with pytest.raises(IntegrityError, match="more bytes"):
            staged.write("a.safetensors", 0, data + b"x")


def test_versions_never_go_backwards(tmp_path: Path) -> None:
    store = WeightStore(tmp_path)
    publish(store, 4, seed=0)
    with pytest.raises(StaleVersion):
        publish(store, 2, seed=0)
    with pytest.raises(VersionExists):
        publish(store, 4, seed=9)
    again = publish(store, 4, seed=0)  # an identical retry is fine
    assert again.version == 4 and store.versions() == [4]


def test_retention_keeps_last_k_pinned_and_leased(tmp_path: Path) -> None:
    store = WeightStore(tmp_path, keep_last=2)
    publish(store, 1)
    publish(store, 2)
    store.pin(1)
    with store.lease(2):
        for v in range(3, 6):
            publish(store, v)
        assert store.versions() == [1, 2, 4, 5]
        assert read_all(store, 2, "a.safetensors") == shard_bytes(0)
    publish(store, 6)
    assert store.versions() == [1, 5, 6]
    assert store.pinned() == [1]
    store.unpin(1)
    assert store.prune() == [1]
    assert store.versions() == [5, 6]
    with pytest.raises(VersionNotFound):
        store.manifest(1)
    assert list((tmp_path / "trash").iterdir()) == []


def test_corruption_on_disk_detected_on_read(tmp_path: Path) -> None:
    store = WeightStore(tmp_path)
    publish(store, 0)
    path = store.path(0) / "a.safetensors"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    # A rewrite changes the file's mtime/ctime; pin mtime far away so the test does not
    # depend on the clock tick separating publish and corruption.
    os.utime(path, ns=(1, 1))
    with pytest.raises(IntegrityError, match="corrupted"):
        read_all(store, 0, "a.safetensors")
    with pytest.raises(IntegrityError, match="corrupted"):  # also when resuming past the flip
        read_all(store, 0, "a.safetensors", offset=len(raw) - 10)
    with pytest.raises(IntegrityError):
        store.verify(0)
    read_all(store, 0, "b.safetensors")  # the other shard is fine


def test_unchanged_verified_shards_are_served_without_rehash_but_scrub_rehashes(
    tmp_path: Path,
) -> None:
    store = WeightStore(tmp_path)
    publish(store, 0)
    path = store.path(0) / "a.safetensors"
    assert store._verified[path] == file_identity(path)
    # Bit rot that leaves the file's identity alone: served as is (the fetching client
    # hashes every byte it receives and refuses it), but a scrub finds it.
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    store._verified[path] = file_identity(path)
    assert read_all(store, 0, "a.safetensors") == bytes(raw)
    with pytest.raises(IntegrityError):
        store.verify(0)
    with pytest.raises(IntegrityError):  # and from then on it is re-hashed on every read
        read_all(store, 0, "a.safetensors")


def test_safetensors_parts_read_back_bit_for_bit_in_every_dtype() -> None:
    from safetensors.torch import load, save

    from asympo.transport.weights_client import safetensors_parts

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b.f32": torch.randn(7, generator=g),
        "c.f16": torch.randn(2, 2, generator=g).to(torch.float16),
        "d.i64": torch.arange(5),
        "e.bool": torch.tensor([True, False, True]),
        "f.empty": torch.empty(0, 4),
        "g.scalar": torch.tensor(2.5),
    }
    blob = b"".join(bytes(p) for p in safetensors_parts(tensors))
    back = load(blob)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name
    # Same tensors through safetensors' own writer read back the same.
    assert all(torch.equal(load(save(tensors))[k], back[k]) for k in tensors)


def test_unshared_cpu_tensors_copies_tied_names_and_views_at_other_offsets() -> None:
    from safetensors.torch import load

    from asympo.transport.weights_client import unshared_cpu_tensors

    embed = torch.randn(6, 4)
    packed = torch.randn(8, 4)  # e.g. a fused q/k projection seen as two views
    state = {"embed": embed, "lm_head": embed, "q": packed[:4], "k": packed[4:]}
    out = unshared_cpu_tensors(state)
    storages = {t.untyped_storage().data_ptr() for t in out.values()}
    # No two names share memory any more (keyed on the offset, "k" kept "q"'s storage).
    assert len(storages) == len(state)
    assert all(torch.equal(out[k], v) for k, v in state.items())
    back = load(save(out))  # safetensors refuses the tied pair as given
    assert all(torch.equal(back[k], v) for k, v in state.items())
