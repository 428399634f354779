"""One place that turns a URI into an fsspec filesystem, with the storage settings passed explicitly.

Why explicit: Ray workers on other nodes do not share the driver's environment, so the s3 endpoint / region
travel inside the config (:class:`raypipe.config.StorageConfig`) and every worker resolves URIs through here.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path

import fsspec

from raypipe.config import StorageConfig
from raypipe.config.paths import absolute_path


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def resolve(uri: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path)`` for a local path, ``file://`` URI or ``s3://`` URI."""
    storage = storage or StorageConfig()
    if uri.startswith("s3://") or uri.startswith("s3a://"):
        import s3fs

        client_kwargs = {}
        if storage.region:
            client_kwargs["region_name"] = storage.region
        fs = s3fs.S3FileSystem(
            anon=storage.anon,
            endpoint_url=storage.endpoint_url,
            client_kwargs=client_kwargs,
            # Parts are written by other processes: a cached listing would hide them from the driver.
            use_listings_cache=False,
        )
        return fs, uri.split("://", 1)[1].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r} (use a local path or s3://)")
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(uri))


def absolute(uri: str | None) -> str | None:
    """Remote URIs unchanged, local paths absolute: Ray workers and trial drivers run with another cwd."""
    return absolute_path(uri)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URI form of ``path`` on ``fs`` (what goes into ``source_uri`` columns)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return f"s3://{path}" if protocol in ("s3", "s3a") else f"{protocol}://{path}"


def join(path: str, *parts: str) -> str:
    return posixpath.join(path, *parts)


def atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write to a temporary name beside ``path`` then rename (local) / move (s3): readers never see a partial file."""
    parent = posixpath.dirname(path)
    tmp = join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    fs.makedirs(parent, exist_ok=True)
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def local_copy(uri: str, storage: StorageConfig | None = None) -> tuple[str, str | None]:
    """A local path for ``uri`` (file or folder): the path itself when local, else a copy in a fresh temp folder.

    Returns ``(local_path, temp_dir_to_remove_or_None)``. Used to load weights once per actor and to give PyAV
    a seekable local file for remote videos.
    """
    if not is_remote(uri):
        fs, path = resolve(uri, storage)
        return path, None
    fs, path = resolve(uri, storage)
    tmp = tempfile.mkdtemp(prefix="raypipe-")
    target = str(Path(tmp) / posixpath.basename(path.rstrip("/")))
    if fs.isdir(path):
        fs.get(path.rstrip("/") + "/", target, recursive=True)
    else:
        fs.get(path, target)
    return target, tmp


def remove_tree(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)
