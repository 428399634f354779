"""WebDataset tar shards (the layout video2dataset writes): expand shard patterns, index tars, read and write members.

A shard ``00000.tar`` holds samples as consecutive members ``<key>.<ext>`` (``key.mp4``, ``key.json``,
``key.txt``); video2dataset also writes ``00000.parquet`` (one metadata row per sample) and ``00000_stats.json``
beside it. A sample whose download failed has no video member and ``"status": "failed_to_download"`` (with
``error_message``) in its JSON.

Why an index instead of reading tars front to back in one task: :func:`index_shard` reads only the 512-byte
headers (and the small JSON/TXT members next to them) and *seeks* past video bytes, so the driver learns every
sample's ``(shard, offset, size)`` without downloading the corpus; each decode task then reads its own member with
:func:`copy_member` (a ranged read on S3). Memory therefore depends on one video per decode task, not on the
number or size of shards. Nothing here knows about Ray, :class:`raypipe.io.sources.VideoRef` or the encoders.

A truncated tar keeps every sample before the cut; the sample whose member is cut is reported
(``TarMember.truncated``) and becomes an error row, never a decode try.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import re
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import fsspec

from raypipe.config import StorageConfig
from raypipe.io.fs import resolve, to_uri

log = logging.getLogger(__name__)

_BRACE = re.compile(r"\{([^{}]*)\}")
_PATTERN_CHARS = set("*?[{")
# Ranged reads of this size: big enough for a header plus the small JSON/TXT members around it, small enough
# that skipping a video member does not fetch it (s3fs reads ahead by the block size).
INDEX_BLOCK = 64 * 1024
COPY_CHUNK = 1 << 20
# JSON / TXT members larger than this are not metadata (left unread at listing time).
MAX_META_BYTES = 1 << 20
TEXT_EXTS = ("json", "txt")
# What webdataset's TarWriter (and so video2dataset) puts in member headers.
WDS_USER = "bigdata"
WDS_MODE = 0o444


def expand_braces(pattern: str) -> list[str]:
    """``{00000..00003}`` (zero-padded like its first bound) and ``{a,b}`` expanded, left to right, nested ok."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        options = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [x for opt in options for x in expand_braces(head + opt + tail)]


def looks_like_shards(uri: str) -> bool:
    """``*.tar`` files and brace/glob patterns of them (what ``embed.source.kind=auto`` treats as WebDataset)."""
    low = uri.lower().rstrip("/")
    return low.endswith(".tar") or (bool(_BRACE.search(uri)) and ".tar" in low)


def _pattern_root(path: str) -> str:
    cut = min((path.index(c) for c in _PATTERN_CHARS if c in path), default=len(path))
    prefix = path[:cut]
    return prefix.rstrip("/") if prefix.endswith("/") else posixpath.dirname(prefix)


def list_shards(uri: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    """``(fs, root, shard paths)`` sorted, for a tar, a brace pattern, a glob, or a folder / s3 prefix of tars.

    ``root`` is the folder that shard names are taken relative to. A shard of a brace pattern that does not exist
    is skipped with a warning (video2dataset leaves gaps where a whole shard failed); none at all is an error.
    """
    fs, path = resolve(uri, storage)
    if _BRACE.search(path):
        root = _pattern_root(path)
        wanted = expand_braces(path)
        found = [p for p in wanted if fs.exists(p)]
        if len(found) < len(wanted):
            log.warning("webdataset: %d of %d shards of %s do not exist (skipped)", len(wanted) - len(found), len(wanted), uri)
    elif any(c in path for c in "*?["):
        root = _pattern_root(path)
        found = [p for p in fs.glob(path) if p.lower().endswith(".tar")]
    elif path.lower().endswith(".tar"):
        root = posixpath.dirname(path)
        found = [path] if fs.exists(path) else []
    else:
        root = path
        found = [p for p in fs.find(path) if p.lower().endswith(".tar")] if fs.exists(path) else []
        found = [p for p in found if not posixpath.basename(p).startswith(".")]
    if not found:
        raise FileNotFoundError(f"embed.source.uri: no .tar shards at {uri}")
    return fs, root, sorted(set(found))


def shard_name(root: str, path: str) -> str:
    """The shard's path relative to ``root`` without ``.tar`` (``00000``): the prefix of repeated keys."""
    rel = posixpath.relpath(path, root) if root else posixpath.basename(path)
    return rel[: -len(".tar")] if rel.lower().endswith(".tar") else rel


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name, the rest is the extension."""
    d, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(d, stem) if d else stem, ext.lower() if dot else ""


@dataclass
class TarMember:
    name: str
    offset: int  # of the data, in the tar file
    size: int
    truncated: bool = False  # the tar ends before this member's data does


@dataclass
class TarSample:
    key: str
    members: dict[str, TarMember] = field(default_factory=dict)  # extension -> member
    meta: dict[str, Any] = field(default_factory=dict)  # parsed JSON member
    txt: str | None = None
    meta_error: str = ""  # a JSON/TXT member that could not be read or parsed


@dataclass
class ShardIndex:
    uri: str
    path: str
    name: str
    size: int
    samples: list[TarSample] = field(default_factory=list)
    error: str = ""  # why indexing stopped early (truncated / unreadable tar); earlier samples are kept
    seconds: float = 0.0


def _read_meta(tar: tarfile.TarFile, info: tarfile.TarInfo, sample: TarSample, ext: str) -> None:
    if info.size > MAX_META_BYTES:
        return
    try:
        f = tar.extractfile(info)
        raw = f.read() if f is not None else b""
        if len(raw) < info.size:
            raise OSError("member cut short")
        if ext == "json":
            value = json.loads(raw.decode("utf-8"))
            sample.meta = value if isinstance(value, dict) else {"value": value}
        else:
            sample.txt = raw.decode("utf-8", errors="replace")
    except (OSError, ValueError, tarfile.TarError) as exc:
        sample.meta_error = f"{info.name}: {exc}"


def _walk(tar: tarfile.TarFile, size: int, index: ShardIndex) -> None:
    by_key: dict[str, TarSample] = {}
    for info in tar:
        if not info.isfile():
            continue
        key, ext = split_member_name(info.name)
        if not ext:
            continue
        sample = by_key.get(key)
        if sample is None:
            sample = by_key[key] = TarSample(key)
            index.samples.append(sample)
        if ext in sample.members:
            log.warning("webdataset: %s holds %s twice; the first is used", index.uri, info.name)
            continue
        cut = info.offset_data + info.size > size
        sample.members[ext] = TarMember(info.name, info.offset_data, info.size, truncated=cut)
        if cut:
            index.error = f"truncated tar: {info.name} needs {info.offset_data + info.size} bytes, the file has {size}"
            break
        if ext in TEXT_EXTS:
            _read_meta(tar, info, sample, ext)


def _check_end(f: BinaryIO, offset: int, size: int) -> str:
    """tarfile stops quietly at a bad or cut header in mid-archive: after the last member there must be the
    zero block that ends an archive, else samples after ``offset`` are lost (reported, not silently dropped)."""
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        return f"truncated tar: it ends at byte {size} without the end-of-archive blocks"
    if block.count(0) != len(block):
        return f"invalid tar header at byte {offset}: the samples after it cannot be read"
    return ""


def index_shard(fs: fsspec.AbstractFileSystem, path: str, name: str) -> ShardIndex:
    """Every sample of one tar with its members' offsets, reading headers and metadata members only. Never raises:
    an unreadable or truncated tar sets ``error`` and keeps the samples read before the problem."""
    t0 = time.monotonic()
    index = ShardIndex(uri=to_uri(fs, path), path=path, name=name, size=0)
    try:
        index.size = int(fs.size(path))
        with fs.open(path, "rb", block_size=INDEX_BLOCK) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            _walk(tar, index.size, index)
            if not index.error:
                index.error = _check_end(f, tar.offset, index.size)
    except (OSError, tarfile.TarError, EOFError, ValueError) as exc:
        msg = str(exc) or type(exc).__name__
        reason = "truncated tar" if "unexpected end" in msg or "truncated" in msg.lower() else "unreadable tar"
        index.error = index.error or f"{reason}: {msg}"
    if index.error:
        log.warning("webdataset: %s: %s (%d samples before it kept)", index.uri, index.error, len(index.samples))
    index.seconds = time.monotonic() - t0
    return index


def index_shards(uri: str, storage: StorageConfig | None = None, *, threads: int = 8) -> list[ShardIndex]:
    """:func:`index_shard` over every shard of ``uri``, a few at a time (S3 latency), in shard order."""
    fs, root, paths = list_shards(uri, storage)
    with ThreadPoolExecutor(max(1, min(threads, len(paths)))) as pool:
        indexes = list(pool.map(lambda p: index_shard(fs, p, shard_name(root, p)), paths))
    log.info("webdataset: %d shards, %d samples indexed from %s", len(indexes), sum(len(i.samples) for i in indexes), uri)
    return indexes


def copy_member(fs: fsspec.AbstractFileSystem, path: str, offset: int, size: int, dst: BinaryIO) -> int:
    """Copy ``size`` bytes at ``offset`` of the tar at ``path`` into ``dst`` in chunks; returns the bytes copied
    (fewer than ``size`` when the tar is cut short). On S3 this is a ranged read of that member only."""
    copied = 0
    with fs.open(path, "rb", block_size=min(max(size, INDEX_BLOCK), 8 * COPY_CHUNK)) as f:
        f.seek(offset)
        while copied < size:
            chunk = f.read(min(COPY_CHUNK, size - copied))
            if not chunk:
                break
            dst.write(chunk)
            copied += len(chunk)
    return copied


# ------------------------------------------------------------------------------------------------------------
# Writing (the corpus generator and tests): the same layout video2dataset produces
# ------------------------------------------------------------------------------------------------------------


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, dict | list):
        return json.dumps(value, indent=4, ensure_ascii=False).encode("utf-8")
    return str(value).encode("utf-8")


def write_tar(fileobj: BinaryIO, samples: list[dict[str, Any]], *, mtime: float = 0.0) -> None:
    """Samples ``{"__key__": k, "mp4": bytes, "json": dict, "txt": str}`` as members ``k.<ext>`` in extension order,
    like webdataset's TarWriter (uncompressed, mode 0444, owner ``bigdata``); ``mtime`` fixed so that one input
    gives byte-identical shards."""
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = str(sample["__key__"])
            for ext in sorted(k for k in sample if not k.startswith("_")):
                data = _as_bytes(sample[ext])
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), mtime, WDS_MODE
                info.uname = info.gname = WDS_USER
                tar.addfile(info, io.BytesIO(data))


def write_shard(
    fs: fsspec.AbstractFileSystem, folder: str, name: str, samples: list[dict[str, Any]], *, mtime: float = 0.0
) -> str:
    """``folder/name.tar`` plus video2dataset's ``name_stats.json`` and ``name.parquet`` (the JSON rows); returns
    the tar path. The tar is written under a temporary name and moved, so a lister never sees half a shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raypipe.io.fs import atomic_write_bytes

    buf = io.BytesIO()
    write_tar(buf, samples, mtime=mtime)
    tar_path = posixpath.join(folder, f"{name}.tar")
    atomic_write_bytes(fs, tar_path, buf.getvalue())
    metas = [dict(s.get("json") or {}) for s in samples]
    statuses = [str(m.get("status", "success")) for m in metas]
    video_bytes = sum(len(v) for s in samples for k, v in s.items() if not k.startswith("_") and k not in TEXT_EXTS)
    stats = {
        "count": len(samples), "successes": statuses.count("success"),
        "failed_to_download": statuses.count("failed_to_download"),
        "failed_to_resize": statuses.count("failed_to_subsample"),
        "duration": 0.0, "bytes_downloaded": video_bytes, "start_time": mtime, "end_time": mtime,
        "status_dict": {s: statuses.count(s) for s in sorted(set(statuses))},
    }
    atomic_write_bytes(fs, posixpath.join(folder, f"{name}_stats.json"), json.dumps(stats, indent=4).encode())
    rows = [{"key": str(s["__key__"]), "status": st, "error_message": m.get("error_message"),
             "caption": s.get("txt")} for s, m, st in zip(samples, metas, statuses, strict=True)]
    pbuf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(
        [("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()), ("caption", pa.string())])), pbuf)
    atomic_write_bytes(fs, posixpath.join(folder, f"{name}.parquet"), pbuf.getvalue())
    return tar_path
