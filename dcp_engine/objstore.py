"""``FsspecStorage``: the storage seam over an fsspec file system (``s3://``, ``gs://``,
``memory://``; any other fsspec protocol, ``http(s)://`` included, read-only).

Object stores have no rename and no directories, so the commit protocol differs from
the local one (``storage.py``, ``committer.py``):

- shards are written under the checkpoint's final prefix ``step_X/``, each file in one
  upload (s3fs: one PUT, or a multipart upload completed at ``close``; the writes pass
  in slices of 8 MiB, so s3fs's buffer holds one part, not a whole tensor); a file is
  visible once its upload completed, and never half-written;
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
import functools
import io
import json
import threading
from collections.abc import Generator
from typing import IO, Any, ClassVar, Literal

from . import layout
from .errors import CheckpointError
from .location import URL, WRITABLE_PROTOCOLS
from .storage import ALIAS_MAX, Child, Storage, alias_target

_SLICE = 8 << 20


class FsspecStorage(Storage):
    """The storage seam over one fsspec file system."""

    renames = False
    _cache: ClassVar[dict[tuple[str, str], FsspecStorage]] = {}
    _cache_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, protocol: str, options: dict[str, Any] | None = None) -> None:

        self.protocol = protocol
        self.options = dict(options or {})
        self.read_only = protocol not in WRITABLE_PROTOCOLS
        self.per_process = protocol == "memory"
        self.fs = _filesystem(protocol, self.options)

    @classmethod
    def of(cls, url: URL) -> FsspecStorage:
        # Options may nest (``client_kwargs={"endpoint_url": ...}``): keyed by their JSON.
        key = (url.protocol, json.dumps(url.options, sort_keys=True, default=repr))
        with cls._cache_lock:
            found = cls._cache.get(key)
            if found is None:
                found = cls._cache[key] = cls(url.protocol, url.options)
            return found

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its file system (to a writer process): rebuilt there from the
        protocol and options, with that process's credentials."""
        return {k: v for k, v in self.__dict__.items() if k != "fs"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.fs = _filesystem(self.protocol, self.options)

    def _p(self, path: URL) -> str:
        return str(path)

    def _writable(self, path: URL) -> str:
        if self.read_only:
            raise CheckpointError(
                f"{path}: {self.protocol}:// is read-only here (writes: "
                f"{', '.join(sorted(WRITABLE_PROTOCOLS))}); nothing is written"
            )
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
        return None if len(raw) > ALIAS_MAX else alias_target(raw)

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
        """Quarantine only (commits never move anything here): the marker is deleted
        first, so that ``src`` stops being a checkpoint at once, then the rest is copied
        to ``dst`` (the marker last, for the record) and deleted. A crash on the way
        leaves a prefix without a marker, which the next holder sweeps."""
        if self.exists(dst):
            raise FileExistsError(errno.EEXIST, "refusing to replace it", str(dst))
        if not self.exists(src):
            raise FileNotFoundError(errno.ENOENT, "no such prefix", str(src))
        marker = src / layout.MARKER_FILE
        try:
            kept = self.read_bytes(marker)
        except (FileNotFoundError, IsADirectoryError):
            kept = None
        self.remove_file(marker)
        self.fs.copy(self._writable(src), self._p(dst), recursive=True)
        if kept is not None:
            self.write_atomic(dst / layout.MARKER_FILE, kept)
        self.remove_tree(src)

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

    def read_tagged(self, path: URL) -> tuple[bytes, object]:
        """S3: the content and its ETag, read between two HEADs that agree (a write
        in between is seen, and the object read again)."""
        if self.protocol not in ("s3", "s3a"):
            return super().read_tagged(path)

        def etag() -> str:
            return str(self.fs.info(self._p(path), refresh=True).get("ETag", "")).strip('"')

        for _ in range(8):
            before = etag()
            raw = self.read_bytes(path)
            if etag() == before:
                return raw, before
        raise OSError(errno.EAGAIN, "keeps changing while read", str(path))

    def replace_if(self, path: URL, data: bytes, tag: object) -> bool | None:
        """S3: a conditional PUT (``If-Match``), atomic on the server. ``memory://``:
        compare and store (one process). Others: None."""
        if self.protocol == "memory":
            if self.version(path) != tag:
                return False
            self.fs.pipe_file(self._writable(path), data)
            return True
        if self.protocol not in ("s3", "s3a"):
            return None
        try:
            self.fs.pipe_file(self._writable(path), data, IfMatch=f'"{tag}"')
        except FileNotFoundError:
            return False
        except OSError as e:
            if "precondition" in str(e).lower().replace("-", ""):
                return False
            raise
        return True

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
        ``close``); nothing is left of a block that raised. Writes go to the file system
        in slices of at most ``_SLICE`` bytes, so that its upload buffer holds a part, not
        a whole tensor. (``memory://`` publishes at open: the bytes are buffered here and
        stored at the end instead.)"""
        where = self._writable(path)
        if self.protocol == "memory":
            buffer = io.BytesIO()
            yield buffer
            self.fs.pipe_file(where, buffer.getvalue())
            return
        f = self.fs.open(where, "wb")
        try:
            yield _Sliced(f)  # type: ignore[misc]
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard() if hasattr(f, "discard") else f.close()
            raise
        try:
            f.close()
        except Exception as e:
            raise _io_error(path, e) from e


class _Sliced:
    """A binary file whose ``write`` passes large buffers on in slices."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _SLICE):
            self._f.write(view[start : start + _SLICE])
        return len(view)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _filesystem(protocol: str, options: dict[str, Any]) -> Any:
    import fsspec

    # Listings are never cached: other processes (the other ranks, the next job) write
    # and delete under the same prefixes.
    return fsspec.filesystem(protocol, **{"use_listings_cache": False, **options})


def _io_error(path: object, e: BaseException) -> OSError:
    """A file system's own exception (botocore's ``EndpointConnectionError``...) as the
    ``OSError`` every caller of the seam handles, naming the path."""
    if isinstance(e, OSError):
        return e
    return OSError(errno.EIO, f"{type(e).__name__}: {e}", str(path))


def _wrap_errors(cls: type[FsspecStorage]) -> type[FsspecStorage]:
    """Every method of the seam raises ``OSError`` (or the engine's own errors) only."""
    for name in ("exists", "is_dir", "is_file", "children", "read_bytes", "size", "version",
                 "open_read", "file_sizes", "read_alias", "write_atomic", "create_exclusive",
                 "mkdir", "publish", "remove_tree", "remove_file", "touch", "write_alias",
                 "take_over", "read_tagged", "replace_if"):  # fmt: skip
        method = getattr(cls, name)

        def wrapped(self: Any, path: Any, *a: Any, __m: Any = method, **k: Any) -> Any:
            try:
                return __m(self, path, *a, **k)
            except (OSError, CheckpointError):
                raise
            except Exception as e:
                raise _io_error(path, e) from e

        functools.update_wrapper(wrapped, method)
        setattr(cls, name, wrapped)
    return cls


_wrap_errors(FsspecStorage)


__all__ = ["FsspecStorage"]
