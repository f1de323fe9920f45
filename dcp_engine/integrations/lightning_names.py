"""Lightning's checkpoint paths as names of engine checkpoints.

Lightning addresses checkpoints by file path (``.../epoch=0-step=10.ckpt``,
``.../last.ckpt``) and looks files up itself: ``ckpt_path="last"`` lists ``dirpath`` for
``last*.ckpt`` and takes the newest by mtime, and the version counter asks whether a path
exists. So every name is a small file at that path: a ``NameFile``, JSON, naming the
experiment and the step of a committed engine checkpoint (and, when the dict saved under
this name differs from the one the engine holds, those differences). It is written
atomically, and only once its checkpoint has committed: a name never points at a
checkpoint that does not exist yet.

The marker of each checkpoint lists its names (``extra["lightning_names"]``), so that the
engine knows which of its checkpoints Lightning still refers to across restarts; a
checkpoint whose list becomes empty is handed to retention (``CheckpointManager.discard``).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError
from ..location import Location, as_location, is_url
from ..storage import storage_of
from .lightning_payload import NO_OVERRIDES, Overrides

FORMAT = "dcp-engine-lightning-name/1"
NAMES_KEY = "lightning_names"
"""The marker's ``extra`` key listing the Lightning paths that name a checkpoint."""
_MAX_BYTES = 64 << 20  # a name file is small; anything larger is not one (a torch .ckpt)


def normalize(path: str | os.PathLike[str]) -> str:
    """One spelling per name: a URL as given, a local path absolute (symlinks kept:
    ``save_last="link"`` makes ``last.ckpt`` one)."""
    text = os.fspath(path)
    return text if is_url(text) else os.path.abspath(text)


@dataclass(frozen=True)
class NameFile:
    """One Lightning path naming one committed engine checkpoint."""

    experiment: str
    """The experiment directory (absolute path or URL)."""
    step: int
    overrides: Overrides = NO_OVERRIDES

    @property
    def experiment_dir(self) -> Location:
        return as_location(self.experiment)

    def to_bytes(self) -> bytes:
        body: dict[str, Any] = {
            "format": FORMAT,
            "experiment": self.experiment,
            "step": self.step,
            "about": "a name of a dcp-engine checkpoint: load it with "
            "dcp_engine.integrations.lightning.load_checkpoint(path)",
        }
        if self.overrides.values is not None:
            body["overrides"] = base64.b64encode(self.overrides.values).decode()
        if self.overrides.removed:
            body["removed"] = list(self.overrides.removed)
        return (json.dumps(body, indent=1) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> NameFile | None:
        """The name file in ``data``; None if ``data`` is not one (e.g. a torch file);
        ``CheckpointError`` if it says it is one and is damaged."""
        if not data.lstrip().startswith(b"{"):
            return None
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, ValueError):
            return None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            return None
        try:
            blob = body.get("overrides")
            values = None if blob is None else base64.b64decode(blob, validate=True)
            removed = tuple(str(k) for k in body.get("removed", ()))
            step = body["step"]
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"step {step!r} is not a step")
            return cls(str(body["experiment"]), step, Overrides(values, removed))
        except (KeyError, TypeError, ValueError, binascii.Error) as e:
            raise CheckpointError(f"{where} is a damaged dcp-engine name file: {e}") from e


def read(path: str) -> NameFile | None:
    """The name file at ``path``, None if the file is something else (a torch checkpoint,
    a directory); ``FileNotFoundError`` if nothing is there."""
    location = as_location(path)
    storage = storage_of(location)
    if storage.is_dir(location):
        return None
    if not storage.exists(location):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if storage.size(location) > _MAX_BYTES:
        return None
    return NameFile.from_bytes(storage.read_bytes(location), path)


def make_parent(path: str) -> None:
    """The directory of ``path``, now: Lightning links to (``save_last="link"``) and lists
    a name's directory right after ``save_checkpoint`` returns, before the name exists."""
    location = as_location(path)
    storage_of(location).mkdir(location.parent)


def write(path: str, name: NameFile, *, fsync: bool) -> None:
    """Write ``name`` at ``path`` atomically (its directory is created)."""
    location = as_location(path)
    storage = storage_of(location)
    storage.mkdir(location.parent)
    storage.write_atomic(location, name.to_bytes(), fsync=fsync)


def remove(path: str) -> bool:
    """Delete the file at ``path`` (a name, or a link to one); False if it was gone."""
    if not is_url(path) and os.path.islink(path):
        os.unlink(path)
        return True
    location = as_location(path)
    storage = storage_of(location)
    if not storage.exists(location):
        return False
    storage.remove_file(location)
    return True


def is_link(path: str) -> bool:
    """A symlink (``ModelCheckpoint(save_last="link")``): its removal is the link's only."""
    return not is_url(path) and os.path.islink(path)


__all__ = [
    "FORMAT",
    "NAMES_KEY",
    "NameFile",
    "is_link",
    "make_parent",
    "normalize",
    "read",
    "remove",
    "write",
]
