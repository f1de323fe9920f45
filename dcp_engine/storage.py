"""The file-system seam: every operation on checkpoint data goes through a ``Storage``.

``LocalStorage`` is a local (or shared POSIX) file system. A test injects faults by
handing a subclass to the manager (``CheckpointManager(..., storage=...)``): a shard
file system that raises ``ENOSPC`` after N bytes, a disk that reports less free space,
a write that waits on a gate. The storage object travels to the writer process with
the first save, so it must be picklable.

Durability (invariant 1): ``write_atomic`` is temp file + fsync + rename + fsync of the
directory; ``publish`` renames without ever replacing and fsyncs the parent.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from . import layout
from .digests import HashingFileSystem


class LocalStorage:
    """Checkpoint I/O on a POSIX file system."""

    def shard_filesystem(self, *, digests: bool = True) -> HashingFileSystem:
        """The DCP file system a writer writes shards through: it sizes (and with
        ``digests``, hashes) every file and keeps the OS errors its writes met."""
        return HashingFileSystem(hashing=digests)

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
        """Readers see the old content of ``path`` or the new, never a mix."""
        tmp = path.with_name(layout.atomic_tmp_name(path.name, os.getpid()))
        try:
            with open(tmp, "wb") as f:
                f.write(data)
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
        """Create ``path`` holding ``data`` only if nothing has that name (``O_EXCL``, which
        is atomic on local disks and NFSv3+); False if the name is taken."""
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

    def read_bytes(self, path: Path) -> bytes:
        return path.read_bytes()

    def mkdir(self, path: Path, *, exist_ok: bool = True) -> None:
        path.mkdir(parents=True, exist_ok=exist_ok)

    def publish(self, src: Path, dst: Path, *, fsync: bool = True) -> None:
        """Rename ``src`` to ``dst``, never replacing an existing ``dst``."""
        if dst.exists() or dst.is_symlink():
            raise FileExistsError(errno.EEXIST, "refusing to replace it", str(dst))
        os.rename(src, dst)
        if fsync:
            self.fsync_dir(dst.parent)

    def remove_tree(self, path: Path) -> None:
        """Remove a directory of ours and everything in it (gone already: fine)."""
        shutil.rmtree(path, ignore_errors=True)

    def remove_file(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def touch(self, path: Path) -> None:
        """Set ``path``'s modification time to now (a lease heartbeat)."""
        os.utime(path)

    def symlink_atomic(self, link: Path, target: str, *, fsync: bool = True) -> None:
        """Point ``link`` at ``target`` atomically (temp link + rename)."""
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

    def file_sizes(self, directory: Path, *, exclude: str) -> dict[str, int]:
        """Sizes of the regular files under ``directory`` (relative POSIX paths)."""
        sizes: dict[str, int] = {}
        for p in sorted(directory.rglob("*")):
            if p.is_file() and not p.is_symlink() and p.name != exclude:
                sizes[p.relative_to(directory).as_posix()] = p.stat().st_size
        return sizes


__all__ = ["LocalStorage"]
