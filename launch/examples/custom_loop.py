"""A custom training loop checkpointed by dcp-engine: 2 epochs of 10 steps on 2 ranks.
Stop it (--max-steps N, as a job's time limit would; or kill it) and run it again: it
resumes at the batch where it stopped and ends at step 20, as an uninterrupted run does.
torchrun --standalone --nproc_per_node=2 launch/examples/custom_loop.py [checkpoint.yaml]"""

import argparse
import math

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

import dcp_engine as de

EPOCHS = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="launch/examples/checkpoint.yaml",
                        help="YAML file with a checkpoint: block")  # fmt: skip
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this global step (a job's time limit)")  # fmt: skip
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.manual_seed(0)  # the same data and initial weights on every rank
    data, val_x = TensorDataset(torch.randn(160, 16)), torch.randn(32, 16)
    sampler = de.ResumableDistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=8, sampler=sampler)  # 10 steps per epoch on 2 ranks
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    model = DDP(net)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=100)
    # The sampler is state too: a resumed run goes on with the batches it has not seen.
    app = {"model": model, "optim": optim, "sched": sched, "sampler": sampler}
    # Asynchronous unless the config says async_mode: off.
    cb = de.CheckpointCallback(de.CheckpointConfig.from_yaml(args.config))
    start = cb.on_train_start(app)  # resumes as `resume:` says; TrainStart(0, 0) when fresh
    if start.resumed_from is not None and dist.get_rank() == 0:
        print(f"resumed at step {start.step}, epoch {start.epoch} "
              f"({start.batches_done} of its batches done)", flush=True)  # fmt: skip
    exp = cb.manager.experiment_dir if cb.manager is not None else None
    step, stop = start.step, args.max_steps or math.inf
    try:
        for epoch in range(start.epoch, EPOCHS):
            sampler.set_epoch(epoch)  # the epoch resumed keeps its position
            for (x,) in loader:
                loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
                optim.zero_grad()
                loss.backward()
                optim.step()
                sched.step()
                step += 1  # the global step, counted on from start.step
                cb.on_step_end(step, app, metrics={"loss": loss.item()})  # mean of the ranks
                if step >= stop:
                    break
            if step >= stop:
                break  # mid-epoch: on_train_end saves the position
            with torch.no_grad():
                val_loss = (model(val_x) - val_x.sum(1, keepdim=True)).pow(2).mean().item()
            cb.on_validation_end({"val_loss": val_loss})
            cb.on_epoch_end(epoch, app)
        cb.on_train_end(app)  # final save, flush, close
    except BaseException as e:
        cb.on_exception(app, e)  # flush what is in flight; no save of a broken state
        raise
    if dist.get_rank() == 0 and exp is not None:
        print(f"step {step}; kept:", [c.step for c in de.find_checkpoints(exp)], flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":  # the writer process re-imports this module
    main()
