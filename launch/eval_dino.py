"""Load the teacher of a DINO checkpoint into a plain model on one process and extract
features, as DINO's guide does under "Loading for evaluation" (no torchrun needed).

    python launch/eval_dino.py EXPERIMENT_OR_CHECKPOINT [--which best|latest] \
        [--key teacher|student] [--out features.pt]

The checkpoint was written by N ranks, sharded (FSDP2) or not (DDP); it is read here
whole, through ``dcp_engine.open_checkpoint`` (read-only, every file checked against
its digest first: a corrupt checkpoint is refused, never evaluated). The model is
rebuilt from the experiment's ``config.yaml``. Prints the features' shape and the
weighted k-NN accuracy (the memory bank and queries of the training config's ``eval:``
block).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dino.evaluation import base_dataset, eval_images, knn_accuracy
from dino.model import DinoModel

import dcp_engine as de


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="an experiment directory, a checkpoint or an alias")
    p.add_argument(
        "--which",
        default="best",
        choices=["best", "latest"],
        help="for an experiment: which checkpoint (best falls back to latest)",
    )
    p.add_argument("--key", default="teacher", choices=["teacher", "student"])
    p.add_argument("--out", help="save {'features', 'labels'} here (torch.save)")
    args = p.parse_args(argv)

    try:
        ckpt = _open(args.source, args.which)
        info = ckpt.info
        cfg = ckpt.run_config()
        if cfg is None:
            raise SystemExit(f"no config.yaml beside {info.path}: cannot rebuild its model")
        model = DinoModel.from_config(cfg)  # plain: no DDP, no FSDP, no process group
        ckpt.load({args.key: model})  # strict: every key, every shape
    except de.CheckpointError as e:
        raise SystemExit(str(e)) from None
    model.eval()
    print(
        f"loaded the {args.key} of {info.path} into a plain {type(model).__name__}: step "
        f"{info.step}, epoch {info.epoch}, metrics {dict(info.metrics)}"
    )

    ev = cfg["eval"]
    images, labels = eval_images(base_dataset(cfg), ev)
    with torch.no_grad():
        features, projections = model(images, return_backbone_features=True)
    print(f"features {tuple(features.shape)}, projections {tuple(projections.shape)}")
    print(f"k-NN accuracy (k={ev['knn_k']}): {knn_accuracy(features, labels, ev):.4f}")
    if args.out:
        torch.save({"features": features, "labels": labels}, args.out)
        print(f"features written to {args.out}")
    return 0


def _open(source: str, which: str) -> de.CheckpointReader:
    """For an experiment: its best (by the monitor it recorded), else its latest. A
    local path or a URL (``s3://...``, ``http://...``)."""
    try:
        return de.open_checkpoint(source, which)
    except ValueError:  # a checkpoint, not an experiment: there is nothing to pick
        return de.open_checkpoint(source)
    except de.CheckpointError:
        if which != "best":
            raise
        return de.open_checkpoint(source, "latest")


if __name__ == "__main__":
    sys.exit(main())
