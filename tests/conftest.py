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


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API server (moto) on 127.0.0.1, one per test worker."""
    from tests.servers import moto_s3

    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint, monkeypatch, request):
    """A fresh bucket on the loopback S3 server, and the environment that points every
    process of the test (ranks, writer processes, the CLI) at it. Yields ``s3://bucket``."""
    import re
    import uuid

    from tests.servers import make_bucket, s3_env

    for k, v in s3_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    stem = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    bucket = f"{stem}-{uuid.uuid4().hex[:8]}"
    make_bucket(s3_endpoint, bucket)
    yield f"s3://{bucket}"
