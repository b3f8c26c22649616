"""HypeNet for transformers (written by minihalo.export; needs only torch and transformers).

A decoder of pre-norm blocks, h = x + Mixer(RMSNorm(x)); x' = h + MLP(RMSNorm(h)), whose mixer is per layer
(config.layer_types) either
- "full_attention": softmax attention with GQA; in a HypeNet NoPE (no RoPE) with the query scaled by
  s_t = log_a(t + a) at the 0-based position t, and a sigmoid output gate: y = (o * sigmoid(x Wg)) Wo;
- "linear_attention": Lightning attention, an RNN with a fixed decay gamma_h per head,
  S_t = gamma_h S_{t-1} + k_t^T v_t, o_t = q_t S_t / sqrt(D), with RoPE and RMSNorm on q and k, and
  y = (RMSNorm_{H*D}(o) * sigmoid(x Wz)) Wo.

Padding: rows may be left-padded (attention_mask 0). A padding token has no position (positions count
real tokens only), is attended by no query, and does not enter the RNN state.

The cache (HypeNetCache) holds the keys and values of the attention layers and the (H, D, D) state of the
Lightning layers; `generate` works with it (greedy, sampling, beam search, left-padded batches).

Shapes: B batch, T tokens in this call, S cached + new tokens, H query heads, G key/value heads, D head dim.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_hypenet import HypeNetConfig

# transformers 5.x calls the cache `cache` in generate and in model outputs; 4.x `past_key_values`
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def lightning_decay(num_heads):
    """Per-head log decays g_h = -m_h, m_h the ALiBi slopes for `num_heads` heads; gamma_h = exp(g_h).
    For H a power of two m_h = 2^(-8h/H), h = 1..H; otherwise the slopes of the nearest lower power of
    two P, then every other slope of the 2P recipe. Float32 (H,): the same in every Lightning layer."""
    def slopes_power_of_2(n):
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    p = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = slopes_power_of_2(p)
    if p < num_heads:
        slopes += slopes_power_of_2(2 * p)[0::2][: num_heads - p]
    return -torch.tensor(slopes, dtype=torch.float32)


def lightning_chunk(q, k, v, g, state, chunk_size):
    """Lightning attention in its chunkwise form, in fp32 (fp64 for fp64 inputs): exact attention inside
    chunks of C tokens, the state carries everything older. Within a chunk (local positions j = 1..C):
        O = ((Q * gamma^j) S + ((Q K^T) * M) V) / sqrt(D),  M_ij = gamma^(i-j) for j <= i
        S' = gamma^C S + (K * gamma^(C-j))^T V
    q, k, v (B, T, H, D); g (H,) log decays; state (B, H, D, D) or None. Returns o (B, T, H, D) in q's
    dtype and the final state (B, H, D, D)."""
    B, T, H, D = q.shape
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    S = q.new_zeros(B, H, D, D, dtype=cdt) if state is None else state.to(cdt)  # (B, H, D, D)
    g = g.to(device=q.device, dtype=cdt)
    gh = g[None, :, None]  # (1, H, 1)
    outs = []
    for start in range(0, T, chunk_size):
        qc, kc, vc = (x[:, start:start + chunk_size].transpose(1, 2).to(cdt) for x in (q, k, v))  # (B, H, C, D)
        C = qc.shape[2]
        j = torch.arange(1, C + 1, device=q.device, dtype=cdt)  # local positions 1..C
        diff = j[:, None] - j[None, :]  # (C, C): i - j
        M = torch.where(diff >= 0, torch.exp(g[:, None, None] * diff.clamp(min=0)), 0.0)  # (H, C, C)
        intra = ((qc @ kc.transpose(-1, -2)) * M) @ vc  # (B, H, C, D)
        inter = (qc * torch.exp(gh * j)[..., None]) @ S  # (B, H, C, D): gamma^j q_j S
        outs.append((inter + intra) * D ** -0.5)
        S = torch.exp(g * C)[None, :, None, None] * S + (kc * torch.exp(gh * (C - j))[..., None]).transpose(-1, -2) @ vc
    o = torch.cat(outs, dim=2).transpose(1, 2) if outs else v.new_zeros(v.shape, dtype=cdt)  # (B, T, H, D)
    return o.to(q.dtype), S


def lightning_step(q, k, v, g, state):
    """One token of the recurrence, state (B, H, D, D) updated in place: S = gamma S + k^T v, o = q S / sqrt(D).
    q, k, v (B, H, D). Returns o (B, H, D) in q's dtype."""
    gamma = g.to(device=state.device, dtype=state.dtype).exp()[None, :, None, None]
    state.mul_(gamma).add_(k.to(state.dtype)[..., :, None] * v.to(state.dtype)[..., None, :])
    return (torch.einsum("bhk,bhkv->bhv", q.to(state.dtype), state) * q.shape[-1] ** -0.5).to(q.dtype)


def lightning_attn(q, k, v, g, state, chunk_size, impl):
    """(o, final state): minihalo's Triton kernels when minihalo is installed, the tensors are on a GPU, impl
    is "auto" or "triton" and the chunk size suits the kernels (a power of two >= 16); this file's chunkwise
    form otherwise (the same computation)."""
    triton_chunk = chunk_size >= 16 and chunk_size & (chunk_size - 1) == 0
    if q.is_cuda and impl in ("auto", "triton") and q.dtype != torch.float64 and triton_chunk:
        try:
            from minihalo.ops import lightning_attn as minihalo_lightning_attn
        except ImportError:
            pass
        else:
            return minihalo_lightning_attn(q, k, v, g, initial_state=state, output_final_state=True,
                                           chunk_size=chunk_size, impl="triton")
    return lightning_chunk(q, k, v, g, state, chunk_size)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """RoPE tables for integer positions (B, T): cos, sin (B, T, 1, D), rotate_half layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # (B, T, 1, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class HypeNetCache:
    """What decoding keeps: `layers[i]` = {"k", "v"} (B, G, S, D) for an attention layer, {"state"}
    (B, H, D, D) fp32 for a Lightning layer; `mask` (B, S) 1 = real token, 0 = padding; `next_pos` (B,)
    each row's next position."""

    def __init__(self, num_layers):
        self.layers = [dict() for _ in range(num_layers)]
        self.mask = None
        self.next_pos = None

    def get_seq_length(self, layer_idx=0):
        return 0 if self.mask is None else self.mask.shape[1]

    def __len__(self):
        return len(self.layers)

    def reorder_cache(self, beam_idx):
        """Keep the rows `beam_idx` (beam search)."""
        for layer in self.layers:
            for name, t in layer.items():
                layer[name] = t.index_select(0, beam_idx.to(t.device))
        self.mask = self.mask.index_select(0, beam_idx.to(self.mask.device))
        self.next_pos = self.next_pos.index_select(0, beam_idx.to(self.next_pos.device))


class Context:
    """What every layer needs to know about this call's tokens."""

    def __init__(self, positions, rope, token_mask, attn_mask):
        self.positions = positions  # (B, T) 0-based, padding not counted
        self.rope = rope  # cos, sin (B, T, 1, D) or None
        self.token_mask = token_mask  # (B, T) 1 = real token; None = no padding
        self.attn_mask = attn_mask  # (B, 1, T, S) bool, True = may attend; None = plain causal


class HypeNetMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HypeNetAttention(nn.Module):
    """Softmax attention with GQA; optional RoPE, q/k RMSNorm, query scale s_t, sigmoid output gate."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        H, G, D, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
        self.q_proj = nn.Linear(d, H * D, bias=c.attention_bias)
        self.k_proj = nn.Linear(d, G * D, bias=c.attention_bias)
        self.v_proj = nn.Linear(d, G * D, bias=c.attention_bias)
        self.o_proj = nn.Linear(H * D, d, bias=c.attention_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(D, c.rms_norm_eps)
            self.k_norm = RMSNorm(D, c.rms_norm_eps)
        if c.attn_output_gate:
            self.g_proj = nn.Linear(d, H * D, bias=False)

    def forward(self, x, ctx, cache):
        c = self.config
        B, T, _ = x.shape
        H, G, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = self.q_proj(x).view(B, T, H, D)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, G, D)  # (B, T, G, D)
        v = self.v_proj(x).view(B, T, G, D)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if c.attn_rope:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        if c.attn_scale_a is not None:  # s_t = log_a(t + a) at the 0-based position t; s_0 = 1
            s = torch.log(ctx.positions.float() + c.attn_scale_a) / math.log(c.attn_scale_a)  # (B, T)
            q = q * s.to(q.dtype)[:, :, None, None]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
        if cache is not None:
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)  # (B, G, S, D)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        k = k.repeat_interleave(H // G, dim=1)  # (B, H, S, D): query head h reads kv head h // (H/G)
        v = v.repeat_interleave(H // G, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.attn_mask,
                                           is_causal=ctx.attn_mask is None and T > 1)  # (B, H, T, D)
        o = o.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        if c.attn_output_gate:
            o = o * torch.sigmoid(self.g_proj(x))
        return self.o_proj(o)


class HypeNetLightning(nn.Module):
    """Lightning attention: q, k = RoPE(RMSNorm(x Wq)), RoPE(RMSNorm(x Wk)); v = x Wv;
    o = LightningAttention(q, k, v); y = (RMSNorm_{H*D}(o) * sigmoid(x Wz)) Wo."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        H, D, d = c.num_attention_heads, c.head_dim, c.hidden_size
        self.kv_heads = H if c.lin_mha else c.num_key_value_heads
        self.q_proj = nn.Linear(d, H * D, bias=c.attention_bias)
        self.k_proj = nn.Linear(d, self.kv_heads * D, bias=c.attention_bias)
        self.v_proj = nn.Linear(d, self.kv_heads * D, bias=c.attention_bias)
        self.o_proj = nn.Linear(H * D, d, bias=c.attention_bias)
        if c.lin_qk_norm:
            self.q_norm = RMSNorm(D, c.rms_norm_eps)
            self.k_norm = RMSNorm(D, c.rms_norm_eps)
        if c.lin_output_norm:
            self.o_norm = RMSNorm(H * D, c.rms_norm_eps)
        if c.lin_output_gate:
            self.z_proj = nn.Linear(d, H * D, bias=False)

    def forward(self, x, ctx, cache):
        c = self.config
        B, T, _ = x.shape
        H, D = c.num_attention_heads, c.head_dim
        q = self.q_proj(x).view(B, T, H, D)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.kv_heads, D)  # (B, T, H or G, D)
        v = self.v_proj(x).view(B, T, self.kv_heads, D)
        if c.lin_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if c.lin_rope:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        if c.lin_fp32:
            q, k, v = q.float(), k.float(), v.float()
        else:
            q, k = q.to(v.dtype), k.to(v.dtype)
        if self.kv_heads != H:
            k = k.repeat_interleave(H // self.kv_heads, dim=2)  # (B, T, H, D)
            v = v.repeat_interleave(H // self.kv_heads, dim=2)
        if ctx.token_mask is not None:  # padding must not enter the state: k_t^T v_t = 0 there
            k = k * ctx.token_mask[:, :, None, None].to(k.dtype)
        g = lightning_decay(H).to(x.device)  # (H,) fp32, never in the model's dtype
        state = None if cache is None else cache.get("state")
        if state is not None and T == 1:  # decoding: the recurrence, state updated in place
            o = lightning_step(q[:, 0], k[:, 0], v[:, 0], g, state)[:, None]  # (B, 1, H, D)
        else:
            o, state = lightning_attn(q, k, v, g, state, c.lin_chunk_size, c.lin_impl)
            if cache is not None:
                cache["state"] = state  # (B, H, D, D)
        o = o.reshape(B, T, H * D)  # (B, T, H*D)
        if c.lin_output_norm:
            o = self.o_norm(o)
        if c.lin_output_gate:
            o = o * torch.sigmoid(self.z_proj(x))
        return self.o_proj(o)


class HypeNetBlock(nn.Module):
    def __init__(self, config, layer_type):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = HypeNetAttention(config) if layer_type == "full_attention" else HypeNetLightning(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = HypeNetMLP(config)

    def forward(self, x, ctx, cache=None):
        x = x + self.mixer(self.input_layernorm(x), ctx, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class HypeNetPreTrainedModel(PreTrainedModel):
    config_class = HypeNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HypeNetBlock"]
    _is_stateful = True  # the RNN state cannot be rolled back (no assisted decoding)
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class HypeNetModel(HypeNetPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(HypeNetBlock(config, t) for t in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None,
                inputs_embeds=None, **kwargs):
        """attention_mask (B, S) or (B, T): 1 = token, 0 = padding; its last T columns are this call's.
        Positions count real tokens: a row's first real token is at 0 whatever padding precedes it."""
        c = self.config
        cache = kwargs.pop("cache", None) if past_key_values is None else past_key_values
        if cache is not None and not isinstance(cache, HypeNetCache):
            raise TypeError(f"HypeNet keeps attention K/V and RNN states in a HypeNetCache; got a "
                            f"{type(cache).__name__}. Pass past_key_values=None to start a new one")
        use_cache = (c.use_cache and not self.training) if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = HypeNetCache(c.num_hidden_layers)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        B, T = x.shape[:2]
        dev = x.device
        new_mask = torch.ones(B, T, dtype=torch.long, device=dev) if attention_mask is None \
            else attention_mask[:, -T:].to(device=dev, dtype=torch.long)  # (B, T)
        past = 0 if cache is None else cache.get_seq_length()
        offset = torch.zeros(B, dtype=torch.long, device=dev) if past == 0 else cache.next_pos
        positions = (offset[:, None] + new_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        mask = new_mask if past == 0 else torch.cat([cache.mask, new_mask], dim=1)  # (B, S)
        if cache is not None:
            cache.mask, cache.next_pos = mask, offset + new_mask.sum(-1)
        padded = not bool(mask.all())
        if padded or past > 0:  # query i (absolute past + i) sees real keys j <= it, and itself
            i = torch.arange(T, device=dev)[:, None] + past
            j = torch.arange(past + T, device=dev)[None, :]
            attn_mask = ((j <= i)[None] & mask.bool()[:, None, :]) | (j == i)[None]  # (B, T, S)
            attn_mask = attn_mask[:, None]  # (B, 1, T, S)
        else:
            attn_mask = None
        uses_rope = (c.attn_rope and "full_attention" in c.layer_types) or \
                    (c.lin_rope and "linear_attention" in c.layer_types)
        rope = rope_cos_sin(positions, c.head_dim, c.rope_theta, x.dtype) if uses_rope else None
        ctx = Context(positions, rope, new_mask if bool((new_mask == 0).any()) else None, attn_mask)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx, layer_cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), **{CACHE_FIELD: cache})


class HypeNetForCausalLM(HypeNetPreTrainedModel, GenerationMixin):
    # transformers 5 maps each tied parameter to its source; 4.x lists them
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} if TRANSFORMERS_5 else ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = HypeNetModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # generate must not make a DynamicCache: forward starts a HypeNetCache

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None, labels=None,
                logits_to_keep=0, inputs_embeds=None, num_items_in_batch=None, **kwargs):
        """Logits (B, T', V) of the positions `logits_to_keep` (an int N = the last N, 0 = all; or a slice
        or index tensor). With `labels` (B, T), the loss: next-token cross-entropy of logits[:, t] against
        labels[:, t + 1], -100 ignored; the mean over labelled tokens (or the sum / num_items_in_batch)."""
        out = self.model(input_ids, attention_mask, past_key_values, use_cache, inputs_embeds, **kwargs)
        if isinstance(logits_to_keep, int):
            logits_to_keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.lm_head(out.last_hidden_state[:, logits_to_keep])  # (B, T', V)
        loss = None
        if labels is not None:
            shift = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # (B*(T-1), V)
            target = labels[:, 1:].to(logits.device).reshape(-1)
            if num_items_in_batch is None:
                loss = F.cross_entropy(shift, target, ignore_index=-100)
            else:
                loss = F.cross_entropy(shift, target, ignore_index=-100, reduction="sum") / num_items_in_batch
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(out, CACHE_FIELD)})

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, logits_to_keep=None, **kwargs):
        """The tokens the cache has not seen yet, with the whole attention mask (generate extends it)."""
        cache = kwargs.get("cache") if past_key_values is None else past_key_values
        past = 0 if cache is None else cache.get_seq_length()
        inputs = {"attention_mask": attention_mask, "past_key_values": cache, "use_cache": use_cache}
        if inputs_embeds is not None and past == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, past:]
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs

    def _reorder_cache(self, past_key_values, beam_idx):
        past_key_values.reorder_cache(beam_idx)
        return past_key_values
