"""``FsspecStorage``: the storage seam over an fsspec file system (``s3://``, ``gs://``,
``memory://``, any fsspec protocol; ``http(s)://`` read-only).

Object stores have no rename and no directories, so the commit protocol differs from
the local one (``storage.py``, ``committer.py``):

- shards are written under the checkpoint's final prefix ``step_X/``, each file in one
  upload (s3fs: a multipart upload straight from the staging buffers for big files);
  a file is visible once its upload completed, and never half-written;
- the ``COMMITTED`` marker object is written last, in one PUT (atomic): it is the
  commit; readers trust only the marker;
- ``latest``, ``best`` and ``index.json`` are small objects written after it (an alias
  object holds the name of its checkpoint);
- deleting a checkpoint deletes its marker first (it stops existing at once), then the
  rest; the lease holder sweeps prefixes that have no marker;
- the lease (``OWNER``) is created with a conditional write (``If-None-Match: *``: S3,
  GCS, and fsspec's memory file system); its heartbeat rewrites it.

A "directory" is a prefix with at least one object under it; creating one writes
nothing.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Generator
from typing import IO, Any, ClassVar, Literal

from . import layout
from .errors import CheckpointError
from .location import URL
from .storage import Child, Storage, alias_target

_ALIAS_MAX = 4096


class FsspecStorage(Storage):
    """The storage seam over one fsspec file system."""

    renames = False
    _cache: ClassVar[dict[tuple[str, tuple[tuple[str, Any], ...]], FsspecStorage]] = {}
    _cache_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, protocol: str, options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.protocol = protocol
        self.options = dict(options or {})
        self.read_only = protocol in ("http", "https")
        self.per_process = protocol == "memory"
        # Listings are never cached: other processes (the other ranks, the next job)
        # write and delete under the same prefixes.
        self.fs = fsspec.filesystem(protocol, **{"use_listings_cache": False, **self.options})

    @classmethod
    def of(cls, url: URL) -> FsspecStorage:
        key = (url.protocol, tuple(sorted(url.options.items())))
        with cls._cache_lock:
            found = cls._cache.get(key)
            if found is None:
                found = cls._cache[key] = cls(url.protocol, url.options)
            return found

    def __reduce__(self) -> tuple[Any, ...]:
        return (FsspecStorage, (self.protocol, self.options))

    def _p(self, path: URL) -> str:
        return str(path)

    def _writable(self, path: URL) -> str:
        if self.read_only:
            raise CheckpointError(f"{path}: {self.protocol}:// is read-only; nothing is written")
        return str(path)

    # ---------------------------------------------------------------- reading
    def exists(self, path: URL) -> bool:
        return bool(self.fs.exists(self._p(path)))

    def is_dir(self, path: URL) -> bool:
        try:
            return bool(self.fs.isdir(self._p(path)))
        except FileNotFoundError:
            return False

    def is_file(self, path: URL) -> bool:
        try:
            return bool(self.fs.isfile(self._p(path)))
        except FileNotFoundError:
            return False

    def children(self, directory: URL) -> list[Child]:
        self.fs.invalidate_cache(self._p(directory))
        try:
            listed = self.fs.ls(self._p(directory), detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        out: dict[str, str] = {}
        for entry in listed:
            name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
            if not name or name in (".", ".."):
                continue
            kind: Literal["dir", "file"] = "dir" if entry.get("type") == "directory" else "file"
            if out.get(name) != "dir":  # a prefix and an object of one name: the prefix
                out[name] = kind
        return [Child(n, k) for n, k in sorted(out.items())]  # type: ignore[arg-type]

    def read_bytes(self, path: URL) -> bytes:
        try:
            return bytes(self.fs.cat_file(self._p(path)))
        except IsADirectoryError:
            raise
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such object", str(path)) from None

    def size(self, path: URL) -> int:
        return int(self.fs.size(self._p(path)))

    def version(self, path: URL) -> object:
        """The content itself: an object store's mtime has a resolution of a second."""
        return self.read_bytes(path)

    def open_read(self, path: URL) -> IO[bytes]:
        return self.fs.open(self._p(path), "rb")

    def file_sizes(self, directory: URL, *, exclude: str) -> dict[str, int]:
        root = self._p(directory)
        self.fs.invalidate_cache(root)
        try:
            found = self.fs.find(root, detail=True)
        except FileNotFoundError:
            return {}
        prefix = self.fs._strip_protocol(root).rstrip("/") + "/"
        sizes = {}
        for name, info in sorted(found.items()):
            rel = name[len(prefix) :] if name.startswith(prefix) else name.rsplit("/", 1)[-1]
            if rel and rel.rsplit("/", 1)[-1] != exclude and info.get("type") != "directory":
                sizes[rel] = int(info["size"])
        return sizes

    def read_alias(self, link: URL) -> str | None:
        try:
            raw = self.read_bytes(link)
        except (FileNotFoundError, IsADirectoryError):
            return None
        return None if len(raw) > _ALIAS_MAX else alias_target(raw)

    # ---------------------------------------------------------------- writing
    def free_bytes(self, path: URL) -> int:
        return 1 << 62  # an object store does not fill up

    def write_atomic(self, path: URL, data: bytes, *, fsync: bool = True) -> None:
        """One PUT: readers see the old object or the new one."""
        self.fs.pipe_file(self._writable(path), data)

    def create_exclusive(self, path: URL, data: bytes, *, fsync: bool = True) -> bool:
        """A conditional write (``If-None-Match: *``): atomic on S3, GCS and ``memory://``."""
        try:
            with self.fs.open(self._writable(path), "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        return True

    def mkdir(self, path: URL, *, exist_ok: bool = True) -> None:
        """Prefixes need no creating. ``exist_ok=False`` (a new experiment name): refused
        when objects exist under ``path`` already."""
        self._writable(path)
        if not exist_ok and self.exists(path):
            raise FileExistsError(errno.EEXIST, "objects exist under it", str(path))
        if self.protocol == "memory":
            self.fs.makedirs(self._p(path), exist_ok=True)

    def publish(self, src: URL, dst: URL, *, fsync: bool = True) -> None:
        """A copy then a delete (quarantine only: commits never move anything here)."""
        if self.exists(dst):
            raise FileExistsError(errno.EEXIST, "refusing to replace it", str(dst))
        if not self.exists(src):
            raise FileNotFoundError(errno.ENOENT, "no such prefix", str(src))
        self.fs.copy(self._writable(src), self._p(dst), recursive=True)
        self.remove_tree(src, first=layout.MARKER_FILE)

    def remove_tree(self, path: URL, *, first: str | None = None) -> None:
        """Everything under ``path``; ``first`` (the marker) is deleted before the rest,
        so that the prefix stops being a checkpoint at once."""
        root = self._writable(path)
        if first is not None:
            self.remove_file(path / first)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(root, recursive=True)
        self.fs.invalidate_cache(root)

    def remove_file(self, path: URL) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._writable(path))

    def touch(self, path: URL, data: bytes) -> None:
        self.fs.pipe_file(self._writable(path), data)

    def write_alias(self, link: URL, target: str, *, fsync: bool = True) -> None:
        self.fs.pipe_file(self._writable(link), target.encode())

    def take_over(self, path: URL, stale: bytes) -> None:
        """Delete a dead holder's lease object if it still holds ``stale``. Between the
        read and the delete another contender may have won; the conditional create that
        follows still lets only one job in, and a job that lost its lease sees it at its
        next heartbeat."""
        try:
            if self.read_bytes(path) == stale:
                self.remove_file(path)
        except FileNotFoundError:
            return

    def open_atomic(self, path: URL, *, fsync: bool = True) -> Any:
        """An object appears whole when its upload completes: ``open_write`` is atomic."""
        return self.open_write(path, fsync=fsync)

    @contextlib.contextmanager
    def open_write(self, path: URL, *, fsync: bool = True) -> Generator[IO[bytes], None, None]:
        """One object: visible, whole, once the block exits (the upload completes at
        ``close``); nothing is left of a block that raised."""
        f = self.fs.open(self._writable(path), "wb")
        try:
            yield f
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard() if hasattr(f, "discard") else f.close()
            raise
        f.close()


__all__ = ["FsspecStorage"]
