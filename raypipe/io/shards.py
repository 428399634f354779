"""Atomic Parquet shards with a manifest, resumable through per-batch part files; any row schema keyed by id.

Layout under ``root`` (local folder or s3:// prefix)::

    shard-00003-of-00008.parquet   committed shards (rows sorted by key, schema + metadata)
    errors.parquet                 rows that failed (ERROR_COLUMNS), committed the same way
    _manifest.json                 written LAST: which shards exist, row counts, metadata, config hash
    _parts/shard-00003/part-*.parquet, _parts/errors/part-*.parquet   work done but not yet committed
    _parts/_config.json            the config hash the parts were made with

Rows go to shard ``stable_hash(key) % num_shards`` (a hash that is the same in every process, unlike ``hash``).
Every file is written under a temporary name and renamed (local) or moved (s3), so a reader never sees a half
file; a crashed run leaves parts, which the rerun reuses: only videos found in no committed shard, no part and
no error row are processed again. Commit merges the old shard (if any) with its parts, dedupes by key and sorts,
so an interrupted run that is resumed produces exactly the rows of an uninterrupted one.

The labelling job reuses :class:`ShardStore` with its own prediction schema.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raypipe.config import StorageConfig
from raypipe.io.fs import atomic_write_bytes, join, resolve
from raypipe.schema import ShardInfo, error_schema

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
ERRORS = "errors.parquet"
PARTS = "_parts"


def stable_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")


def shard_of(key: str, num_shards: int) -> int:
    return stable_hash(key) % num_shards


def _table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class ShardStore:
    """One output folder of keyed Parquet shards. Picklable (Ray tasks write parts through a copy of it)."""

    def __init__(
        self, root: str, storage: StorageConfig | None, *, num_shards: int, schema: pa.Schema, key: str = "video_id"
    ) -> None:
        self.root, self.storage, self.num_shards, self.schema, self.key = root, storage, num_shards, schema, key

    @property
    def fs_path(self) -> tuple[Any, str]:
        return resolve(self.root, self.storage)

    def shard_name(self, shard: int) -> str:
        return f"shard-{shard:05d}-of-{self.num_shards:05d}.parquet"

    # ---------- parts (written by Ray tasks) ----------
    def _write_part(self, folder: str, table: pa.Table) -> str:
        fs, root = self.fs_path
        ids = sorted(table.column(self.key).to_pylist())
        name = "part-" + hashlib.sha1("\n".join(ids).encode()).hexdigest()[:20] + ".parquet"
        path = join(root, PARTS, folder, name)
        atomic_write_bytes(fs, path, _table_bytes(table))
        return path

    def write_rows(self, table: pa.Table) -> list[int]:
        """Group ``table`` by shard and write one part per shard; returns the shard of each row."""
        table = table.cast(self.schema)
        shards = [shard_of(k, self.num_shards) for k in table.column(self.key).to_pylist()]
        arr = pa.array(shards, pa.int32())
        for s in sorted(set(shards)):
            self._write_part(f"shard-{s:05d}", table.filter(pc.equal(arr, s)))
        return shards

    def write_errors(self, table: pa.Table) -> None:
        if table.num_rows:
            self._write_part("errors", table.cast(error_schema()))

    # ---------- what is done ----------
    def _list(self, folder: str) -> list[str]:
        fs, root = self.fs_path
        path = join(root, folder)
        if not fs.exists(path):
            return []
        return sorted(p for p in fs.find(path) if p.endswith(".parquet") and "/.tmp-" not in p)

    def _read(self, path: str, columns: list[str] | None = None) -> pa.Table:
        fs, _ = self.fs_path
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)

    def committed_paths(self) -> list[str]:
        fs, root = self.fs_path
        if not fs.exists(root):
            return []
        return sorted(
            p for p in fs.ls(root, detail=False)
            if posixpath.basename(p).startswith("shard-") and p.endswith(".parquet")
        )

    def done_keys(self, *, include_errors: bool = True) -> set[str]:
        """Keys found in committed shards or parts (and in error rows unless failed ones should be retried)."""
        done: set[str] = set()
        for p in self.committed_paths() + [p for p in self._list(PARTS) if "/errors/" not in p]:
            done.update(self._read(p, [self.key]).column(0).to_pylist())
        if include_errors:
            done.update(self.error_keys())
        return done

    def error_keys(self) -> set[str]:
        keys: set[str] = set()
        fs, root = self.fs_path
        paths = self._list(join(PARTS, "errors"))
        if fs.exists(join(root, ERRORS)):
            paths.append(join(root, ERRORS))
        for p in paths:
            keys.update(self._read(p, ["video_id"]).column(0).to_pylist())
        return keys

    def pending_shards(self) -> list[int]:
        return sorted({int(posixpath.basename(posixpath.dirname(p)).split("-")[1]) for p in self._list(PARTS) if "/shard-" in p})

    # ---------- commit ----------
    def commit(
        self, manifest: dict[str, Any] | None = None, *, drop_error_keys: Iterable[str] = ()
    ) -> dict[str, Any] | None:
        """The commit sequence of every writer (embed, the importers, label): pending parts -> atomic shard files,
        then the errors table (minus ``drop_error_keys``: videos that have since succeeded), then, with
        ``manifest`` (its extra fields), the manifest last, so a reader never trusts a half-committed store.
        Without ``manifest`` (a stalled run) the parts become shards a rerun skips; the old manifest stays.
        Returns the manifest written (``manifest["errors"]["rows"]`` counts the error rows)."""
        for shard in self.pending_shards():
            self.commit_shard(shard)
        self.commit_errors(drop_error_keys)
        return None if manifest is None else self.write_manifest(manifest)

    def commit_shard(self, shard: int) -> int:
        """Merge the committed shard with its parts into a new atomic shard file; remove the parts. Row count."""
        fs, root = self.fs_path
        parts = [p for p in self._list(join(PARTS, f"shard-{shard:05d}"))]
        final = join(root, self.shard_name(shard))
        tables = [self._read(p).cast(self.schema) for p in parts]
        if fs.exists(final):
            tables.insert(0, self._read(final).cast(self.schema))
        if not tables:
            return 0
        table = _dedupe_sorted(pa.concat_tables(tables), self.key).replace_schema_metadata(self.schema.metadata)
        atomic_write_bytes(fs, final, _table_bytes(table))
        for p in parts:
            fs.rm(p)
        return table.num_rows

    def commit_errors(self, drop_keys: Iterable[str] = ()) -> int:
        """errors.parquet = old errors + error parts, minus keys that have since succeeded."""
        fs, root = self.fs_path
        parts = self._list(join(PARTS, "errors"))
        final = join(root, ERRORS)
        tables = [self._read(p).cast(error_schema()) for p in parts]
        if fs.exists(final):
            tables.insert(0, self._read(final).cast(error_schema()))
        table = _dedupe_sorted(pa.concat_tables(tables), "video_id") if tables else error_schema().empty_table()
        drop = pa.array(sorted(set(drop_keys)), pa.string())
        before = table.num_rows
        if len(drop):
            table = table.filter(pc.invert(pc.is_in(table.column("video_id"), value_set=drop)))
        if parts or not fs.exists(final) or table.num_rows != before:
            atomic_write_bytes(fs, final, _table_bytes(table))
        for p in parts:
            fs.rm(p)
        return table.num_rows

    def write_manifest(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Written last: lists the committed shards with row counts; a reader trusts only what it lists."""
        fs, root = self.fs_path
        shards = []
        total = 0
        for p in self.committed_paths():
            rows = pq.ParquetFile(fs.open(p, "rb")).metadata.num_rows
            shards.append({"path": posixpath.basename(p), "rows": rows})
            total += rows
        errors = 0
        if fs.exists(join(root, ERRORS)):
            errors = pq.ParquetFile(fs.open(join(root, ERRORS), "rb")).metadata.num_rows
        meta = self.schema.metadata or {}
        manifest = {
            "num_shards": self.num_shards,
            "key": self.key,
            "shards": shards,
            "rows": total,
            "errors": {"path": ERRORS, "rows": errors},
            "metadata": {k.decode(): json.loads(v) for k, v in meta.items()},
            **extra,
        }
        atomic_write_bytes(fs, join(root, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())
        return manifest

    # ---------- config stamp ----------
    def check_config(self, config_hash: str, *, overwrite: bool) -> None:
        """Refuse to mix rows made with another feature config in one folder (or wipe it when ``overwrite``)."""
        fs, root = self.fs_path
        stamp = join(root, PARTS, "_config.json")
        old = None
        if fs.exists(join(root, MANIFEST)):
            old = json.loads(fs.cat_file(join(root, MANIFEST))).get("config_hash")
        elif fs.exists(stamp):
            old = json.loads(fs.cat_file(stamp)).get("config_hash")
        if old is not None and old != config_hash:
            if not overwrite:
                raise ValueError(
                    f"embed.output: {self.root} holds features made with another config (hash {old} != "
                    f"{config_hash}); choose a new output folder or set embed.overwrite=true"
                )
            log.warning("overwriting %s (config hash %s -> %s)", self.root, old, config_hash)
            fs.rm(root, recursive=True)
        if not fs.exists(stamp):
            atomic_write_bytes(fs, stamp, json.dumps({"config_hash": config_hash}).encode())


def _dedupe_sorted(table: pa.Table, key: str) -> pa.Table:
    """Sort by key and keep the first row of each key (a retried batch may have written a row twice)."""
    table = table.sort_by(key)
    keys = table.column(key).to_pylist()
    keep = [i for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
    return table.take(pa.array(keep, pa.int64())) if len(keep) != len(keys) else table


# ---------- readers ----------
def read_manifest(root: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    fs, path = resolve(root, storage)
    mpath = join(path, MANIFEST)
    if not fs.exists(mpath):
        raise FileNotFoundError(f"{root} has no {MANIFEST}: not a committed shard folder (did the job finish?)")
    return json.loads(fs.cat_file(mpath))


def shard_uris(root: str, storage: StorageConfig | None = None) -> list[str]:
    """URIs of the committed shards listed in the manifest (what ray.data.read_parquet should read)."""
    manifest = read_manifest(root, storage)
    base = root.rstrip("/")
    return [f"{base}/{s['path']}" for s in manifest["shards"]]


def read_shards(
    root: str, storage: StorageConfig | None = None, columns: list[str] | None = None
) -> tuple[pa.Table, ShardInfo | None]:
    """All committed rows (sorted by shard then key) and the ShardInfo when the rows are feature rows."""
    fs, path = resolve(root, storage)
    manifest = read_manifest(root, storage)
    tables = []
    for s in manifest["shards"]:
        with fs.open(join(path, s["path"]), "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    info = None
    if "raypipe" in manifest.get("metadata", {}):
        info = ShardInfo(**manifest["metadata"]["raypipe"])
    if not tables:
        return pa.table({}), info
    return pa.concat_tables(tables), info


def read_errors(root: str, storage: StorageConfig | None = None) -> pa.Table:
    fs, path = resolve(root, storage)
    p = join(path, ERRORS)
    if not fs.exists(p):
        return error_schema().empty_table()
    with fs.open(p, "rb") as f:
        return pq.read_table(f)
