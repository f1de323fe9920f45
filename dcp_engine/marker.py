"""The ``COMMITTED`` marker: one typed record, the only code that reads or writes one.

A marker says what a committed checkpoint holds (step, epoch, metrics, the kind of every
``app_state`` entry) and lists every file with its size and digest. It carries a digest
of its own canonical form, so that a flipped byte in the marker makes the checkpoint
*corrupt* (reported by name, quarantined on resume) instead of a different checkpoint or
a traceback. Every field is checked once, here (``Marker.from_bytes``); other modules
read attributes.

Format ``dcp-engine/2`` carries the marker digest; ``dcp-engine/1`` markers (written
before it) are still read, with every field checked alike.
"""

from __future__ import annotations

import json
import math
import re
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .errors import IntegrityError

FORMAT = "dcp-engine/2"
LEGACY_FORMATS = ("dcp-engine/1",)
SHARDS_RAW = "raw/1"
SHARDS_TORCH_SAVE = "dcp/torch_save"
SHARD_FORMATS = (SHARDS_RAW, SHARDS_TORCH_SAVE)
DIGEST_ALGORITHM = "crc32"
_HEX8 = re.compile(r"[0-9a-f]{8}")


class MarkerError(IntegrityError):
    """A marker that fails its digest or its schema: its checkpoint is corrupt."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint: its size, and its CRC-32 when digests were on."""

    size: int
    crc32: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"size": self.size}
        if self.crc32 is not None:
            out[DIGEST_ALGORITHM] = self.crc32
        return out


@dataclass(frozen=True)
class Marker:
    """What a committed checkpoint is (``step_X/COMMITTED``)."""

    step: int
    epoch: int | None
    metrics: Mapping[str, float]
    world_size: int
    entries: Mapping[str, Mapping[str, Any]]
    """Top-level ``app_state`` key -> how it was written (``{"kind": ..., ...}``)."""
    files: Mapping[str, FileEntry]
    """Every file of the checkpoint but the marker, by relative POSIX path."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    torch_version: str = torch.__version__
    format: str = FORMAT
    shards: str = SHARDS_TORCH_SAVE
    """The shard files' format: ``raw/1`` (``native.py``), or DCP's stock format
    (``dcp/torch_save``) in checkpoints written before it."""

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def amended(
        self, metrics: Mapping[str, float], extra: Mapping[str, Any] | None = None
    ) -> Marker:
        """This marker with ``metrics`` (and ``extra``) merged in; re-digested when written."""
        return replace(
            self,
            metrics={**self.metrics, **metrics},
            extra={**self.extra, **(extra or {})},
            format=FORMAT,
        )

    # ------------------------------------------------------------------ bytes

    def _body(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "step": self.step,
            "epoch": self.epoch,
            "metrics": dict(self.metrics),
            "extra": dict(self.extra),
            "created": self.created,
            "world_size": self.world_size,
            "torch_version": self.torch_version,
            "entries": {k: dict(v) for k, v in self.entries.items()},
            "files": {k: f.to_json() for k, f in self.files.items()},
            "bytes": self.total_bytes,
            "shards": self.shards,
        }

    def to_bytes(self) -> bytes:
        body = self._body()
        body["digest"] = f"{DIGEST_ALGORITHM}:{_digest(body)}"
        return json.dumps(body, indent=1, sort_keys=True, allow_nan=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, where: str) -> Marker:
        """The marker in ``raw``; ``MarkerError`` naming ``where`` and the first problem."""
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MarkerError(f"marker {where} is corrupt: not JSON ({e})") from None
        if not isinstance(data, dict):
            raise MarkerError(f"marker {where} is corrupt: not a JSON object")
        fmt = data.get("format")
        if fmt == FORMAT:
            stored = data.pop("digest", None)
            expected = f"{DIGEST_ALGORITHM}:{_digest(data)}"
            if stored != expected:
                raise MarkerError(
                    f"marker {where} is corrupt: its digest is {stored!r}, its content "
                    f"hashes to {expected!r}"
                )
        elif fmt not in LEGACY_FORMATS:
            raise MarkerError(f"marker {where} is corrupt: format {fmt!r}, expected {FORMAT!r}")
        try:
            return _parse(data)
        except _Bad as e:
            raise MarkerError(f"marker {where} is corrupt: {e}") from None


def _digest(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return f"{zlib.crc32(canonical.encode()) & 0xFFFFFFFF:08x}"


class _Bad(Exception):
    pass


def _int(data: Mapping[str, Any], key: str, low: int) -> int:
    v = data.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise _Bad(f"field {key!r} is {v!r}, expected an int >= {low}")
    return v


def _dict(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    v = data.get(key, {} if key == "extra" else None)
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise _Bad(f"field {key!r} is {type(v).__name__}, expected an object")
    return v


def _parse(data: Mapping[str, Any]) -> Marker:
    step = _int(data, "step", 0)
    epoch = data.get("epoch")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
        raise _Bad(f"field 'epoch' is {epoch!r}, expected an int or null")
    metrics = {}
    for name, value in _dict(data, "metrics").items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Bad(f"metric {name!r} is {value!r}, expected a number")
        metrics[name] = float(value)
    created = data.get("created")
    if isinstance(created, bool) or not isinstance(created, (int, float)):
        raise _Bad(f"field 'created' is {created!r}, expected a time")
    if not math.isfinite(created):
        raise _Bad(f"field 'created' is {created!r}, expected a finite time")
    entries = _dict(data, "entries")
    for key, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("kind"), str):
            raise _Bad(f"entry {key!r} is {entry!r}, expected an object with a 'kind'")
    files = {}
    for name, meta in _dict(data, "files").items():
        if not isinstance(meta, dict):
            raise _Bad(f"file {name!r} is {meta!r}, expected an object")
        size = meta.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _Bad(f"file {name!r} has size {size!r}, expected an int >= 0")
        crc = meta.get(DIGEST_ALGORITHM)
        if crc is not None and not (isinstance(crc, str) and _HEX8.fullmatch(crc)):
            raise _Bad(f"file {name!r} has {DIGEST_ALGORITHM} {crc!r}, expected 8 hex digits")
        files[name] = FileEntry(size, crc)
    marker = Marker(
        step=step,
        epoch=epoch,
        metrics=metrics,
        world_size=_int(data, "world_size", 1),
        entries=entries,
        files=files,
        extra=_dict(data, "extra"),
        created=float(created),
        torch_version=str(data.get("torch_version", "?")),
        format=str(data["format"]),
        shards=_shards(data),
    )
    total = data.get("bytes")
    if total != marker.total_bytes:
        raise _Bad(f"field 'bytes' is {total!r}, its files add up to {marker.total_bytes}")
    return marker


def _shards(data: Mapping[str, Any]) -> str:
    shards = data.get("shards", SHARDS_TORCH_SAVE)  # absent: written before raw/1
    if shards not in SHARD_FORMATS:
        raise _Bad(f"field 'shards' is {shards!r}, expected one of {', '.join(SHARD_FORMATS)}")
    return str(shards)


def clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Metrics as plain floats (tensors and numpy scalars via ``float``); names must be str."""
    out: dict[str, float] = {}
    for k, v in (metrics or {}).items():
        if not isinstance(k, str):
            raise TypeError(f"metric names must be str, got {k!r}")
        try:
            out[k] = float(v.item() if hasattr(v, "item") else v)
        except (TypeError, ValueError) as e:
            raise TypeError(f"metric {k!r}={v!r} is not a number") from e
    return out


def clean_extra(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """``extra`` as it will read back from the marker (JSON), or ``TypeError``."""
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    try:
        return dict(json.loads(json.dumps(dict(extra), allow_nan=True)))
    except (TypeError, ValueError) as e:
        raise TypeError(f"extra must be JSON-serialisable (it goes into the marker): {e}") from e


__all__ = ["FORMAT", "FileEntry", "Marker", "MarkerError", "clean_extra", "clean_metrics"]
