#!/usr/bin/env bash
# DINO training on NNODES nodes: run this once on every node with its NODE_RANK; all
# agents meet at MASTER_ADDR:MASTER_PORT, which node 0 serves (static rendezvous: node
# NODE_RANK holds ranks NODE_RANK*NPROC ...). On one machine, two agents on loopback show
# it (tests/test_dino_launch.py does):
#   NODE_RANK=0 launch/dino_multinode.sh --checkpoint.dir /tmp/x &
#   NODE_RANK=1 launch/dino_multinode.sh --checkpoint.dir /tmp/x
# The checkpoint directory must be the same shared filesystem on every node.
set -euo pipefail
PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:?set NODE_RANK (0 .. NNODES-1)}
NPROC=${NPROC:-1}
STRATEGY=${STRATEGY:-fsdp}
CONFIG=${CONFIG:-launch/configs/dino_tiny.yaml}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29511}
RDZV_ID=${RDZV_ID:-dino}
HERE="$(cd "$(dirname "$0")" && pwd -P)"
cd "$HERE/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --nproc_per_node="$NPROC" --rdzv_backend=static --rdzv_id="$RDZV_ID" \
  --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
  launch/train_dino.py --config "$CONFIG" --strategy "$STRATEGY" "$@"
