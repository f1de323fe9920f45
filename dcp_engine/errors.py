"""The exceptions of the engine. Every message names the path, the step or the key."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved, found or loaded."""


class CheckpointNotFoundError(CheckpointError):
    """The requested checkpoint (a path, a step, an alias) does not exist."""


class NotACheckpointError(CheckpointError):
    """A directory exists but is not a committed dcp-engine checkpoint (torn, foreign)."""


class IntegrityError(CheckpointError):
    """A committed checkpoint's files do not match its marker (missing, truncated, corrupt)."""


class StateMismatchError(CheckpointError):
    """The checkpoint's keys or shapes do not match the objects it is loaded into."""


class ConfigError(ValueError):
    """A ``CheckpointConfig`` field has a bad value; the message names the field (and, for a
    config read from a file, the file and the key as written there)."""

    def __init__(self, field: str, value: object, expected: str, *, where: str = "") -> None:
        name = where or f"CheckpointConfig.{field}"
        super().__init__(f"{name}={value!r} is invalid: expected {expected}")
        self.field = field


class UnknownKeyError(ConfigError):
    """A config block has a key that is neither a field nor a known alias of one."""

    def __init__(
        self, key: str, where: str, nearest: str | None, *, hint: str | None = None
    ) -> None:
        tail = f"; did you mean {nearest!r}?" if nearest else f"; {hint}" if hint else ""
        ValueError.__init__(self, f"unknown key {key!r} in {where}{tail}")
        self.field = key


class UnsupportedKeyError(ConfigError):
    """A config block has a key of another framework (torchtitan's ``load_only``...) that
    the engine knows but does not support; the message says why and what to use."""

    def __init__(self, key: str, value: object, where: str, why: str) -> None:
        ValueError.__init__(self, f"{where}.{key}={value!r} is not supported: {why}")
        self.field = key


class ExperimentLockedError(CheckpointError):
    """Another job holds the experiment's lease (``OWNER``): only one job writes an
    experiment. The message names the holder (host, pid, job id, when it started)."""


class TimelineError(CheckpointError):
    """A save whose step is not above the newest committed step of its experiment."""
