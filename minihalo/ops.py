"""Lightning Attention: linear attention with a fixed per-head decay (docs/method.md §2).

One function, `lightning_attn`, with several implementations that compute the same thing:

    S_t = gamma_h * S_{t-1} + k_t^T v_t          (state, fp32, one D x D matrix per head)
    o_t = scale * q_t S_t

- "recurrent": the per-token loop above. Obviously right; the spec.
- "parallel":  O = scale * ((Q K^T) ⊙ M) V with M_ts = gamma^(t-s) for s <= t. O(T^2): teaching only.
- "chunk":     the chunkwise form (docs/method.md §2.3): exact attention inside chunks of C tokens,
               the state carries everything older. O(T C D + T D^2) time, O(T D + D^2) memory.
- "triton":    the same chunkwise algorithm as Triton kernels (minihalo.kernels).
- "auto":      "triton" on CUDA tensors, "chunk" elsewhere.

`lightning_step` is the one-token decode step (recurrent form, state updated in place).

Shapes: B batch, T time, H heads, D head dim (K for q/k, V for v when they differ).
q, k: (B, T, H, K); v: (B, T, H, V); g_gamma: (H,) log decays (<= 0); state: (B, H, K, V).
"""
import math

import torch

IMPLS = ("recurrent", "parallel", "chunk", "triton", "auto")


def lightning_decay(num_heads: int) -> torch.Tensor:
    """Per-head log decays g_h = -m_h, m_h the ALiBi slopes for `num_heads` heads (docs/method.md §2).

    For H a power of two m_h = 2^(-8h/H), h = 1..H. Otherwise take the slopes of the nearest
    lower power of two P, then every other slope of the 2P recipe (indices 0, 2, 4, ...).
    Returns a float32 tensor of shape (H,); gamma = exp(g).
    """
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")

    def slopes_power_of_2(n):
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    p = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = slopes_power_of_2(p)
    if p < num_heads:
        slopes += slopes_power_of_2(2 * p)[0::2][: num_heads - p]
    return -torch.tensor(slopes, dtype=torch.float32)


def rel_err(a, b) -> float:
    """Relative error ||a - b|| / ||b|| (Frobenius norms, in fp64): how every comparison in minihalo's
    tests, notebooks and benchmarks is measured."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _check_inputs(q, k, v, g_gamma, initial_state, impl):
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, T, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q and k must have the same shape (B, T, H, K) and v the shape (B, T, H, V); "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, T, H, K = q.shape
    if g_gamma.shape != (H,):
        raise ValueError(f"g_gamma must have shape (H,) = ({H},), one log decay per head; got {tuple(g_gamma.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(f"initial_state must have shape (B, H, K, V) = {(B, H, K, v.shape[-1])}; "
                         f"got {tuple(initial_state.shape)}")


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def lightning_attn(q, k, v, g_gamma, scale=None, initial_state=None, output_final_state=False,
                   chunk_size=64, impl="auto"):
    """Lightning Attention (docs/method.md §2). Same layout and arguments as fla's `chunk_simple_gla`.

    Returns `o` (B, T, H, V) in the input dtype, or `(o, final_state)` with final_state
    (B, H, K, V) in fp32 (fp64 for fp64 inputs) when `output_final_state=True`.
    """
    _check_inputs(q, k, v, g_gamma, initial_state, impl)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if impl == "auto":
        impl = "triton" if q.is_cuda else "chunk"
    if impl == "triton":
        from minihalo.kernels import lightning_attn_triton
        o, state = lightning_attn_triton(q, k, v, g_gamma, scale, initial_state, output_final_state, chunk_size)
    else:
        fn = {"recurrent": _recurrent, "parallel": _parallel, "chunk": _chunk}[impl]
        cdt = _compute_dtype(q)
        g = g_gamma.to(device=q.device, dtype=cdt)
        s0 = None if initial_state is None else initial_state.to(cdt)
        o, state = fn(q.to(cdt), k.to(cdt), v.to(cdt), g, scale, s0, chunk_size)
        o = o.to(q.dtype)
    return (o, state) if output_final_state else o


def _recurrent(q, k, v, g, scale, s0, chunk_size):
    """docs/method.md §2 form 1: one token at a time."""
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1]) if s0 is None else s0  # (B, H, K, V)
    gamma = g.exp()[None, :, None, None]  # (1, H, 1, 1)
    outs = []
    for t in range(T):
        S = gamma * S + k[:, t, :, :, None] * v[:, t, :, None, :]  # (B, H, K, V): k_t^T v_t
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))  # (B, H, V)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)  # (B, T, H, V)
    return o, S


def _parallel(q, k, v, g, scale, s0, chunk_size):
    """docs/method.md §2 form 2: O = scale * ((Q K^T) ⊙ M) V, M_ts = gamma^(t-s) (s <= t).

    An initial state enters as scale * gamma^(t+1) * q_t S_0; the final state is
    gamma^T S_0 + sum_s gamma^(T-1-s) k_s^T v_s.
    """
    B, T, H, K = q.shape
    t = torch.arange(T, device=q.device, dtype=q.dtype)
    diff = t[:, None] - t[None, :]  # (T, T): t - s
    M = torch.where(diff >= 0, torch.exp(g[:, None, None] * diff.clamp(min=0)), 0.0)  # (H, T, T)
    scores = torch.einsum("bthk,bshk->bhts", q, k) * M  # (B, H, T, T)
    o = scale * torch.einsum("bhts,bshv->bthv", scores, v)  # (B, T, H, V)
    w = torch.exp(g[:, None] * (T - 1 - t))  # (H, T): decay of token s to the end
    S = torch.einsum("bshk,hs,bshv->bhkv", k, w, v)  # (B, H, K, V)
    if s0 is not None:
        o = o + scale * torch.einsum("bthk,ht,bhkv->bthv", q, torch.exp(g[:, None] * (t + 1)), s0)
        S = S + torch.exp(g * T)[None, :, None, None] * s0
    return o, S


def _chunk(q, k, v, g, scale, s0, chunk_size):
    """docs/method.md §2 form 3, chunkwise. Walks the chunks with a running state; within chunk n
    (local positions j = 1..C):

        O_[n] = scale * ((Q_[n] ⊙ gamma^j) S_[n-1] + ((Q_[n] K_[n]^T) ⊙ M_C) V_[n])
        S_[n] = gamma^C S_[n-1] + (K_[n] ⊙ gamma^(C-j))^T V_[n]

    Every exponent is <= 0, so nothing overflows however long T is. The last chunk may be
    shorter than C. Memory: O(T D) for the outputs plus one C x C block and one D x D state.
    """
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1]) if s0 is None else s0  # (B, H, K, V)
    gh = g[None, :, None]  # (1, H, 1)
    outs = []
    for start in range(0, T, chunk_size):
        qc, kc, vc = (x[:, start:start + chunk_size].transpose(1, 2) for x in (q, k, v))  # (B, H, C, D)
        C = qc.shape[2]
        j = torch.arange(1, C + 1, device=q.device, dtype=q.dtype)  # local positions 1..C
        diff = j[:, None] - j[None, :]  # (C, C): i - j
        M = torch.where(diff >= 0, torch.exp(g[:, None, None] * diff.clamp(min=0)), 0.0)  # (H, C, C) decay mask
        intra = ((qc @ kc.transpose(-1, -2)) * M) @ vc  # (B, H, C, V)
        inter = (qc * torch.exp(gh * j)[..., None]) @ S  # (B, H, C, V): gamma^j q_j S_[n-1]
        outs.append(scale * (inter + intra))
        k_decayed = kc * torch.exp(gh * (C - j))[..., None]  # (B, H, C, K): gamma^(C-j) k_j
        S = torch.exp(g * C)[None, :, None, None] * S + k_decayed.transpose(-1, -2) @ vc  # (B, H, K, V)
    o = torch.cat(outs, dim=2).transpose(1, 2) if outs else v.new_zeros(v.shape)  # (B, T, H, V)
    return o, S


@torch.no_grad()
def lightning_step(q, k, v, g_gamma, state, scale=None, impl="auto"):
    """One decode step (docs/method.md §2 form 1) for a single new token; `state` is updated in place.

    q, k: (B, H, K); v: (B, H, V); state: (B, H, K, V) fp32. Returns o (B, H, V) in q's dtype.
    `impl` takes the names of `lightning_attn`: for one token the recurrent, parallel and chunkwise
    forms are the same PyTorch update; "triton" is the in-place kernel; "auto" picks by device.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if impl == "triton" or (impl == "auto" and q.is_cuda):
        from minihalo.kernels import lightning_step_triton
        return lightning_step_triton(q, k, v, g_gamma, state, scale)
    gamma = g_gamma.to(device=state.device, dtype=state.dtype).exp()[None, :, None, None]
    state.mul_(gamma).add_(k.to(state.dtype)[..., :, None] * v.to(state.dtype)[..., None, :])
    o = scale * torch.einsum("bhk,bhkv->bhv", q.to(state.dtype), state)
    return o.to(q.dtype)
