"""Bad input raises a clear error (naming the op, the argument and the fix) instead of reading
or writing out of bounds. Every case runs in this process: a crash would take pytest down."""
import pytest
import torch

import aiter_dist
from aiter_dist.kernels import flash_attn as fa

ROWS, H, D = 10, 2, 16


def _varlen(cu_q, cu_k=None, max_q=ROWS, max_k=ROWS, rows_q=ROWS, rows_k=ROWS):
    q = torch.randn(rows_q, H, D)
    k = torch.randn(rows_k, H, D)
    cu_q = torch.tensor(cu_q, dtype=torch.int32)
    cu_k = cu_q if cu_k is None else torch.tensor(cu_k, dtype=torch.int32)
    return aiter_dist.flash_attn_varlen_func(q, k, k, cu_q, cu_k, max_q, max_k)


# ----------------------------------------------------------------------------- varlen offsets

@pytest.mark.parametrize("cu, message", [
    ([0, 4, 12], r"cu_seqlens_q\[-1\] is 12 but q has 10 rows"),  # past the data
    ([0, 4, 50], r"cu_seqlens_q\[-1\] is 50 but q has 10 rows"),
    ([0, 4, 8], r"cu_seqlens_q\[-1\] is 8 but q has 10 rows"),  # short of the data
    ([0, 8, 4, 10], r"cu_seqlens_q decreases at index 2 \(8 then 4\)"),
    ([0, 12, 4, 10], r"cu_seqlens_q decreases at index 2 \(12 then 4\)"),
    ([2, 4, 10], r"cu_seqlens_q\[0\] is 2; the offsets must start at 0"),
    ([-3, 4, 10], r"cu_seqlens_q\[0\] is -3"),
], ids=str)
def test_varlen_offsets_that_leave_the_data_raise(cu, message):
    with pytest.raises(ValueError, match=message) as err:
        _varlen(cu)
    assert "aiter_dist.flash_attn_varlen_func" in str(err.value)
    assert "cumsum" in str(err.value)  # the fix
    assert "synchronization" not in str(err.value)  # CPU: always checked, nothing to turn off


def test_varlen_key_offsets_are_checked_against_k_rows():
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[-1\] is 10 but k \(and v\) has 7 rows"):
        _varlen([0, 4, 10], [0, 4, 10], rows_k=7)
    with pytest.raises(ValueError, match=r"cu_seqlens_k decreases at index 1"):
        _varlen([0, 4, 10], [0, -1, 10])


def test_varlen_max_seqlen_must_cover_the_longest_sequence():
    with pytest.raises(ValueError, match=r"sequence 1 has 6 rows .*max_seqlen_q is 5; pass "
                                         r"max_seqlen_q >= 6"):
        _varlen([0, 4, 10], max_q=5)
    with pytest.raises(ValueError, match=r"max_seqlen_k is 3; pass max_seqlen_k >= 6"):
        _varlen([0, 4, 10], max_k=3)
    with pytest.raises(ValueError, match="max_seqlen_q must be >= 0"):
        _varlen([0, 4, 10], max_q=-1)
    with pytest.raises(TypeError, match="max_seqlen_k must be an int"):
        _varlen([0, 4, 10], max_k=6.5)


def test_varlen_offsets_layout():
    q = torch.randn(ROWS, H, D)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    f = aiter_dist.flash_attn_varlen_func
    with pytest.raises(TypeError, match="cu_seqlens_q must be a 1-D int32 tensor"):
        f(q, q, q, cu.long(), cu, 6, 6)
    with pytest.raises(TypeError, match="cu_seqlens_k must be a 1-D int32 tensor .got list"):
        f(q, q, q, cu, [0, 4, 10], 6, 6)
    with pytest.raises(ValueError, match=r"cu_seqlens_q must be a 1-D .* got shape \(1, 3\)"):
        f(q, q, q, cu[None], cu, 6, 6)
    with pytest.raises(ValueError, match=r"cu_seqlens_k must be .* got shape \(0,\)"):
        f(q, q, q, cu, cu[:0], 6, 6)
    with pytest.raises(ValueError, match="cu_seqlens_q has 3 offsets but cu_seqlens_k has 2"):
        f(q, q, q, cu, torch.tensor([0, 10], dtype=torch.int32), 6, 10)


def test_varlen_valid_edge_cases_run():
    # No sequence at all, a larger max_seqlen than needed, and strided offsets (read correctly).
    out = _varlen([0], rows_q=0, rows_k=0)
    assert out.shape == (0, H, D)
    q = torch.randn(ROWS, H, D)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    strided = torch.tensor([0, 99, 4, 99, 10], dtype=torch.int32)[::2]
    assert not strided.is_contiguous()
    want = aiter_dist.flash_attn_varlen_func(q, q, q, cu, cu, 6, 6, causal=True)
    got = aiter_dist.flash_attn_varlen_func(q, q, q, strided, strided, 64, 64, causal=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_varlen_value_check_switch(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.delenv(fa.CHECK_VARLEN_ENV, raising=False)
    assert fa._checks_offset_values(cuda)  # on by default
    monkeypatch.setenv(fa.CHECK_VARLEN_ENV, "0")
    assert not fa._checks_offset_values(cuda)
    assert fa._checks_offset_values(torch.device("cpu"))  # CPU: always
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        _varlen([0, 4, 12])
    monkeypatch.setenv(fa.CHECK_VARLEN_ENV, "1")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not fa._checks_offset_values(cuda)  # no host reads inside a CUDA graph capture


def test_varlen_gpu_error_says_what_the_check_costs():
    msg = str(fa._offsets_error("flash_attn_varlen_func", "cu_seqlens_q[0] is 1",
                                torch.device("cuda", 0)))
    assert "one device synchronization per call" in msg
    assert "AITER_DIST_CHECK_VARLEN=0" in msg


# ----------------------------------------------------------------------------- collectives

@pytest.mark.parametrize("op", ["all_gather", "reduce_scatter"])
@pytest.mark.parametrize("dim", [1.5, True, "0"], ids=repr)
def test_collective_dim_must_be_an_int(op, dim):
    # Checked before any process group is needed.
    with pytest.raises(TypeError, match=f"aiter_dist.{op}: dim must be an int"):
        getattr(aiter_dist, op)(torch.randn(4, 2), dim=dim)


def test_fused_norm_keeps_refusing_float64():
    # float64 reaches rms_norm's PyTorch path, not the fused collectives (their kernels and
    # peers' buffers are fp32/fp16/bf16).
    x = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="all_reduce_add_rms_norm: x has dtype torch.float64"):
        aiter_dist.all_reduce_add_rms_norm(x, x, torch.ones(8, dtype=torch.float64))


def test_nonfinite_inputs_raise_no_interpreter_warnings():
    """NaN and inf are data: the interpreter's numpy floating-point warnings do not leak out."""
    import warnings

    x = torch.tensor([[1.0, float("inf"), float("nan"), 3e38, 3e38, -2.0, 0.5, 1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        y = aiter_dist.rms_norm(x, torch.ones(8))
        aiter_dist.add_rms_norm(x, x, torch.ones(8))
    assert torch.isnan(y).all()  # the row's mean square is inf or NaN: every output is NaN
