"""Caches and decoding for HybridLM (minihalo.model): the K/V and RNN-state cache, the one-token attention
over a static K/V buffer, a decoding step captured as a CUDA graph, and `generate`.

`Cache` holds K/V (attention layers) and fp32 states (Lightning layers); dynamic (grows by torch.cat) or
static (buffers written in place). A static cache gives every one-token step the same shapes and addresses,
so `CUDAGraphStep` captures one step once (projections packed, layers fused by torch.compile) and replays it.
`generate` prefills the prompt (in chunks if asked) and decodes greedily or by nucleus sampling.

Shapes: B batch, T time (tokens in this call), S cached + new tokens, H query heads, G key/value heads (GQA),
D head dim, V vocabulary.
"""
import contextlib

import torch

KV_BLOCK = 1024  # a static cache's K/V length is a multiple of this: decode_attention splits the keys into blocks


def store_kv(cache, k, v, cache_pos):
    """Add this call's keys/values (B, G, T, D) to one attention layer's cache (a dict); return the keys
    and values to attend to, (B, G, S, D). `cache_pos` says how (see Context): None appends by torch.cat;
    an int p writes the static buffers at [p, p+T) in place and returns [0, p+T); a (1,) device tensor
    writes the one token at that index and returns the whole buffers (the step of a CUDA graph)."""
    if cache_pos is None:
        if "k" in cache:
            k = torch.cat([cache["k"], k], dim=2)  # (B, G, S, D)
            v = torch.cat([cache["v"], v], dim=2)
        cache["k"], cache["v"] = k, v
        return k, v
    if isinstance(cache_pos, int):
        end = cache_pos + k.shape[2]
        cache["k"][:, :, cache_pos:end] = k
        cache["v"][:, :, cache_pos:end] = v
        return cache["k"][:, :, :end], cache["v"][:, :, :end]
    cache["k"].index_copy_(2, cache_pos, k)
    cache["v"].index_copy_(2, cache_pos, v)
    return cache["k"], cache["v"]


def decode_attention(q, k, v, mask, impl="auto"):
    """Softmax attention of one new token per row over a whole K/V buffer: q (B, H, 1, D); k, v (B, G, S, D);
    mask (B, 1, 1, S) bool, True = attend. Returns (B, H, 1, D).

    impl: "triton" = minihalo.kernels.decode_attention_triton (the keys split over every SM, one pass over
    K and V in fp32 online softmax); "torch" = the two products below; "auto" = "triton" for CUDA tensors
    that are not float64.

    Two batched matmuls that read each cached key and value once (plus a few passes over the small
    (H, S) score matrix), as the decoding floor requires. GQA without a copy:
    the H/G query heads that share kv head g become H/G rows of one query matrix (a view). The second
    product sums over all S keys; split into blocks of KV_BLOCK keys, it runs as many small products in
    parallel, whose partial sums are then added (the split-K of flash-decoding). The unwritten tail of a
    static buffer is masked out; it holds zeros, so 0 * V stays 0.
    """
    B, H, _, D = q.shape
    G, S = k.shape[1], k.shape[2]
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown impl {impl!r}; expected 'auto', 'torch' or 'triton'")
    if impl == "triton" or (impl == "auto" and q.is_cuda and q.dtype != torch.float64):
        from minihalo.kernels import decode_attention_triton
        return decode_attention_triton(q[:, :, 0], k, v, mask[:, 0, 0], D ** -0.5)[:, :, None]
    qg = q.reshape(B, G, H // G, D)  # (B, G, H/G, D): row j of group g is query head g*(H/G) + j
    acc = torch.promote_types(v.dtype, torch.float32)  # softmax and sums in fp32 (fp64 for fp64 inputs)
    scores = (qg @ k.transpose(-1, -2)).to(acc) * D ** -0.5  # (B, G, H/G, S)
    p = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype)  # mask broadcasts over G, H/G
    n = S // KV_BLOCK
    p = p.view(B, G, H // G, n, KV_BLOCK).transpose(2, 3)  # (B, G, n, H/G, KV_BLOCK)
    o = (p @ v.view(B, G, n, KV_BLOCK, D)).to(acc).sum(2)  # (B, G, n, H/G, D) partial sums -> (B, G, H/G, D)
    return o.to(v.dtype).view(B, H, 1, D)


def padded_causal_mask(mask, past, T):
    """(B, 1, T, S) bool: query i (absolute index past + i) may attend key j <= it that is a real token
    (mask (B, S), 1 = real); a padding query sees itself, so no softmax row is empty."""
    i = torch.arange(T, device=mask.device)[:, None] + past  # absolute index of each query
    j = torch.arange(mask.shape[1], device=mask.device)[None, :]
    allowed = (j <= i)[None] & mask.bool()[:, None, :]  # (B, T, S)
    allowed |= (j == i)[None]
    return allowed[:, None]


def causal_lower_right(T, S):
    """torch's causal mask for T queries that are the last T of S keys (torch.nn.attention.bias, imported on first
    use: it brings torch._dynamo, which would double the time `import minihalo` takes)."""
    from torch.nn.attention.bias import causal_lower_right as lower_right
    return lower_right(T, S)


class Cache:
    """Decoding cache. `layers[i]` holds K and V (B, G, S, D) for an attention layer, an fp32 state
    (B, H, D, D) for a Lightning layer (updated in place); `mask` (B, S) marks every token seen
    (1 = real, 0 = padding), `next_pos` (B,) each row's next position, `length` = S.

    Two forms (make either with HybridLM.new_cache):
    - dynamic (`Cache(num_layers)`): K/V grow by torch.cat each call. The simplest form.
    - static (`Cache.static`, what `generate` uses): K/V and mask are buffers sized for the whole run,
      written in place. A one-token step attends over the whole buffer, the unwritten tail masked out,
      and reads its write position from the device tensor `index`: every step has the same shapes
      and addresses, so it can be captured once as a CUDA graph and replayed (CUDAGraphStep).
    """

    def __init__(self, num_layers):
        self.layers = [dict() for _ in range(num_layers)]
        self.mask = None  # (B, S) 1 = real token; static: (B, capacity)
        self.next_pos = None  # (B,)
        self.length = 0  # S, tokens held
        self.padded = False  # whether any call had padding (then attention needs an explicit mask)
        self.capacity = None  # static only: tokens the buffers hold
        self.index = None  # static only: `length` as a (1,) device tensor, advanced by a captured step too

    @classmethod
    def static(cls, cfg, batch_size, max_len, device=None, dtype=torch.float32):
        """Buffers for `max_len` tokens (rounded up to a multiple of KV_BLOCK), all zeros."""
        cache = cls(cfg.num_layers)
        cap = -(-max_len // KV_BLOCK) * KV_BLOCK
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        for layer, kind in zip(cache.layers, cfg.layer_types):
            if kind == "attention":
                layer["k"] = torch.zeros(batch_size, cfg.num_kv_heads, cap, cfg.head_dim, dtype=dtype, device=device)
                layer["v"] = torch.zeros_like(layer["k"])  # (B, G, capacity, D)
            else:
                layer["state"] = torch.zeros(batch_size, cfg.num_heads, cfg.head_dim, cfg.head_dim,
                                             dtype=state_dtype, device=device)  # (B, H, D, D)
        cache.mask = torch.zeros(batch_size, cap, dtype=torch.long, device=device)
        cache.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        cache.capacity, cache.index = cap, torch.zeros(1, dtype=torch.long, device=device)
        return cache

    def add_tokens(self, new_mask, has_padding):
        """Record a call's T tokens (new_mask (B, T), 1 = real); return the attention mask of Context and
        `cache_pos` for them. One-token steps on a static cache touch device tensors only (no host sync)."""
        T = new_mask.shape[1]
        if self.capacity is not None and self.length + T > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} tokens; {self.length} are in it and {T} more came. "
                             f"Make it with a larger max_len (HybridLM.new_cache(batch_size, max_len))")
        past = self.length
        self.length += T
        self.padded |= has_padding
        if self.capacity is None:  # dynamic
            offset = torch.zeros_like(new_mask[:, 0]) if self.next_pos is None else self.next_pos
            self.mask = new_mask if past == 0 else torch.cat([self.mask, new_mask], dim=1)  # (B, S)
            self.next_pos = offset + new_mask.sum(-1)
            if self.padded:
                return padded_causal_mask(self.mask, past, T), None
            return (None if past == 0 or T == 1 else causal_lower_right(T, past + T)), None
        self.next_pos.add_(new_mask.sum(-1))
        if T == 1:  # a step: write at the device index, attend over the whole buffer
            pos = self.index.clone()
            self.index.add_(1)
            self.mask.index_copy_(1, pos, new_mask)
            allowed = self.mask.bool().index_fill_(1, pos, True)  # (B, capacity); a padding query sees itself
            return allowed[:, None, None, :], pos
        self.index.fill_(past + T)
        self.mask[:, past:past + T] = new_mask
        if self.padded:
            return padded_causal_mask(self.mask[:, :past + T], past, T), past
        return (None if past == 0 else causal_lower_right(T, past + T)), past


class CUDAGraphStep:
    """One decoding step of the whole model (a token per row in, the next logits out), captured once as a
    CUDA graph and replayed.

    An eager step launches about a thousand small kernels (28 layers of projections, norms, RoPE, gates,
    attention); at batch 1 the host takes longer to issue them than the GPU takes to run them. A graph records the
    launches once and replays them with one call. That needs the same shapes and addresses at every
    step: the static cache gives both (its buffers never move; a step reads its write position from the
    device tensor `cache.index`). The first call runs the step eagerly (Triton compiles its kernels,
    cuBLAS picks its own: neither may happen during capture), then captures.

    Inside the graph the GPU still runs every kernel, about a microsecond each at the least, and reads weights
    in pieces. So the step is made of fewer, larger kernels first: the model's projections are packed
    (`pack_projections`: one matmul per group instead of two to four), and with `compile=True` each layer
    goes through torch.compile for the warm-up and the capture (Inductor fuses the norms, RoPE, gates and
    residual adds into a few kernels; the matmuls stay cuBLAS's). The compiled code is recorded in the graph;
    replays run no Python.
    """

    def __init__(self, model, cache, compile=True):
        if cache.capacity is None:
            raise ValueError("CUDAGraphStep needs a static cache: make it with model.new_cache(batch_size, max_len)")
        self.model, self.cache, self.compile = model.pack_projections(), cache, compile
        self.tokens = torch.zeros(cache.mask.shape[0], 1, dtype=torch.long, device=cache.mask.device)  # (B, 1)
        self.graph = self.logits = None

    @torch.no_grad()
    def __call__(self, tokens):
        """tokens (B,) -> logits (B, V) of the next position. The tensor is overwritten by the next call."""
        if self.cache.length >= self.cache.capacity:
            raise ValueError(f"the cache is full ({self.cache.capacity} tokens); make it with a larger max_len")
        self.tokens.copy_(tokens[:, None])
        if self.graph is not None:
            self.graph.replay()
            self.cache.length += 1  # the host's count; the graph advanced cache.index itself
            return self.logits
        with compiled_layers(self.model) if self.compile else contextlib.nullcontext():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # the warm-up is a real step (and compiles)
                logits = self.model(self.tokens, cache=self.cache, logits_to_keep=1)[:, -1]  # (B, V)
            torch.cuda.current_stream().wait_stream(side)
            length = self.cache.length
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records the next step's kernels without running them
                self.logits = self.model(self.tokens, cache=self.cache, logits_to_keep=1)[:, -1]
            self.cache.length = length
        return logits


@contextlib.contextmanager
def compiled_layers(model):
    """Within the block each layer's forward runs through torch.compile. Layers of one kind share the compiled
    code (the parameters are its inputs); a new cache size compiles once more, with the size symbolic."""
    for layer in model.layers:
        layer.forward = torch.compile(layer.forward)  # an instance attribute: nn.Module.__call__ finds it first
    try:
        yield
    finally:
        for layer in model.layers:
            del layer.forward


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, max_new_tokens=32, temperature=0.0, top_p=1.0,
             eos_token_id=None, pad_token_id=None, generator=None, cuda_graph=None, compile=True,
             prefill_chunk=None):
    """Prompt (B, T), left-padded if rows differ in length, followed by up to `max_new_tokens`
    new tokens (B, T + N). Greedy when temperature == 0, else nucleus sampling. Rows that emitted
    `eos_token_id` continue with `pad_token_id` (default: eos).
    A static cache holds the run: the prompt goes through it in chunks of `prefill_chunk` tokens
    (None = one pass; the chunked form in Lightning layers), then each new token is one step (the
    recurrent form, one cached attention step), replayed as a CUDA graph when `cuda_graph`
    (default: on for a model on a GPU; `compile`: its layers fused by torch.compile, see CUDAGraphStep).
    Only the logits that are sampled from are computed."""
    if attention_mask is not None:
        m = attention_mask.long()
        if bool((m[:, 1:] < m[:, :-1]).any()):
            raise ValueError("attention_mask has padding after a token: generation needs left padding "
                             "(with a transformers tokenizer set tokenizer.padding_side = 'left')")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1; got {temperature}, {top_p}")
    if cuda_graph is None:
        cuda_graph = input_ids.is_cuda
    if cuda_graph and not input_ids.is_cuda:
        raise ValueError("cuda_graph=True needs the model and input_ids on a CUDA device; pass cuda_graph=False")
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    pad = eos if pad_token_id is None else pad_token_id
    B, T = input_ids.shape
    cache = model.new_cache(B, T + max_new_tokens)
    logits = model.prefill(input_ids, attention_mask, cache, prefill_chunk)  # (B, V)
    if cuda_graph:
        step = CUDAGraphStep(model, cache, compile)
    else:
        step = lambda tok: model(tok[:, None], cache=cache)[:, -1]  # noqa: E731
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    new = []
    for i in range(max_new_tokens):
        tok = sample(logits.float(), temperature, top_p, generator)  # (B,)
        if eos is not None:
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            done |= tok == eos
        new.append(tok)
        if i == max_new_tokens - 1 or (eos is not None and bool(done.all())):
            break
        logits = step(tok)  # (B, V)
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1) if new else input_ids


def sample(logits, temperature, top_p, generator):
    """logits (B, V) -> next tokens (B,): argmax, or nucleus sampling at a temperature."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        p_sorted, idx = probs.sort(dim=-1, descending=True)
        keep = p_sorted.cumsum(-1) - p_sorted < top_p  # the smallest set with mass >= top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, p_sorted * keep)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
