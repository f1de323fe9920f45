from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dcp_engine as de


@pytest.fixture(autouse=True)
def _small_threads() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def cfg(tmp_path: Path) -> de.CheckpointConfig:
    # The engine's promises do not depend on the writer; tests/test_async.py covers those.
    return de.CheckpointConfig(
        root_dir=str(tmp_path), experiment_name="exp", monitor="loss", async_mode="off"
    )


@pytest.fixture
def mgr(cfg: de.CheckpointConfig):
    with de.CheckpointManager(cfg) as m:
        yield m
