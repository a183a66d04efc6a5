#!/usr/bin/env bash
# One call on a GPU machine: install, GPU test tiers, benchmarks, and the 2-GPU training run.
#   benchmarks/run_gpu.sh [stage ...]     stages: info tests multigpu norm attention gemm collectives
#                                         overhead train (default: all); multigpu-shared (the
#                                         multigpu tier as two ranks on one GPU); train-ops (RoPE, SwiGLU,
#                                         cross-entropy benchmarks); train-ops-e2e (1 GPU, with and
#                                         without those ops, and --no-aiter); conv (conv2d vs cuDNN);
#                                         dist-gemm (2 GPUs: overlapped GEMMs vs NCCL + cuBLAS and
#                                         torch's fused ops); train-modes (eager, compiled,
#                                         CUDA graphs, each beside --no-aiter, on 1 GPU and on 2 when
#                                         there are 2; TRAIN_MODES_CONFIG, default 1b); and worlds
#                                         (multigpu tier and collective benchmarks at every world size
#                                         3..n-1 of an n-GPU machine)
# Results (tables, logs) go to $OUT (default ./out). NVLink multicast stays off throughout.
# Environment: NORM_ARGS, ATTN_ARGS, GEMM_ARGS, COLL_ARGS, OVERHEAD_ARGS (benchmark flags), WORLDS,
# TRAIN_CONFIG, TRAIN_NPROC, TRAIN_STEPS, GPU_TEST_JOBS, GPU_TEST_FILES (default tests/test_*.py).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
stages=${*:-info tests multigpu norm attention gemm collectives overhead train}
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
status=0
# run LOG CMD...: run CMD, its output to the screen and to $OUT/LOG; remember a failure.
run() { local log=$1; shift; echo "=== $*" | tee -a "$OUT/$log"; "$@" 2>&1 | tee -a "$OUT/$log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; echo "=== FAILED: $*"; }; }
for s in $stages; do
  case $s in
    info) run info.log nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
          run info.log python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.device_count())' ;;
    # The GPU tier in GPU_TEST_JOBS pytest processes (default 3) over interleaved test files:
    # on a fresh machine Triton's compiles dominate and one process outlives a 10-minute call.
    # A test still running after 5 minutes prints every thread's stack, and goes on.
    # test_comm_local_ranks.py runs alone afterwards: its virtual ranks spin on one GPU waiting
    # for each other, and beside three other processes' kernels it once spun past 5 minutes
    # (it passes alone on cold machines).
    tests) files=(); solo=()
           for f in ${GPU_TEST_FILES:-tests/test_*.py}; do
             case $f in *test_comm_local_ranks.py) solo+=("$f") ;; *) files+=("$f") ;; esac
           done
           jobs=${GPU_TEST_JOBS:-3}; pids=()
           for ((j = 0; j < jobs; j++)); do
             group=(); for ((i = j; i < ${#files[@]}; i += jobs)); do group+=("${files[i]}"); done
             [ ${#group[@]} -gt 0 ] || continue   # (no paths would run every test)
             python3 -m pytest -q -m gpu -p no:cacheprovider -o faulthandler_timeout=300 \
               "${group[@]}" > "$OUT/pytest_gpu_$j.log" 2>&1 &
             pids+=($!)
           done
           for j in "${!pids[@]}"; do
             wait "${pids[j]}"; rc=$?; echo "=== gpu tests, group $j"; tail -3 "$OUT/pytest_gpu_$j.log"
             [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || { status=1; echo "=== FAILED: gpu tests, group $j"; }
           done
           [ ${#solo[@]} -eq 0 ] || run pytest_gpu_solo.log python3 -m pytest -q -m gpu \
             -p no:cacheprovider -o faulthandler_timeout=300 "${solo[@]}" ;;
    multigpu) [ "$ngpu" -ge 2 ] && run pytest_multigpu.log python3 -m pytest -q -m multigpu \
                -o faulthandler_timeout=300 tests ;;
    # The multigpu tier on one GPU: two ranks share it through the IPC workspace.
    multigpu-shared) run pytest_multigpu_shared.log env AITER_DIST_TEST_GPU_RANKS=2 \
                       python3 -m pytest -q -m multigpu -p no:cacheprovider \
                       -o faulthandler_timeout=300 tests ;;
    norm) run bench_norm.log python3 benchmarks/bench_norm.py ${NORM_ARGS:-} ;;
    attention) run bench_attention.log python3 benchmarks/bench_attention.py ${ATTN_ARGS:-} ;;
    gemm) run bench_gemm.log python3 benchmarks/bench_gemm.py ${GEMM_ARGS:-} ;;
    collectives) [ "$ngpu" -ge 2 ] && run bench_collectives.log torchrun --nproc-per-node "$ngpu" benchmarks/bench_collectives.py ${COLL_ARGS:-} ;;
    overhead) run bench_overhead.log python3 benchmarks/bench_overhead.py ${OVERHEAD_ARGS:-} ;;
    conv) run bench_conv.log python3 benchmarks/bench_conv.py ${CONV_ARGS:-} ;;
    dist-gemm) [ "$ngpu" -ge 2 ] && run bench_dist_gemm.log torchrun --nproc-per-node 2 benchmarks/bench_dist_gemm.py ${DGEMM_ARGS:-} ;;
    train-ops) run bench_train_ops.log python3 benchmarks/bench_train_ops.py ${TRAIN_OPS_ARGS:-} ;;
    train-ops-e2e) for mode in "" "--no-train-ops" "--no-aiter" "--compile" "--no-train-ops --compile"; do
                     run "train_ops_${TRAIN_MODES_CONFIG:-1b}.log" torchrun --nproc-per-node 1 examples/train_llama.py --config "${TRAIN_MODES_CONFIG:-1b}" --steps ${TRAIN_STEPS:-30} $mode
                   done ;;
    train-modes) for n in 1 $([ "$ngpu" -ge 2 ] && echo 2); do
                   for mode in "" "--compile" "--cuda-graphs" "--no-aiter" "--no-aiter --compile" "--no-aiter --cuda-graphs"; do
                     run "train_modes_${TRAIN_MODES_CONFIG:-1b}.log" torchrun --nproc-per-node "$n" examples/train_llama.py --config "${TRAIN_MODES_CONFIG:-1b}" --steps ${TRAIN_STEPS:-30} $mode
                   done
                 done ;;
    worlds) for w in ${WORLDS:-$(seq 3 $((ngpu - 1)))}; do
              devs=$(seq -s, 0 $((w - 1)))
              run "pytest_multigpu_w$w.log" env CUDA_VISIBLE_DEVICES="$devs" python3 -m pytest -q -m multigpu tests
              run "bench_collectives_w$w.log" env CUDA_VISIBLE_DEVICES="$devs" torchrun --nproc-per-node "$w" benchmarks/bench_collectives.py --ops all_reduce,all_gather ${COLL_ARGS:-}
            done ;;
    train) [ "$ngpu" -ge 2 ] && for mode in "" "--no-fuse-norm" "--sequence-parallel" "--no-aiter"; do
             run "train_${TRAIN_CONFIG:-small}.log" torchrun --nproc-per-node "${TRAIN_NPROC:-2}" examples/train_llama.py --config "${TRAIN_CONFIG:-small}" --steps ${TRAIN_STEPS:-60} $mode
           done ;;
  esac
done
exit $status
