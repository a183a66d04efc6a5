"""The cached launch path (kernels/_runtime.fast_launch): one JIT call per specialization, then
the compiled kernel's own launcher with the same arguments. CPU tier: a stand-in kernel records
what each path receives; GPU tier: real kernels through both paths agree."""
import inspect

import pytest
import torch

from aiter_dist.kernels import _runtime


class _Param:
    def __init__(self, default=inspect.Parameter.empty):
        self.default = default


class _Compiled:
    def __init__(self, log):
        self.function, self.packed_metadata, self.log = "fn", "meta", log

    def run(self, *args):
        self.log.append(("run", args))


class _Kernel:
    """What fast_launch uses of a JITFunction: arg_names, params, [grid](...) -> compiled."""
    __name__ = "_stand_in_kernel"

    def __init__(self):
        self.arg_names = ["X", "n", "BLOCK", "FLAG"]
        self.params = [_Param(), _Param(), _Param(), _Param(default=False)]
        self.log = []

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return _Compiled(self.log)
        return call


@pytest.fixture
def fresh_cache(monkeypatch):
    monkeypatch.setattr(_runtime, "_compiled", {})
    monkeypatch.setattr(_runtime, "_current_device", lambda: 0)
    monkeypatch.setattr(_runtime, "_current_stream", lambda index: 1234)
    monkeypatch.setattr(_runtime, "FAST_LAUNCH", True)


def test_second_call_goes_straight_to_the_compiled_launcher(fresh_cache):
    k = _Kernel()
    x = torch.zeros(64)
    dev = torch.device("cpu")
    _runtime.fast_launch(k, (3,), dev, (x, 32), {"BLOCK": 16, "num_warps": 4})
    _runtime.fast_launch(k, (5, 2), dev, (x, 48), {"BLOCK": 16, "num_warps": 4})
    assert [e[0] for e in k.log] == ["jit", "run"]
    # grid padded to 3-D, the stream, the handles, no hooks, the args, then the constexprs in
    # signature order (FLAG from its default).
    assert k.log[1][1] == (5, 2, 1, 1234, "fn", "meta", None, None, None, x, 48, 16, False)


@pytest.mark.parametrize("change", ["alignment", "dtype", "value one", "not divisible",
                                    "64-bit int", "constexpr", "num_warps"])
def test_anything_triton_specializes_on_compiles_again(fresh_cache, change):
    k = _Kernel()
    dev = torch.device("cpu")
    base = torch.zeros(64)
    args, kw = (base, 32), {"BLOCK": 16, "num_warps": 4}
    _runtime.fast_launch(k, (1,), dev, args, kw)
    other = {"alignment": ((base[1:], 32), kw), "dtype": ((base.half(), 32), kw),
             "value one": ((base, 1), kw), "not divisible": ((base, 33), kw),
             "64-bit int": ((base, 2**40), kw), "constexpr": (args, {"BLOCK": 32, "num_warps": 4}),
             "num_warps": (args, {"BLOCK": 16, "num_warps": 8})}[change]
    _runtime.fast_launch(k, (1,), dev, *other)
    assert [e[0] for e in k.log] == ["jit", "jit"]


def test_int_and_float_keys(fresh_cache):
    """An entry per Triton specialization: 17 and 1 share a residue mod 16 but 1 is a constant
    to Triton; 2**40 and 2**40 + 16 (64-bit, divisible) share one, as do -16 and -32 and 32 and
    48; int 0 and a float never do (Triton compiles i32 and fp32 launchers)."""
    k = _Kernel()
    dev = torch.device("cpu")
    x = torch.zeros(64)
    for n in (17, 1, 2**40, 2**40 + 16, -16, -32, 32, 48, 0, 1e-6, 0.5):
        _runtime.fast_launch(k, (1,), dev, (x, n), {"BLOCK": 16})
    assert [e[0] for e in k.log] == ["jit", "jit", "jit", "run", "jit", "run", "jit", "run",
                                     "jit", "jit", "run"]


def test_unknown_arguments_and_profiler_hooks_take_the_jit(fresh_cache, monkeypatch):
    k = _Kernel()
    dev = torch.device("cpu")
    for _ in range(2):
        _runtime.fast_launch(k, (1,), dev, (object(), 32), {"BLOCK": 16})
    assert [e[0] for e in k.log] == ["jit", "jit"]
    hooks = _runtime._knobs.runtime.launch_enter_hook
    monkeypatch.setattr(hooks, "calls", [lambda *a: None])
    for _ in range(2):
        _runtime.fast_launch(k, (1,), dev, (torch.zeros(4), 32), {"BLOCK": 16})
    assert [e[0] for e in k.log] == ["jit"] * 4


def test_a_caller_key_replaces_the_derived_one(fresh_cache):
    k = _Kernel()
    dev = torch.device("cpu")
    x = torch.zeros(64)
    _runtime.fast_launch(k, (1,), dev, (x, 32), {"BLOCK": 16}, key=("mine",))
    _runtime.fast_launch(k, (1,), dev, (x, 48), {"BLOCK": 16}, key=("mine",))
    assert [e[0] for e in k.log] == ["jit", "run"]


def test_a_plan_calls_the_launcher_with_the_same_arguments(fresh_cache, monkeypatch):
    k = _Kernel()
    dev = torch.device("cpu")
    x = torch.zeros(64)
    monkeypatch.setattr(_runtime, "INTERPRETED", False)  # a compiled process: plans hold launchers
    plan = _runtime.plan_launch(k, (5, 2), dev, x, 48, BLOCK=16)
    y = x[16:]
    plan(y, 48)
    assert [e[0] for e in k.log] == ["jit", "run"]
    got = k.log[1][1]
    assert got[:9] == (5, 2, 1, 1234, "fn", "meta", None, None, None) and got[9] is y
    assert got[10:] == (48, 16, False)
    assert _runtime.plan_launch(k, (1,), dev, x[1:], 48, BLOCK=16) is None  # misaligned


def test_a_plan_takes_triton_s_own_path_under_a_profiler_or_without_a_launcher(fresh_cache,
                                                                             monkeypatch):
    k = _Kernel()
    dev = torch.device("cpu")
    x = torch.zeros(64)
    monkeypatch.setattr(_runtime, "INTERPRETED", False)
    plan = _runtime.plan_launch(k, (1,), dev, x, 32, BLOCK=16)
    hooks = _runtime._knobs.runtime.launch_enter_hook
    monkeypatch.setattr(hooks, "calls", [lambda *a: None])
    plan(x, 32)
    assert [e[0] for e in k.log] == ["jit", "jit"]
    monkeypatch.setattr(hooks, "calls", [])
    plan(x, 32)
    assert [e[0] for e in k.log] == ["jit", "jit", "run"]
    no_launcher = _runtime.LaunchPlan(k, (1,), dev, {"BLOCK": 16}, None, 0)
    no_launcher(x, 32)  # (the interpreter, or AITER_DIST_FAST_LAUNCH=0): launch() as usual
    assert [e[0] for e in k.log] == ["jit", "jit", "run", "run"]


def test_host_arithmetic():
    assert [_runtime.cdiv(a, 4) for a in (0, 1, 4, 5)] == [0, 1, 1, 2]
    assert [_runtime.next_pow2(n) for n in (0, 1, 2, 3, 64, 65)] == [1, 1, 2, 4, 64, 128]


@pytest.mark.gpu
def test_cached_launches_match_the_jit_on_gpu(monkeypatch):
    """The same ops through the cached path (second and later calls) and the JIT path give the
    same bits, including on misaligned views (another specialization)."""
    import aiter_dist

    x = torch.randn(37, 1000, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1000, device="cuda", dtype=torch.bfloat16)
    views = [x, x[1:], x.view(-1)[3:3 + 36 * 1000].view(36, 1000)]
    cached = [[aiter_dist.rms_norm(v, w) for _ in range(3)][-1] for v in views]
    monkeypatch.setattr(_runtime, "FAST_LAUNCH", False)
    jit = [aiter_dist.rms_norm(v, w) for v in views]
    for a, b in zip(cached, jit):
        assert torch.equal(a, b)
