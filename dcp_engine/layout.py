"""Every on-disk name of an experiment, and how to parse it.

No other module knows a path pattern: they ask this one. Names are parsed with
``re.fullmatch`` so that a foreign ``step_00000999.backup`` or ``notes/`` is never
mistaken for ours (and therefore never listed, loaded or deleted).

    <root_dir>/<experiment>/
      config.yaml
      index.json
      checkpoints/
        step_00001200/          committed: DCP shards + .metadata + COMMITTED
        step_00001300.tmp/      in flight or torn
        step_00001100.corrupt/  quarantined: failed its digests on resume, never loaded
        latest -> step_00001200
      OWNER                     the lease of the job that writes here

On an object store (no rename: ``storage.renames`` is False) there is no ``.tmp``: a save
writes under ``step_X/`` and its ``COMMITTED`` object, written last, is the commit; a
``step_X/`` without one is torn. ``latest``/``best`` are objects holding the name of
their checkpoint. The same names serve a local tier (``<local_dir>/<experiment>/``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from .location import Location

CHECKPOINTS_DIR = "checkpoints"
INDEX_FILE = "index.json"
CONFIG_FILE = "config.yaml"
MARKER_FILE = "COMMITTED"
OWNER_FILE = "OWNER"
CLAIM_FILE = "CREATED"
"""On an object store (no directories): created exclusively, it claims a new default
experiment name, as ``mkdir`` does on disk."""
DCP_METADATA_FILE = ".metadata"
TMP_SUFFIX = ".tmp"
CORRUPT_SUFFIX = ".corrupt"
ALIASES = ("latest", "best")
AVERAGE_FILE = "average_model.pth"
"""In the experiment: the mean of the best checkpoints' modules (``average_best_models``)."""

_STEP_DIGITS = 8
_STEP_RE = re.compile(r"step_(\d{8,})")
_TMP_RE = re.compile(r"step_(\d{8,})\.tmp")
_ATOMIC_TMP_RE = re.compile(r"\.(index\.json|config\.yaml|latest|best|COMMITTED)\.\d+\.tmp")
_CORRUPT_RE = re.compile(r"(step_\d{8,})\.corrupt(?:-(\d+))?")


def step_dirname(step: int) -> str:
    """``step_00001200`` for step 1200 (more digits past 99,999,999)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step:0{_STEP_DIGITS}d}"


def tmp_dirname(step: int) -> str:
    return step_dirname(step) + TMP_SUFFIX


def _parse(pattern: re.Pattern[str], name: str, suffix: str) -> int | None:
    m = pattern.fullmatch(name)
    if m is None:
        return None
    step = int(m.group(1))
    # Only the canonical spelling is ours: step_000000001 is not step_00000001.
    return step if step_dirname(step) + suffix == name else None


def parse_step_dirname(name: str) -> int | None:
    """The step of a final checkpoint directory name, or None if the name is not ours."""
    return _parse(_STEP_RE, name, "")


def parse_tmp_dirname(name: str) -> int | None:
    """The step of an in-flight (or torn) directory name, or None if the name is not ours."""
    return _parse(_TMP_RE, name, TMP_SUFFIX)


def atomic_tmp_name(name: str, pid: int) -> str:
    """The temporary a ``name`` is written to before it is renamed over ``name``."""
    return f".{name}.{pid}.tmp"


def is_atomic_tmp(name: str) -> bool:
    """A temporary of ours that a crash left beside ``index.json``, ``config.yaml``, an
    alias or a marker (never a name of the user's)."""
    return _ATOMIC_TMP_RE.fullmatch(name) is not None


def corrupt_dirname(step: int, attempt: int = 1) -> str:
    """``step_00000060.corrupt`` (``.corrupt-2``, ... when the step was quarantined before)."""
    suffix = CORRUPT_SUFFIX if attempt == 1 else f"{CORRUPT_SUFFIX}-{attempt}"
    return step_dirname(step) + suffix


def parse_corrupt_dirname(name: str) -> int | None:
    """The step of a quarantined directory name, or None if the name is not ours."""
    m = _CORRUPT_RE.fullmatch(name)
    if m is None:
        return None
    step = parse_step_dirname(m.group(1))
    attempt = int(m.group(2) or 1)
    if step is None or corrupt_dirname(step, attempt) != name or attempt < 1:
        return None
    return step


@dataclass(frozen=True)
class ExperimentLayout:
    """The paths of one experiment directory."""

    root: Location

    @property
    def checkpoints_dir(self) -> Location:
        return self.root / CHECKPOINTS_DIR

    @property
    def index_path(self) -> Location:
        return self.root / INDEX_FILE

    @property
    def config_path(self) -> Location:
        return self.root / CONFIG_FILE

    def step_dir(self, step: int) -> Location:
        return self.checkpoints_dir / step_dirname(step)

    def tmp_dir(self, step: int) -> Location:
        return self.checkpoints_dir / tmp_dirname(step)

    def staging_dir(self, step: int, *, renames: bool) -> Location:
        """Where the shards of a save of ``step`` are written: ``step_X.tmp/``, renamed at
        the commit; on a storage without rename (an object store) the final ``step_X/``,
        where the marker written last is the commit."""
        return self.tmp_dir(step) if renames else self.step_dir(step)

    @property
    def owner_path(self) -> Location:
        return self.root / OWNER_FILE

    def quarantine_dir(self, step: int, taken: Callable[[Location], bool]) -> Location:
        """The first ``step_X.corrupt[-n]`` name for ``step`` that is not ``taken``."""
        attempt = 1
        while taken(path := self.checkpoints_dir / corrupt_dirname(step, attempt)):
            attempt += 1
        return path

    def alias_path(self, alias: str) -> Location:
        if alias not in ALIASES:
            raise ValueError(f"unknown alias {alias!r}; known: {ALIASES}")
        return self.checkpoints_dir / alias


def default_experiment_name(
    model: str, dataset: str, when: float | None = None, attempt: int = 1
) -> str:
    """``{model}_{dataset}_{YYYYmmdd_HHMMSS}`` (local time); ``..._HHMMSS-2``, ``-3``...
    for the second, third run started in the same second (the directory is created
    exclusively, so two jobs never share one)."""
    name = f"{model}_{dataset}_{time.strftime('%Y%m%d_%H%M%S', time.localtime(when))}"
    return name if attempt == 1 else f"{name}-{attempt}"


def is_default_experiment_name(name: str, model: str, dataset: str) -> bool:
    """Whether ``name`` is a run of ``{model}_{dataset}`` named by default."""
    pattern = re.escape(f"{model}_{dataset}_") + r"\d{8}_\d{6}(?:-\d+)?"
    return re.fullmatch(pattern, name) is not None


def marker_path(checkpoint_dir: Location) -> Location:
    return checkpoint_dir / MARKER_FILE


def dcp_metadata_path(checkpoint_dir: Location) -> Location:
    return checkpoint_dir / DCP_METADATA_FILE


def experiment_of(checkpoint_dir: Location) -> Location:
    """The experiment directory that holds ``checkpoint_dir`` (``<exp>/checkpoints/step_X``)."""
    return checkpoint_dir.parent.parent
