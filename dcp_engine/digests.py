"""Per-file digests, computed while the files are written (no second read pass).

CRC-32 (``zlib.crc32``): in the standard library (no dependency), about 3.4 GB/s on one
core of the reference machine, and it releases the GIL on large buffers, so in thread
mode hashing does not hold training. It detects the flipped bytes, truncations and torn
writes a checkpoint suffers; it is not a defence against deliberate tampering.

``HashingFileSystem`` is DCP's ``FileSystem`` over the storage seam whose write streams
hash what passes through them; the writers read its ``digests`` after writing.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Generator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from torch.distributed.checkpoint.filesystem import FileSystemBase

if TYPE_CHECKING:
    from .storage import Storage

ALGORITHM = "crc32"


def hexdigest(crc: int) -> str:
    return f"{crc & 0xFFFFFFFF:08x}"


class HashingStream:
    """A write-only file wrapper that hashes and counts every byte written, in order."""

    def __init__(self, raw: Any, errors: list[OSError], *, hashing: bool = True) -> None:
        self._raw = raw
        self.crc = 0
        self.size = 0
        self._errors = errors
        self._hashing = hashing

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        try:
            n = self._raw_write(view)
        except OSError as e:
            # torch.save reports a failed write as "unexpected pos"; the cause is kept.
            self._errors.append(e)
            raise
        n = len(view) if n is None else n
        if self._hashing:
            self.crc = zlib.crc32(view[:n], self.crc)
        self.size += n
        return n

    def _raw_write(self, view: memoryview) -> int | None:
        """The write itself: the seam a faulty test file system overrides."""
        return self._raw.write(view)

    def tell(self) -> int:
        return self._raw.tell()

    def flush(self) -> None:
        try:
            self._raw.flush()
        except OSError as e:  # a buffered write's error may surface here
            self._errors.append(e)
            raise

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        self._raw.close()

    @property
    def closed(self) -> bool:
        return bool(self._raw.closed)

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False


class HashingFileSystem(FileSystemBase):
    """DCP's ``FileSystem`` over a ``Storage``, hashing every file it writes (keyed by file
    name) and keeping every OS error a write met (``errors``: the root cause of a failed
    save). With ``fsync`` a file is durable once its stream closes."""

    stream_class: type[HashingStream] = HashingStream

    def __init__(
        self, storage: Storage | None = None, *, hashing: bool = True, fsync: bool = True
    ) -> None:
        super().__init__()
        if storage is None:
            from .storage import LocalStorage

            storage = LocalStorage()
        self.storage = storage
        self.hashing = hashing
        """False: sizes only (``CheckpointConfig.digests=False``)."""
        self.fsync = fsync
        self.digests: dict[str, dict[str, Any]] = {}
        self.errors: list[OSError] = []
        self._lock = threading.Lock()  # DCP writes files from several threads

    @contextmanager
    def create_stream(self, path: Any, mode: str) -> Generator[Any, None, None]:
        path = self.init_path(path)
        if "w" not in mode:
            with self.storage.open_read(path) as plain:
                yield plain
            return
        try:
            with self.storage.open_write(path, fsync=self.fsync) as raw:
                hashing = self.stream_class(raw, self.errors, hashing=self.hashing)
                yield hashing
        except OSError as e:  # e.g. ENOSPC when the file is closed
            if all(e is not seen for seen in self.errors):
                self.errors.append(e)
            raise
        digest: dict[str, Any] = {"size": hashing.size}
        if self.hashing:
            digest[ALGORITHM] = hexdigest(hashing.crc)
        with self._lock:
            self.digests[path.name] = digest

    def concat_path(self, path: Any, suffix: str) -> Any:
        return self.init_path(path) / suffix

    def init_path(self, path: Any) -> Any:
        from .location import as_location

        return as_location(path)

    def rename(self, path: Any, new_path: Any) -> None:
        self.storage.publish(self.init_path(path), self.init_path(new_path), fsync=self.fsync)
        old, new = self.init_path(path).name, self.init_path(new_path).name
        with self._lock:
            if old in self.digests:
                self.digests[new] = self.digests.pop(old)

    def mkdir(self, path: Any) -> None:
        self.storage.mkdir(self.init_path(path))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True

    def exists(self, path: Any) -> bool:
        return self.storage.exists(self.init_path(path))

    def rm_file(self, path: Any) -> None:
        self.storage.remove_file(self.init_path(path))
