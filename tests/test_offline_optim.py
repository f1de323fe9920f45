"""Optimizer state read outside training is what ``Optimizer.load_state_dict`` takes: int
parameter ids, Adam's moments kept (``export``, ``open_checkpoint(...).load_entries``), and
a raw ``optimizer.state_dict()`` saved as a plain value resumes into a fresh optimizer."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

import dcp_engine as de
from dcp_engine import cli
from tests import toy

FIXTURES = Path(__file__).parent / "fixtures"

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class Net(nn.Module):
    """Two layers in two parameter groups, and a head that never gets a gradient (no
    optimizer state: an unstepped parameter)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(4, 8)
        self.out = nn.Linear(8, 2)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.body(x)))


def make(seed: int) -> tuple[Net, torch.optim.Optimizer]:
    net = Net(seed)
    optim = torch.optim.Adam(
        [
            {"params": net.body.parameters(), "lr": 1e-2},
            {"params": [*net.out.parameters(), *net.unused.parameters()], "lr": 1e-3},
        ],
        betas=(0.8, 0.9),
    )
    return net, optim


def step(net: Net, optim: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    net(torch.randn(5, 4, generator=g)).pow(2).mean().backward()
    optim.step()
    optim.zero_grad()


def trained() -> tuple[Net, torch.optim.Optimizer]:
    net, optim = make(0)
    for s in range(3):
        step(net, optim, s)
    return net, optim


def assert_same_optimizer_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert list(a["state"]) == list(b["state"]), (list(a["state"]), list(b["state"]))
    assert all(isinstance(k, int) for k in b["state"])
    toy.assert_equal(a["state"], b["state"])
    assert a["param_groups"] == b["param_groups"]


def test_export_and_open_checkpoint_give_adam_state_that_load_state_dict_restores(tmp_path):
    """Pass: the exported (and ``load_entries``) optimizer entry is keyed by int ids in
    both groups' order; a fresh Adam's ``load_state_dict`` takes it and then holds
    exp_avg/exp_avg_sq bit for bit; the next step matches the original's; ``dcp.save`` of
    its state dict works (it used to fail with "duplicated flatten key")."""
    net, optim = trained()
    cfg = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="e", async_mode="off")
    with de.CheckpointManager(cfg) as mgr:
        mgr.save(3, {"model": net, "optim": optim})
    out = tmp_path / "all.pt"
    assert cli.main(["export", str(tmp_path / "e"), str(out)]) == 0
    for loaded in (
        torch.load(out, weights_only=True)["optim"],
        de.open_checkpoint(tmp_path / "e").load_entries(["optim"])["optim"],
    ):
        assert loaded["param_groups"][0]["params"] == [0, 1]
        assert loaded["param_groups"][1]["params"] == [2, 3, 4, 5]
        assert sorted(loaded["state"]) == [0, 1, 2, 3]  # 4, 5: never stepped
        fresh_net, fresh = make(7)
        fresh_net.load_state_dict(torch.load(out, weights_only=True)["model"])
        fresh.load_state_dict(loaded)
        assert_same_optimizer_state(optim.state_dict(), fresh.state_dict())
        step(fresh_net, fresh, 99)
        dcp.save(
            {"optim": fresh.state_dict()}, checkpoint_id=tmp_path / f"dcp{id(loaded)}", no_dist=True
        )
    step(net, optim, 99)
    toy.assert_equal(net.state_dict(), fresh_net.state_dict())
    assert_same_optimizer_state(optim.state_dict(), fresh.state_dict())


def test_a_raw_optimizer_state_dict_saved_as_a_plain_value_resumes_into_a_fresh_one(tmp_path):
    """Pass: ``app_state={"opt_sd": optim.state_dict()}`` (a plain value, not the
    Optimizer) resumes into a fresh optimizer's state dict, into None, and into a stepped
    one's: int keys come back, and the fresh optimizer's ``load_state_dict`` restores it
    exactly; ``load_entries`` gives the same."""
    net, optim = trained()
    cfg = de.CheckpointConfig(root_dir=str(tmp_path), experiment_name="e", async_mode="off")
    with de.CheckpointManager(cfg) as mgr:
        mgr.save(3, {"model": net, "opt_sd": optim.state_dict()})
    for start in ("fresh", None, "stepped"):
        fresh_net, fresh = make(5)
        if start == "stepped":
            step(fresh_net, fresh, 42)
        app = {"model": fresh_net, "opt_sd": fresh.state_dict() if start else None}
        with de.CheckpointManager(cfg) as mgr:
            info = mgr.load(app)
        assert info is not None and info.step == 3
        assert sorted(app["opt_sd"]["state"]) == [0, 1, 2, 3], start
        fresh.load_state_dict(app["opt_sd"])
        assert_same_optimizer_state(optim.state_dict(), fresh.state_dict())
    offline = de.open_checkpoint(tmp_path / "e").load_entries(["opt_sd"])["opt_sd"]
    assert_same_optimizer_state(optim.state_dict(), offline)


def test_an_optimizer_saved_without_its_parameter_order_reads_back_by_name(tmp_path):
    """Pass: a checkpoint from before the parameter order was recorded (the legacy
    fixture) reads back in the FQN-keyed layout that ``set_optimizer_state_dict`` takes,
    and that restores the optimizer exactly."""
    exp = tmp_path / "legacy"
    shutil.copytree(FIXTURES / "legacy_torch_save" / "legacy", exp, symlinks=True)
    expected = torch.load(FIXTURES / "legacy_torch_save" / "expected.pt", weights_only=True)
    loaded = de.open_checkpoint(exp).load_entries(["optim"])["optim"]
    assert sorted(loaded["state"]) == ["bias", "weight"]
    assert sorted(loaded["param_groups"][0]["params"]) == ["bias", "weight"]
    model = nn.Linear(4, 3)
    optim = torch.optim.AdamW(model.parameters(), lr=0.5)
    set_optimizer_state_dict(model, optim, loaded)
    toy.assert_equal(expected["optim"]["state"], optim.state_dict()["state"])
    assert optim.param_groups[0]["lr"] == expected["optim"]["param_groups"][0]["lr"]
