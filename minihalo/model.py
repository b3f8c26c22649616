"""HybridLM: one decoder class for both a Transformer teacher and a HypeNet hybrid.

Each layer is pre-norm (docs/method.md §1): h = x + Mixer(RMSNorm(x)); x' = h + MLP(RMSNorm(h)). The mixer
is either softmax attention (GQA, docs/method.md §1 / §3.2) or Lightning attention (an RNN, docs/method.md §3.1),
chosen per layer by `config.layer_types`. A Qwen3 / Llama teacher is this class with every layer
"attention" and RoPE on; a HypeNet is the same class with the HyPE layout (RoPE in the RNN
layers, NoPE plus the query scale s_t in the attention layers). Conversion (minihalo.convert)
only swaps mixers and copies weights.

Inference: `forward(..., logits_to_keep=)` computes only the logits asked for; a `Cache` holds K/V and RNN
states; `prefill` feeds a prompt in chunks; `pack_projections` lays each group of input projections in one
buffer (one matmul per group when decoding); `generate` decodes. The caches, the one-token attention over a
static cache, the CUDA-graph step and generation itself are in minihalo.decoding.

Shapes: B batch, T time (tokens in this call), S cached + new tokens, d model width,
H query heads, G key/value heads (GQA), D head dim, V vocabulary.
"""
import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from minihalo.decoding import Cache, decode_attention, generate, padded_causal_mask, store_kv
from minihalo.ops import IMPLS, lightning_attn, lightning_decay, lightning_step

MIXERS = ("attention", "lightning")
# SDPA kernels for a one-token query (a decoding step of the dynamic cache). cuDNN is left out: it builds an
# execution plan for every new key length, ~50 ms of host time per call when the cache grows by a token each
# step (measured on an H200 by minihalo.bench_e2e). For longer queries PyTorch's own choice stands: cuDNN
# is there the fastest kernel (2x flash at 8K tokens, same measurement). Steps on a static cache do not
# use SDPA at all (decode_attention).
ONE_TOKEN_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class HybridConfig:
    vocab_size: int = 256
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    layer_types: list = field(default_factory=list)  # "attention" | "lightning" per layer; [] = all attention
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # biases on q/k/v/o projections (Qwen3 and Llama: off)
    max_position_embeddings: int = 32768  # the training length; informational
    eos_token_id: Optional[int] = None
    # softmax-attention layers (docs/method.md §1, §3.2)
    qk_norm: bool = True  # Qwen3: True, Llama: False
    attn_rope: bool = True  # False = NoPE (HyPE)
    attn_output_gate: bool = False  # y = (o ⊙ sigmoid(x Wg)) Wo
    attn_scale_a: Optional[float] = None  # HyPE query scale s_t = log_a(t + a); None = off
    # Lightning (RNN) layers (docs/method.md §3.1)
    lin_rope: bool = True
    lin_qk_norm: bool = True
    lin_mha: bool = True  # K/V with H heads (GQA→MHA); False keeps G heads, shared per group
    lin_output_norm: bool = True  # RMSNorm over the full H*D width
    lin_output_gate: bool = True  # sigmoid(x Wz)
    lin_chunk_size: int = 64
    lin_fp32: bool = False  # q, k, v enter the Lightning op in fp32 (else the compute dtype: bf16 under autocast)
    lin_impl: str = "auto"  # see minihalo.ops.lightning_attn

    def __post_init__(self):
        if not self.layer_types:
            self.layer_types = ["attention"] * self.num_layers
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries; num_layers is {self.num_layers}")
        bad = sorted(set(self.layer_types) - set(MIXERS))
        if bad:
            raise ValueError(f"unknown layer types {bad}; expected entries of {MIXERS}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if not isinstance(self.lin_chunk_size, int) or self.lin_chunk_size < 1:
            raise ValueError(f"lin_chunk_size must be a positive int (tokens per chunk of the Lightning layers, "
                             f"e.g. 64); got {self.lin_chunk_size!r}")
        if self.lin_impl not in IMPLS:
            raise ValueError(f"unknown lin_impl {self.lin_impl!r}; expected one of {IMPLS}")

    def cache_bytes(self, context_len, batch_size=1, dtype=torch.bfloat16):
        """Decoding memory: KV bytes per token of the attention layers (in `dtype`), the constant
        fp32 state of the Lightning layers, and the total at `context_len` tokens (docs/method.md §5)."""
        n_attn = self.layer_types.count("attention")
        elem = torch.empty((), dtype=dtype).element_size()
        kv_per_token = batch_size * n_attn * 2 * self.num_kv_heads * self.head_dim * elem
        rnn_state = batch_size * (self.num_layers - n_attn) * self.num_heads * self.head_dim ** 2 * 4
        return {"kv_bytes_per_token": kv_per_token, "rnn_state_bytes": rnn_state,
                "total_bytes": kv_per_token * context_len + rnn_state}

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown HybridConfig fields {unknown}")
        return cls(**d)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, weight applied in the input dtype (as Qwen3 and Llama do)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # F.rms_norm normalizes in fp32 and returns x's dtype (one fused kernel on CUDA)
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """RoPE tables for integer positions (B, T): cos, sin of shape (B, T, 1, D), rotate_half layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)  # (D/2,)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # (B, T, 1, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x (B, T, H, D) rotated by position: x cos + rotate_half(x) sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def project(x, linears, packed):
    """[m(x) for m in linears]: the projections of one input. With `packed`, the linears' weights stacked in
    one buffer (HybridLM.pack_projections), and no gradient recorded, one matmul reads them all. A decoding
    step multiplies one vector per row by each matrix: the time is that of reading the weights, and one read
    of 32 MB runs much closer to the memory bandwidth than four reads of 8 MB."""
    if packed is None or torch.is_grad_enabled():
        return [m(x) for m in linears]
    return F.linear(x, packed).split([m.out_features for m in linears], dim=-1)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.packed = None  # see HybridLM.pack_projections

    def in_projections(self):
        return [self.gate_proj, self.up_proj]

    def forward(self, x):
        gate, up = project(x, self.in_projections(), self.packed)
        return self.down_proj(F.silu(gate) * up)


class Attention(nn.Module):
    """Causal softmax attention with GQA (docs/method.md §1), optionally the HyPE layer of docs/method.md §3.2:
    NoPE, query scale s_t = ln(t + a) / ln(a), and a sigmoid output gate."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H, G, D, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(d, H * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, G * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, G * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * D, d, bias=cfg.attention_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        if cfg.attn_output_gate:
            self.g_proj = nn.Linear(d, H * D, bias=False)
        self.packed = None  # see HybridLM.pack_projections

    def in_projections(self):
        return [self.q_proj, self.k_proj, self.v_proj] + ([self.g_proj] if self.cfg.attn_output_gate else [])

    def forward(self, x, ctx, cache):
        cfg = self.cfg
        B, T, _ = x.shape
        H, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, k, v, *gate = project(x, self.in_projections(), self.packed)  # gate: [x Wg] or []
        q = q.view(B, T, H, D)  # (B, T, H, D)
        k = k.view(B, T, G, D)  # (B, T, G, D)
        v = v.view(B, T, G, D)  # (B, T, G, D)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.attn_rope:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        if cfg.attn_scale_a is not None:  # s_t = log_a(t + a), t = 0-based position; s_0 = 1
            a = cfg.attn_scale_a
            s = torch.log(ctx.positions.float() + a) / math.log(a)  # (B, T)
            q = q * s.to(q.dtype)[:, :, None, None]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
        if cache is not None:
            k, v = store_kv(cache, k, v, ctx.cache_pos)  # (B, G, S, D): every key this call attends to
        if isinstance(ctx.cache_pos, torch.Tensor):  # a one-token step over a whole static buffer
            o = decode_attention(q, k, v, ctx.attn_mask)  # (B, H, 1, D)
        else:  # GQA inside the kernel (enable_gqa): query head h reads kv head h // (H/G), no copy of K/V
            with sdpa_kernel(ONE_TOKEN_BACKENDS) if T == 1 else contextlib.nullcontext():
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.attn_mask,
                                                   is_causal=ctx.attn_mask is None and T > 1, enable_gqa=True)
        o = o.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        if cfg.attn_output_gate:
            o = o * torch.sigmoid(gate[0])
        return self.o_proj(o)


class Lightning(nn.Module):
    """Lightning attention layer of HypeNet (docs/method.md §3.1):
    q, k = RoPE(RMSNorm_D(x Wq)), RoPE(RMSNorm_D(x Wk)); v = x Wv;
    o = LightningAttention(q, k, v);  y = (RMSNorm_{H*D}(o) ⊙ sigmoid(x Wz)) Wo."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H, D, d = cfg.num_heads, cfg.head_dim, cfg.hidden_size
        self.kv_heads = H if cfg.lin_mha else cfg.num_kv_heads
        self.q_proj = nn.Linear(d, H * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, self.kv_heads * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, self.kv_heads * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * D, d, bias=cfg.attention_bias)
        if cfg.lin_qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        if cfg.lin_output_norm:
            self.o_norm = RMSNorm(H * D, cfg.rms_norm_eps)
        if cfg.lin_output_gate:
            self.z_proj = nn.Linear(d, H * D, bias=False)
        self.packed = None  # see HybridLM.pack_projections
        # Fixed per-head log decays, the same in every layer (docs/method.md §2): a buffer that follows the
        # model's device but not its dtype (see _apply), and is not saved (it is a function of H).
        self.register_buffer("g_gamma", lightning_decay(H), persistent=False)

    def _apply(self, fn, recurse=True):
        """model.to(bfloat16) must not round the decays: g_gamma stays fp32 whatever `fn` casts to."""
        super()._apply(fn, recurse)
        self.g_gamma = lightning_decay(self.cfg.num_heads).to(self.g_gamma.device)
        return self

    def in_projections(self):
        return [self.q_proj, self.k_proj, self.v_proj] + ([self.z_proj] if self.cfg.lin_output_gate else [])

    def forward(self, x, ctx, cache):
        cfg = self.cfg
        B, T, _ = x.shape
        H, D = cfg.num_heads, cfg.head_dim
        q, k, v, *gate = project(x, self.in_projections(), self.packed)  # gate: [x Wz] or []
        q = q.view(B, T, H, D)  # (B, T, H, D)
        k = k.view(B, T, self.kv_heads, D)  # (B, T, H or G, D)
        v = v.view(B, T, self.kv_heads, D)
        if cfg.lin_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.lin_rope:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        if cfg.lin_fp32:  # the state is fp32 either way; this also keeps q, k, v and the dots in fp32
            q, k, v = q.float(), k.float(), v.float()
        else:  # under bf16 autocast the fp32 norm weights make q, k fp32 while v is bf16
            q, k = q.to(v.dtype), k.to(v.dtype)
        if self.kv_heads != H:
            k = k.repeat_interleave(H // self.kv_heads, dim=2)  # (B, T, H, D)
            v = v.repeat_interleave(H // self.kv_heads, dim=2)
        if ctx.token_mask is not None:  # padding must not enter the state: k_t^T v_t = 0 there
            k = k * ctx.token_mask[:, :, None, None].to(k.dtype)
        state = None if cache is None else cache.get("state")
        if state is not None and T == 1:  # decode: the recurrent form, state updated in place
            o = lightning_step(q[:, 0], k[:, 0], v[:, 0], self.g_gamma, state, impl=cfg.lin_impl)[:, None]
        else:  # training / prefill: the chunked form
            o, new_state = lightning_attn(q, k, v, self.g_gamma, initial_state=state, output_final_state=True,
                                          chunk_size=cfg.lin_chunk_size, impl=cfg.lin_impl)
            if state is not None:
                state.copy_(new_state)  # in place: a captured decoding step keeps reading this tensor
            elif cache is not None:
                cache["state"] = new_state  # (B, H, D, D) fp32
        o = o.reshape(B, T, H * D)  # (B, T, H*D)
        if cfg.lin_output_norm:
            o = self.o_norm(o)
        if cfg.lin_output_gate:
            o = o * torch.sigmoid(gate[0])
        return self.o_proj(o)


class Block(nn.Module):
    def __init__(self, cfg, layer_type):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mixer = Attention(cfg) if layer_type == "attention" else Lightning(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, ctx, cache=None):
        x = x + self.mixer(self.input_layernorm(x), ctx, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class Context:
    """What every layer needs to know about this call's tokens. HybridLM.forward builds it; to call
    one mixer alone, use `Context.causal`: `layer.mixer(x, Context.causal(cfg, B, T), None)`."""
    positions: torch.Tensor  # (B, T) 0-based token positions, padding excluded
    rope: Optional[tuple]  # cos, sin (B, T, 1, D), or None when no layer uses RoPE
    token_mask: Optional[torch.Tensor]  # (B, T) 1 = real token, 0 = padding; None = no padding
    # (B, 1, T, S) bool, True = may attend; a CausalBias (causal with the queries at the end of the keys);
    # or None = plain causal over this call's tokens
    attn_mask: Optional[object]
    # Where this call's K/V go in a cache (see store_kv): None = appended (dynamic cache), an int =
    # written from that index on (static cache), a (1,) device tensor = the index of a one-token step
    cache_pos: Optional[object] = None

    @classmethod
    def causal(cls, cfg, batch_size, seq_len, device=None, dtype=torch.float32):
        """An unpadded, uncached call: positions 0..T-1, plain causal attention."""
        positions = torch.arange(seq_len, device=device).expand(batch_size, seq_len)  # (B, T)
        return cls(positions, rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, dtype), None, None)


class HybridLM(nn.Module):
    def __init__(self, config: HybridConfig):
        super().__init__()
        self.config = cfg = replace(config)  # its own copy: set_query_scale must not reach other models
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, t) for t in cfg.layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, input_ids, attention_mask=None, cache: Optional[Cache] = None, logits_to_keep=0,
                output_hidden=False):
        """input_ids (B, T) -> logits (B, T', V). `attention_mask` (B, T): 1 = token, 0 = padding
        (left padding for generation). With a `cache`, the tokens continue what it holds.
        `logits_to_keep` (transformers' name): an int N = the last N positions (0 = all), or a slice or
        index tensor over T. Only those positions go through the final norm and lm_head: at T = 32K the
        full logits of a 152K vocabulary would take 10 GB in bf16. `output_hidden=True` returns the final
        hidden states (B, T', d) instead, after the final norm and before lm_head (HALO's chunked KL)."""
        cfg = self.config
        B, T = input_ids.shape
        dev = input_ids.device
        new_mask = torch.ones(B, T, dtype=torch.long, device=dev) if attention_mask is None else attention_mask.long()
        has_padding = attention_mask is not None and not bool(new_mask.all())
        offset = torch.zeros(B, dtype=torch.long, device=dev) if cache is None or cache.next_pos is None else cache.next_pos
        positions = (offset[:, None] + new_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        if cache is None:
            attn_mask, cache_pos = (padded_causal_mask(new_mask, 0, T) if has_padding else None), None
        else:
            attn_mask, cache_pos = cache.add_tokens(new_mask, has_padding)
        uses_rope = (cfg.attn_rope and "attention" in cfg.layer_types) or (cfg.lin_rope and "lightning" in cfg.layer_types)
        x = self.embed_tokens(input_ids)  # (B, T, d)
        rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype) if uses_rope else None
        ctx = Context(positions, rope, new_mask if has_padding else None, attn_mask, cache_pos)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx, layer_cache)
        if isinstance(logits_to_keep, int):
            if logits_to_keep < 0:
                raise ValueError(f"logits_to_keep must be >= 0 (0 = every position); got {logits_to_keep}")
            logits_to_keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        h = self.norm(x[:, logits_to_keep])  # (B, T', d)
        return h if output_hidden else self.lm_head(h)  # (B, T', V)

    def _apply(self, fn, recurse=True):
        """model.to(...) gives every parameter new memory of its own: the packing (pack_projections) is undone."""
        super()._apply(fn, recurse)
        for owner in self.projection_owners():
            owner.packed = None
        return self

    def projection_owners(self):
        """The modules whose input projections can be packed: every mixer and every MLP."""
        return [m for layer in self.layers for m in (layer.mixer, layer.mlp)]

    @torch.no_grad()
    def pack_projections(self):
        """Lay the input projections of each mixer (q, k, v and the output gate) and of each MLP (gate, up)
        back to back in one buffer; the parameters become views of it, so no memory is added and training,
        optimizers and state dicts see the same parameters. Steps without gradients then read each group
        with one matmul (see `project`): what decoding needs. `model.to(...)` undoes it. Projections with
        biases stay as they are. Returns the model."""
        for owner in self.projection_owners():
            linears = owner.in_projections()
            if owner.packed is not None or any(m.bias is not None for m in linears):
                continue
            packed = torch.cat([m.weight for m in linears])  # (sum of out_features, in_features)
            row = 0
            for m in linears:  # each weight now lives in the packed buffer; its old memory is freed
                m.weight.data = packed[row:row + m.out_features]
                row += m.out_features
            owner.packed = packed
        return self

    def set_query_scale(self, a):
        """Switch the HyPE query scale s_t = log_a(t + a) of the attention layers on (a > 1) or off
        (None). It is part of the config, so save_pretrained keeps it (docs/method.md §4 step 5)."""
        if a is not None and not (isinstance(a, (int, float)) and a > 1):
            raise ValueError(f"the query scale base a must be a number > 1 (or None to switch it off); got {a!r}")
        self.config.attn_scale_a = None if a is None else float(a)
        return self

    def new_cache(self, batch_size=None, max_len=None):
        """A decoding cache: dynamic without arguments; static (buffers for `max_len` tokens of
        `batch_size` rows, on the model's device and dtype) with them. See Cache."""
        if max_len is None:
            return Cache(len(self.layers))
        w = self.embed_tokens.weight
        return Cache.static(self.config, batch_size, max_len, w.device, w.dtype)

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask=None, cache=None, chunk_size=None):
        """Feed a prompt (B, T) through `cache`, `chunk_size` tokens at a time (None = one pass), and
        return the last position's logits (B, V). Attention layers attend to the cache plus the chunk,
        Lightning layers carry their state from chunk to chunk, so the result is one pass's; only one
        chunk's activations live at a time, so the memory beyond the cache does not grow with T."""
        T = input_ids.shape[1]
        step = T if chunk_size is None else chunk_size
        if step < 1:
            raise ValueError(f"chunk_size must be a positive number of tokens (or None); got {chunk_size}")
        for start in range(0, T, step):
            mask = None if attention_mask is None else attention_mask[:, start:start + step]
            logits = self(input_ids[:, start:start + step], mask, cache=cache, logits_to_keep=1)
        return logits[:, -1]

    def generate(self, input_ids, attention_mask=None, max_new_tokens=32, **options):
        """Prompt (B, T), left-padded if rows differ, followed by up to `max_new_tokens` new tokens (B, T + N):
        greedy or nucleus sampling, a static cache, on a GPU a CUDA-graph step (minihalo.decoding.generate)."""
        return generate(self, input_ids, attention_mask, max_new_tokens, **options)

    def cache_bytes(self, context_len, batch_size=1, dtype=torch.bfloat16):
        return self.config.cache_bytes(context_len, batch_size, dtype)

    def save_pretrained(self, path):
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)
        # a packed weight is a view of a larger buffer (pack_projections); safetensors stores whole tensors
        state = {k: v.clone() if v.untyped_storage().nbytes() > v.nbytes else v.contiguous()
                 for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")  # the same tensor as the embeddings
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None):
        from safetensors.torch import load_file
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"{path!r} has no config.json; expected a folder written by HybridLM.save_pretrained")
        with open(cfg_path) as f:
            d = json.load(f)
        if "model_type" in d:
            raise ValueError(f"{path!r} is a transformers checkpoint (model_type={d['model_type']!r}); "
                             f"load it with minihalo.from_hf instead")
        state = load_file(os.path.join(path, "model.safetensors"), device=str(device))
        model = cls(HybridConfig.from_dict(d)).to(device=device, dtype=dtype or state["embed_tokens.weight"].dtype)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = set(missing) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
        if missing or unexpected:
            raise ValueError(f"checkpoint {path!r} does not match its config: missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)}")
        return model


def model_logits(out):
    """Logits from a model output: a tensor (minihalo), an object with `.logits` (transformers), or a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")
