"""HybridLM against transformers' Qwen3/Llama, HALO weight transfer, decoding with caches."""
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

import minihalo as mh
from minihalo.model import Attention, Lightning
from minihalo.ops import rel_err

V = 101


def tiny_hf(kind, tied, seed=0):
    """A random transformers model: GQA (6 heads, 2 KV heads), head_dim 16 != hidden/heads = 8."""
    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=48, intermediate_size=72, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied,
                  max_position_embeddings=256, eos_token_id=None, pad_token_id=0)
    if kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(rope_theta=1e6, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(rope_theta=1e4, **common))
    with torch.no_grad():  # random norm weights, so that a norm copied wrong shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
@pytest.mark.parametrize("tied", [True, False])
def test_logits_and_greedy_tokens_equal_transformers(kind, tied):
    hf = tiny_hf(kind, tied)
    model = mh.from_hf(hf).eval()
    assert model.config.qk_norm == (kind == "qwen3")
    ids = torch.randint(1, V, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4
    ours = model.generate(ids, max_new_tokens=12)
    theirs = hf.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, theirs)


def test_from_hf_checkpoint_folder(tmp_path):
    hf = tiny_hf("qwen3", tied=False)
    hf.save_pretrained(tmp_path)
    model = mh.from_hf(tmp_path)
    ids = torch.randint(1, V, (1, 20))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4
    assert mh.tokenizer_in_folder(tmp_path) is None  # no tokenizer files in this folder


def test_from_hf_rejects_other_models(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="gpt2"):
        mh.from_hf(gpt2)
    gpt2.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="gpt2"):
        mh.from_hf(tmp_path)
    with pytest.raises(ValueError):
        mh.from_hf(42)


def test_conversion_with_every_change_off_is_the_teacher():
    teacher = mh.from_hf(tiny_hf("qwen3", tied=True)).eval()
    same = mh.to_hypenet(teacher, [0, 1, 2], attn_rope=True, attn_output_gate=False).eval()
    ids = torch.randint(1, V, (2, 30))
    with torch.no_grad():
        assert torch.equal(same(ids), teacher(ids))


def test_weight_transfer():
    """docs/method.md §4 step 0: every copied tensor, the GQA→MHA order and the fresh parameters."""
    teacher = mh.from_hf(tiny_hf("qwen3", tied=False))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = mh.to_hypenet(teacher, [1])
    for k, v in teacher.state_dict().items():  # the teacher is left unchanged
        assert torch.equal(v, before[k]), k
    tsd, ssd = teacher.state_dict(), student.state_dict()
    for k in tsd:  # everything outside the mixers is reused unchanged
        if ".mixer." not in k:
            assert torch.equal(ssd[k], tsd[k]), k
    assert student.config.layer_types == ["lightning", "attention", "lightning"]
    assert not student.config.attn_rope and student.config.lin_rope
    # kept attention layer: same projections and norms, a new N(0, 0.02) output gate
    att, t_att = student.layers[1].mixer, teacher.layers[1].mixer
    assert isinstance(att, Attention)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
        assert torch.equal(getattr(att, name).weight, getattr(t_att, name).weight), name
    assert 0.015 < att.g_proj.weight.std().item() < 0.025 and abs(att.g_proj.weight.mean().item()) < 0.005
    # Lightning layers: K/V heads repeated kv0, kv0, kv0, kv1, kv1, kv1 (6 heads from 2)
    D, H, G = 16, 6, 2
    for i in (0, 2):
        lin, src = student.layers[i].mixer, teacher.layers[i].mixer
        assert isinstance(lin, Lightning)
        for name in ("q_proj", "o_proj", "q_norm", "k_norm"):
            assert torch.equal(getattr(lin, name).weight, getattr(src, name).weight), name
        for name in ("k_proj", "v_proj"):
            w, w_src = getattr(lin, name).weight, getattr(src, name).weight
            assert w.shape == (H * D, 48)
            for h in range(H):
                assert torch.equal(w[h * D:(h + 1) * D], w_src[(h // (H // G)) * D:(h // (H // G) + 1) * D])
        assert torch.equal(lin.o_norm.weight, torch.ones(H * D))
        bound = 48 ** -0.5  # nn.Linear's default init: U(-1/sqrt(in), 1/sqrt(in))
        assert lin.z_proj.weight.abs().max() <= bound and lin.z_proj.weight.std() > bound / 3
    # a Llama teacher has no QK-norm: the Lightning layers get fresh norms of ones
    llama_student = mh.to_hypenet(mh.from_hf(tiny_hf("llama", tied=True)), [0])
    assert torch.equal(llama_student.layers[1].mixer.q_norm.weight, torch.ones(D))
    # ablation switches remove the parts
    bare = mh.to_hypenet(teacher, [], lin_qk_norm=False, lin_output_gate=False, lin_output_norm=False, lin_mha=False)
    lin = bare.layers[0].mixer
    assert not any(hasattr(lin, n) for n in ("q_norm", "z_proj", "o_norm"))
    assert torch.equal(lin.k_proj.weight, teacher.layers[0].mixer.k_proj.weight)


def test_lightning_from_copies_trained_layers():
    """docs/method.md §4 step 3: the Lightning layers come from the stage-1 model, everything else from the
    teacher (the stage-1 model's own non-mixer weights, shifted here, must not leak in)."""
    teacher = mh.from_hf(tiny_hf("qwen3", tied=True))
    stage1 = mh.to_hypenet(teacher, [])  # a Lightning layer everywhere (HALO stage 1)
    with torch.no_grad():
        for p in stage1.parameters():
            p.add_(0.01)
    hybrid = mh.to_hypenet(teacher, [2], lightning_from=stage1)
    for i in (0, 1):
        for k, v in hybrid.layers[i].mixer.state_dict().items():
            assert torch.equal(v, stage1.layers[i].mixer.state_dict()[k]), (i, k)
    for k, v in teacher.layers[2].mixer.state_dict().items():  # the kept attention layer is the teacher's
        assert torch.equal(v, hybrid.layers[2].mixer.state_dict()[k]), k
    tsd = teacher.state_dict()
    for k, v in hybrid.state_dict().items():
        if ".mixer." not in k:  # embeddings, norms, MLPs, head
            assert torch.equal(v, tsd[k]), k


def test_lightning_from_refuses_other_options():
    teacher = mh.from_hf(tiny_hf("qwen3", tied=True))
    stage1 = mh.to_hypenet(teacher, [], lin_rope=False)
    with pytest.raises(ValueError, match="lin_rope: source False, requested True"):
        mh.to_hypenet(teacher, [2], lightning_from=stage1)
    mh.to_hypenet(teacher, [2], lightning_from=stage1, lin_rope=False)  # the same options: accepted


def test_bad_layer_indices():
    teacher = mh.from_hf(tiny_hf("qwen3", tied=True))
    for good in ([], [0], (1, 2), range(3), [np.int64(1)]):
        kinds = ["attention" if i in list(good) else "lightning" for i in range(3)]
        assert mh.to_hypenet(teacher, good).config.layer_types == kinds
    for bad, message in [(3, r"a list of layer indices, e.g. \[2, 5\]; got 3 \(int\)"),
                         (["2"], r"integer layer indices; got '2' \(str\)"),
                         ([3], "out of range for a 3-layer model"), ([-1], "out of range"),
                         ([1, 1], "repeat")]:
        with pytest.raises(ValueError, match=message):
            mh.to_hypenet(teacher, bad)
    with pytest.raises(ValueError, match="Transformer"):
        mh.to_hypenet(mh.to_hypenet(teacher, [0]), [0])


def hybrid(layer_types, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = mh.HybridConfig(vocab_size=V, hidden_size=48, intermediate_size=64, num_layers=len(layer_types),
                          num_heads=3, num_kv_heads=1, head_dim=16, layer_types=layer_types, attn_rope=False,
                          attn_output_gate=True, rope_theta=1e4, lin_chunk_size=16, **kw)
    return mh.HybridLM(cfg).eval()


MIXES = [["lightning"] * 3, ["attention", "lightning", "lightning"], ["lightning", "attention", "attention"]]


@pytest.mark.parametrize("layer_types", MIXES)
@pytest.mark.parametrize("scale_a", [None, 30.0])
def test_decode_token_by_token_equals_full_forward(layer_types, scale_a):
    model = hybrid(layer_types, attn_scale_a=scale_a)
    ids = torch.randint(0, V, (2, 41))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        parts = [model(ids[:, :17], cache=cache)]  # a prefill, then one token at a time
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(17, 30)]
        parts.append(model(ids[:, 30:], cache=cache))  # and a second multi-token chunk
    assert rel_err(torch.cat(parts, 1), full) < 1e-5


@pytest.mark.parametrize("layer_types", MIXES)
def test_left_padded_batch_matches_each_prompt_alone(layer_types):
    model = hybrid(layer_types, attn_scale_a=50.0)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, V, (n,), generator=g) for n in (5, 19, 1, 12)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    batch = model.generate(ids, mask, max_new_tokens=10)
    with torch.no_grad():
        logits = model(ids, mask)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=10)
        assert torch.equal(batch[i, T:], alone[0, len(p):]), i
        with torch.no_grad():  # logits at real positions are those of the prompt alone
            ref = model(p[None])[0]
        assert (logits[i, T - len(p):] - ref).abs().max() < 1e-5


def test_generation_rejects_right_padding_and_handles_eos():
    model = hybrid(MIXES[1])
    ids = torch.randint(1, V, (2, 6), generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]))
    greedy = model.generate(ids, max_new_tokens=8)[:, 6:].tolist()
    # EOS: row 0's first new token from the third on that it has not emitted before (else its first token)
    j = next((j for j in range(2, 8) if greedy[0][j] not in greedy[0][:j]), 0)
    eos, pad = greedy[0][j], 0
    stops = [row.index(eos) + 1 if eos in row else 8 for row in greedy]  # new tokens up to and with EOS
    n = max(stops)  # generation ends when every row has emitted EOS
    expected = [row[:stop] + [pad] * (n - stop) for row, stop in zip(greedy, stops)]
    out = model.generate(ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=pad)
    assert out[:, 6:].tolist() == expected
    g = torch.Generator().manual_seed(0)
    sampled = model.generate(ids, max_new_tokens=5, temperature=1.0, top_p=0.9, generator=g)
    assert sampled.shape == (2, 11) and torch.equal(sampled[:, :6], ids)


def test_save_load_round_trip(tmp_path):
    model = hybrid(MIXES[1], attn_scale_a=100.0)
    model.save_pretrained(tmp_path)
    loaded = mh.HybridLM.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    ids = torch.randint(0, V, (2, 25))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    half = mh.HybridLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.embed_tokens.weight.dtype == torch.bfloat16


def test_cache_bytes_matches_the_paper():
    """docs/method.md §5: Qwen3-1.7B KV 112 KiB/token; HypeNet-2B 28 KiB/token plus ~22 MB of RNN state."""
    shape = dict(num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128)
    assert mh.HybridConfig(**shape).cache_bytes(1)["kv_bytes_per_token"] == 112 * 1024
    hype = mh.HybridConfig(**shape, layer_types=["attention" if i in (2, 3, 6, 8, 9, 21, 25) else "lightning"
                                                 for i in range(28)])
    mem = hype.cache_bytes(1000)
    assert mem["kv_bytes_per_token"] == 28 * 1024
    assert mem["rnn_state_bytes"] == 21 * 16 * 128 * 128 * 4  # 22.0 MB
    assert mem["total_bytes"] == 1000 * 28 * 1024 + mem["rnn_state_bytes"]
    small = hybrid(MIXES[1])  # the model method reads its config
    assert small.cache_bytes(10, dtype=torch.float32) == small.config.cache_bytes(10, dtype=torch.float32)


def test_config_errors():
    with pytest.raises(ValueError):
        mh.HybridConfig(num_layers=2, layer_types=["attention"])
    with pytest.raises(ValueError):
        mh.HybridConfig(num_layers=1, layer_types=["mamba"])
    with pytest.raises(ValueError):
        mh.HybridConfig(num_heads=3, num_kv_heads=2)
    for bad in (0, -64, 16.0):
        with pytest.raises(ValueError, match=f"lin_chunk_size must be a positive int .*; got {bad}"):
            mh.HybridConfig(lin_chunk_size=bad)


def test_lightning_gets_one_dtype_under_bf16_autocast(monkeypatch):
    """Under bf16 autocast the projections give bf16 but the fp32 RMSNorm weights make q, k fp32; the Triton
    kernel takes one dtype only, so the mixer must hand lightning_attn q, k, v of the same dtype."""
    import minihalo.model as model_module
    from minihalo.ops import lightning_attn
    seen = []

    def recording(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return lightning_attn(q, k, v, *args, **kwargs)

    monkeypatch.setattr(model_module, "lightning_attn", recording)
    cfg = mh.HybridConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                          num_kv_heads=1, head_dim=16, layer_types=["attention", "lightning"])
    model = mh.HybridLM(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 64, (2, 16))).float().sum().backward()
    assert seen == [(torch.bfloat16,) * 3]


def test_decays_stay_fp32_and_unsaved_when_the_model_is_cast():
    """model.to(bf16) must not round the per-head decays (docs/method.md §2), and they are not weights."""
    model = hybrid(["lightning", "attention"]).to(torch.bfloat16)
    g = model.layers[0].mixer.g_gamma
    assert g.dtype == torch.float32 and torch.equal(g, mh.lightning_decay(3))
    assert not any("g_gamma" in k for k in model.state_dict())


@pytest.mark.parametrize("lin_fp32", [False, True])
def test_lin_fp32_chooses_the_dtype_of_the_lightning_inputs(monkeypatch, lin_fp32):
    """Under bf16 autocast the Lightning op gets q, k, v in bf16, or in fp32 with lin_fp32=True."""
    import minihalo.model as model_module
    original, seen = model_module.lightning_attn, []

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(model_module, "lightning_attn", spy)
    model = hybrid(["lightning"], lin_fp32=lin_fp32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, V, (1, 20)))
    want = torch.float32 if lin_fp32 else torch.bfloat16
    assert seen == [(want, want, want)]


def test_set_query_scale_is_the_models_own_and_checked():
    """set_query_scale changes this model's config only, and refuses a base <= 1."""
    a = hybrid(["attention"])
    b = mh.HybridLM(a.config)
    a.set_query_scale(64)
    assert a.config.attn_scale_a == 64.0 and b.config.attn_scale_a is None
    with pytest.raises(ValueError, match="a number > 1"):
        a.set_query_scale(1)
