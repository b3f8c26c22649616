"""Triton kernels (minihalo.kernels) against the PyTorch forms of docs/method.md §2, on CPU through Triton's
interpreter (conftest.py sets TRITON_INTERPRET=1 before anything is imported).

Tolerance: fp32 relative error ||a - b|| / ||b|| <= 1e-4. The interpreter computes in true fp32,
and the two sides only differ in summation order over at most a few hundred terms (~1e-6 seen);
1e-4 leaves room for that but not for a wrong decay or a missing term (errors of order 1).
Every output buffer starts as NaN (kernels.POISON_OUTPUTS is on under the interpreter), so an
element the kernel fails to write fails the comparison.
"""
import pytest
import torch

from minihalo import kernels
from minihalo.ops import lightning_attn, lightning_decay, lightning_step, rel_err

TOL = 1e-4


def test_runs_under_interpreter_and_poisons_outputs():
    assert kernels.INTERPRETED, "tests must run the kernels through TRITON_INTERPRET=1"
    assert kernels.POISON_OUTPUTS
    out = kernels.new_output((3,), torch.float32, "cpu")
    assert torch.isnan(out).all()


def run_both(B, T, H, D, with_init, seed, DV=None, chunk_size=64):
    """Forward + backward through Triton and through the chunked PyTorch form (fp64, the reference).
    The loss uses both outputs (o and the final state), so every gradient path is exercised."""
    DV = DV or D
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, D, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, DV, generator=gen)
    s0 = torch.randn(B, H, D, DV, generator=gen) if with_init else None
    do = torch.randn(B, T, H, DV, generator=gen)
    dst = torch.randn(B, H, D, DV, generator=gen)
    g = lightning_decay(H)

    def forward_backward(impl, dtype):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        s = None if s0 is None else s0.to(dtype).requires_grad_()
        o, st = lightning_attn(*leaves, g, initial_state=s, output_final_state=True, impl=impl, chunk_size=chunk_size)
        loss = (o * do.to(dtype)).sum() + (st * dst.to(dtype)).sum()
        grads = torch.autograd.grad(loss, leaves + ([s] if s is not None else []))
        return [o, st, *grads]

    return forward_backward("triton", torch.float32), forward_backward("chunk", torch.float64)


NAMES = ["o", "final_state", "dq", "dk", "dv", "d_initial_state"]


# T covers a single token, one chunk minus one, a partial second chunk, and 4 chunks + 1 token.
@pytest.mark.parametrize("T", [1, 63, 100, 257])
@pytest.mark.parametrize("H", [1, 3])
@pytest.mark.parametrize("D", [16, 32, 64])
@pytest.mark.parametrize("with_init", [False, True])
def test_forward_backward_match_chunk_reference(T, H, D, with_init):
    B = 2 if T < 257 else 1
    ours, ref = run_both(B, T, H, D, with_init, seed=T * 100 + H * 10 + D + with_init)
    for name, a, b in zip(NAMES, ours, ref):
        assert torch.isfinite(a).all(), f"{name}: non-finite values (an unwritten, poisoned element?)"
        assert a.shape == b.shape, name
        assert rel_err(a, b) <= TOL, f"{name}: rel err {rel_err(a, b):.2e} (T={T}, H={H}, D={D}, init={with_init})"


@pytest.mark.parametrize("D,DV", [(8, 8), (24, 40)])
def test_head_dims_not_a_power_of_two_are_padded(D, DV):
    """D < 16 and non-power-of-two D are padded to a power of two >= 16 with masked loads."""
    ours, ref = run_both(1, 70, 2, D, True, seed=7, DV=DV)
    for name, a, b in zip(NAMES, ours, ref):
        assert rel_err(a, b) <= TOL, f"{name}: rel err {rel_err(a, b):.2e}"


def test_chunk_size_128_and_recurrent_reference():
    """Another chunk size, compared with the per-token recurrence itself (the spec)."""
    gen = torch.Generator().manual_seed(3)
    B, T, H, D = 1, 150, 3, 32
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    s0 = torch.randn(B, H, D, D, generator=gen)
    g = lightning_decay(H)
    o, st = lightning_attn(q, k, v, g, initial_state=s0, output_final_state=True, impl="triton", chunk_size=128)
    o_ref, st_ref = lightning_attn(q.double(), k.double(), v.double(), g, initial_state=s0.double(),
                                   output_final_state=True, impl="recurrent")
    assert rel_err(o, o_ref) <= TOL and rel_err(st, st_ref) <= TOL


def test_strong_decay_long_sequence_stays_finite():
    """Decay exponents are differences of log-decays (never gamma^-j): a strong decay over many
    chunks must not overflow. gamma = e^-20 per token would give e^(20*63) ~ inf if it did."""
    gen = torch.Generator().manual_seed(4)
    B, T, H, D = 1, 200, 2, 16
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    g = torch.tensor([-20.0, -0.01])
    o, st = lightning_attn(q, k, v, g, output_final_state=True, impl="triton")
    o_ref, st_ref = lightning_attn(q.double(), k.double(), v.double(), g, output_final_state=True, impl="recurrent")
    assert torch.isfinite(o).all() and rel_err(o, o_ref) <= TOL and rel_err(st, st_ref) <= TOL


def test_fp16_under_interpreter():
    """fp16 works in the interpreter; compared with fp64 at fp16 precision (~1e-3: 11-bit mantissa)."""
    gen = torch.Generator().manual_seed(5)
    B, T, H, D = 1, 100, 2, 32
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    g = lightning_decay(H)
    o = lightning_attn(q.half(), k.half(), v.half(), g, impl="triton")
    ref = lightning_attn(q.half().double(), k.half().double(), v.half().double(), g, impl="chunk")
    assert o.dtype == torch.float16 and rel_err(o, ref) <= 5e-3


def test_bf16_refused_under_interpreter():
    q = torch.randn(1, 8, 1, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bf16|bfloat16"):
        lightning_attn(q, q, q, lightning_decay(1), impl="triton")
    with pytest.raises(TypeError, match="bf16|bfloat16"):
        lightning_step(q[:, 0], q[:, 0], q[:, 0], lightning_decay(1), torch.zeros(1, 1, 16, 16), impl="triton")


def test_bad_chunk_size_and_state_are_refused():
    q = torch.randn(1, 8, 1, 16)
    with pytest.raises(ValueError, match="chunk_size"):
        lightning_attn(q, q, q, lightning_decay(1), impl="triton", chunk_size=48)
    with pytest.raises(ValueError, match="state"):
        lightning_step(q[:, 0], q[:, 0], q[:, 0], lightning_decay(1), torch.zeros(1, 1, 16, 16).double(), impl="triton")


@pytest.mark.parametrize("B,H,D,DV", [(2, 3, 32, 32), (1, 2, 24, 40)])
def test_decode_step_matches_recurrent_form(B, H, D, DV):
    """Steps of the decode kernel, one token at a time, equal the recurrent form over the sequence."""
    gen = torch.Generator().manual_seed(6)
    T = 5
    q, k = (torch.randn(B, T, H, D, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, DV, generator=gen)
    s0 = torch.randn(B, H, D, DV, generator=gen)
    g = lightning_decay(H)
    o_ref, st_ref = lightning_attn(q, k, v, g, initial_state=s0, output_final_state=True, impl="recurrent")
    state = s0.clone()
    outs = [lightning_step(q[:, t], k[:, t], v[:, t], g, state, impl="triton") for t in range(T)]
    o = torch.stack(outs, dim=1)  # (B, T, H, DV)
    assert rel_err(o, o_ref) <= TOL and rel_err(state, st_ref) <= TOL


@pytest.mark.parametrize("B,H,G,S,D", [(2, 6, 2, 200, 32), (1, 4, 4, 64, 16), (3, 5, 1, 1000, 24)])
def test_decode_attention_kernel_matches_softmax(B, H, G, S, D):
    """The split-key kernel equals softmax attention computed from scratch (fp64): query head h reads kv head
    h // (H/G), masked keys get no weight, splits with no allowed key drop out, a partial last block is masked."""
    gen = torch.Generator().manual_seed(S)
    q = torch.randn(B, H, D, generator=gen)
    k, v = (torch.randn(B, G, S, D, generator=gen) for _ in range(2))
    mask = torch.rand(B, S, generator=gen) < 0.5
    mask[:, S // 3:] = False  # whole splits see no key
    mask[:, 0] = True
    kh, vh = (x.double().repeat_interleave(H // G, dim=1) for x in (k, v))  # (B, H, S, D)
    scores = torch.einsum("bhd,bhsd->bhs", q.double(), kh) / D ** 0.5
    ref = torch.einsum("bhs,bhsd->bhd", scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1), vh)
    for programs in (1, 7, 528):  # one split per row and kv head ... more splits than blocks (empty ones)
        out = kernels.decode_attention_triton(q, k, v, mask, D ** -0.5, programs=programs)
        assert out.shape == (B, H, D) and rel_err(out, ref) <= TOL, programs
