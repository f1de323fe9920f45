"""Locations: a local path, or a URL that an fsspec file system serves.

Every place that takes a location (``root_dir``, ``resume``, ``load(which=<path>)``,
``open_checkpoint``, ``load_weights``, the CLI) parses it here, once. A string with a
scheme (``s3://bucket/exp``, ``gs://...``, ``memory://...``, ``http(s)://...``) becomes
a ``URL``; anything else (and ``file://``) a ``pathlib.Path``. A URL is never handed to
``Path``: ``Path("s3://b/x")`` collapses the ``//`` and names a LOCAL directory.

``URL`` has the pure part of ``pathlib``'s interface that the engine uses (``/``,
``name``, ``parent``, ``with_name``, ``resolve``, ordering), and no I/O: that is
``storage.storage_of(location)``'s job.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import CheckpointError

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://(.*)", re.DOTALL)
_ONE_SLASH = re.compile(r"(s3|s3a|gs|gcs|memory|https?):/([^/].*)", re.DOTALL)
"""``s3:/bucket``: a URL with a slash missing, not a local directory named ``s3:``."""
WRITABLE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "memory"})
"""Protocols the engine writes: their objects appear whole once uploaded and a PUT can be
conditional (``If-None-Match``), which the commit and the lease need. Others are read."""
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
             "abfs": "adlfs", "http": "aiohttp", "https": "aiohttp"}  # fmt: skip
_EXTRA = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


class URL:
    """A location on an fsspec file system: ``protocol://`` and a ``/``-separated path.

    ``options`` are the file system's storage options (``endpoint_url``, credentials...:
    fsspec's ``storage_options``); they travel with every location derived by ``/``."""

    __slots__ = ("_options", "path", "protocol")

    def __init__(self, protocol: str, path: str, options: Mapping[str, Any] | None = None):
        self.protocol = protocol.lower()
        self.path = path.rstrip("/") if path.strip("/") else path.strip("/")
        self._options = tuple(sorted((options or {}).items()))

    @property
    def options(self) -> dict[str, Any]:
        return dict(self._options)

    def with_options(self, options: Mapping[str, Any] | None) -> URL:
        return URL(self.protocol, self.path, options)

    @property
    def read_only(self) -> bool:
        return self.protocol not in WRITABLE_PROTOCOLS

    def __truediv__(self, other: str | os.PathLike[str]) -> URL:
        part = os.fspath(other).strip("/")
        joined = f"{self.path}/{part}" if self.path else part
        return URL(self.protocol, joined, self.options)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> URL:
        head = posixpath.dirname(self.path)
        return URL(self.protocol, head, self.options)

    def with_name(self, name: str) -> URL:
        return self.parent / name

    def resolve(self) -> URL:
        """Itself: a URL has no symlinks or ``..`` to resolve (``pathlib`` parity)."""
        return self

    def __str__(self) -> str:
        return f"{self.protocol}://{self.path}"

    def __repr__(self) -> str:
        return f"URL({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, URL) and (self.protocol, self.path) == (other.protocol, other.path)

    def __hash__(self) -> int:
        return hash((self.protocol, self.path))

    def __lt__(self, other: URL) -> bool:
        return (self.protocol, self.path) < (other.protocol, other.path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (URL, (self.protocol, self.path, self.options))


Location = Path | URL
"""Where a checkpoint, an experiment or a file is."""


def is_url(value: object) -> bool:
    return isinstance(value, URL) or (
        isinstance(value, str) and _SCHEME.fullmatch(value) is not None
    )


def same_location(a: str | os.PathLike[str] | URL, b: str | os.PathLike[str] | URL) -> bool:
    """Whether two paths or URLs name the same place: URLs as written (a trailing ``/``
    aside), local paths after ``~`` and symlinks are resolved."""
    if is_url(a) or is_url(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    assert not isinstance(a, URL) and not isinstance(b, URL)  # is_url said so
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def as_location(
    value: str | os.PathLike[str] | URL, options: Mapping[str, Any] | None = None
) -> Location:
    """``value`` as a ``URL`` (it has a scheme) or a ``Path``. A URL's protocol must have
    an installed fsspec implementation: refused here, naming the package, otherwise."""
    if isinstance(value, URL):
        return value if options is None else value.with_options(options)
    if isinstance(value, Path):
        return value
    text = os.fspath(value)
    m = _SCHEME.fullmatch(text)
    if m is None:
        typo = _ONE_SLASH.fullmatch(text)
        if typo is not None:
            raise CheckpointError(f"{text}: did you mean {typo.group(1)}://{typo.group(2)}?")
        return Path(text)
    protocol, rest = m.group(1).lower(), m.group(2)
    if protocol == "file":
        return Path("/" + rest.lstrip("/"))
    check_protocol(protocol, text)
    return URL(protocol, rest, options)


def check_protocol(protocol: str, where: str) -> None:
    """``CheckpointError`` naming what to install if fsspec cannot serve ``protocol``."""
    try:
        import fsspec
    except ImportError:
        raise CheckpointError(
            f"{where}: URLs need fsspec; pip install 'dcp-engine[{_EXTRA.get(protocol, 's3')}]'"
            f" (or: pip install fsspec {_PACKAGES.get(protocol, '')})".rstrip()
        ) from None
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise CheckpointError(f"{where}: no fsspec file system knows {protocol}://") from None
    except ImportError as e:
        package = _PACKAGES.get(protocol)
        extra = _EXTRA.get(protocol)
        how = f"pip install {package}" if package else str(e)
        if extra:
            how += f" (or pip install 'dcp-engine[{extra}]')"
        raise CheckpointError(f"{where}: {protocol}:// needs {how}: {e}") from None


__all__ = ["URL", "Location", "as_location", "check_protocol", "is_url", "same_location"]
