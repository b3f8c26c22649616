"""minihalo.anatomy, the helpers notebook 04 uses to look inside a model: mixer_io, weight_provenance."""
import torch

import minihalo as mh
from minihalo.anatomy import mixer_io, weight_provenance

H, G, D = 6, 2, 8  # 3 query heads per KV head: an interleaved and a tiled order differ


def tiny_teacher(seed=0):
    """A random 3-layer Transformer (GQA, QK-norm) with random norm weights, so a misplaced norm shows."""
    torch.manual_seed(seed)
    cfg = mh.HybridConfig(vocab_size=97, hidden_size=40, intermediate_size=64, num_layers=3, num_heads=H,
                          num_kv_heads=G, head_dim=D)
    model = mh.HybridLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def test_mixer_io_records_normed_mixer_input_and_output_before_the_residual():
    model = mh.to_hypenet(tiny_teacher(), [1], attn_scale_a=20.0).eval()
    ids = torch.randint(0, 97, (2, 29), generator=torch.Generator().manual_seed(1))
    records = mixer_io(model, ids)
    assert len(records) == 3
    # The pre-norm block written out (docs/method.md §1): the hooks must see RMSNorm(h) and Mixer(RMSNorm(h)).
    with torch.no_grad():
        h = model.embed_tokens(ids)  # (B, T, d)
        for layer, (x, y) in zip(model.layers, records):
            assert torch.equal(x, layer.input_layernorm(h))
            assert x.shape == y.shape == h.shape
            h = h + y
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        assert mh.ops.rel_err(model.lm_head(model.norm(h)), model(ids)) < 1e-6
    assert all(not layer.mixer._forward_hooks for layer in model.layers)  # hooks removed


def test_mixer_io_passes_forward_arguments():
    model = mh.to_hypenet(tiny_teacher(), [0]).eval()
    ids = torch.randint(1, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: the Lightning layer zeroes k there, so its output changes
    plain, padded = mixer_io(model, ids), mixer_io(model, ids, attention_mask=mask)
    assert not torch.equal(plain[1][1][0], padded[1][1][0])
    assert mh.ops.rel_err(padded[1][1][1], plain[1][1][1]) < 1e-6  # the unpadded row is unchanged


def test_weight_provenance_of_to_hypenet():
    teacher = tiny_teacher()
    student = mh.to_hypenet(teacher, [1])  # layers 0, 2 Lightning; layer 1 attention
    how = weight_provenance(student, teacher)
    assert set(how) == set(student.state_dict())
    interleaved = f"teacher heads {[h // (H // G) for h in range(H)]}"  # kv0, kv0, kv0, kv1, kv1, kv1
    for i in (0, 2):
        p = f"layers.{i}.mixer."
        assert {n: how[p + n] for n in ("q_proj.weight", "o_proj.weight", "q_norm.weight", "k_norm.weight")} == \
            dict.fromkeys(("q_proj.weight", "o_proj.weight", "q_norm.weight", "k_norm.weight"), "copied")
        assert how[p + "k_proj.weight"] == how[p + "v_proj.weight"] == interleaved
        assert how[p + "z_proj.weight"] == how[p + "o_norm.weight"] == "new"
    assert how["layers.1.mixer.k_proj.weight"] == "copied" and how["layers.1.mixer.g_proj.weight"] == "new"
    assert all(v == "copied" for n, v in how.items() if ".mixer." not in n)


def test_weight_provenance_sees_head_order_and_changes():
    teacher = tiny_teacher()
    student = mh.to_hypenet(teacher, [1])
    k_teacher = teacher.layers[0].mixer.k_proj.weight  # (G*D, d)
    with torch.no_grad():
        student.layers[0].mixer.k_proj.weight.copy_(k_teacher.repeat(H // G, 1))  # tiled: kv0, kv1, kv0, ...
        student.layers[0].mixer.q_proj.weight.add_(1e-3)
        student.embed_tokens.weight[0, 0] += 1
    how = weight_provenance(student, teacher)
    assert how["layers.0.mixer.k_proj.weight"] == f"teacher heads {[h % G for h in range(H)]}"
    assert how["layers.0.mixer.q_proj.weight"] == "new"
    assert how["embed_tokens.weight"] == "new"
