"""All-reduce fused with residual add and RMSNorm, the step where a row-parallel output meets the
residual stream:

    residual_out = all_reduce(x) + residual ;  out = rms_norm(residual_out) * weight

One launch over the symmetric workspace: each program copies its own rows in, meets its peers'
programs at a barrier, sums those rows over the ranks in rank order (fp32, rounded to the dtype as
``all_reduce`` would), adds the residual and normalizes, then a closing barrier. The result is the
same as ``add_rms_norm(all_reduce(x), residual, weight)``; the backward is add+RMSNorm's (the
all-reduce's gradient is the identity, Megatron's convention).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ..kernels._runtime import launch, record_path, runs_triton
from ..kernels.rmsnorm import _check_norm_inputs, add_rms_norm_bwd, rms_norm_fwd
from .all_reduce import (_DTYPE_CODE, _POLLS_PER_S, AUTO_ONE_SHOT_MAX_BYTES, OP_NAMES, _barrier,
                         _check_headers, _timeout_s, _write_header, all_reduce_raw,
                         check_comm_errors)
from .workspace import HEADER_BYTES, MAX_WORLD, get_workspace
from ..kernels.rmsnorm import add_rms_norm_ref

OP_ALL_REDUCE_ADD_RMS_NORM = 4
OP_NAMES[OP_ALL_REDUCE_ADD_RMS_NORM] = "all_reduce_add_rms_norm"
FUSED_MAX_N = 16384  # whole rows in registers; wider rows take the unfused path


# ----------------------------------------------------------------------------- reference

def all_reduce_add_rms_norm_ref(xs, residual, weight, eps=1e-6):
    """From every rank's x: (out, residual_out), in the inputs' dtype via float64."""
    total = torch.stack([x.double() for x in xs]).sum(0).to(xs[0].dtype)
    return add_rms_norm_ref(total, residual, weight, eps)


# ----------------------------------------------------------------------------- kernels

@triton.jit(do_not_specialize=["rank", "world", "max_spins", "dtype_code", "op_id"])
def _all_reduce_add_rms_norm_kernel(
    X, R, W, Y, RES_OUT, RSTD, BUF_PTRS, SIG_PTRS, ERR,
    M, N, eps, rank, world, max_spins, dtype_code, op_id,
    MAX_PROGRAMS: tl.constexpr, MAX_WORLD_: tl.constexpr, HEADER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Inputs are contiguous (M, N). Program p owns row blocks p, p + nprog, ... in both phases.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    elem_ty = X.dtype.element_ty
    cols = tl.arange(0, BLOCK_N)[None, :]
    col_mask = cols < N
    my_base = tl.load(BUF_PTRS + rank)
    my_buf = tl.multiple_of((my_base + HEADER).to(tl.pointer_type(elem_ty)), 16)
    if pid == 0:
        _write_header(my_base, M * N, dtype_code, nprog, N)
    for blk in range(pid, tl.cdiv(M, BLOCK_M), nprog):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        offs = rows.to(tl.int64)[:, None] * N + cols
        mask = (rows < M)[:, None] & col_mask
        tl.store(my_buf + offs, tl.load(X + offs, mask=mask), mask=mask)

    tl.debug_barrier()
    failed = _barrier(SIG_PTRS, ERR, pid * MAX_WORLD_, rank, world, max_spins, op_id, pid)
    tl.debug_barrier()
    if (pid == 0) & (failed == 0):
        _check_headers(BUF_PTRS, ERR, world, M * N, dtype_code, nprog, N, op_id, pid)

    if failed == 0:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        for blk in range(pid, tl.cdiv(M, BLOCK_M), nprog):
            rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < M
            offs = rows.to(tl.int64)[:, None] * N + cols
            mask = row_mask[:, None] & col_mask
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for r in range(world):
                src = tl.multiple_of((tl.load(BUF_PTRS + r) + HEADER).to(
                    tl.pointer_type(elem_ty)), 16)
                acc += tl.load(src + offs, mask=mask, other=0.0, cache_modifier=".cg").to(
                    tl.float32)
            # Round the sum as all_reduce would, then add the residual and round again.
            total = acc.to(elem_ty).to(tl.float32)
            s = (total + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)).to(elem_ty)
            tl.store(RES_OUT + offs, s, mask=mask)
            sf = s.to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=1) / N + eps)
            tl.store(Y + offs, (sf * rstd[:, None] * w).to(elem_ty), mask=mask)
            tl.store(RSTD + rows, rstd, mask=row_mask)

    tl.debug_barrier()
    if failed == 0:
        _barrier(SIG_PTRS, ERR, (MAX_PROGRAMS + pid) * MAX_WORLD_, rank, world, max_spins, op_id,
                 pid)


# ----------------------------------------------------------------------------- launchers

def _fused_fits(x2, ws) -> bool:
    return x2.shape[1] <= FUSED_MAX_N and x2.numel() * x2.element_size() <= ws.data_bytes


def all_reduce_add_rms_norm_fwd(x, residual, weight, eps, group, algo="auto"):
    """(out, residual_out, rstd). Takes the fused kernel when it applies, else all_reduce then
    add_rms_norm (recorded)."""
    op = "all_reduce_add_rms_norm"
    _check_norm_inputs(op, x, weight, residual)
    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    r2 = residual.reshape(-1, x.shape[-1]).contiguous()
    reason = None
    if algo == "fallback" or world == 1:
        use = False
    elif world > MAX_WORLD:
        use, reason = False, f"world size {world} > {MAX_WORLD}"
    elif not runs_triton(op, x.device):
        use, reason = False, "CPU tensor on a GPU machine"
    else:
        ws = get_workspace(group, x.device)
        if not _fused_fits(x2, ws):
            use, reason = False, f"rows of {x2.shape[1]} or {x2.numel()} elements exceed the " \
                                  f"fused kernel's limits"
        elif algo == "one_shot":
            use = True
        else:
            table = "cpu" if x.device.type == "cpu" else (
                "cuda" if torch.cuda.is_current_stream_capturing() else "cuda-eager")
            use = x2.numel() * x2.element_size() <= AUTO_ONE_SHOT_MAX_BYTES[table].get(world, 0)
    if not use:
        record_path(op, "all_reduce + add_rms_norm", reason)
        total = all_reduce_raw(x2, group, "fallback" if algo == "fallback" else "auto")
        y, res_out, rstd = rms_norm_fwd(total, weight, eps, residual=r2)
        return y.view(x.shape), res_out.view(x.shape), rstd
    check_comm_errors(ws)
    M, N = x2.shape
    y, res_out = torch.empty_like(x2), torch.empty_like(x2)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    cpu = x.device.type == "cpu"
    block_n = triton.next_power_of_2(N)
    block_m = max(1, min((16384 if cpu else 4096) // block_n, 64))
    programs = min(triton.cdiv(max(M, 1), block_m), ws.max_programs)
    max_spins = min(int(_timeout_s() * _POLLS_PER_S["cpu" if cpu else "cuda"]), 2**31 - 1)
    launch(_all_reduce_add_rms_norm_kernel, (programs,), x.device,
           x2, r2, weight, y, res_out, rstd, ws.buffer_ptrs, ws.signal_ptrs, ws.err,
           M, N, eps, ws.rank, ws.world_size, max_spins, _DTYPE_CODE[x.dtype],
           OP_ALL_REDUCE_ADD_RMS_NORM, MAX_PROGRAMS=ws.max_programs, MAX_WORLD_=MAX_WORLD,
           HEADER=HEADER_BYTES, BLOCK_M=block_m, BLOCK_N=block_n,
           num_warps=1 if cpu else min(max(block_m * block_n // 512, 4), 16))
    if cpu:
        check_comm_errors(ws)
    record_path(op, "one_shot")
    return y.view(x.shape), res_out.view(x.shape), rstd


# ----------------------------------------------------------------------------- autograd

class AllReduceAddRMSNormFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, group, algo):
        y, res_out, rstd = all_reduce_add_rms_norm_fwd(x, residual, weight, eps, group, algo)
        ctx.save_for_backward(res_out, weight, rstd)
        return y, res_out

    @staticmethod
    def backward(ctx, dy, dres_out):
        res_out, weight, rstd = ctx.saved_tensors
        dx, dw = add_rms_norm_bwd(dy, dres_out, res_out, weight, rstd)
        # The all-reduce passes the gradient through unchanged (identity backward).
        return dx, dx, dw, None, None, None


# ----------------------------------------------------------------------------- functional API

def all_reduce_add_rms_norm(x, residual, weight, eps=1e-6, group=None, *, algo="auto"):
    """``residual_out = all_reduce(x) + residual; out = rms_norm(residual_out) * weight``.

    Returns ``(out, residual_out)``. ``algo`` as for ``all_reduce``; ``last_path(
    "all_reduce_add_rms_norm")`` tells whether the fused kernel served the call.
    """
    return AllReduceAddRMSNormFunc.apply(x, residual, weight, eps, group, algo)


__all__ = ["all_reduce_add_rms_norm", "all_reduce_add_rms_norm_ref", "AllReduceAddRMSNormFunc"]
