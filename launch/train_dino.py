"""DINO self-supervised training under torchrun, checkpointed asynchronously by dcp-engine.

    torchrun --standalone --nproc_per_node=2 launch/train_dino.py \
        [--config launch/configs/dino_tiny.yaml] [--strategy fsdp|ddp] [--max-steps N] \
        [--checkpoint.dir DIR] [--checkpoint.resume latest] [--<block>.<key> VALUE ...]

Real DINO, small: a ViT student and its EMA teacher (cosine momentum), the DINO loss
with its all-reduced centre and teacher-temperature warm-up, multi-crop, AdamW with
cosine LR and weight-decay schedules, gradient clipping, the last layer frozen in the
first epoch, optional AMP with a GradScaler. Every rank saves its shards in the
background; ``--checkpoint.resume latest`` continues bit for bit where a killed run was.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the dino package beside us

from dino.checkpoint import CONFIG_KEY
from dino.config import parse_args
from dino.data import (
    MultiCropAugmentation,
    MultiCropDataset,
    ResumableDistributedSampler,
)
from dino.evaluation import base_dataset, eval_images, knn_accuracy
from dino.loss import DINOLoss
from dino.model import DinoModel, params_groups
from dino.schedules import cosine_scheduler

import dcp_engine as de
from dcp_engine.units import fmt_bytes

log = logging.getLogger("train_dino")


def main() -> None:
    cfg, args = parse_args()
    device = _init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank{rank}] %(message)s",
        stream=sys.stdout,
    )
    logging.getLogger("dcp_engine").setLevel(logging.WARNING)  # our lines say it shorter
    m, d, t, lc = cfg["model"], cfg["data"], cfg["train"], cfg["loss"]
    if t["batch_size"] % world:
        raise SystemExit(f"train.batch_size {t['batch_size']} is not a multiple of {world} ranks")

    # ---- data: every crop is a function of (seed, epoch, sample), whatever the world size
    base = base_dataset(cfg)
    augment = MultiCropAugmentation(
        tuple(d["global_crops_scale"]),
        tuple(d["local_crops_scale"]),
        d["local_crops_number"],
        global_size=m["img_size"],
        local_size=d["local_crop_size"],
    )
    dataset = MultiCropDataset(base, augment, seed=cfg["seed"])
    sampler = ResumableDistributedSampler(dataset, world, rank, t["batch_size"], seed=cfg["seed"])
    # Its own generator: a DataLoader iterator otherwise draws its base seed from the
    # global RNG each epoch, and a resumed run (one iterator fewer before the restored
    # RNG state) would draw the student's drop-path masks from another point.
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=t["batch_size"] // world,
        sampler=sampler,
        drop_last=True,
        generator=torch.Generator().manual_seed(cfg["seed"]),
    )
    niter = sampler.steps_per_epoch
    epochs = t["epochs"]
    max_steps = min(t["max_steps"] or epochs * niter, epochs * niter)

    # ---- networks: the same initial weights on every rank, then one RNG stream per rank
    torch.manual_seed(cfg["seed"])
    student = DinoModel.from_config(cfg)
    teacher = DinoModel.from_config({**m, "drop_path_rate": 0.0})
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    student, teacher = student.to(device), teacher.to(device)
    student_ddp, student, teacher = _wrap(cfg["strategy"], student, teacher, device)
    torch.manual_seed(cfg["seed"] * 1000 + rank + 1)

    optimizer = torch.optim.AdamW(params_groups(student))  # lr and wd: the schedules
    amp = bool(t["use_fp16"])
    if amp and cfg["strategy"] == "fsdp":
        raise SystemExit(
            "train.use_fp16 with FSDP2: use FSDP2's MixedPrecisionPolicy "
            "(not wired here); the GradScaler path is for --strategy ddp"
        )
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    dino_loss = DINOLoss(
        m["out_dim"],
        augment.num_crops,
        lc["warmup_teacher_temp"],
        lc["teacher_temp"],
        lc["warmup_teacher_temp_epochs"],
        epochs,
        lc["student_temp"],
        lc["center_momentum"],
    ).to(device)
    lr_schedule = cosine_scheduler(
        t["lr"] * t["batch_size"] / 256.0, t["min_lr"], epochs, niter, t["warmup_epochs"]
    )
    wd_schedule = cosine_scheduler(t["weight_decay"], t["weight_decay_end"], epochs, niter)
    momentum_schedule = cosine_scheduler(t["momentum_teacher"], 1.0, epochs, niter)

    # ---- what a resume needs, besides the RNG states the engine captures on every rank
    app: dict[str, Any] = {
        "student": student,
        "teacher": teacher,
        "optimizer": optimizer,
        "dino_loss": dino_loss,
        "scaler": scaler,
        "sampler": sampler,
    }
    ck = dict(cfg["checkpoint"])
    ck.setdefault("model_name", m["arch"])
    ck.setdefault("dataset_name", d["name"] if not d["path"] else Path(d["path"]).name)
    callback = de.CheckpointCallback(  # asynchronous as checkpoint.async_mode says (process)
        de.CheckpointConfig.from_dict(ck), run_config=cfg, extra={CONFIG_KEY: cfg}
    )
    start = callback.on_train_start(app)
    mgr = callback.manager
    step = start.step
    if rank == 0:
        where = mgr.experiment_dir if mgr is not None else "(checkpointing disabled)"
        log.info(
            "DINO %s on %d ranks (%s, %s): %d steps of %d/epoch, batch %d, experiment %s",
            m["arch"],
            world,
            cfg["strategy"],
            dist.get_backend(),
            max_steps,
            niter,
            t["batch_size"],
            where,
        )
        if start.resumed_from is not None:
            log.info(
                "resumed from %s: step %d, epoch %d", start.resumed_from.path, step, start.epoch
            )

    log_path = None
    if mgr is not None and isinstance(mgr.experiment_dir, Path):
        log_path = mgr.experiment_dir / "train_log.jsonl"
    elif mgr is not None:  # an object store cannot append: the log stays on this machine
        log_path = Path(f"{mgr.experiment_dir.name}.train_log.jsonl")
        log.info("experiment %s is remote: the train log goes to %s", mgr.experiment_dir, log_path)
    progress = Progress(rank == 0, max_steps, step, bar=not args.no_bar, log_path=log_path)
    autocast = (
        torch.autocast(
            device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16
        )
        if amp
        else nullcontext()
    )
    try:
        for epoch in range(start.epoch, epochs):
            if step >= max_steps:
                break
            sampler.set_epoch(epoch)  # keeps the position of a run resumed mid-epoch
            dataset.set_epoch(epoch)
            for images, _ in loader:
                it = step  # the global iteration: index of the schedules
                for i, group in enumerate(optimizer.param_groups):
                    group["lr"] = lr_schedule[it]
                    if i == 0:  # only the regularised group has weight decay
                        group["weight_decay"] = wd_schedule[it]
                images = [im.to(device, non_blocking=True) for im in images]
                with autocast:
                    teacher_output = teacher(images[:2])  # only the global crops
                    _reshard(teacher)
                    student_output = student_ddp(images)
                    loss = dino_loss(student_output, teacher_output, epoch)
                mean_loss = _global_mean(loss.detach())  # every rank sees the same value
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"loss is {mean_loss} at step {step + 1}")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                if t["clip_grad"]:
                    clip_gradients(student, t["clip_grad"])
                if epoch < t["freeze_last_layer"]:
                    for name, p in student.named_parameters():
                        if "last_layer" in name:
                            p.grad = None
                scaler.step(optimizer)
                scaler.update()
                with torch.no_grad():  # the teacher: EMA of the student
                    mom = momentum_schedule[it]
                    for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
                        pt.mul_(mom).add_(ps.detach(), alpha=1 - mom)
                sampler.advance()
                step += 1
                row = {"epoch": epoch, "loss": mean_loss, "lr": lr_schedule[it],
                       "wd": wd_schedule[it], "teacher_momentum": mom,
                       "teacher_temp": dino_loss.teacher_temp(epoch)}  # fmt: skip
                progress.step(step, row, cfg["log"]["every_n_steps"])
                callback.on_step_end(step, app, metrics={"loss": mean_loss})
                progress.checkpoints(callback.last_save)
                if step >= max_steps and sampler.consumed < sampler.total_size:
                    break  # mid-epoch; at the epoch's end, validate and close it first
            else:  # the epoch ran to its end: evaluate, then the epoch-end save
                acc = validate(teacher, base, cfg["eval"], device)
                if rank == 0:
                    progress.write(f"epoch {epoch} done at step {step}: k-NN accuracy {acc:.4f}")
                callback.on_validation_end({"knn_acc": acc})
                callback.on_epoch_end(epoch, app)
                progress.checkpoints(callback.last_save)
        callback.on_train_end(app, step=step)  # the final save, flushed and closed
    except BaseException as e:
        callback.on_exception(app, e)
        raise
    progress.checkpoints(callback.last_save)
    progress.close()
    if rank == 0 and mgr is not None:
        kept = de.find_checkpoints(mgr.experiment_dir)
        names = ", ".join(f"{c.path.name} (epoch {c.epoch})" for c in kept)
        log.info("done at step %d; committed checkpoints: %s", step, names)
    if args.digest_out:  # collective (FSDP gathers the full state)
        digests = state_digests(app)
        if rank == 0:
            log.info("final state sha256 %s", digests["all"][:16])
            Path(args.digest_out).write_text(json.dumps(digests, indent=1))
    dist.destroy_process_group()


def _init_distributed() -> torch.device:
    if "RANK" not in os.environ:
        raise SystemExit(
            "run me under torchrun (launch/dino.sh), e.g. "
            "torchrun --standalone --nproc_per_node=2 launch/train_dino.py"
        )
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        return device
    dist.init_process_group("gloo")
    return torch.device("cpu")


def _wrap(
    strategy: str, student: nn.Module, teacher: nn.Module, device: torch.device
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(what the forward goes through, the student without wrapper, the teacher)."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(student, device_ids=ids), student, teacher  # teacher: replicated EMA
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for net in (student, teacher):  # the same sharding: the EMA runs on local shards
        for block in net.backbone.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(net.head, mesh=mesh)
        fully_shard(net, mesh=mesh)
    return student, student, teacher


def clip_gradients(model: nn.Module, clip: float) -> None:
    """DINO's ``utils.clip_gradients``: each parameter's gradient norm clipped to ``clip``
    on its own (not the global norm: the last layer's gradient, dropped while it is frozen,
    must not shrink the others). Under FSDP2 a norm is of the whole parameter."""
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        if p.grad is None:
            continue
        norm = p.grad.detach().norm(2)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        coef = clip / (norm.item() + 1e-6)
        if coef < 1:
            p.grad.mul_(coef)


def _reshard(module: nn.Module) -> None:
    """FSDP2 keeps the root's parameters gathered after a forward, expecting a backward;
    the teacher has none, and its EMA update needs the shards."""
    reshard = getattr(module, "reshard", None)
    if reshard is not None:
        reshard()


def _global_mean(x: torch.Tensor) -> float:
    """The loss over the global batch (the same on every rank and for any world size)."""
    x = x.float().clone()
    dist.all_reduce(x)
    return x.item() / dist.get_world_size()


@torch.no_grad()
def validate(teacher: nn.Module, base: Any, ev: dict[str, Any], device: torch.device) -> float:
    """k-NN accuracy of the teacher's backbone features. Every rank computes the same
    number (FSDP needs every rank in the forward); no RNG is used."""
    images, labels = eval_images(base, ev)
    was_training = teacher.training
    teacher.eval()
    feats = [
        teacher(images[i : i + 128].to(device), return_backbone_features=True)[0]
        for i in range(0, len(images), 128)
    ]
    _reshard(teacher)
    teacher.train(was_training)
    return knn_accuracy(torch.cat(feats), labels, ev)


def state_digests(app: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of the full (unsharded) student, teacher, optimizer and loss centre, per key
    and together: equal digests mean equal bits. Collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    student_sd, optim_sd = get_state_dict(app["student"], app["optimizer"], options=opts)
    teacher_sd = get_model_state_dict(app["teacher"], options=opts)
    parts = {
        "student": student_sd,
        "teacher": teacher_sd,
        "optimizer": optim_sd,
        "center": app["dino_loss"].center.cpu(),
    }
    out = {}
    for key, value in parts.items():
        buf = io.BytesIO()
        torch.save(value, buf)
        out[key] = hashlib.sha256(buf.getvalue()).hexdigest()
    out["all"] = hashlib.sha256("".join(out[k] for k in parts).encode()).hexdigest()
    return out


class Progress:
    """Rank 0's output: a line every N steps and one per committed checkpoint; a
    tqdm-style bar on the last line while attached to a terminal."""

    def __init__(
        self, enabled: bool, total: int, start: int, *, bar: bool, log_path: Path | None
    ) -> None:
        self.on = enabled
        self.bar = enabled and bar and sys.stdout.isatty()
        # DINO's log.txt, per step: one JSON line (a resumed run appends; a step logged
        # twice, by a killed run and its resumption, counts as its last line)
        self.log = open(log_path, "a") if enabled and log_path is not None else None  # noqa: SIM115
        self.total, self.start, self.t0 = total, start, time.perf_counter()
        self.pending: list[de.SaveHandle] = []  # saves not reported yet
        self.reported: set[int] = set()  # steps whose save was reported
        self.last = ""

    def write(self, line: str) -> None:
        if self.bar:
            sys.stdout.write("\r\033[K")
        print(line, flush=True)
        if self.bar and self.last:
            sys.stdout.write(self.last)
            sys.stdout.flush()

    def step(self, step: int, row: dict[str, Any], every: int) -> None:
        """``row``: epoch, loss, lr, wd, teacher_momentum, teacher_temp."""
        if not self.on:
            return
        rate = (step - self.start) / max(time.perf_counter() - self.t0, 1e-9)
        if self.log is not None:
            self.log.write(json.dumps({"step": step, **row, "time": time.time()}) + "\n")
            self.log.flush()
        if every and (step % every == 0 or step == self.total):
            self.write(
                f"step {step:>5}/{self.total} epoch {row['epoch']} loss {row['loss']:.4f} "
                f"lr {row['lr']:.3e} wd {row['wd']:.4f} "
                f"teacher_mom {row['teacher_momentum']:.5f} "
                f"teacher_temp {row['teacher_temp']:.4f} {rate:.2f} steps/s"
            )
        if self.bar:
            done = int(30 * step / max(self.total, 1))
            eta = (self.total - step) / rate if rate > 0 else 0.0
            self.last = (
                f"\r\033[K[{'#' * done}{'.' * (30 - done)}] {step}/{self.total} "
                f"{100 * step / max(self.total, 1):3.0f}% loss {row['loss']:.4f} "
                f"{rate:.2f} it/s eta {eta:4.0f}s"
            )
            sys.stdout.write(self.last)
            sys.stdout.flush()

    def checkpoints(self, newest: de.SaveHandle | None) -> None:
        """A line for each save once it committed (or was skipped): its handle says."""
        if not self.on:
            return
        known = self.reported | {h.step for h in self.pending}
        if newest is not None and newest.step not in known:
            self.pending.append(newest)
        for h in list(self.pending):
            if h.skipped:
                self.write(f"checkpoint step {h.step}: skipped (the previous one was writing)")
            elif not h.committed.done():
                continue
            elif h.committed.exception() is not None:
                self.write(f"checkpoint step {h.step}: FAILED: {h.committed.exception()}")
            else:
                s = h.stats
                assert s is not None
                self.write(
                    f"checkpoint step {s.step}: {fmt_bytes(s.bytes)}, blocked "
                    f"{s.blocked_s * 1e3:.1f} ms (waited {s.waited_s * 1e3:.1f} ms for the "
                    f"previous save + staged {s.staged_s * 1e3:.1f} ms), committed in "
                    f"{s.total_s:.2f} s ({fmt_bytes(s.bytes / max(s.total_s, 1e-9))}/s)"
                )
            self.reported.add(h.step)
            self.pending.remove(h)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.bar:
            sys.stdout.write("\n")
            self.bar = False


if __name__ == "__main__":  # the writer process re-imports this module
    main()
