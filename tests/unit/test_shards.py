"""The shard commit itself, interrupted: a crash after a shard file was renamed into place but before its parts
were removed and the manifest was rewritten. The rerun must reuse what is there (no key redone), give exactly the
rows of an uninterrupted commit, and no reader may ever see a half-written file."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from raypipe.io import shards as shards_mod
from raypipe.io.shards import MANIFEST, ShardStore, read_manifest, read_shards

SCHEMA = pa.schema([("video_id", pa.string()), ("value", pa.int64())])


def _table(ids: list[str]) -> pa.Table:
    return pa.table({"video_id": ids, "value": [int(i[1:]) for i in ids]}, schema=SCHEMA)


def _store(root: str) -> ShardStore:
    return ShardStore(root, None, num_shards=3, schema=SCHEMA)


def _commit_all(store: ShardStore) -> dict:
    for s in store.pending_shards():
        store.commit_shard(s)
    store.commit_errors()
    return store.write_manifest({"run": "test"})


class InjectedCrash(RuntimeError):
    pass


def test_crash_between_shard_rename_and_manifest_resumes_exactly(tmp_path, monkeypatch) -> None:
    first, second = [f"v{i:03d}" for i in range(0, 12)], [f"v{i:03d}" for i in range(12, 30)]
    # the reference: the same two batches committed without interruption
    ref = _store(str(tmp_path / "ref"))
    ref.write_rows(_table(first))
    _commit_all(ref)
    ref.write_rows(_table(second))
    _commit_all(ref)
    expected = read_shards(ref.root)[0]

    store = _store(str(tmp_path / "out"))
    store.write_rows(_table(first))
    before = _commit_all(store)
    store.write_rows(_table(second))

    # Crash right after the first shard's new file is renamed into place (its parts and the manifest not yet done).
    real_write = shards_mod.atomic_write_bytes
    calls = {"n": 0}

    def crash_after_first_shard(fs, path, data):
        real_write(fs, path, data)
        calls["n"] += 1
        if path.endswith(".parquet") and "/shard-" in path:
            raise InjectedCrash(f"crash after renaming {path}")

    monkeypatch.setattr(shards_mod, "atomic_write_bytes", crash_after_first_shard)
    with pytest.raises(InjectedCrash, match="crash after renaming .*shard-0000"):
        _commit_all(store)
    monkeypatch.setattr(shards_mod, "atomic_write_bytes", real_write)

    # What a reader sees now: the old manifest, and every shard file it lists is a whole Parquet file.
    assert read_manifest(store.root) == before
    table, _ = read_shards(store.root)
    assert set(first) <= set(table.column("video_id").to_pylist())
    assert not list((tmp_path / "out").rglob(".tmp-*"))
    # Nothing is redone: every key of the second batch is still known as done (committed shard or kept part).
    assert store.done_keys() == set(first) | set(second)
    assert store.pending_shards()  # the parts of the crashed commit are still there

    after = _commit_all(store)  # the rerun's commit
    table, _ = read_shards(store.root)
    assert table.equals(expected)  # exactly the rows of the uninterrupted commit: no duplicate, none lost
    assert after["rows"] == 30 and json.loads((tmp_path / "out" / MANIFEST).read_text())["rows"] == 30
    assert not store.pending_shards()


def test_crash_while_writing_a_shard_leaves_the_committed_one_whole(tmp_path, monkeypatch) -> None:
    """The process dies half-way through writing a shard's new file: readers still get the committed shard, whole
    (the new bytes went to a temporary name), and the rerun's commit completes it."""
    import fsspec

    store = _store(str(tmp_path / "out"))
    store.write_rows(_table([f"v{i:03d}" for i in range(12)]))
    _commit_all(store)
    committed = read_shards(store.root)[0]
    store.write_rows(_table([f"v{i:03d}" for i in range(12, 30)]))

    fs = fsspec.filesystem("file")  # the cached instance every local resolve() returns
    real_open = fs.open

    def half_then_crash(path, mode="rb", **kw):
        f = real_open(path, mode, **kw)
        if "w" in mode and "shard-" in str(path):
            def write(data, _w=f.write):
                _w(data[: len(data) // 2])
                f.close()
                raise InjectedCrash(f"died writing {path}")
            f.write = write
        return f

    monkeypatch.setattr(fs, "open", half_then_crash)
    with pytest.raises(InjectedCrash, match="died writing"):
        _commit_all(store)
    monkeypatch.setattr(fs, "open", real_open)

    assert read_shards(store.root)[0].equals(committed)  # every listed file reads whole: nothing half-written
    _commit_all(store)
    assert sorted(read_shards(store.root)[0].column("video_id").to_pylist()) == [f"v{i:03d}" for i in range(30)]
