#!/usr/bin/env bash
# Launch examples/train_llama.py under MPI: aiter_dist.init_distributed() takes rank and size
# from mpi4py and broadcasts the torch.distributed rendezvous address over MPI.
#
#   launch/mpirun.sh NPROC [train_llama.py args...]
#
# MPIEXEC picks the launcher (default: the mpiexec next to $PYTHON, e.g. the `mpich` wheel's, else
# the one on PATH); MPI_ARGS adds launcher options (hostfile, binding), e.g.
#   MPI_ARGS="-f hosts.txt -ppn 8" launch/mpirun.sh 16 --config 1b
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 NPROC [train_llama.py args...]" >&2
  exit 2
fi
NPROC=$1; shift
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON=${PYTHON:-python}
PYBIN="$(dirname "$(command -v "$PYTHON")")"
if [[ -z "${MPIEXEC:-}" ]]; then
  if [[ -x "$PYBIN/mpiexec" ]]; then MPIEXEC="$PYBIN/mpiexec"; else MPIEXEC=mpiexec; fi
fi

# MPI_ARGS is split on spaces on purpose (several options).
# shellcheck disable=SC2086
exec "$MPIEXEC" -n "$NPROC" ${MPI_ARGS:-} "$PYTHON" "$HERE/../examples/train_llama.py" "$@"
