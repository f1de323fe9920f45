"""The storage seam: every operation on checkpoint data goes through a ``Storage``.

Two implementations sit behind it: ``LocalStorage`` (a local or shared POSIX file
system, here) and ``objstore.FsspecStorage`` (``s3://``, ``gs://``, ``memory://``, any
fsspec protocol; ``http(s)://`` read-only). ``storage_of(location)`` picks one. No other
module calls ``os``, ``shutil`` or ``pathlib`` I/O on checkpoint data.

The two differ in how a checkpoint is committed (``renames``):

- local: shards go into ``step_X.tmp/``; the marker is written into it (temp file +
  fsync + rename), then ``step_X.tmp`` is renamed to ``step_X`` (never replacing) and the
  parent fsynced. The rename is the commit.
- object stores have no rename: shards go under the final ``step_X/`` prefix, and the
  ``COMMITTED`` marker object, written last in one PUT, is the commit.

A test injects faults by handing a subclass of ``LocalStorage`` to the manager
(``CheckpointManager(..., storage=...)``). A storage travels to the writer process with
the first save, so it must be picklable.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
import shutil
import zlib
from collections.abc import Generator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, NamedTuple

from . import layout
from .location import URL, Location

if TYPE_CHECKING:
    from .digests import HashingFileSystem

_CHUNK = 8 << 20
ALIAS_MAX = 4096


class Child(NamedTuple):
    """One entry of a directory (or of a prefix of an object store)."""

    name: str
    kind: Literal["dir", "file", "link"]


class Storage(abc.ABC):
    """What the engine needs of a storage. Paths are ``Location``s of this storage."""

    renames: bool = True
    """True: a checkpoint is committed by renaming ``step_X.tmp``; False: by writing its
    marker object last under ``step_X/``."""
    read_only: bool = False
    per_process: bool = False
    """True: each process sees its own (fsspec's ``memory://``): no writer process."""

    # ---------------------------------------------------------------- reading
    @abc.abstractmethod
    def exists(self, path: Any) -> bool: ...

    @abc.abstractmethod
    def is_dir(self, path: Any) -> bool: ...

    @abc.abstractmethod
    def is_file(self, path: Any) -> bool: ...

    @abc.abstractmethod
    def children(self, directory: Any) -> list[Child]:
        """The entries of ``directory`` sorted by name; [] if it does not exist."""

    @abc.abstractmethod
    def read_bytes(self, path: Any) -> bytes: ...

    @abc.abstractmethod
    def size(self, path: Any) -> int: ...

    @abc.abstractmethod
    def version(self, path: Any) -> object:
        """Something that changes whenever ``path`` is written or touched (a lease's
        heartbeat). ``FileNotFoundError`` if it does not exist."""

    @abc.abstractmethod
    def open_read(self, path: Any) -> IO[bytes]:
        """A binary file for ``seek``/``read``/``readinto`` (ranged reads)."""

    def digest(self, path: Any) -> str:
        """The CRC-32 of every byte of ``path`` (one streaming pass)."""
        crc = 0
        with self.open_read(path) as f:
            while chunk := f.read(_CHUNK):
                crc = zlib.crc32(chunk, crc)
        return f"{crc & 0xFFFFFFFF:08x}"

    @abc.abstractmethod
    def file_sizes(self, directory: Any, *, exclude: str) -> dict[str, int]:
        """Sizes of the files under ``directory`` (relative POSIX paths)."""

    @abc.abstractmethod
    def read_alias(self, link: Any) -> str | None:
        """The checkpoint name an alias (``latest``, ``best``) points at, or None."""

    def resolve(self, path: Any) -> Location:
        return path

    # ---------------------------------------------------------------- writing
    @abc.abstractmethod
    def free_bytes(self, path: Any) -> int: ...

    @abc.abstractmethod
    def write_atomic(self, path: Any, data: bytes, *, fsync: bool = True) -> None:
        """Readers see the old content of ``path`` or the new, never a mix."""

    @abc.abstractmethod
    def create_exclusive(self, path: Any, data: bytes, *, fsync: bool = True) -> bool:
        """Create ``path`` holding ``data`` only if nothing has that name; False if taken."""

    @abc.abstractmethod
    def mkdir(self, path: Any, *, exist_ok: bool = True) -> None: ...

    @abc.abstractmethod
    def publish(self, src: Any, dst: Any, *, fsync: bool = True) -> None:
        """Move ``src`` to ``dst``, never replacing an existing ``dst``."""

    @abc.abstractmethod
    def remove_tree(self, path: Any) -> None:
        """Remove a directory of ours and everything in it (gone already: fine)."""

    @abc.abstractmethod
    def remove_file(self, path: Any) -> None: ...

    @abc.abstractmethod
    def touch(self, path: Any, data: bytes) -> None:
        """Change ``version(path)`` (a lease heartbeat); ``data`` is its content."""

    @abc.abstractmethod
    def write_alias(self, link: Any, target: str, *, fsync: bool = True) -> None:
        """Point ``link`` at the checkpoint named ``target``, atomically."""

    @abc.abstractmethod
    def take_over(self, path: Any, stale: bytes) -> None:
        """Remove the lease ``path`` if it still holds ``stale`` (its holder is gone)."""

    def read_tagged(self, path: Any) -> tuple[bytes, object]:
        """The content of ``path`` and a tag that changes with every write of it."""
        return self.read_bytes(path), self.version(path)

    def replace_if(self, path: Any, data: bytes, tag: object) -> bool | None:
        """Replace ``path`` by ``data`` only if it is still what ``tag`` was read from,
        atomically; False if it changed. None: this storage cannot (``take_over`` then)."""
        return None

    def touch_if(self, path: Any, data: bytes, tag: object) -> bool:
        """``touch`` unless ``path`` changed since ``tag`` was read (a heartbeat that must
        not overwrite a new holder's lease); False then."""
        done = self.replace_if(path, data, tag)
        if done is not None:
            return done
        if self.version(path) != tag:
            return False
        self.touch(path, data)
        return True

    @abc.abstractmethod
    def open_write(
        self, path: Any, *, fsync: bool = True
    ) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A new file; with ``fsync`` durable once the block exits without error."""

    @abc.abstractmethod
    def open_atomic(
        self, path: Any, *, fsync: bool = True
    ) -> contextlib.AbstractContextManager[IO[bytes]]:
        """Replace ``path`` by what the block writes, atomically: readers see the old
        content or the new, and a block that raised leaves the old."""

    def shard_filesystem(self, *, digests: bool = True, fsync: bool = True) -> HashingFileSystem:
        """The DCP file system a writer writes shards through: it sizes (and with
        ``digests``, hashes) every file and keeps the OS errors its writes met."""
        from .digests import HashingFileSystem

        return HashingFileSystem(self, hashing=digests, fsync=fsync)


class LocalStorage(Storage):
    """Checkpoint I/O on a POSIX file system.

    Durability (invariant 1): ``write_atomic`` is temp file + fsync + rename + fsync of
    the directory; ``publish`` renames without ever replacing and fsyncs the parent."""

    def exists(self, path: Path) -> bool:
        return path.exists() or path.is_symlink()

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def is_file(self, path: Path) -> bool:
        return path.is_file()

    def children(self, directory: Path) -> list[Child]:
        try:
            entries = sorted(directory.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for p in entries:
            kind: Literal["dir", "file", "link"] = (
                "link" if p.is_symlink() else "dir" if p.is_dir() else "file"
            )
            out.append(Child(p.name, kind))
        return out

    def read_bytes(self, path: Path) -> bytes:
        return path.read_bytes()

    def size(self, path: Path) -> int:
        return path.stat().st_size

    def version(self, path: Path) -> object:
        st = path.stat()
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def open_read(self, path: Path) -> IO[bytes]:
        return open(path, "rb", buffering=0)

    def file_sizes(self, directory: Path, *, exclude: str) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for p in sorted(directory.rglob("*")):
            if p.is_file() and not p.is_symlink() and p.name != exclude:
                sizes[p.relative_to(directory).as_posix()] = p.stat().st_size
        return sizes

    def read_alias(self, link: Path) -> str | None:
        """A symlink's target; a small regular file's content (an experiment copied from
        an object store, where aliases are objects)."""
        try:
            if link.is_symlink():
                return os.readlink(link)
            if link.is_file() and link.stat().st_size <= ALIAS_MAX:
                return alias_target(link.read_bytes())
        except (OSError, UnicodeDecodeError):
            return None
        return None

    def resolve(self, path: Path) -> Path:
        return path.resolve()

    def free_bytes(self, path: Path) -> int:
        return shutil.disk_usage(path).free

    def fsync_dir(self, path: Path) -> None:
        """Make the entries of ``path`` (creations, renames) durable."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_atomic(self, path: Path, data: bytes, *, fsync: bool = True) -> None:
        with self.open_atomic(path, fsync=fsync) as f:
            f.write(data)

    @contextlib.contextmanager
    def open_atomic(self, path: Path, *, fsync: bool = True) -> Generator[IO[bytes], None, None]:
        """A temporary beside ``path``, fsynced, renamed over it, the directory fsynced."""
        tmp = path.with_name(layout.atomic_tmp_name(path.name, os.getpid()))
        try:
            with open(tmp, "wb") as f:
                yield f
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
            if path.is_dir() and not path.is_symlink():
                raise IsADirectoryError(errno.EISDIR, "a directory is in the way", str(path))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        if fsync:
            self.fsync_dir(path.parent)

    def create_exclusive(self, path: Path, data: bytes, *, fsync: bool = True) -> bool:
        """``O_EXCL``: atomic on local disks and NFSv3+."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if fsync:
            self.fsync_dir(path.parent)
        return True

    def mkdir(self, path: Path, *, exist_ok: bool = True) -> None:
        path.mkdir(parents=True, exist_ok=exist_ok)

    def publish(self, src: Path, dst: Path, *, fsync: bool = True) -> None:
        if dst.exists() or dst.is_symlink():
            raise FileExistsError(errno.EEXIST, "refusing to replace it", str(dst))
        os.rename(src, dst)
        if fsync:
            self.fsync_dir(dst.parent)

    def remove_tree(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def remove_file(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def touch(self, path: Path, data: bytes) -> None:
        """The modification time, not the content: rewriting in place could be read torn."""
        os.utime(path)

    def write_alias(self, link: Path, target: str, *, fsync: bool = True) -> None:
        """A symlink, made atomically (temp link + rename)."""
        tmp = link.with_name(layout.atomic_tmp_name(link.name, os.getpid()))
        try:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.symlink(target, tmp)
            os.replace(tmp, link)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if fsync:
            self.fsync_dir(link.parent)

    def take_over(self, path: Path, stale: bytes) -> None:
        """Remove ``path`` if it still holds ``stale`` (a dead lease holder's ``OWNER``):
        it is moved aside first, and put back if it changed hands meanwhile."""
        aside = path.with_name(f".{path.name}.stale.{os.getpid()}.{os.urandom(4).hex()}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        if aside.read_bytes() != stale:  # another contender won meanwhile: its lease
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
        self.remove_file(aside)

    @contextlib.contextmanager
    def open_write(self, path: Path, *, fsync: bool = True) -> Generator[IO[bytes], None, None]:
        with open(path, "wb") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())


def alias_target(raw: bytes) -> str | None:
    """The content of an alias object: the name of a checkpoint, else None (a user's
    file that happens to be named ``latest`` is not an alias)."""
    try:
        name = raw.decode().strip()
    except UnicodeDecodeError:
        return None
    return name if layout.parse_step_dirname(name) is not None else None


def storage_of(location: Location, given: Storage | None = None) -> Storage:
    """The storage serving ``location``: ``given`` (a test's faulty one) if it serves
    that kind of location, else ``LocalStorage`` for a path, ``FsspecStorage`` for a URL."""
    if given is not None:
        if isinstance(location, URL) == isinstance(given, LocalStorage):
            raise TypeError(f"storage={type(given).__name__} cannot serve {location}")
        return given
    if isinstance(location, URL):
        from .objstore import FsspecStorage

        return FsspecStorage.of(location)
    return LocalStorage()


__all__ = ["Child", "LocalStorage", "Storage", "storage_of"]
