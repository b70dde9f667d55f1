#!/usr/bin/env bash
# Distributed training with torchrun, one process per GPU.
#   GPUS=8 tools/dist_train.sh CONFIG [train.py options]
# Several nodes: run on each node with the same MASTER_ADDR/PORT and NNODES,
# and NODE_RANK=0..NNODES-1:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 PORT=29500 GPUS=8 tools/dist_train.sh CONFIG
# On a machine without GPUs, GPUS=N starts N CPU processes that use gloo
# (tools/train.py detects it; see eomt_mm/engine/dist.py).
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: [GPUS=N NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 PORT=29500] $0 CONFIG [options]" >&2
    exit 2
fi
CONFIG=$1
shift
GPUS=${GPUS:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
PYTHON=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)

exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" \
    --master_port="$PORT" \
    "$HERE/train.py" \
    "$CONFIG" \
    --launcher pytorch "$@"
