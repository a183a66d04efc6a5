"""Every GPU kernel compiles for Hopper (sm_90) with the installed Triton, on any machine.

The CPU tier runs the kernels through the interpreter, which accepts code the compiler refuses
(loop-carried types, scalar/tensor mixes, unsupported casts). Triton's compiler needs no GPU, so
this test compiles each kernel family down to a cubin in a subprocess with the interpreter off.
Kernel arguments follow one naming rule, which gives their types: UPPER-case names are pointers
(bf16 unless listed) except the row and column counts M and N (and the GEMMs' reduction length
K, which their calls type), lower-case ones int32 (float32 for scales and eps). Pointers and
strides are marked 16-divisible, as Triton's launcher marks them for aligned tensors, so the
loads take the pipelined (asynchronous copy) path of real launches.
"""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r'''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from aiter_dist.comm.all_reduce import _all_reduce_kernel
    from aiter_dist.comm.fused_norm import _fused_norm_kernel
    from aiter_dist.comm.gather_scatter import _gather_scatter_kernel
    from aiter_dist.comm.protocol import _handshake_kernel
    from aiter_dist.comm import dist_gemm as dg
    from aiter_dist.comm import vocab_parallel as vp
    from aiter_dist.kernels import conv
    from aiter_dist.kernels import cross_entropy as ce
    from aiter_dist.kernels import flash_attn as fa
    from aiter_dist.kernels import gemm
    from aiter_dist.kernels import rmsnorm as rn
    from aiter_dist.kernels import rope
    from aiter_dist.kernels import swiglu

    FLOATS = {"qk_scale", "sm_scale", "eps", "label_smoothing"}
    POINTERS = {"LSE": "*fp32", "DELTA": "*fp32", "DQ_ACC": "*fp32", "RSTD": "*fp32",
                "SCALE": "*fp32", "DW_PARTIAL": "*fp32", "CU_Q": "*i32", "CU_K": "*i32",
                "ERR": "*i32", "BUF_PTRS": "*i64", "SIG_PTRS": "*i64", "X_SCALE": "*fp32",
                "W_SCALE": "*fp32"}
    failures = []

    def compile_for_hopper(name, fn, constexprs, num_warps=4, num_stages=2, **pointer_types):
        constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
        sig = {}
        for arg in fn.arg_names:
            if arg in constexprs:
                sig[arg] = "constexpr"
            elif arg in pointer_types:  # named explicitly, whatever the naming rule says
                sig[arg] = pointer_types[arg]
            elif arg.isupper() and arg not in ("M", "N"):
                sig[arg] = pointer_types.get(arg, POINTERS.get(arg, "*bf16"))
            else:
                sig[arg] = "fp32" if arg in FLOATS else "i32"
        aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
                   if sig[arg].startswith("*") or (sig[arg] == "i32" and arg[0] == "s")}
        try:
            triton.compile(ASTSource(fn, sig, constexprs, aligned),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages})
            print("compiled", name)
        except Exception as e:  # report every failure, not just the first
            failures.append(name)
            print("FAILED", name, type(e).__name__, str(e)[:3000])

    attn = dict(IS_VARLEN=False, HAS_LEFT=False, HAS_RIGHT=True, HEAD_DIM=128, BLOCK_M=64,
                BLOCK_N=64, BLOCK_D=128, PRECISION="tf32", USE_TMA=False, ATOMIC_DQ=True,
                DQ_TMA=False)
    window = dict(attn, IS_VARLEN=True, HAS_LEFT=True, HEAD_DIM=96)
    for tag, c in (("causal hd128", attn), ("varlen window hd96", window)):
        compile_for_hopper(f"attention fwd {tag}", fa._attn_fwd_kernel, c, 4, 3)
        compile_for_hopper(f"attention dk/dv + atomic dq {tag}", fa._attn_bwd_dkdv_kernel,
                           dict(c, BLOCK_N=128), 8)
        compile_for_hopper(f"attention dk/dv {tag}", fa._attn_bwd_dkdv_kernel,
                           dict(c, ATOMIC_DQ=False))
        compile_for_hopper(f"attention dq {tag}", fa._attn_bwd_dq_kernel, c)
    desc = "tensordesc<bf16[1, 64, 1, 128]>"
    compile_for_hopper("attention fwd with tensor descriptors", fa._attn_fwd_kernel,
                       dict(attn, USE_TMA=True), 4, 3, K=desc, V=desc)
    compile_for_hopper("attention dk/dv with tensor descriptors", fa._attn_bwd_dkdv_kernel,
                       dict(attn, USE_TMA=True), Q=desc, DO=desc)
    compile_for_hopper("attention dk/dv + dq by bulk reduce", fa._attn_bwd_dkdv_kernel,
                       dict(attn, BLOCK_N=128, DQ_TMA=True), 8,
                       DQ_ACC="tensordesc<fp32[1, 64, 1, 128]>")
    # (Triton 3.6's ptxas crashes on this kernel with 2 stages; 1 and 3 compile.)
    compile_for_hopper("attention dq with tensor descriptors", fa._attn_bwd_dq_kernel,
                       dict(attn, USE_TMA=True), 4, 3, K=desc, V=desc)
    compile_for_hopper("attention delta", fa._attn_bwd_delta_kernel,
                       dict(IS_VARLEN=False, HEAD_DIM=128, BLOCK_M=64, BLOCK_D=128))
    compile_for_hopper("attention fwd, seqlens of 1", fa._attn_fwd_kernel,
                       dict(attn, seqlen_q=1, seqlen_k=1, HEAD_DIM=64, BLOCK_D=64))

    for residual, even, chunks in ((True, True, 1), (False, False, 1), (True, False, 3)):
        compile_for_hopper(f"rms_norm fwd residual={residual} even={even} chunks={chunks}",
                           rn._rms_norm_fwd_kernel,
                           dict(HAS_RESIDUAL=residual, BLOCK_M=4, BLOCK_N=4096,
                                NUM_CHUNKS=chunks, EVEN=even, OFFSETS_64=chunks > 1), 8)
    for dres, chunks in ((True, 1), (False, 3)):
        compile_for_hopper(f"rms_norm bwd dres={dres} chunks={chunks}", rn._rms_norm_bwd_kernel,
                           dict(HAS_DRES=dres, BLOCK_M=2, BLOCK_N=4096, NUM_CHUNKS=chunks), 8)

    comm = dict(MAX_PROGRAMS=512, MAX_WORLD_=8, HEADER=256, ABORT_POLL=64, HWORDS=8)
    for two_shot in (False, True):
        compile_for_hopper(f"all_reduce two_shot={two_shot}", _all_reduce_kernel,
                           dict(comm, TWO_SHOT=two_shot, COPY_IN=True, BLOCK=2048), 8)
    for reduce in (False, True):
        compile_for_hopper(f"gather_scatter reduce={reduce}", _gather_scatter_kernel,
                           dict(comm, REDUCE=reduce, COPY_IN=True, BLOCK=2048), 8)
    compile_for_hopper("collective handshake", _handshake_kernel, comm)
    compile_for_hopper("dist-gemm start barrier", dg._start_kernel, comm)
    compile_for_hopper("dist-gemm end barrier", dg._end_kernel, comm)
    compile_for_hopper("dist-gemm slot sum + bias", dg._sum_slots_kernel,
                       dict(comm, HAS_BIAS=True, BLOCK=2048), 8)
    for mode, fp8 in ((0, 0.0), (0, 448.0), (1, 0.0), (2, 0.0)):
        types = {"Y": "*fp8e4nv"} if fp8 else {}
        compile_for_hopper(f"fused norm mode={mode} fp8={bool(fp8)}", _fused_norm_kernel,
                           dict(comm, MODE=mode, FP8_MAX=fp8, FP8_MIN_EXP=-6 if fp8 else 0,
                                BLOCK_M=1, BLOCK_N=4096), 8, R="*fp32", RES_OUT="*fp32",
                           **types)
    # GEMM (its K is the reduction length, an int). Pointer kernel: unit strides become
    # constants, as real launches specialize them.
    mm = dict(HAS_BIAS=True, SCALING=0, PRECISION="tf32", UPCAST=False, EVEN_K=True,
              BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, sak=1, scn=1)
    compile_for_hopper("gemm pointers bf16 x @ w.T + bias", gemm._gemm_kernel,
                       dict(mm, sbk=1), 8, 3, K="i32")
    compile_for_hopper("gemm pointers fp32 dgrad dy @ w, K tail", gemm._gemm_kernel,
                       dict(mm, HAS_BIAS=False, EVEN_K=False, BLOCK_K=32, sbn=1), 8, 3,
                       A="*fp32", B="*fp32", C="*fp32", K="i32")
    fp8 = dict(mm, HAS_BIAS=False, BLOCK_K=128, sbk=1, sxk=1, swk=1)
    compile_for_hopper("gemm pointers fp8 rowwise", gemm._gemm_kernel, dict(fp8, SCALING=1),
                       8, 3, A="*fp8e4nv", B="*fp8e4nv", K="i32")
    compile_for_hopper("gemm pointers fp8 blockscale", gemm._gemm_kernel, dict(fp8, SCALING=2),
                       8, 3, A="*fp8e4nv", B="*fp8e4nv", K="i32")
    # Persistent TMA kernel: forward (nt), dgrad (nn: w as stored) and wgrad (tn: dy.T).
    tma = dict(HAS_BIAS=False, SCALING=0, PRECISION="tf32", UPCAST=False, BLOCK_M=128,
               BLOCK_N=256, BLOCK_K=64, GROUP_M=8, NUM_SMS=132, FLATTEN=True, SUBTILE=False,
               DEVICE_DESC=False)
    a_k, a_m = "tensordesc<bf16[128, 64]>", "tensordesc<bf16[64, 128]>"
    b_k, b_n = "tensordesc<bf16[256, 64]>", "tensordesc<bf16[64, 256]>"
    out = "tensordesc<bf16[128, 256]>"
    for tag, a_desc, b_desc, a_km, b_km in (("x @ w.T + bias", a_k, b_k, True, True),
                                            ("dgrad dy @ w", a_k, b_n, True, False),
                                            ("wgrad dy.T @ x", a_m, b_n, False, False)):
        compile_for_hopper(f"gemm TMA persistent bf16 {tag}", gemm._gemm_tma_kernel,
                           dict(tma, A_K_MAJOR=a_km, B_K_MAJOR=b_km, HAS_BIAS=a_km and b_km),
                           8, 3, A=a_desc, B=b_desc, C=out, K="i32")
    for tag, a_km, b_km, sub in (("x @ w.T", True, True, False), ("wgrad, subtiled", False,
                                                                   False, True)):
        compile_for_hopper(f"gemm TMA persistent bf16, device descriptors, {tag}",
                           gemm._gemm_tma_kernel, dict(tma, A_K_MAJOR=a_km, B_K_MAJOR=b_km,
                                                       SUBTILE=sub, DEVICE_DESC=True), 8, 3,
                           A="*bf16", B="*bf16", C="*bf16", K="i32")
    compile_for_hopper("gemm TMA persistent bf16, subtiled store, not flattened",
                       gemm._gemm_tma_kernel, dict(tma, A_K_MAJOR=True, B_K_MAJOR=True,
                                                   SUBTILE=True, FLATTEN=False), 8, 4,
                       A=a_k, B=b_k, C="tensordesc<bf16[128, 128]>", K="i32")
    compile_for_hopper("gemm TMA persistent fp32 (tf32)", gemm._gemm_tma_kernel,
                       dict(tma, A_K_MAJOR=True, B_K_MAJOR=True, BLOCK_N=128, BLOCK_K=32), 8, 3,
                       A="tensordesc<fp32[128, 32]>", B="tensordesc<fp32[128, 32]>",
                       C="tensordesc<fp32[128, 128]>", K="i32")
    f8 = dict(tma, A_K_MAJOR=True, B_K_MAJOR=True, BLOCK_K=128, sxk=1, swk=1)
    compile_for_hopper("gemm TMA persistent fp8 rowwise + bias", gemm._gemm_tma_kernel,
                       dict(f8, SCALING=1, HAS_BIAS=True), 8, 3,
                       A="tensordesc<fp8e4nv[128, 128]>", B="tensordesc<fp8e4nv[256, 128]>",
                       C=out, K="i32")
    compile_for_hopper("gemm TMA persistent fp8 blockscale", gemm._gemm_tma_kernel,
                       dict(f8, SCALING=2, BLOCK_N=128), 8, 4,
                       A="tensordesc<fp8e4nv[128, 128]>", B="tensordesc<fp8e4nv[128, 128]>",
                       C="tensordesc<bf16[128, 128]>", K="i32")

    # Training ops: RoPE of q and k (fp32 tables), SwiGLU, cross-entropy, vocab-parallel CE.
    tables = dict(COS="*fp32", SIN="*fp32", CU_SEQLENS="*i32", SEQLEN_OFFSETS="*i32")
    rot = dict(ROT_HALF=64, HEADDIM=128, BLOCK_T=1, BLOCK_H=16, BLOCK_HK=8, BLOCK_K=64,
               BLOCK_TAIL=1, INTERLEAVED=False, CONJUGATE=False, VARLEN=False,
               OFFSETS_TENSOR=False, HAS_K=True, COPY_TAIL=False, OFFSETS_64=False)
    compile_for_hopper("rope q+k halves", rope._rotary_kernel, rot, 4, **tables)
    compile_for_hopper("rope pairs, varlen, offsets, tail, backward", rope._rotary_kernel,
                       dict(rot, ROT_HALF=32, BLOCK_K=32, BLOCK_TAIL=64, INTERLEAVED=True,
                            CONJUGATE=True, VARLEN=True, OFFSETS_TENSOR=True, COPY_TAIL=True),
                       4, **tables)
    compile_for_hopper("swiglu fwd", swiglu._swiglu_fwd_kernel,
                       dict(BLOCK_M=1, BLOCK_N=2048, EVEN=True, OFFSETS_64=False), 8)
    compile_for_hopper("swiglu bwd", swiglu._swiglu_bwd_kernel,
                       dict(BLOCK_M=1, BLOCK_N=2048, EVEN=False, OFFSETS_64=True), 8)
    rows = dict(TGT="*i64", LOSS="*fp32", LSE="*fp32", G="*fp32", STATS="*fp32", C="i32")
    for grad in (False, True):
        compile_for_hopper(f"cross_entropy fwd write_grad={grad}", ce._cross_entropy_fwd_kernel,
                           dict(BLOCK_M=1, BLOCK_C=8192, HAS_SMOOTHING=grad, WRITE_GRAD=grad),
                           8, **rows)
    compile_for_hopper("cross_entropy bwd", ce._cross_entropy_bwd_kernel,
                       dict(BLOCK_M=1, BLOCK_C=8192, HAS_SMOOTHING=False), 8, **rows)
    compile_for_hopper("vocab-parallel stats", vp._vocab_parallel_stats_kernel,
                       dict(BLOCK_M=1, BLOCK_C=8192), 8, **rows)
    compile_for_hopper("vocab-parallel combine", vp._vocab_parallel_combine_kernel,
                       dict(BLOCK=256), 4, **rows)
    # conv2d: implicit GEMMs over NHWC (sizes are ints whatever their case; Wt, the weight, a
    # pointer).
    sizes = {n: "i32" for n in ("H", "Wd", "OH", "OW", "HP", "WP", "CI", "CO", "CO_ALL", "KH",
                                "KW", "P")}
    sizes["Wt"] = "*bf16"
    cv = dict(PRECISION=conv.PRECISION, UPCAST=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64,
              GROUP_M=8, X_C1=True, W_C1=True, DY_C1=True)
    compile_for_hopper("conv2d fwd", conv._conv2d_fwd_kernel,
                       dict(cv, HAS_BIAS=True, FLAT_K=False), 8, 3, **sizes)
    compile_for_hopper("conv2d fwd, flattened taps (stem)", conv._conv2d_fwd_kernel,
                       dict(cv, HAS_BIAS=False, FLAT_K=True, BLOCK_K=32), 8, 3, **sizes)
    compile_for_hopper("conv2d dgrad by stride phase", conv._conv2d_dgrad_kernel, cv, 8, 3,
                       **sizes)
    compile_for_hopper("conv2d wgrad split-K", conv._conv2d_wgrad_kernel,
                       dict(cv, HAS_DB=True, FLAT_N=False), 8, 3, DW_PART="*fp32",
                       DB_PART="*fp32", **sizes)
    if failures:
        raise SystemExit(f"{len(failures)} kernel(s) failed to compile: {failures}")
''')


def _has_nvidia_backend() -> bool:
    # Looked up on disk: importing triton here, before aiter_dist turns the interpreter on,
    # would leave Triton's own jit functions compiled-mode for the rest of the session.
    import importlib.util

    spec = importlib.util.find_spec("triton")
    return spec is not None and spec.origin is not None and os.path.isdir(
        os.path.join(os.path.dirname(spec.origin), "backends", "nvidia"))


@pytest.mark.skipif(not _has_nvidia_backend(), reason="this Triton has no NVIDIA backend")
def test_kernels_compile_for_hopper():
    env = dict(os.environ, TRITON_INTERPRET="0")
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-6000:]
    assert "FAILED" not in p.stdout
