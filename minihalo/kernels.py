"""Triton kernels: Lightning Attention (docs/method.md §2; chunked forward, backward, decode step) and decode attention.

Everything here computes the chunkwise form of docs/method.md §2. For one head, chunk n, local positions
j = 1..C (C = chunk size), Lambda_j = gamma^j and M_C[i, j] = gamma^(i-j) for i >= j else 0:

    O_[n] = scale * ((Q_[n] ⊙ Lambda) S_[n-1] + ((Q_[n] K_[n]^T) ⊙ M_C) V_[n])      (output)
    S_[n] = gamma^C S_[n-1] + (K_[n] ⊙ gamma^(C-j))^T V_[n]                         (state)

One kernel, `_lightning_scan_kernel`, does all of the heavy work. Each program owns one
(batch, head) and one block of BV value columns, keeps its slice of the state (K x BV, fp32) in
registers and walks the chunks in order: load a chunk of q, k, v; write that chunk's output; fold
the chunk into the state. q, k, v are read once and o written once, so the forward moves the
fewest bytes possible (the memory floor). The chunks of a sequence are walked one after another,
so the parallelism is B * H * (V / BV) programs: enough at B * H >= 64 on an H100, too little for
a single short batch (see notebooks/02_triton_kernel.ipynb for the trade-off against designs that
store every chunk's state and compute outputs fully in parallel, as flash-linear-attention does).

The backward needs no new kernel. Linear attention is bilinear, and each gradient is again a
Lightning scan with the roles of the tensors swapped (dO the output gradient, R = reversed time):

    dq_t = scale * sum_{s<=t} gamma^(t-s) (dO_t . v_s) k_s   -> scan(a=dO, b=v, c=k)           (+ initial state S_0^T)
    dk_t = scale * sum_{u>=t} gamma^(u-t) (v_t . dO_u) q_u   -> scan(a=v, b=dO, c=q, reverse)
    dv_t = scale * sum_{u>=t} gamma^(u-t) (k_t . q_u) dO_u   -> scan(a=k, b=q, c=dO, reverse)

where scan(a, b, c) computes out_t = scale * a_t · sum_{s<=t} gamma^(t-s) b_s^T c_s, exactly the
forward with (q, k, v) = (a, b, c). The dv scan's final state gives the initial state's gradient.

The decode step (`_lightning_step_kernel`) is the recurrent form for one token, in place.

One kernel serves the softmax-attention layers: `_decode_attention_kernel`, one query token per row over a
KV cache (a decoding step). Read once, the cache is the whole cost, so the keys are split across the SMs
(flash-decoding) and each program reads its keys for all the query heads of a GQA group at once.

Shapes: B batch, T time, H heads, K key/query head dim, V value head dim (usually K = V = D).
q, k: (B, T, H, K); v, o: (B, T, H, V); g_gamma: (H,) log decays <= 0; states (B, H, K, V) fp32.

Precision: dot products take inputs in the input dtype and accumulate in fp32; the state is fp32
and is rounded to the input dtype only as the operand of a dot (like fla). fp32 inputs use
input_precision="ieee" (true fp32, not tf32). On CPU the kernels run under Triton's interpreter
(TRITON_INTERPRET=1), in fp32 or fp16; bf16 is refused there because the interpreter's bf16
tl.dot returns wrong values.
"""
import contextlib
import os

import torch

if not torch.cuda.is_available():
    # Triton chooses interpreted or compiled mode when a kernel is *defined* (below), from this
    # variable. Without a GPU only the interpreter can run them, so turn it on unless the user
    # already decided. (Tests and notebooks set it themselves before importing minihalo.)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


# ---------------------------------------------------------------------------------------------
# The scan kernel: forward pass, and (with roles swapped) every gradient.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _lightning_scan_kernel(
    A, Bm, C, OUT,          # a, b: (batch, T, H, DK); c, out: (batch, T, H, DV); all contiguous
    S_INIT, S_FINAL,        # initial state (batch, H, DK, DV) with strides below; final state, contiguous fp32
    G,                      # (H,) fp32 log decays g = log(gamma) <= 0
    scale,                  # output scale (1/sqrt(D) by default)
    T, H, DK, DV,           # sequence length, heads, the true head dims (BK, BV may be larger: padding)
    s_init_b, s_init_h, s_init_k, s_init_v,  # strides of S_INIT (lets the backward pass S_0^T without a copy)
    CHUNK: tl.constexpr,    # C, tokens per chunk (power of two >= 16)
    BK: tl.constexpr,       # DK rounded up to a power of two >= 16: the whole key dim in one block
    BV: tl.constexpr,       # value columns per program (power of two >= 16)
    REVERSE: tl.constexpr,  # walk time backwards (t -> T-1-t): used by the dk and dv scans
    HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, else "tf32" (ignored for fp16/bf16 inputs)
):
    """out_t = scale * a_t · S_t with S_t = gamma S_{t-1} + b_t^T c_t, chunk by chunk (docs/method.md §2.3).

    Program (i_v, i_bh) computes out[batch, :, head, i_v*BV : (i_v+1)*BV] and the matching
    columns of the state. Every decay exponent below is g times a count >= 0, so <= 0: no
    overflow for any T.
    """
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H

    offs_c = tl.arange(0, CHUNK)              # local position in the chunk; the method's j is offs_c + 1
    offs_k = tl.arange(0, BK)                 # key dim (the state's rows)
    offs_v = i_v * BV + tl.arange(0, BV)      # this program's value columns
    mask_k = offs_k < DK
    mask_v = offs_v < DV

    g = tl.load(G + i_h).to(tl.float32)
    # Decays that are the same for every chunk (docs/method.md §2.3):
    #   M_C[i, j] = gamma^(i-j) for i >= j else 0    (C, C)  within-chunk causal decay mask
    #   Lambda_j  = gamma^j                            (C,)   decay of the carried state S_[n-1] to position j
    diff = offs_c[:, None] - offs_c[None, :]
    decay_mask = tl.where(diff >= 0, tl.exp(g * tl.maximum(diff, 0).to(tl.float32)), 0.0)  # (C, C)
    decay_q = tl.exp(g * (offs_c + 1).to(tl.float32))                                      # (C,)

    # Pointers to this (batch, head): a token's row is H * D elements after the previous one.
    # 64-bit offsets: at T = 1M, H = 16, D = 128 a tensor already has 2^31 elements.
    row_ab = H * DK
    row_cv = H * DV
    a_bh = A + i_b.to(tl.int64) * T * row_ab + i_h * DK
    b_bh = Bm + i_b.to(tl.int64) * T * row_ab + i_h * DK
    c_bh = C + i_b.to(tl.int64) * T * row_cv + i_h * DV
    o_bh = OUT + i_b.to(tl.int64) * T * row_cv + i_h * DV

    # The state slice S[:, i_v*BV : (i_v+1)*BV], (BK, BV) fp32, lives in registers throughout.
    if HAS_INIT:
        s_ptrs = S_INIT + i_b * s_init_b + i_h * s_init_h + offs_k[:, None] * s_init_k + offs_v[None, :] * s_init_v
        S = tl.load(s_ptrs, mask=mask_k[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BK, BV), dtype=tl.float32)

    for n in range(0, tl.cdiv(T, CHUNK)):
        # ---- load chunk n: rows pos = n*C + j of the scan, i.e. token t = pos (or T-1-pos) ----
        pos = n * CHUNK + offs_c                       # (C,)
        mask_t = pos < T
        if REVERSE:
            t = (T - 1 - pos).to(tl.int64)
        else:
            t = pos.to(tl.int64)
        m_ak = mask_t[:, None] & mask_k[None, :]
        m_cv = mask_t[:, None] & mask_v[None, :]
        a = tl.load(a_bh + t[:, None] * row_ab + offs_k[None, :], mask=m_ak, other=0.0)   # (C, BK)  Q_[n]
        b = tl.load(b_bh + t[:, None] * row_ab + offs_k[None, :], mask=m_ak, other=0.0)   # (C, BK)  K_[n]
        c = tl.load(c_bh + t[:, None] * row_cv + offs_v[None, :], mask=m_cv, other=0.0)   # (C, BV)  V_[n]

        # ---- output: O_[n] = scale * ((Q_[n] K_[n]^T ⊙ M_C) V_[n] + (Q_[n] ⊙ Lambda) S_[n-1]) ----
        scores = tl.dot(a, tl.trans(b), input_precision=PRECISION) * decay_mask           # (C, C) fp32
        o = tl.dot(scores.to(c.dtype), c, input_precision=PRECISION)                      # (C, BV) intra-chunk
        # (Q ⊙ Lambda) S = Lambda ⊙ (Q S): scale the rows after the product, q stays as loaded
        o += tl.dot(a, S.to(a.dtype), input_precision=PRECISION) * decay_q[:, None]       # (C, BV) from the past
        tl.store(o_bh + t[:, None] * row_cv + offs_v[None, :], (scale * o).to(OUT.dtype.element_ty), mask=m_cv)

        # ---- state: S_[n] = gamma^L S_[n-1] + (K_[n] ⊙ gamma^(L-j))^T V_[n] ----
        # L = C except for a partial last chunk; rows j > L are padding (b = c = 0 there).
        # The row decay is applied to V_[n] instead of K_[n] (the same product, since it scales
        # row j of both): the (C, BV) tile is smaller than the (C, BK) one, and K_[n]^T can go
        # into the dot straight from where it was loaded.
        L = tl.minimum(T - n * CHUNK, CHUNK)
        decay_k = tl.where(offs_c < L, tl.exp(g * tl.maximum(L - 1 - offs_c, 0).to(tl.float32)), 0.0)  # (C,) gamma^(L-j)
        c_decayed = (c * decay_k[:, None]).to(c.dtype)                                    # (C, BV)
        S = S * tl.exp(g * L.to(tl.float32)) + tl.dot(tl.trans(b), c_decayed, input_precision=PRECISION)

    if STORE_FINAL:
        f_ptrs = S_FINAL + i_bh.to(tl.int64) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
        tl.store(f_ptrs, S, mask=mask_k[:, None] & mask_v[None, :])


# ---------------------------------------------------------------------------------------------
# The decode step: one token, recurrent form (docs/method.md §2 form 1), state updated in place.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _lightning_step_kernel(
    Q, K, V, G, STATE, OUT,   # q, k: (B, H, DK); v, out: (B, H, DV); state (B, H, DK, DV) fp32; all contiguous
    scale, H, DK, DV,
    BK: tl.constexpr, BV: tl.constexpr,
):
    """S <- gamma S + k^T v;  o = scale * q S.  Program (i_v, i_bh) owns S[:, i_v*BV : (i_v+1)*BV].

    A pure memory stream: each state element is read once and written once.
    """
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k = offs_k < DK
    mask_v = offs_v < DV

    gamma = tl.exp(tl.load(G + i_bh % H).to(tl.float32))
    q = tl.load(Q + i_bh * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32)   # (BK,)
    k = tl.load(K + i_bh * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32)   # (BK,)
    v = tl.load(V + i_bh * DV + offs_v, mask=mask_v, other=0.0).to(tl.float32)   # (BV,)
    s_ptrs = STATE + i_bh.to(tl.int64) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    m_s = mask_k[:, None] & mask_v[None, :]
    S = tl.load(s_ptrs, mask=m_s, other=0.0)                                      # (BK, BV) fp32
    S = gamma * S + k[:, None] * v[None, :]                                       # S_t = gamma S_{t-1} + k_t^T v_t
    tl.store(s_ptrs, S, mask=m_s)
    o = scale * tl.sum(q[:, None] * S, axis=0)                                    # o_t = scale * q_t S_t, (BV,)
    tl.store(OUT + i_bh * DV + offs_v, o.to(OUT.dtype.element_ty), mask=mask_v)


# ---------------------------------------------------------------------------------------------
# Softmax attention of one new token over a KV cache (the decoding step of an attention layer).
# ---------------------------------------------------------------------------------------------
@triton.jit
def _decode_attention_kernel(
    Q, K, V, MASK,            # q (B, G, HG, D); k, v (B, G, S, D); mask (B, S) bool, True = attend; all contiguous
    O_PART, M_PART, L_PART,   # per split: unnormalized outputs (B, G, NS, HG, D) fp32; row maxima, sums (B, G, NS, HG)
    scale, S, G, HG, D, NS, KEYS_PER_SPLIT,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (i_split, i_bg) attends the HG query heads that share kv head g of row b to the keys of one
    split: [i_split * KEYS_PER_SPLIT, +KEYS_PER_SPLIT). It streams them in blocks of BLOCK_N keys with an
    online softmax (a running maximum m, sum l and output acc), so each key and value is read once, by
    one program, for all HG heads together. The splits are combined afterwards (decode_attention_triton)."""
    i_split = tl.program_id(0)
    i_bg = tl.program_id(1)  # b * G + g
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_h = offs_h < HG
    mask_d = offs_d < D
    q = tl.load(Q + i_bg * HG * D + offs_h[:, None] * D + offs_d[None, :], mask=mask_h[:, None] & mask_d[None, :],
                other=0.0)                                                            # (BLOCK_H, BLOCK_D)
    kv = i_bg.to(tl.int64) * S * D                                                    # this (b, g)'s keys
    mask_row = MASK + (i_bg // G).to(tl.int64) * S                                    # row b of the mask
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    start = i_split * KEYS_PER_SPLIT
    for n in range(start, tl.minimum(start + KEYS_PER_SPLIT, S), BLOCK_N):
        keys = n + offs_n
        in_range = keys < S
        k = tl.load(K + kv + keys[:, None] * D + offs_d[None, :], mask=in_range[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(V + kv + keys[:, None] * D + offs_d[None, :], mask=in_range[:, None] & mask_d[None, :], other=0.0)
        allowed = tl.load(mask_row + keys, mask=in_range, other=0) != 0
        s = (tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale).to(tl.float32)  # (BLOCK_H, BLOCK_N)
        s = tl.where(allowed[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all keys so far masked: keep exp() finite
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    part = (i_bg * NS + i_split) * HG + offs_h                                        # (BLOCK_H,) rows of the partials
    tl.store(O_PART + part[:, None] * D + offs_d[None, :], acc, mask=mask_h[:, None] & mask_d[None, :])
    tl.store(M_PART + part, m, mask=mask_h)
    tl.store(L_PART + part, l, mask=mask_h)


# ---------------------------------------------------------------------------------------------
# Launch code
# ---------------------------------------------------------------------------------------------
INTERPRETED = type(_lightning_scan_kernel).__name__ == "InterpretedFunction"
_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRETER_DTYPES = (torch.float32, torch.float16)
MAX_HEAD_DIM = 256  # the state slice (K x BV fp32) must fit in registers


def _pow2_at_least_16(n):
    return max(16, triton.next_power_of_2(n))


def _check_device_and_dtype(*tensors):
    dtype = tensors[0].dtype
    for x in tensors:
        if x.dtype != dtype:
            raise TypeError(f"q, k, v (and dO) must share one dtype; got {[t.dtype for t in tensors]}")
    if INTERPRETED:
        if dtype not in _INTERPRETER_DTYPES:
            raise TypeError(
                f"minihalo's Triton kernels run under TRITON_INTERPRET=1 (CPU) in float32 or float16 only; got {dtype}. "
                "The interpreter's bf16 tl.dot returns wrong values: cast to float32, or use impl='chunk' on CPU.")
    else:
        if not all(x.is_cuda for x in tensors):
            raise ValueError(
                "minihalo's Triton kernels need CUDA tensors (or set TRITON_INTERPRET=1 before importing minihalo "
                f"to run them on CPU); got devices {[str(t.device) for t in tensors]}. On CPU use impl='chunk'.")
        if dtype not in _GPU_DTYPES:
            raise TypeError(f"Triton kernels take float32, float16 or bfloat16; got {dtype}")


def _scan_config(DV, dtype):
    """(BV, num_warps, num_stages): a fixed block configuration, no autotuning (so nothing needs a
    GPU driver on CPU). Chosen from a sweep on an H200 at B=4, T=16K, H=16, D=128, bf16
    (notes/kernel.md): 64 value columns per program (so B*H*2 programs at D=128), one warpgroup,
    loads prefetched 3 chunks deep. fp32 tiles are twice as large, so 2 stages there; GPUs before
    Ampere have 64 KB of shared memory, so no prefetching there.
    """
    BV = min(64, _pow2_at_least_16(DV))
    num_warps = 4
    num_stages = 2 if dtype == torch.float32 else 3
    if not INTERPRETED and torch.cuda.get_device_capability()[0] < 8:
        num_stages = 1
    return BV, num_warps, num_stages


# Under the interpreter every output buffer starts as NaN ("poisoned"): an element the kernel fails to
# write then shows up. Off by default on the GPU, where filling costs a full extra write of each
# output; the benchmark's checks turn it on with `poison_outputs()`.
POISON_OUTPUTS = INTERPRETED


@contextlib.contextmanager
def poison_outputs(on=True):
    """Within the block, kernel outputs start as NaN (on=True) or uninitialized; restored on exit."""
    global POISON_OUTPUTS
    saved, POISON_OUTPUTS = POISON_OUTPUTS, on
    try:
        yield
    finally:
        POISON_OUTPUTS = saved


def new_output(shape, dtype, device):
    """An output buffer for a kernel: NaN-filled while POISON_OUTPUTS is on, else uninitialized."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def scan(a, b, c, g, scale, chunk_size, s_init=None, reverse=False, want_final=False, config=None):
    """Launch `_lightning_scan_kernel`: out_t = scale * a_t · S_t, S_t = gamma S_{t-1} + b_t^T c_t.

    a, b: (B, T, H, DK); c: (B, T, H, DV); s_init: (B, H, DK, DV) fp32 (any strides) or None.
    Returns out (B, T, H, DV) in c's dtype and the final state (B, H, DK, DV) fp32 or None.
    `config` = (BV, num_warps, num_stages) overrides the fixed choice (used by the benchmark's sweep).
    """
    Bsz, T, H, DK = a.shape
    DV = c.shape[-1]
    BK = _pow2_at_least_16(DK)
    BV, num_warps, num_stages = config or _scan_config(DV, c.dtype)
    out = new_output(c.shape, c.dtype, c.device)
    final = new_output((Bsz, H, DK, DV), torch.float32, c.device) if want_final else None
    s0 = s_init if s_init is not None else out  # unused pointer when HAS_INIT is False
    s_strides = s_init.stride() if s_init is not None else (0, 0, 0, 0)
    grid = (triton.cdiv(DV, BV), Bsz * H)
    _lightning_scan_kernel[grid](
        a, b, c, out, s0, final if want_final else out, g, scale,
        T, H, DK, DV, *s_strides,
        CHUNK=chunk_size, BK=BK, BV=BV, REVERSE=reverse,
        HAS_INIT=s_init is not None, STORE_FINAL=want_final,
        PRECISION="ieee" if c.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, final


class LightningAttnFunction(torch.autograd.Function):
    """Forward = one scan; backward = three scans (see the module docstring). No gradient for g_gamma:
    the decays are fixed ALiBi slopes (docs/method.md §2)."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, chunk_size):
        o, final = scan(q, k, v, g, scale, chunk_size, s_init=initial_state, want_final=output_final_state)
        ctx.save_for_backward(q, k, v, g, initial_state)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, s0 = ctx.saved_tensors
        scale, C = ctx.scale, ctx.chunk_size
        if do is None:  # only the final state was used
            do = torch.zeros_like(v)
        do = do.contiguous()
        need_ds0 = s0 is not None and ctx.needs_input_grad[5]
        # dq: forward-time scan of dO against (v, k); the initial state enters as S_0^T (a strided view).
        dq, _ = scan(do, v, k, g, scale, C, s_init=None if s0 is None else s0.transpose(-1, -2))
        # dk, dv: the same scan run backwards in time.
        dk, _ = scan(v, do, q, g, scale, C, reverse=True)
        dv, R = scan(k, q, do, g, scale, C, reverse=True, want_final=need_ds0)
        # R = sum_u gamma^u q_u^T dO_u; S_0 reaches o_u through gamma^(u+1): dS_0 = scale * gamma * R.
        gamma = g.exp()[None, :, None, None]                                  # (1, H, 1, 1)
        ds0 = scale * gamma * R if need_ds0 else None
        if dht is not None:
            # Gradient arriving at the final state: S_T contains gamma^(T-1-t) k_t^T v_t and gamma^T S_0.
            # Rare (truncated backprop through time), so plain PyTorch, in fp32.
            T = q.shape[1]
            w = torch.exp(g[None, :] * torch.arange(T - 1, -1, -1, device=g.device, dtype=torch.float32)[:, None])  # (T, H)
            dht = dht.float()
            dk = (dk.float() + torch.einsum("bthv,bhkv->bthk", v.float(), dht) * w[None, :, :, None]).to(dk.dtype)
            dv = (dv.float() + torch.einsum("bthk,bhkv->bthv", k.float(), dht) * w[None, :, :, None]).to(dv.dtype)
            if need_ds0:
                ds0 = ds0 + torch.exp(g * T)[None, :, None, None] * dht
        if ds0 is not None:
            ds0 = ds0.to(s0.dtype)
        return dq, dk, dv, None, None, ds0, None, None


def _check_chunk_size(chunk_size):
    if not isinstance(chunk_size, int) or chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16 for the Triton kernels (tl.dot needs it); got {chunk_size!r}")


def lightning_attn_triton(q, k, v, g_gamma, scale, initial_state=None, output_final_state=False, chunk_size=64):
    """Lightning Attention through the Triton kernels (docs/method.md §2, chunkwise). Called by
    `minihalo.ops.lightning_attn(..., impl="triton")`, which checks shapes first.

    Returns (o (B, T, H, V) in q's dtype, final state (B, H, K, V) fp32 or None). Differentiable
    in q, k, v and initial_state.
    """
    _check_device_and_dtype(q, k, v)
    _check_chunk_size(chunk_size)
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported by the Triton kernels; got K={q.shape[-1]}, V={v.shape[-1]}")
    g = g_gamma.to(device=q.device, dtype=torch.float32).contiguous()
    if initial_state is not None:
        initial_state = initial_state.to(torch.float32)
    if q.shape[1] == 0:
        o = torch.zeros_like(v)
        final = initial_state.clone() if initial_state is not None else torch.zeros(
            q.shape[0], q.shape[2], q.shape[3], v.shape[3], dtype=torch.float32, device=q.device)
        return o, (final if output_final_state else None)
    return LightningAttnFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), g, float(scale),
                                       initial_state, bool(output_final_state), chunk_size)


def lightning_step_triton(q, k, v, g_gamma, state, scale):
    """One decode step (docs/method.md §2 form 1) through `_lightning_step_kernel`; `state` updated in place.

    q, k: (B, H, K); v: (B, H, V); state: (B, H, K, V) fp32 contiguous. Returns o (B, H, V) in q's dtype.
    """
    _check_device_and_dtype(q, k, v)
    Bsz, H, DK = q.shape
    DV = v.shape[-1]
    if k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"q, k must be (B, H, K) and v (B, H, V); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if state.shape != (Bsz, H, DK, DV) or state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous float32 tensor of shape (B, H, K, V) = {(Bsz, H, DK, DV)} "
                         f"(it is updated in place); got {tuple(state.shape)} {state.dtype}, contiguous={state.is_contiguous()}")
    if max(DK, DV) > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported; got K={DK}, V={DV}")
    g = g_gamma.to(device=q.device, dtype=torch.float32).contiguous()
    o = new_output(v.shape, q.dtype, q.device)
    BK = triton.next_power_of_2(DK)
    BV = min(32, triton.next_power_of_2(DV))
    grid = (triton.cdiv(DV, BV), Bsz * H)
    _lightning_step_kernel[grid](q.contiguous(), k.contiguous(), v.contiguous(), g, state, o,
                                 float(scale), H, DK, DV, BK=BK, BV=BV, num_warps=4)
    return o


DECODE_BLOCK_N = 64  # keys per block of the decode-attention kernel


def decode_attention_triton(q, k, v, mask, scale, programs=528):
    """Softmax attention of one query token per row over a KV cache, split over the keys (flash-decoding).

    q (B, H, D); k, v (B, G, S, D) contiguous, H a multiple of G (query head h reads kv head h // (H/G));
    mask (B, S) bool, True = attend (each row must allow at least one key). Returns (B, H, D) in q's dtype.
    One program per (row, kv head, split) reads its keys once for the H/G heads of the group; the splits'
    partial softmaxes (maximum m, sum l, output acc) are then combined: o = sum_s e^(m_s - M) acc_s /
    sum_s e^(m_s - M) l_s with M = max_s m_s. About `programs` programs in all (4 per SM of an H200 by default)
    keep every SM streaming even for one row.
    """
    _check_device_and_dtype(q, k, v)
    B, H, D = q.shape
    G, S = k.shape[1], k.shape[2]
    if k.shape != (B, G, S, D) or v.shape != k.shape or H % G or mask.shape != (B, S) or mask.dtype != torch.bool:
        raise ValueError(f"need q (B, H, D), k and v (B, G, S, D) with H a multiple of G, a bool mask (B, S); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(mask.shape)} {mask.dtype}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported; got {D}")
    HG = H // G
    # the split plan is arithmetic on S only (no branch on it), so a compiled step can keep S symbolic;
    # splits past the last key stay empty and drop out in the combination (m = -inf, l = 0)
    splits = triton.cdiv(programs, B * G)
    keys_per_split = triton.cdiv(triton.cdiv(S, splits), DECODE_BLOCK_N) * DECODE_BLOCK_N
    o_part = new_output((B, G, splits, HG, D), torch.float32, q.device)
    m_part = new_output((B, G, splits, HG), torch.float32, q.device)
    l_part = new_output((B, G, splits, HG), torch.float32, q.device)
    _decode_attention_kernel[(splits, B * G)](
        q.contiguous(), k.contiguous(), v.contiguous(), mask.contiguous(), o_part, m_part, l_part,
        float(scale), S, G, HG, D, splits, keys_per_split,
        BLOCK_H=_pow2_at_least_16(HG), BLOCK_N=DECODE_BLOCK_N, BLOCK_D=_pow2_at_least_16(D),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, num_stages=3)
    w = torch.exp(m_part - m_part.amax(2, keepdim=True))  # (B, G, splits, HG): a split with no allowed key gets 0
    o = (w[..., None] * o_part).sum(2) / (w * l_part).sum(2)[..., None]  # (B, G, HG, D)
    return o.to(q.dtype).view(B, H, D)
