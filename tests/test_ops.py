"""Lightning attention: the recurrent (spec), parallel and chunkwise forms agree (docs/method.md §2)."""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from minihalo.ops import lightning_attn, lightning_decay, lightning_step, rel_err

# fp64 differs only by summation order (~1e-15); fp32 accumulates ~1e-7 per op over a few hundred steps.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def inputs(B, T, H, D, dtype, with_state, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
    s0 = torch.randn(B, H, D, D, generator=g, dtype=dtype).requires_grad_() if with_state else None
    return q, k, v, s0


def run(impl, q, k, v, s0, chunk_size):
    g_gamma = lightning_decay(q.shape[2])
    o, s = lightning_attn(q, k, v, g_gamma, initial_state=s0, output_final_state=True,
                          chunk_size=chunk_size, impl=impl)
    # one random linear functional of both outputs, so every gradient path is exercised
    gen = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() + \
           (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    leaves = [x for x in (q, k, v, s0) if x is not None]
    return [o, s, *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 63, 100, 257])
@pytest.mark.parametrize("H", [1, 3, 16])
@pytest.mark.parametrize("D", [16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_three_forms_agree(dtype, T, H, D, with_state):
    q, k, v, s0 = inputs(2, T, H, D, dtype, with_state, seed=T * 100 + H * 10 + D)
    ref = run("recurrent", q, k, v, s0, 64)
    names = ["o", "final_state", "dq", "dk", "dv", "ds0"]
    for impl, chunk_size in [("parallel", 64), ("chunk", 16), ("chunk", 64)]:
        got = run(impl, q, k, v, s0, chunk_size)
        for name, a, b in zip(names, got, ref):
            assert a.dtype == b.dtype
            assert rel_err(a, b) <= TOL[dtype], f"{impl}/{chunk_size} {name}: {rel_err(a, b):.2e}"


def test_decay_check_values():
    """docs/method.md §2: gamma for H = 16, and the non-power-of-two recipe."""
    expected = [0.4931, 0.6065, 0.7022, 0.7788, 0.8380, 0.8825, 0.9154, 0.9394,
                0.9568, 0.9692, 0.9781, 0.9845, 0.9890, 0.9922, 0.9945, 0.9961]
    assert torch.allclose(lightning_decay(16).exp(), torch.tensor(expected), atol=5e-5)
    # H = 9: slopes 2^-1 .. 2^-8 of P = 8, then the first of every other slope of 2P = 16: 2^-0.5
    slopes = [2.0 ** -i for i in range(1, 9)] + [2.0 ** -0.5]
    assert torch.allclose(-lightning_decay(9), torch.tensor(slopes))
    # H = 12: P = 8, then 2P = 16 recipe's slopes at indices 0, 2, 4, 6: 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5
    slopes = [2.0 ** -i for i in range(1, 9)] + [2.0 ** -(i + 0.5) for i in range(4)]
    assert torch.allclose(-lightning_decay(12), torch.tensor(slopes))
    assert lightning_decay(1).item() == pytest.approx(-2.0 ** -8)


def test_output_dtype_and_state_dtype():
    q, k, v, _ = inputs(1, 10, 2, 16, torch.float32, False)
    o, s = lightning_attn(q.bfloat16(), k.bfloat16(), v.bfloat16(), lightning_decay(2), output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    ref = lightning_attn(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), lightning_decay(2))
    assert rel_err(o.float(), ref) < 1e-2  # bf16 output rounding only


def test_decode_step_equals_recurrent():
    B, T, H, D = 2, 12, 3, 16
    q, k, v, s0 = inputs(B, T, H, D, torch.float32, True)
    g_gamma = lightning_decay(H)
    ref, ref_state = lightning_attn(q, k, v, g_gamma, initial_state=s0, output_final_state=True, impl="recurrent")
    state = s0.detach().clone()
    outs = [lightning_step(q[:, t], k[:, t], v[:, t], g_gamma, state) for t in range(T)]
    assert rel_err(torch.stack(outs, 1), ref) < 1e-6
    assert rel_err(state, ref_state) < 1e-6


def test_long_sequence_stays_finite():
    """Decay exponents are differences of log-decays: nothing overflows at long T."""
    q, k, v, _ = inputs(1, 4096, 2, 16, torch.float32, False)
    g_gamma = torch.tensor([-1e-4, -30.0])  # one barely decaying head, one that forgets at once
    o, s = lightning_attn(q, k, v, g_gamma, output_final_state=True, chunk_size=64)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    # the forgetful head's output at t is q_t k_t^T v_t * scale alone
    expected = (q[:, :, 1] * k[:, :, 1]).sum(-1, keepdim=True) * v[:, :, 1] / 4
    assert rel_err(o[:, :, 1], expected) < 1e-5


class PeakMemory(TorchDispatchMode):
    """Peak bytes of storages alive at once among those that ops under this mode allocated
    (views share their base's storage and count once; the inputs are not counted)."""

    def __init__(self, *inputs):
        super().__init__()
        self.refs = {t.untyped_storage().data_ptr(): 1 for t in inputs}  # storage -> live tensors
        self.live = self.peak = self.largest = 0

    def _release(self, ptr, n):
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            del self.refs[ptr]
            self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                ptr, n = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                if ptr not in self.refs:
                    self.refs[ptr] = 0
                    self.live += n
                    self.largest = max(self.largest, n)
                self.refs[ptr] += 1
                weakref.finalize(t, self._release, ptr, n)
        self.peak = max(self.peak, self.live)
        return out


def test_chunk_form_memory_is_linear_in_T():
    """At T = 16384 the chunked form holds O(T D + D^2) extra bytes and never a T x T tensor."""
    B, T, H, D, C = 1, 16384, 1, 16, 64
    q, k, v, _ = inputs(B, T, H, D, torch.float32, False)
    g_gamma = lightning_decay(H)
    with torch.no_grad(), PeakMemory(q, k, v) as mem:
        o = lightning_attn(q, k, v, g_gamma, chunk_size=C, impl="chunk")
        del o
    io_bytes = B * T * H * D * 4  # one (B, T, H, D) fp32 tensor
    assert mem.largest < T * T * 4 / 64  # no T x T (or even T x T/64) tensor
    assert mem.peak <= 3 * io_bytes + 16 * C * C * 4 + 8 * D * D * 4, mem.peak


@pytest.mark.parametrize("bad", [
    dict(k=torch.zeros(1, 5, 2, 8)),  # k shape differs from q
    dict(v=torch.zeros(1, 4, 2, 16)),  # v time differs
    dict(g_gamma=torch.zeros(3)),  # wrong number of heads
    dict(impl="cuda_magic"),
    dict(initial_state=torch.zeros(1, 2, 16, 8)),
    dict(q=torch.zeros(5, 2, 16)),  # not 4-D
])
def test_bad_input_is_rejected(bad):
    args = dict(q=torch.zeros(1, 5, 2, 16), k=torch.zeros(1, 5, 2, 16), v=torch.zeros(1, 5, 2, 16),
                g_gamma=torch.zeros(2))
    args.update(bad)
    with pytest.raises(ValueError):
        lightning_attn(**args)
    with pytest.raises(ValueError):
        lightning_decay(0)
