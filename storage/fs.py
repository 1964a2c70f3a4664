"""Paths through fsspec: local folders, ``memory://``, ``s3://``, ``gs://`` alike.

Local paths get the strongest commit protocol (temporary name, fsync, rename, fsync the
folder); object stores have no rename, but a single PUT is atomic (the object appears whole
or not at all), which is what the commit order needs (docs/cache-format.md).
"""

from __future__ import annotations

import os

import fsspec
from fsspec.implementations.local import LocalFileSystem


def open_fs(path: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path within it) for a local path or URL."""
    fs, root = fsspec.core.url_to_fs(str(path))
    return fs, root.rstrip("/") or "/"


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def write_atomic(path: str | os.PathLike, data: bytes | str, fs: fsspec.AbstractFileSystem | None = None) -> None:
    """Replace `path` with `data` (str: UTF-8) so that readers see the old or the new bytes,
    never a mix, also after a power loss. fs: the file system `path` is in (None: local).
    Local: a temporary name beside it (.NAME.PID.tmp), fsync, rename, fsync the folder.
    Object stores: one PUT, which is atomic."""
    data = data.encode() if isinstance(data, str) else data
    path = str(path)
    if fs is not None and not is_local(fs):
        fs.pipe_file(path, data)
        return
    tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
