"""A custom training loop checkpointed by dcp-engine. Run it twice: the second run resumes.
torchrun --standalone --nproc_per_node=2 launch/examples/custom_loop.py [checkpoint.yaml]"""

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import dcp_engine as de

if __name__ == "__main__":  # the writer process re-imports this module
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    model = DDP(net)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=100)
    app = {"model": model, "optim": optim, "sched": sched}
    path = sys.argv[1] if len(sys.argv) > 1 else "launch/examples/checkpoint.yaml"
    cb = de.AsyncCheckpointCallback(de.CheckpointConfig.from_yaml(path))
    start = cb.on_train_start(app)  # resumes as `resume:` says; (0, 0) on a fresh run
    exp = cb.manager.experiment_dir
    step, gen = start.step, torch.Generator().manual_seed(dist.get_rank())
    try:
        for epoch in range(start.epoch, start.epoch + 2):
            for _ in range(10):
                x = torch.randn(8, 16, generator=gen)
                loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
                optim.zero_grad()
                loss.backward()
                optim.step()
                sched.step()
                step += 1
                cb.on_step_end(step, app, metrics={"loss": loss.item()})
            cb.on_validation_end({"val_loss": loss.item()})  # a real loop evaluates here
            cb.on_epoch_end(epoch, app)
        cb.on_train_end(app)  # final save, flush, close
    except BaseException as e:
        cb.on_exception(app, e)  # flush what is in flight; no save of a broken state
        raise
    if dist.get_rank() == 0:
        print(f"step {step}; kept:", [c.step for c in de.find_checkpoints(exp)], flush=True)
    dist.destroy_process_group()
