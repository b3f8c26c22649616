"""HALO (docs/method.md §4): alignment, layer selection, chunked KL distillation, the query scale, the CLI."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minihalo import HybridConfig, HybridLM, to_hypenet
from minihalo.data import prepare
from minihalo.halo import (STEPS, distill_loss, evenly_spaced_layers, final_hidden, kl_divergence, load_teacher,
                           num_attention_layers, pick_query_scale, recall_drop_layers, select_attention_layers,
                           selection_scores, stage1_align, stage2_distill, swap_layer)
from minihalo.model import Context
from minihalo.pipeline import HaloConfig, main, preset_config, read_jsonl, run
from minihalo.ops import rel_err
from minihalo.tasks import WORDS
from minihalo.train import TrainConfig

# The authors' per-layer sweep for Qwen3-1.7B (docs/method.md §4): layer -> (C, R) of M(i).
QWEN3_1_7B = {
    0: (0.3108, 0.6339), 1: (0.5548, 0.7202), 2: (0.5804, 0.6937), 3: (0.5839, 0.7144), 4: (0.5756, 0.7097),
    5: (0.5799, 0.7432), 6: (0.5784, 0.6862), 7: (0.5753, 0.7100), 8: (0.5828, 0.7258), 9: (0.5802, 0.6935),
    10: (0.5722, 0.7249), 11: (0.5727, 0.6883), 12: (0.5768, 0.6936), 13: (0.5782, 0.7258), 14: (0.5784, 0.7182),
    15: (0.5794, 0.7314), 16: (0.5791, 0.7017), 17: (0.5725, 0.7053), 18: (0.5757, 0.7087), 19: (0.5776, 0.6847),
    20: (0.5708, 0.7188), 21: (0.5768, 0.6531), 22: (0.5709, 0.7274), 23: (0.5775, 0.7064), 24: (0.5776, 0.6936),
    25: (0.5769, 0.6705), 26: (0.5779, 0.7008), 27: (0.5794, 0.7216),
}
V, T = 64, 24


def make_teacher(seed=0, layers=3, vocab=V, seq_len=T):
    """A random Qwen3-style Transformer: odd sizes (3 heads, 1 KV head), every layer attention + RoPE."""
    torch.manual_seed(seed)
    cfg = HybridConfig(vocab_size=vocab, hidden_size=24, intermediate_size=40, num_layers=layers, num_heads=3,
                       num_kv_heads=1, head_dim=8, rope_theta=1e4, lin_chunk_size=16, max_position_embeddings=seq_len)
    m = HybridLM(cfg)
    with torch.no_grad():  # norms away from 1, so a wrong norm shows
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return m.eval()


def batches(step):  # (4, T+1), a pure function of the step
    return torch.randint(0, V, (4, T + 1), generator=torch.Generator().manual_seed(1000 + step))


def tcfg(**kw):
    return TrainConfig(**{**dict(steps=30, lr=1e-2, min_lr=1e-3, warmup_steps=2, progress=False, seed=0), **kw})


# ------------------------------------------------------------------------------------------------
# Step 1: alignment
# ------------------------------------------------------------------------------------------------
def test_stage1_loss_falls_for_every_layer_and_only_rnn_mixers_change():
    teacher = make_teacher()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    initial = to_hypenet(teacher, [], seed=0)  # what stage1_align starts from
    student, hist, rows = stage1_align(teacher, batches, tcfg())
    first, last = np.array(rows[0]["layer_mse"]), np.array(rows[-1]["layer_mse"])
    assert (last < 0.5 * first).all(), (first, last)
    assert hist["loss"][0] == pytest.approx(first.sum(), rel=1e-6)  # the loss is the sum over layers
    for (name, a), b in zip(initial.state_dict().items(), student.state_dict().values()):
        if ".mixer." in name:
            assert not torch.equal(a, b), name  # every RNN weight trained
        else:
            assert torch.equal(a, b), name  # embeddings, norms, MLPs, head: bitwise unchanged
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert all(p.grad is None for p in teacher.parameters())


def test_stage1_loss_matches_a_from_scratch_mse():
    """The first logged per-layer loss equals the MSE computed by hand through the teacher's own blocks."""
    teacher = make_teacher(seed=1)
    initial = to_hypenet(teacher, [], seed=0)
    _, _, rows = stage1_align(teacher, batches, tcfg(steps=1))
    ids = batches(0)[:, :-1]
    ctx = Context.causal(teacher.config, *ids.shape)
    with torch.no_grad():
        x = teacher.embed_tokens(ids)
        for j, block in enumerate(teacher.layers):
            h = block.input_layernorm(x)
            mse = ((initial.layers[j].mixer(h, ctx, None) - block.mixer(h, ctx, None)) ** 2).mean().item()
            assert rows[0]["layer_mse"][j] == pytest.approx(mse, rel=1e-5), j
            x = block(x, ctx)  # the teacher's output moves on


def test_killed_and_resumed_stage_matches_uninterrupted(tmp_path):
    teacher = make_teacher()
    ref, _, ref_rows = stage1_align(teacher, batches, tcfg(steps=8, ckpt_dir=str(tmp_path / "a"), ckpt_every=3))

    def killed_at_step_7(i):
        if i == 7:
            raise KeyboardInterrupt("simulated kill")
        return batches(i)

    log = tmp_path / "b" / "layers.jsonl"
    log.parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        stage1_align(teacher, killed_at_step_7, tcfg(steps=8, ckpt_dir=str(tmp_path / "b"), ckpt_every=3), log)
    torch.manual_seed(123)  # a fresh process
    resumed, _, _ = stage1_align(teacher, batches, tcfg(steps=8, ckpt_dir=str(tmp_path / "b"), ckpt_every=3), log)
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["layer_mse"] for r in read_jsonl(log, key="batch")] == [r["layer_mse"] for r in ref_rows]


# ------------------------------------------------------------------------------------------------
# Step 2: layer selection
# ------------------------------------------------------------------------------------------------
def test_swap_layer_replaces_exactly_one_mixer():
    teacher = make_teacher(layers=4)
    aligned, _, _ = stage1_align(teacher, batches, tcfg(steps=2))
    ids = batches(5)[:, :-1]
    for i in range(4):
        m = swap_layer(teacher, aligned, i)
        assert m.config.layer_types == ["lightning" if j == i else "attention" for j in range(4)]
        ctx = Context.causal(teacher.config, *ids.shape)
        with torch.no_grad():  # by hand: the teacher's blocks, the aligned RNN at layer i
            x = teacher.embed_tokens(ids)
            for j, block in enumerate(teacher.layers):
                mixer = aligned.layers[i].mixer if j == i else block.mixer
                x = x + mixer(block.input_layernorm(x), ctx, None)
                x = x + block.mlp(block.post_attention_layernorm(x))
            ref = teacher.lm_head(teacher.norm(x))
            assert rel_err(m(ids), ref) < 1e-6, i  # fp32, the same ops
            assert rel_err(m(ids), teacher(ids)) > 1e-3  # and the swap does change the model


def test_select_attention_layers_on_the_qwen3_table():
    csr = {i: c for i, (c, r) in QWEN3_1_7B.items()}
    recall = {i: r for i, (c, r) in QWEN3_1_7B.items()}
    assert select_attention_layers(csr, recall, 7) == [2, 3, 6, 8, 9, 21, 25]
    s = selection_scores(csr, recall)
    assert sorted(s, key=lambda i: -s[i])[:7] == [3, 8, 2, 9, 21, 25, 6]
    assert s[3] == 50.0  # the best commonsense: a zero denominator, clipped at 50
    assert s[5] == 0.0  # the best recall
    assert s[8] == pytest.approx((0.7432 - 0.7258) / (0.5839 - 0.5828 + 1e-10))
    assert num_attention_layers(28) == 7 and num_attention_layers(8, ratio=0.5) == 4


def test_selection_ties_go_to_the_lower_layer():
    csr = {0: 0.5, 1: 0.4, 2: 0.4, 3: 0.4}
    recall = {0: 0.9, 1: 0.5, 2: 0.5, 3: 0.5}  # layers 1, 2, 3 tie
    assert select_attention_layers(csr, recall, 2) == [1, 2]
    assert recall_drop_layers({0: 0.9, 1: 0.5, 2: 0.5, 3: 0.6}, 1.0, 2) == [1, 2]
    assert evenly_spaced_layers(8, 2) == [3, 7] and evenly_spaced_layers(28, 7) == [3, 7, 11, 15, 19, 23, 27]


# ------------------------------------------------------------------------------------------------
# Step 3: the chunked KL
# ------------------------------------------------------------------------------------------------
def kl_reference(s, t):
    """From scratch in float64: mean over rows of sum_v p_v (log p_v - log q_v)."""
    p, q = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    return (p * (p.log() - q.log())).sum(-1).mean()


def test_chunked_kl_equals_unchunked_values_and_gradients():
    torch.manual_seed(0)
    s, t = torch.randn(3, 13, 50, requires_grad=True), 2 * torch.randn(3, 13, 50)
    full = kl_divergence(s, t, chunk_rows=10_000)
    (g_full,) = torch.autograd.grad(full, s)
    for rows in (1, 7, 39):
        chunked = kl_divergence(s, t, chunk_rows=rows)
        (g,) = torch.autograd.grad(chunked, s)
        assert rel_err(chunked, full) < 1e-6 and rel_err(g, g_full) < 1e-5, rows
    assert rel_err(full.double(), kl_reference(s, t)) < 1e-6  # fp32 vs fp64
    # the direction: KL(teacher || student), not the reverse
    assert rel_err(full.double(), kl_reference(t, s)) > 0.05


def test_kl_from_hidden_states_equals_kl_of_logits():
    torch.manual_seed(1)
    hs, ht = torch.randn(2, 9, 16, requires_grad=True), torch.randn(2, 9, 16)
    ws, wt = torch.nn.Linear(16, 50, bias=False), torch.nn.Linear(16, 50, bias=False)
    ref = kl_divergence(ws(hs), wt(ht), chunk_rows=10_000)
    ref_grads = torch.autograd.grad(ref, (hs, ws.weight))
    out = kl_divergence(hs, ht, chunk_rows=4, student_head=ws, teacher_head=wt)
    grads = torch.autograd.grad(out, (hs, ws.weight))
    assert rel_err(out, ref) < 1e-6
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(grads, ref_grads))


def test_kl_of_a_model_against_itself_is_zero():
    teacher = make_teacher()
    same = to_hypenet(teacher, range(3), attn_rope=True, attn_output_gate=False)  # computes what the teacher does
    ids = batches(3)
    assert torch.equal(teacher.lm_head(final_hidden(teacher, ids[:, :-1])), teacher(ids[:, :-1]))
    assert distill_loss(teacher, chunk_rows=7)(same, ids).item() == 0.0
    assert distill_loss(teacher)(to_hypenet(teacher, [0]), ids).item() > 1e-3


def test_stage2_kl_falls_and_the_teacher_stays_frozen():
    teacher = make_teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    aligned, _, _ = stage1_align(teacher, batches, tcfg(steps=5))
    student, hist = stage2_distill(teacher, aligned, [1], batches, tcfg(steps=40, lr=3e-3), chunk_rows=33)
    assert student.config.layer_types == ["lightning", "attention", "lightning"]
    assert not student.config.attn_rope and student.config.attn_output_gate
    assert np.mean(hist["loss"][-5:]) < 0.5 * hist["loss"][0], hist["loss"]
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


# ------------------------------------------------------------------------------------------------
# Step 5 and the pipeline
# ------------------------------------------------------------------------------------------------
def test_pick_query_scale_keeps_the_lowest_loss_and_saves_it(tmp_path):
    teacher = make_teacher()
    model = to_hypenet(teacher, [1]).eval()
    ids = batches(9)
    loss = lambda m: F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).item()  # noqa: E731
    a, table = pick_query_scale(model, loss, [1.5, 8, 1024])
    assert set(table) == {None, 1.5, 8, 1024}
    assert table[a]["loss"] == min(table[b]["loss"] for b in (1.5, 8, 1024))
    assert table[1.5]["loss"] != table[None]["loss"]  # s_t changes the model
    model.save_pretrained(str(tmp_path))
    assert HybridLM.from_pretrained(str(tmp_path)).config.attn_scale_a == float(a)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A random byte-level teacher (T = 96) and a small corpus of word documents."""
    root = tmp_path_factory.mktemp("halo")
    rng = np.random.default_rng(0)
    docs = [" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), 120)) + "." for _ in range(160)]
    data = prepare("words", "byte", out_dir=root / "data", docs=docs)
    make_teacher(vocab=256, layers=4, seq_len=96).save_pretrained(str(root / "teacher"))
    return root, data


def tiny_args(root, data, out, stages=",".join(STEPS)):
    return ["--out", str(root / out), "--teacher", str(root / "teacher"), "--data-dir", str(data), "--stages",
            stages, "--no-progress", "--steps-align", "3", "--steps-distill", "3", "--steps-finetune", "2",
            "--batch-align", "2", "--batch-distill", "2", "--finetune-lengths", "192",
            "--finetune-tokens-per-batch", "384", "--select-samples", "5", "--eval-samples", "1",
            "--eval-windows", "2", "--eval-lengths", "96,192", "--scale-length", "192", "--a-grid", "16,256"]


def test_cli_runs_end_to_end_and_steps_run_alone(tiny_world):
    root, data = tiny_world
    main(tiny_args(root, data, "run", "align,select"))
    assert (root / "run" / "align" / "model" / "config.json").is_file()
    main(tiny_args(root, data, "run", "distill,finetune,scale,report"))  # reads step 1's output
    d = root / "run"
    rep = json.loads((d / "report.json").read_text())
    sel = json.loads((d / "select.json").read_text())
    assert len(sel["layers"]) == 1 and sel["layers"] == sel["halo"]  # k = floor(4 / 4)
    assert rep["layer_types"].count("attention") == 1 and rep["query_scale_a"] in (16.0, 256.0)
    assert set(rep["eval"]) == {"teacher", "hypenet"} and set(rep["eval"]["hypenet"]["perplexity"]) == {"96", "192"}
    assert set(rep["steps"]) == {"align", "distill", "finetune"}
    assert rep["steps"]["distill"]["tokens"] == 3 * 2 * 96
    sha = json.loads((data / "meta.json").read_text())["sha256"]  # of the documents (tests/test_data.py)
    assert rep["corpus"] == {"corpus": "words", "sha256": sha} and sha in (d / "report.md").read_text()
    assert rep["wall_seconds"] >= rep["eval_seconds"] + rep["steps"]["distill"]["seconds"] > 0  # resumed: 2nd call
    for f in ("report.md", "perplexity.png", "niah.png", "layer_scores.png", "hybrid/config.json",
              "align/layers.jsonl", "distill/history.jsonl"):
        assert (d / f).is_file(), f
    assert len(read_jsonl(d / "align" / "layers.jsonl")) == 3


def test_clear_errors(tiny_world, tmp_path):
    root, data = tiny_world
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("huge")
    with pytest.raises(ValueError, match="k=9"):
        num_attention_layers(8, k=9)
    with pytest.raises(ValueError, match="k=5"):
        select_attention_layers({i: 0.5 for i in range(4)}, {i: 0.5 for i in range(4)}, 5)
    hybrid = to_hypenet(make_teacher(), [1])
    with pytest.raises(ValueError, match="distils a Transformer"):
        load_teacher(hybrid)
    hybrid.save_pretrained(str(tmp_path / "hybrid"))
    with pytest.raises(ValueError, match="distils a Transformer"):
        load_teacher(str(tmp_path / "hybrid"))
    with pytest.raises(ValueError, match="no such folder"):
        load_teacher(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="run the step 'align' first"):
        run(HaloConfig(out=str(tmp_path / "empty"), teacher=str(root / "teacher"), data_dir=str(data),
                       stages=("distill",), progress=False))
    with pytest.raises(ValueError, match="unknown stages"):
        run(HaloConfig(out=str(tmp_path / "x"), teacher=str(root / "teacher"), stages=("distil",)))
