#!/usr/bin/env bash
# DINO training on one node: NPROC ranks under torchrun (FSDP2 or DDP; gloo on CPU, NCCL
# on GPU). Extra arguments go to train_dino.py, e.g.
#   NPROC=4 STRATEGY=ddp launch/dino.sh --max-steps 100 --checkpoint.resume latest
set -euo pipefail
PYTHON=${PYTHON:-python3}
NPROC=${NPROC:-2}
STRATEGY=${STRATEGY:-fsdp}
CONFIG=${CONFIG:-launch/configs/dino_tiny.yaml}
HERE="$(cd "$(dirname "$0")" && pwd -P)"
cd "$HERE/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's dcp_engine
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  launch/train_dino.py --config "$CONFIG" --strategy "$STRATEGY" "$@"
