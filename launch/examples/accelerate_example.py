"""Hugging Face Accelerate, checkpointed by dcp-engine. Stop it, run it again with
--resume: it continues exactly where it was (same batches, dropout masks and weights).

    python launch/examples/accelerate_example.py --project-dir runs/acc --stop-after 10
    python launch/examples/accelerate_example.py --project-dir runs/acc --resume
    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node=2 \\
        launch/examples/accelerate_example.py --project-dir runs/acc2
    accelerate launch --cpu --num_processes 2 launch/examples/accelerate_example.py ...
"""

from __future__ import annotations

import argparse

import torch
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

import dcp_engine as de
from dcp_engine.integrations.accelerate import DcpEngineAccelerator


class Progress:
    """A custom object (``register_for_checkpointing``): optimizer steps and samples seen.
    (``accelerator.step`` counts gradient accumulation and restarts with every epoch.)"""

    def __init__(self) -> None:
        self.step = self.samples = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "samples": self.samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.samples = state["step"], state["samples"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--project-dir", required=True, help="the experiment directory")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps in all")
    p.add_argument("--save-every", type=int, default=4, help="save_state() every n steps")
    p.add_argument("--total-limit", type=int, default=2, help="checkpoints kept")
    p.add_argument("--stop-after", type=int, default=0, help="end the run at this step")
    p.add_argument("--resume", action="store_true", help="load_state() the newest first")
    p.add_argument("--async-mode", default="thread", choices=("off", "thread", "process"))
    p.add_argument("--record", help="write the batches seen and the final state here")
    args = p.parse_args()

    accelerator = DcpEngineAccelerator(
        project_config=ProjectConfiguration(
            project_dir=args.project_dir,
            automatic_checkpoint_naming=True,
            total_limit=args.total_limit,
        ),
        # A seeded shuffle and a stateful loader: a resumed epoch goes on where it was.
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, use_stateful_dataloader=True
        ),
        checkpoint_config=de.CheckpointConfig(async_mode=args.async_mode),
    )
    set_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(96, 8), torch.arange(96))
    loader = torch.utils.data.DataLoader(
        data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    if args.resume:
        info = accelerator.load_state()  # the newest committed checkpoint
        accelerator.print(f"resumed from {info.path} at step {progress.step}")

    batches: list[list[int]] = []
    while progress.step < args.steps:
        for x, idx in loader:  # a resumed epoch starts at the batch after the saved one
            with accelerator.accumulate(model):
                loss = (model(x).squeeze(1) - x.sum(1)).pow(2).mean()
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            progress.step += 1
            progress.samples += len(idx)
            batches.append(idx.tolist())
            if progress.step % args.save_every == 0:
                accelerator.save_state()  # returns once staged; rank 0 commits
            if progress.step in (args.steps, args.stop_after):
                break
        if progress.step == args.stop_after:
            break

    if args.record:
        final = {
            "batches": batches,
            "model": accelerator.unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "step": progress.step,
            "samples": progress.samples,
        }
        torch.save(final, f"{args.record}.rank{accelerator.process_index}")
    accelerator.end_training()  # waits for the last commit, gives the experiment back
    kept = [c.step for c in de.find_checkpoints(args.project_dir)]
    accelerator.print(f"step {progress.step}; checkpoints kept: {sorted(kept)}")


if __name__ == "__main__":  # the writer process (async_mode="process") imports this module
    main()
