"""The training config: a YAML file (``launch/configs/dino_tiny.yaml``) and command-line
overrides on top of it.

    --config FILE --max-steps N --epochs N --strategy fsdp|ddp --seed N --resume WHICH
    --<block>.<key> VALUE          e.g. --checkpoint.dir /tmp/x --train.batch_size 16

A value is read as YAML (``null``, ``true``, ``3``, ``[0.4, 1.0]``), but ``off``/``on``/
``yes``/``no`` stay strings. An override must name
a key that the file has (or, in the ``checkpoint:`` block, any key ``CheckpointConfig``
accepts): a typo raises naming the nearest key, instead of training with the default.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from dcp_engine import KEY_ALIASES

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dino_tiny.yaml"
# The named flags of the issue and the guide, and where they land.
SHORTCUTS = {
    "max_steps": ("train", "max_steps"),
    "epochs": ("train", "epochs"),
    "strategy": ("strategy",),
    "seed": ("seed",),
    "resume": ("checkpoint", "resume"),
}


def parse_args(argv: Sequence[str] | None = None) -> tuple[dict[str, Any], argparse.Namespace]:
    """The config after overrides, and the flags that are not config (``--digest-out``)."""
    p = argparse.ArgumentParser(description="DINO self-supervised training (dcp-engine demo)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--max-steps", type=int, dest="max_steps")
    p.add_argument("--epochs", type=int)
    p.add_argument("--strategy", choices=["fsdp", "ddp"])
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", help="'latest', 'best', or a checkpoint/experiment path")
    p.add_argument("--digest-out", help="rank 0 writes the final state's SHA-256 per key here")
    p.add_argument("--no-bar", action="store_true", help="no progress bar, even on a terminal")
    args, rest = p.parse_known_args(argv)
    config = load_config(args.config)
    for name, where in SHORTCUTS.items():
        value = getattr(args, name)
        if value is not None:
            _set(config, where, value, f"--{name.replace('_', '-')}")
    for flag, raw in _pairs(rest, p):
        _set(config, tuple(flag[2:].split(".")), _value(raw), flag)
    return config, args


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"config file {path} does not exist") from None
    if not isinstance(data, dict):
        raise SystemExit(f"config file {path}: expected a mapping at the top level")
    return data


def _value(raw: str) -> Any:
    """``raw`` read as YAML, except YAML 1.1's other booleans: ``off``, ``no``, ``on``,
    ``yes`` stay strings (``--checkpoint.async_mode off``, an experiment named ``no``)."""
    value = yaml.safe_load(raw)
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        return raw
    return value


def _pairs(rest: list[str], parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    pairs, i = [], 0
    while i < len(rest):
        flag = rest[i]
        if not flag.startswith("--") or "." not in flag:
            parser.error(f"unrecognized argument {flag!r} (overrides are --block.key value)")
        if "=" in flag:
            flag, raw = flag.split("=", 1)
            i += 1
        elif i + 1 < len(rest):
            raw, i = rest[i + 1], i + 2
        else:
            parser.error(f"{flag} needs a value")
        pairs.append((flag, raw))
    return pairs


def _set(config: dict[str, Any], where: tuple[str, ...], value: Any, flag: str) -> None:
    node = config
    for depth, key in enumerate(where):
        last = depth == len(where) - 1
        known = list(node) + (list(KEY_ALIASES) if where[0] == "checkpoint" and last else [])
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean {'.'.join((*where[:depth], near[0]))!r}?" if near else ""
            raise SystemExit(
                f"{flag}: the config has no key {'.'.join(where[: depth + 1])!r}{hint}"
            )
        if last:
            if where[0] == "checkpoint" and key in KEY_ALIASES:  # one spelling per field
                for other in [k for k in node if k != key]:
                    if KEY_ALIASES.get(other) == KEY_ALIASES[key]:
                        del node[other]
            node[key] = value
        else:
            if not isinstance(node[key], dict):
                raise SystemExit(f"{flag}: {'.'.join(where[: depth + 1])} is not a block")
            node = node[key]
