"""Units and names as people type and read them: byte sizes, dtype names. Imports
nothing heavy (the command line's parser uses it)."""

from __future__ import annotations

import math
from typing import Any

DTYPE_NAMES = {
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}
"""What ``--dtype`` (and ``export(dtype=)``) accepts -> the ``torch`` dtype's name."""


def fmt_bytes(n: float) -> str:
    """``512 B``, ``12.0 MiB``, ``1.5 TiB``: for messages, logs and the command line."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def tensor_bytes_of(meta: Any) -> int:
    """The bytes of a whole tensor described by DCP's ``TensorStorageMetadata``."""
    return math.prod(meta.size) * meta.properties.dtype.itemsize


__all__ = ["DTYPE_NAMES", "fmt_bytes", "tensor_bytes_of"]
