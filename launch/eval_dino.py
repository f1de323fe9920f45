"""Load the teacher of a DINO checkpoint into a plain model on one process and extract
features, as DINO's guide does under "Loading for evaluation" (no torchrun needed).

    python launch/eval_dino.py EXPERIMENT_OR_CHECKPOINT [--which best|latest] \
        [--key teacher|student] [--out features.pt]

The checkpoint was written by N ranks, sharded (FSDP2) or not (DDP); it is read here
whole, through ``dcp_engine.load_weights``. The model is rebuilt from the experiment's
``config.yaml``. Prints the features' shape and the weighted k-NN accuracy (the memory
bank and queries of the training config's ``eval:`` block).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dino.evaluation import base_dataset, eval_images, knn_accuracy
from dino.model import DinoModel

import dcp_engine as de
from dcp_engine import index, layout


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

    ckpt = _checkpoint(Path(args.source), args.which)
    exp = layout.experiment_of(ckpt)
    config_path = layout.ExperimentLayout(exp).config_path
    if not config_path.exists():
        raise SystemExit(f"{config_path} is missing: cannot rebuild the model of {ckpt}")
    cfg = yaml.safe_load(config_path.read_text())

    model = DinoModel.from_config(cfg)  # plain: no DDP, no FSDP, no process group
    de.load_weights(model, ckpt, key=args.key)  # strict: every key, every shape
    model.eval()
    meta = index.inspect_checkpoint_dir(ckpt)
    print(
        f"loaded the {args.key} of {ckpt} into a plain {type(model).__name__}: step "
        f"{meta.step}, epoch {meta.epoch}, metrics {dict(meta.metrics)}"
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


def _checkpoint(source: Path, which: str) -> Path:
    exp = layout.ExperimentLayout(source)
    if exp.checkpoints_dir.is_dir():  # an experiment: its best, else latest
        alias = exp.alias_path(which)
        source = alias if alias.exists() or which != "best" else exp.alias_path("latest")
    try:
        return index.checkpoint_dir_of(source)
    except de.CheckpointError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    sys.exit(main())
