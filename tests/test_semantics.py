"""Each rule of the method, pinned by a from-scratch reference written from its formula.

The teacher's attention layer (docs/method.md §1), the Lightning layer (§3.1) and the HyPE attention layer
(§3.2) are written again below, a few lines each, in fp64 on one sequence, without calling minihalo's
layers. Each is compared with the mixer of a whole HybridLM forward: a forward hook records the mixer's
input and output, so the model runs as it really does (a batch, left padding, a cache filled by a prefill,
single-token steps and a multi-token chunk) while the reference sees only the row's real tokens at their
0-based positions t = 0, 1, 2, ...

The sizes make every rule visible: H = 6 query heads over G = 2 key/value heads (head order matters);
T = 13 (odd, crossing Lightning chunks of 4 and ending in a partial one); random norm weights (with norm
weights of ones RMSNorm and RoPE commute, and "QK-norm before RoPE" could not be told from "after");
weights large enough that attention is far from uniform, so the query scale s_t changes the output.

Tolerance: rel_err <= 1e-5. The model runs in fp64 but computes RMSNorm and the RoPE tables in fp32, as
Qwen3 does, which leaves about 1e-7; breaking any one rule gives errors above 1e-3.
"""
import math

import pytest
import torch

from minihalo import HybridConfig, HybridLM, to_hypenet
from minihalo.ops import rel_err

V, d, H, G, D, T = 50, 24, 6, 2, 8, 13
THETA, A = 100.0, 5.0  # RoPE base (small, so every frequency pair turns within 13 tokens); HyPE's a
TOL = 1e-5


# ---------------------------------------------------------------- the references (one sequence x: (T, d))
def rms_norm(x, w, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, t):
    """x (T, n, D) rotated by the angle t * THETA^(-2i/D) in the pairs (i, i + D/2) (rotate_half layout)."""
    half = x.shape[-1] // 2
    angle = t.double()[:, None, None] * THETA ** (-torch.arange(half, dtype=torch.float64) / half)  # (T, 1, D/2)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], dim=-1)


def heads(x, linear, n):
    return (x @ linear.weight.T).view(len(x), n, D)  # (T, n, D)


GROUP = torch.arange(H) // (H // G)  # query head h reads key/value head h // (H/G): kv0, kv0, kv0, kv1, kv1, kv1


def causal_softmax_attention(q, k, v):
    """q (T, H, D), k, v (T, G, D) -> (T, H*D): o_t = softmax_s<=t(q_t k_s / sqrt(D)) v_s, head h on kv GROUP[h]."""
    k, v = k[:, GROUP], v[:, GROUP]  # (T, H, D)
    scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(D)  # (H, T, T)
    scores = scores.masked_fill(torch.ones(len(q), len(q), dtype=torch.bool).triu(1), -math.inf)
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(len(q), H * D)


def qwen3_attention(m, x, t, use_rope=True):
    """docs/method.md §1: q, k = RoPE(RMSNorm_D(x Wq)), RoPE(RMSNorm_D(x Wk)); GQA; y = o Wo (NoPE: no RoPE)."""
    pos = rope if use_rope else (lambda x, t: x)
    q = pos(rms_norm(heads(x, m.q_proj, H), m.q_norm.weight), t)
    k = pos(rms_norm(heads(x, m.k_proj, G), m.k_norm.weight), t)
    return causal_softmax_attention(q, k, heads(x, m.v_proj, G)) @ m.o_proj.weight.T


def hype_attention(m, x, t):
    """docs/method.md §3.2: NoPE; q = s_t RMSNorm_D(x Wq), s_t = ln(t + a) / ln(a); y = (o ⊙ sigmoid(x Wg)) Wo."""
    s = torch.log(t.double() + A) / math.log(A)  # (T,)
    q = s[:, None, None] * rms_norm(heads(x, m.q_proj, H), m.q_norm.weight)
    k = rms_norm(heads(x, m.k_proj, G), m.k_norm.weight)
    o = causal_softmax_attention(q, k, heads(x, m.v_proj, G))
    return (o * torch.sigmoid(x @ m.g_proj.weight.T)) @ m.o_proj.weight.T


# ALiBi slopes for H = 6 (docs/method.md §2): those of 4 heads (2^-2, 2^-4, 2^-6, 2^-8), then every other
# slope of 8 heads from the first (2^-1, 2^-3). gamma_h = exp(-m_h).
GAMMA = torch.exp(-torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3], dtype=torch.float64))


def lightning_layer(m, x, t, kv_heads, use_rope=True):
    """docs/method.md §3.1: q, k = RoPE(RMSNorm_D(x Wq)), RoPE(RMSNorm_D(x Wk)); v = x Wv (K/V with `kv_heads`
    heads, shared by query groups when G); S_t = gamma S_{t-1} + k_t^T v_t, o_t = q_t S_t / sqrt(D);
    y = (RMSNorm_{H*D}(o) ⊙ sigmoid(x Wz)) Wo. (NoPE: no RoPE.)"""
    pos = rope if use_rope else (lambda x, t: x)
    q = pos(rms_norm(heads(x, m.q_proj, H), m.q_norm.weight), t)
    k = pos(rms_norm(heads(x, m.k_proj, kv_heads), m.k_norm.weight), t)
    v = heads(x, m.v_proj, kv_heads)
    if kv_heads == G:
        k, v = k[:, GROUP], v[:, GROUP]  # (T, H, D)
    S, o = torch.zeros(H, D, D, dtype=torch.float64), []
    for i in range(len(x)):
        S = GAMMA[:, None, None] * S + k[i, :, :, None] * v[i, :, None, :]  # (H, D, D)
        o.append(torch.einsum("hd,hde->he", q[i], S) / math.sqrt(D))
    o = rms_norm(torch.stack(o).reshape(len(x), H * D), m.o_norm.weight)
    return (o * torch.sigmoid(x @ m.z_proj.weight.T)) @ m.o_proj.weight.T


# ---------------------------------------------------------------- the model side
def random_model(layer_types, **options):
    torch.manual_seed(0)
    cfg = HybridConfig(vocab_size=V, hidden_size=d, intermediate_size=32, num_layers=len(layer_types),
                       num_heads=H, num_kv_heads=G, head_dim=D, layer_types=layer_types, rope_theta=THETA,
                       lin_chunk_size=4, **options)
    model = HybridLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return model.double().eval()


SCENARIOS = {  # name -> (tokens of padding before each row, lengths of the successive calls)
    "one_call": ([0, 0], [T]),
    "left_padded": ([0, 5], [T]),
    "cache": ([0, 5], [6, 1, 1, 1, 4]),  # a left-padded prefill, three single-token steps, a 4-token chunk
}


def mixer_runs(model, layer, scenario):
    """Run `model` as `scenario` says; return, for each row, the input (n, d) and output (n, d) of layer
    `layer`'s mixer at the row's n real tokens."""
    pads, calls = SCENARIOS[scenario]
    ids = torch.randint(0, V, (len(pads), T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    seen = []
    hook = model.layers[layer].mixer.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    try:
        cache, start = (model.new_cache() if len(calls) > 1 else None), 0
        with torch.no_grad():
            for n in calls:
                model(ids[:, start:start + n], mask[:, start:start + n], cache=cache)
                start += n
    finally:
        hook.remove()
    x, y = (torch.cat(parts, dim=1) for parts in zip(*seen))  # (B, T, d)
    return [(x[b, p:], y[b, p:]) for b, p in enumerate(pads)]


def check(model, layer, scenario, reference):
    for x, y in mixer_runs(model, layer, scenario):
        with torch.no_grad():
            ref = reference(model.layers[layer].mixer, x, torch.arange(len(x)))
        assert rel_err(y, ref) <= TOL, f"{scenario}: rel err {rel_err(y, ref):.2e}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_teacher_attention_layer(scenario):
    """docs/method.md §1: QK-norm before RoPE, GQA in repeat_interleave head order, causal softmax."""
    model = random_model(["attention", "attention"])
    check(model, 1, scenario, qwen3_attention)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_hype_attention_layer(scenario):
    """docs/method.md §3.2: NoPE, s_t = ln(t + a) / ln(a) at each token's 0-based position t (counting the
    row's real tokens only, and continuing across cached calls), a sigmoid output gate."""
    model = random_model(["lightning", "attention", "lightning"], attn_rope=False, attn_output_gate=True,
                         attn_scale_a=A)
    check(model, 1, scenario, hype_attention)


@pytest.mark.parametrize("lin_mha", [True, False])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lightning_layer(scenario, lin_mha):
    """docs/method.md §3.1: QK-norm before RoPE, RoPE in the RNN, the decayed state, the output norm over
    H*D before the sigmoid gate; K/V with H heads, or with G heads shared in repeat_interleave order."""
    model = random_model(["lightning", "attention", "lightning"], attn_rope=False, attn_output_gate=True,
                         attn_scale_a=A, lin_mha=lin_mha)
    check(model, 2, scenario, lambda m, x, t: lightning_layer(m, x, t, H if lin_mha else G))


@pytest.mark.parametrize("variant", ["hype", "all_rope", "all_nope", "attn_rope_rnn_nope"])
def test_position_encoding_layouts(variant):
    """The four layouts of the HyPE experiment (minihalo.experiments.hype, docs/method.md §3.3): in one model,
    each attention layer and each Lightning layer has RoPE exactly when its variant says so."""
    from minihalo.experiments.hype import VARIANTS
    opts = VARIANTS[variant]
    model = random_model(["attention", "lightning", "attention", "lightning"], **opts)
    for layer in (0, 2):
        check(model, layer, "left_padded", lambda m, x, t: qwen3_attention(m, x, t, opts["attn_rope"]))
    for layer in (1, 3):
        check(model, layer, "cache", lambda m, x, t: lightning_layer(m, x, t, H, opts["lin_rope"]))


def test_lin_mha_false_through_conversion():
    """to_hypenet gives each Lightning layer H K/V heads by repeating each teacher head's rows for its query
    group (lin_mha=True), or keeps the teacher's G heads and shares them in the forward (lin_mha=False).
    Both students' layers match the reference, and once their fresh gates agree they compute the same logits."""
    teacher = random_model(["attention"] * 3)
    mha, gqa = (to_hypenet(teacher, [1], lin_mha=m) for m in (True, False))
    assert gqa.layers[0].mixer.k_proj.weight.shape == (G * D, d)
    for student, kv_heads in ((mha, H), (gqa, G)):
        for layer in (0, 2):
            check(student, layer, "cache", lambda m, x, t: lightning_layer(m, x, t, kv_heads))
    with torch.no_grad():
        for a, b in zip(mha.layers, gqa.layers):  # the fresh gates (random init) made equal
            for name in ("z_proj", "g_proj"):
                if hasattr(a.mixer, name):
                    getattr(b.mixer, name).weight.copy_(getattr(a.mixer, name).weight)
        ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(2))
        assert rel_err(gqa(ids), mha(ids)) <= TOL
