#!/usr/bin/env bash
# Launch examples/train_llama.py with torchrun.
#
#   launch/torchrun.sh NPROC [train_llama.py args...]          # one node, NPROC ranks
#
# Several nodes: run the same command on every node with
#   NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0's address> [MASTER_PORT=29500] \
#     launch/torchrun.sh 8 --config 8b
# (c10d rendezvous at MASTER_ADDR:MASTER_PORT; NODE_RANK fixes the rank order across nodes, so
# the ranks of one node are consecutive.) train_llama.py then keeps tensor parallelism inside each
# node (--tp defaults to the ranks per node: peer-to-peer memory does not cross hosts) and makes
# the nodes data-parallel replicas (--dp-mode fsdp, the default, or ddp); --batch-size is global.
# --tp 4 on 8-rank nodes gives two replicas per node.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 NPROC [train_llama.py args...]" >&2
  exit 2
fi
NPROC=$1; shift
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON=${PYTHON:-python}
NNODES=${NNODES:-1}

if [[ "$NNODES" -eq 1 ]]; then
  # --standalone: a private local rendezvous on a free port, nothing to configure.
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    "$HERE/../examples/train_llama.py" "$@"
fi

: "${NODE_RANK:?set NODE_RANK (0..NNODES-1) on every node}"
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
MASTER_PORT=${MASTER_PORT:-29500}
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
  --rdzv-id "${RDZV_ID:-train_llama}" \
  "$HERE/../examples/train_llama.py" "$@"
