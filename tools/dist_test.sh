#!/usr/bin/env bash
# Distributed evaluation with torchrun, one process per GPU.
#   GPUS=8 tools/dist_test.sh CONFIG CHECKPOINT [test.py options]
# Several nodes: NNODES, NODE_RANK, MASTER_ADDR, PORT as for dist_train.sh.
# On a machine without GPUs, GPUS=N starts N CPU processes that use gloo.
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: [GPUS=N NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 PORT=29500] $0 CONFIG CHECKPOINT [options]" >&2
    exit 2
fi
CONFIG=$1
CHECKPOINT=$2
shift 2
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
    "$HERE/test.py" \
    "$CONFIG" \
    "$CHECKPOINT" \
    --launcher pytorch "$@"
