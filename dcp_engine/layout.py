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
        latest -> step_00001200
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"
INDEX_FILE = "index.json"
CONFIG_FILE = "config.yaml"
MARKER_FILE = "COMMITTED"
DCP_METADATA_FILE = ".metadata"
TMP_SUFFIX = ".tmp"
ALIASES = ("latest", "best")

_STEP_DIGITS = 8
_STEP_RE = re.compile(r"step_(\d{8,})")
_TMP_RE = re.compile(r"step_(\d{8,})\.tmp")


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


@dataclass(frozen=True)
class ExperimentLayout:
    """The paths of one experiment directory."""

    root: Path

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_FILE

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    def step_dir(self, step: int) -> Path:
        return self.checkpoints_dir / step_dirname(step)

    def tmp_dir(self, step: int) -> Path:
        return self.checkpoints_dir / tmp_dirname(step)

    def alias_path(self, alias: str) -> Path:
        if alias not in ALIASES:
            raise ValueError(f"unknown alias {alias!r}; known: {ALIASES}")
        return self.checkpoints_dir / alias


def default_experiment_name(model: str, dataset: str, when: float | None = None) -> str:
    """``{model}_{dataset}_{YYYYmmdd_HHMMSS}`` (local time)."""
    return f"{model}_{dataset}_{time.strftime('%Y%m%d_%H%M%S', time.localtime(when))}"


def is_default_experiment_name(name: str, model: str, dataset: str) -> bool:
    """Whether ``name`` is a run of ``{model}_{dataset}`` named by default."""
    return re.fullmatch(re.escape(f"{model}_{dataset}_") + r"\d{8}_\d{6}", name) is not None


def marker_path(checkpoint_dir: Path) -> Path:
    return checkpoint_dir / MARKER_FILE


def dcp_metadata_path(checkpoint_dir: Path) -> Path:
    return checkpoint_dir / DCP_METADATA_FILE


def experiment_of(checkpoint_dir: Path) -> Path:
    """The experiment directory that holds ``checkpoint_dir`` (``<exp>/checkpoints/step_X``)."""
    return checkpoint_dir.parent.parent
