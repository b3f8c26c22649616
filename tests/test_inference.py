"""Fast inference paths against the plain full forward: logits_to_keep, the static cache, chunked prefill,
the one-token decode attention, and generate (which uses all of them)."""
import pytest
import torch
import torch.nn.functional as F

import minihalo as mh
from minihalo.decoding import KV_BLOCK, decode_attention
from minihalo.ops import rel_err

V = 101
TOL = 1e-5  # fp32 throughout: the paths differ only in summation order

LAYOUTS = {  # name: (layer types, config overrides); H = 6 query heads over G = 2 kv heads
    "transformer": (["attention"] * 3, dict(attn_rope=True, attn_output_gate=False)),
    "all_lightning": (["lightning"] * 3, dict()),
    "hypenet": (["attention", "lightning", "attention"], dict(attn_rope=False, attn_scale_a=30.0)),
    "mixed_rope": (["lightning", "attention", "lightning"], dict(attn_rope=True, attn_output_gate=False)),
}


def model_for(layout, seed=0):
    layer_types, kw = LAYOUTS[layout]
    torch.manual_seed(seed)
    cfg = mh.HybridConfig(vocab_size=V, hidden_size=48, intermediate_size=64, num_layers=len(layer_types),
                          num_heads=6, num_kv_heads=2, head_dim=16, layer_types=layer_types, rope_theta=1e4,
                          lin_chunk_size=16, **{"attn_output_gate": True, **kw})
    model = mh.HybridLM(cfg).eval()
    with torch.no_grad():  # random norm weights, so that a norm applied at the wrong place shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def left_padded(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(1, V, (n,), generator=g)
        mask[i, T - n:] = 1
    return ids, mask


def greedy_reference(model, ids, n):
    """Greedy decoding by a full forward over the whole sequence for every new token (no cache)."""
    for _ in range(n):
        with torch.no_grad():
            nxt = model(ids)[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_to_keep(layout):
    model = model_for(layout)
    ids = torch.randint(0, V, (2, 23))
    with torch.no_grad():
        full = model(ids)
        assert torch.equal(model(ids, logits_to_keep=0), full)
        assert rel_err(model(ids, logits_to_keep=1), full[:, -1:]) < TOL
        assert rel_err(model(ids, logits_to_keep=5), full[:, -5:]) < TOL
        assert rel_err(model(ids, logits_to_keep=slice(3, 9)), full[:, 3:9]) < TOL
        idx = torch.tensor([0, 7, 22])
        assert rel_err(model(ids, logits_to_keep=idx), full[:, idx]) < TOL
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, logits_to_keep=-1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_static_cache_chunks_and_steps_equal_full_forward(layout):
    """Chunks of 16, 1 and 7 tokens, then single steps, through a static cache: every position's logits are
    those of one full forward. Run on a left-padded batch (padding up to 20 tokens)."""
    model = model_for(layout)
    ids, mask = left_padded([41, 21, 30])
    with torch.no_grad():
        full = model(ids, mask)
        cache = model.new_cache(3, 45)
        cuts = [0, 16, 17, 24] + list(range(25, 42))
        parts = [model(ids[:, a:b], mask[:, a:b], cache=cache) for a, b in zip(cuts[:-1], cuts[1:])]
    real = mask.bool()
    assert rel_err(torch.cat(parts, 1)[real], full[real]) < TOL
    assert cache.length == 41 and cache.capacity == KV_BLOCK and int(cache.index) == 41
    assert torch.equal(cache.next_pos, mask.sum(-1))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_static_cache_matches_each_prompt_alone(layout):
    """A left-padded batch in a static cache gives each row the logits of its prompt alone (no padding)."""
    model = model_for(layout)
    lengths = [9, 33, 1]
    ids, mask = left_padded(lengths, seed=5)
    T = ids.shape[1]
    with torch.no_grad():
        cache = model.new_cache(3, T + 4)
        batch = model(ids, mask, cache=cache)
        for i, n in enumerate(lengths):
            alone = model(ids[i:i + 1, T - n:])
            assert rel_err(batch[i, T - n:], alone[0]) < TOL, i


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("chunk", [1, 16, 50])
def test_chunked_prefill_equals_one_pass(layout, chunk):
    model = model_for(layout)
    ids, mask = left_padded([50, 37], seed=7)
    with torch.no_grad():
        ref = model(ids, mask)[:, -1]
        last = model.prefill(ids, mask, model.new_cache(2, 50), chunk_size=chunk)
    assert rel_err(last, ref) < TOL


@pytest.mark.parametrize("layout", LAYOUTS)
def test_generate_equals_greedy_full_forwards(layout):
    model = model_for(layout)
    ids = torch.randint(1, V, (2, 30), generator=torch.Generator().manual_seed(2))
    ref = greedy_reference(model, ids, 12)
    assert torch.equal(model.generate(ids, max_new_tokens=12), ref)
    assert torch.equal(model.generate(ids, max_new_tokens=12, prefill_chunk=7), ref)


def test_generate_left_padded_equals_each_prompt_alone():
    model = model_for("hypenet")
    lengths = [5, 26, 1, 12]
    ids, mask = left_padded(lengths, seed=11)
    T = ids.shape[1]
    batch = model.generate(ids, mask, max_new_tokens=9, prefill_chunk=8)
    for i, n in enumerate(lengths):
        ref = greedy_reference(model, ids[i:i + 1, T - n:], 9)
        assert torch.equal(batch[i, T:], ref[0, n:]), i


@pytest.mark.parametrize("H, G, S", [(6, 2, KV_BLOCK), (4, 4, 2 * KV_BLOCK), (5, 1, 3 * KV_BLOCK)])
def test_decode_attention_equals_from_scratch_softmax(H, G, S):
    """Query head h reads kv head h // (H/G) (repeat_interleave order, as transformers), masked keys get no weight."""
    g = torch.Generator().manual_seed(H * S)
    B, D = 2, 16
    q = torch.randn(B, H, 1, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, G, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, G, S, D, generator=g, dtype=torch.float64)
    mask = torch.rand(B, 1, 1, S, generator=g) < 0.6
    kh, vh = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)  # (B, H, S, D)
    scores = torch.einsum("bhd,bhsd->bhs", q[:, :, 0], kh) / D ** 0.5
    p = scores.masked_fill(~mask[:, :, 0], float("-inf")).softmax(-1)
    ref = torch.einsum("bhs,bhsd->bhd", p, vh)[:, :, None]
    assert rel_err(decode_attention(q, k, v, mask), ref) < 1e-12
    sdpa = F.scaled_dot_product_attention(q, kh, vh, attn_mask=mask)
    assert rel_err(decode_attention(q, k, v, mask), sdpa) < 1e-12


def test_static_cache_updates_in_place():
    """A captured decoding step keeps reading the same tensors: prefill and steps must write into the
    buffers the static cache was made with, never replace them."""
    model = model_for("mixed_rope")
    cache = model.new_cache(1, 40)
    before = [{name: t.data_ptr() for name, t in entry.items()} for entry in cache.layers]
    ids = torch.randint(0, V, (1, 30))
    with torch.no_grad():
        model.prefill(ids, cache=cache, chunk_size=11)
        model(ids[:, :1], cache=cache)
    after = [{name: t.data_ptr() for name, t in entry.items()} for entry in cache.layers]
    assert after == before
    assert set(before[0]) == {"state"} and set(before[1]) == {"k", "v"}
    assert cache.layers[0]["state"].abs().sum() > 0 and cache.layers[1]["k"][:, :, 30].abs().sum() > 0
    assert cache.layers[1]["k"][:, :, 31:].abs().sum() == 0  # nothing written past the tokens seen


def test_cache_errors():
    model = model_for("hypenet")
    cache = model.new_cache(1, 10)
    with pytest.raises(ValueError, match="cache holds"):
        model(torch.zeros(1, KV_BLOCK + 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="static cache"):
        mh.decoding.CUDAGraphStep(model, model.new_cache())
    with pytest.raises(ValueError, match="cuda_graph"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2, cuda_graph=True)
    with pytest.raises(ValueError, match="chunk_size"):
        model.prefill(torch.zeros(1, 3, dtype=torch.long), cache=model.new_cache(1, 3), chunk_size=0)


def test_generate_computes_no_full_logits():
    """A 4K-token prompt with a 50K vocabulary: lm_head only ever sees one position per row (the full
    logits would be a (4096, 50000) tensor)."""
    torch.manual_seed(0)
    cfg = mh.HybridConfig(vocab_size=50_000, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                          num_kv_heads=1, head_dim=16, layer_types=["lightning", "attention"], attn_rope=False)
    model = mh.HybridLM(cfg).eval()
    shapes = []
    model.lm_head.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(out.shape)))
    ids = torch.randint(0, 50_000, (1, 4096))
    out = model.generate(ids, max_new_tokens=3)
    assert out.shape == (1, 4099)
    assert shapes == [(1, 1, 50_000)] * 3
    shapes.clear()
    model.generate(ids, max_new_tokens=2, prefill_chunk=1000)
    assert shapes == [(1, 1, 50_000)] * 6  # five prompt chunks (last logits each) and one step


@pytest.mark.parametrize("layout", ["transformer", "hypenet", "all_lightning"])
def test_packed_projections_alias_the_parameters(layout, tmp_path):
    """pack_projections: the same parameters (views of one buffer per group, no copy kept), the same logits,
    the same gradients; a change to a parameter reaches the packed matmul; to() and save/load undo it cleanly."""
    model = model_for(layout).double()
    ref = model_for(layout).double()
    ids = torch.randint(0, V, (2, 19), generator=torch.Generator().manual_seed(4))
    params = dict(model.named_parameters())
    n_bytes = sum(p.untyped_storage().nbytes() for p in params.values())
    model.pack_projections()
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    for owner in model.projection_owners():
        linears = owner.in_projections()
        assert owner.packed is not None and len(linears) >= 2
        assert linears[0].weight.data_ptr() == owner.packed.data_ptr()
        assert all(m.weight.untyped_storage().data_ptr() == owner.packed.untyped_storage().data_ptr() for m in linears)
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params.values()}
    assert sum(storages.values()) == n_bytes  # the packed buffers replace the weights' own memory
    with torch.no_grad():  # the packed matmul (no gradient recorded)
        assert rel_err(model(ids), ref(ids)) < 1e-12
        model.layers[1].mixer.v_proj.weight.mul_(-2)  # an in-place update (an optimizer step) reaches it
        ref.layers[1].mixer.v_proj.weight.mul_(-2)
        assert rel_err(model(ids), ref(ids)) < 1e-12
    model(ids).square().mean().backward()  # with gradients: the separate matmuls
    ref(ids).square().mean().backward()
    for name, p in model.named_parameters():
        assert rel_err(p.grad, dict(ref.named_parameters())[name].grad) < 1e-12, name
    model.save_pretrained(tmp_path)
    loaded = mh.HybridLM.from_pretrained(tmp_path)
    model.float()  # new memory per parameter: unpacked
    assert all(owner.packed is None for owner in model.projection_owners())
    with torch.no_grad():
        assert rel_err(loaded(ids), ref(ids)) < 1e-12
        assert rel_err(model(ids), ref(ids)) < 1e-5


def test_packed_projections_skip_biases():
    torch.manual_seed(0)
    cfg = mh.HybridConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2, num_kv_heads=1,
                          head_dim=16, layer_types=["attention", "lightning"], attention_bias=True)
    model = mh.HybridLM(cfg).double().eval()
    ids = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        before = model(ids)
        model.pack_projections()
        assert [m.packed is None for m in model.projection_owners()] == [True, False, True, False]  # mixer, MLP, ...
        assert rel_err(model(ids), before) < 1e-12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and compiled Triton kernels need a GPU")
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("layout", ["transformer", "hypenet"])
def test_cuda_graph_decoding_equals_eager(layout, compile):
    """The step replayed as a CUDA graph gives the full forward's logits at every step; uncompiled, generate
    with it gives exactly the tokens of eager steps (the same kernels; compiled ones round differently)."""
    model = model_for(layout).cuda().pack_projections()
    ids = torch.randint(1, V, (2, 40), generator=torch.Generator().manual_seed(5)).cuda()
    eager = model.generate(ids, max_new_tokens=20, cuda_graph=False)
    if not compile:
        assert torch.equal(model.generate(ids, max_new_tokens=20, cuda_graph=True, compile=False), eager)
    cache = model.new_cache(2, 64)
    step = mh.decoding.CUDAGraphStep(model, cache, compile)
    model.prefill(eager[:, :40], cache=cache)
    with torch.no_grad():
        full = model(eager[:, :59])  # (2, 59, V)
    for i in range(40, 59):
        assert rel_err(step(eager[:, i]), full[:, i]) < 1e-4, i
