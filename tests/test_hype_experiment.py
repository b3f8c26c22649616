"""The HyPE experiment's plumbing (minihalo.experiments.hype): layouts, the recipe's options, the attention
probe against the attention layer itself, the parallel runner with its deadline, the summary."""
import math

import numpy as np
import pytest
import torch

from minihalo import HybridConfig, HybridLM
from minihalo.evaluate import token_nll
from minihalo.experiments import hype
from minihalo.model import Context
from minihalo.tasks import TokenNIAH

TINY = dict(steps=2, multiples=[1, 2], niah_samples=5, loss_rows=1, a_grid=[4, 16], curve_points=1)


def test_layouts():
    p = hype.PRESETS["gpu"]
    for name in hype.VARIANTS:
        cfg = hype.model_config(p, name)
        assert cfg.num_layers == 8 and cfg.hidden_size == 256  # one size for every model
        attn = [t == "attention" for t in cfg.layer_types]
        assert attn == ([True] * 8 if name == "transformer_rope" else [True, False, False, False] * 2)
    assert (hype.model_config(p, "hype").attn_rope, hype.model_config(p, "hype").lin_rope) == (False, True)
    assert hype.model_config(p, "all_rope").attn_rope and not hype.model_config(p, "all_nope").attn_rope
    assert set(hype.WITH_SCALE) == {v for v in hype.VARIANTS if not hype.model_config(p, v).attn_rope}


def test_training_batch_follows_the_recipe():
    task = TokenNIAH(seed=0)
    for alphabet in ("all", "haystack"):
        p = {**hype.PRESETS["cpu"], "copy_alphabet": alphabet, "copy_len": [5, 9], "batch_size": 40, "copy_share": 0.25}
        x = hype.training_batch(task, p, 0, 3)
        copies = x[:10].numpy()  # copy_share 0.25 of 40 rows
        assert np.isin(copies, hype.COPY_ALPHABETS[alphabet]).all()
        assert all(any((row[P:] == row[:-P]).all() for P in range(5, 10)) for row in copies)
        assert (x[10:] == TokenNIAH.QUERY).any(1).all()  # the rest are needle rows
    seen = np.unique(hype.training_batch(task, {**p, "copy_alphabet": "all"}, 0, 3)[:10].numpy())
    assert seen.min() < TokenNIAH.VALUES[1] <= TokenNIAH.HAY[0] < seen.max()  # keys or values and haystack


def tiny_model(**kw):
    cfg = HybridConfig(vocab_size=TokenNIAH.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, layer_types=["attention", "lightning"],
                       rope_theta=100.0, **kw)
    torch.manual_seed(0)
    return HybridLM(cfg).eval()


@pytest.mark.parametrize("kw", [dict(attn_rope=True), dict(attn_rope=False), dict(attn_rope=False, attn_scale_a=8.0)])
def test_attention_weights_reproduce_the_layer(kw):
    """The probe's weights, applied to the layer's values, give the layer's output (RoPE, NoPE, s_t)."""
    mixer = tiny_model(**kw).layers[0].mixer
    x = torch.randn(2, 20, 32)
    ctx = Context.causal(mixer.cfg, 2, 20)
    w = hype.attention_weights(mixer, x, ctx)  # (B, H, T, T)
    v = mixer.v_proj(x).view(2, 20, 2, 8).repeat_interleave(2, dim=2)  # (B, T, H, D)
    o = torch.einsum("bhts,bshd->bthd", w, v).reshape(2, 20, 32)
    with torch.no_grad():
        assert torch.allclose(mixer.o_proj(o), mixer(x, ctx, None), atol=1e-5)
    assert torch.allclose(w.sum(-1), torch.ones(2, 4, 20)) and (w.triu(1) == 0).all()


def test_qk_gain_multiplies_every_logit_by_its_square():
    model = tiny_model(attn_rope=True)
    mixer = model.layers[0].mixer
    x, ctx = torch.randn(1, 12, 32), Context.causal(mixer.cfg, 1, 12)
    log_w1 = hype.attention_weights(mixer, x, ctx).log()
    hype.set_qk_gain(model, 1.5)
    log_w = hype.attention_weights(mixer, x, ctx).log()
    diff = (log_w - 1.5 ** 2 * log_w1).tril()  # log softmax(g² s) = g² log softmax(s) + a constant per row
    rowwise = diff - diff[..., :1]
    assert rowwise.tril().abs().max() < 1e-4


def test_needle_attention_of_uniform_attention():
    """With zero queries every attention row is uniform over the prefix: the answering position (the last of
    T tokens) puts 4/T on the needle and 16/T on the last 16 tokens, in every head."""
    model = tiny_model(attn_rope=True)
    torch.nn.init.zeros_(model.layers[0].mixer.q_proj.weight)
    samples = TokenNIAH(seed=0).make(64, 0.5, 3)
    out = hype.needle_attention(model, samples)
    assert out["needle"] == pytest.approx([4 / 64]) and out["recent"] == pytest.approx([16 / 64])
    assert out["recent_all_heads"] == pytest.approx([16 / 64])


def test_row_losses_pick_each_value_token():
    task = TokenNIAH(seed=0)
    rows = task.training_rows(np.random.default_rng(0), 2, 64)
    first = [TokenNIAH.NEEDLE, 9, 50, 51] + list(range(110, 167)) + [TokenNIAH.QUERY, 9, 50, 51]  # a needle at 0
    rows = torch.cat([rows, torch.tensor([first])])
    model = tiny_model(attn_rope=True)
    nll = token_nll(model, rows)  # (N, L): nll[:, t] scores token t+1
    q = [(i, t) for i in range(3) for t in range(63) if rows[i, t] == TokenNIAH.QUERY]
    want_v1 = np.mean([nll[i, t + 1].item() for i, t in q])  # QUERY key v1 v2: v1 is predicted at the key
    want_v2 = np.mean([nll[i, t + 2].item() for i, t in q if t + 2 < 64])
    got = hype.row_losses(model, rows)
    assert got["v1"] == pytest.approx(want_v1, rel=1e-5) and got["v2"] == pytest.approx(want_v2, rel=1e-5)
    assert got["all"] == pytest.approx(nll.mean().item(), rel=1e-5)
    parts = [got[k] for k in ("sum_haystack", "sum_needles", "sum_questions")]
    assert sum(parts) / 64 == pytest.approx(got["all"], rel=1e-5)
    first_q = [int(np.argmax(rows[i, 1:].numpy() == TokenNIAH.QUERY)) for i in range(3)]
    assert got["sum_questions"] == pytest.approx(np.mean([nll[i, q:].sum().item() for i, q in enumerate(first_q)]),
                                                 rel=1e-5)
    needle_nll = [sum(nll[i, n - 1 + k].item() for n in range(65) if rows[i, n] == TokenNIAH.NEEDLE
                      for k in range(4) if n - 1 + k >= 0) for i in range(3)]  # token n + k is scored at n - 1 + k
    assert got["sum_needles"] == pytest.approx(np.mean(needle_nll), rel=1e-5)
    for T, n_spans in ((64, 1), (16, 3), (24, 3)):  # spans [0, T), [T, 2T), [2T, 4T) ...: 4T >= 64 > 2T
        spans = hype.row_losses(model, rows, T)["haystack_by_span"]
        assert len(spans) == n_spans and sum(spans) == pytest.approx(got["sum_haystack"], rel=1e-5)
    hay = hype.row_losses(model, rows[2:])  # the hand-made row: haystack tokens at 4..60, predicted at 3..59
    late = hype.row_losses(model, rows[2:], 16)["haystack_by_span"]  # [0, 16), [16, 32), [32, 64)
    assert late[0] == pytest.approx(nll[2, 3:16].sum().item(), rel=1e-5)
    assert late[2] == pytest.approx(nll[2, 32:60].sum().item(), rel=1e-5) and sum(late) == pytest.approx(hay["sum_haystack"])


def test_run_gives_every_length_and_the_scaled_variant():
    res = hype.run("cpu", ["all_nope"], progress=False, **TINY)
    assert set(res["models"]) == {"all_nope", "all_nope_st"}
    assert set(res["models"]["all_nope"]["niah"]) == {1, 2} and res["models"]["all_nope_st"]["scale_a"] in (4, 16)
    assert all(len(v) == len(hype.DEPTHS) for v in res["models"]["all_nope"]["niah_by_depth"].values())
    probe = res["models"]["all_nope"]["curve"][-1][1]
    assert len(probe["attn_needle"]) == 2 and 0 < probe["answer_nll_v1"] and "copy_nll_64" in probe
    with pytest.raises(ValueError, match="unknown preset entries"):
        hype.run("cpu", ["hype"], progress=False, step=3)


def test_parallel_runs_report_failures_and_keep_the_rest():
    res = hype.run_parallel("cpu", ["hype", "no_such_variant"], [0], changes=TINY)
    assert [r["seed"] for r in res["runs"]] == [0] and list(res["runs"][0]["models"]) == ["hype", "hype_st"]
    assert [f[0] for f in res["failed"]] == ["no_such_variant_0"]


def test_deadline_stops_a_run_and_keeps_its_curve():
    long = dict(TINY, steps=100000, curve_points=100000)  # a probe after every step, for far longer than allowed
    res = hype.run_jobs("cpu", [{"label": "long", "variant": "hype", "seed": 0, "changes": long}], deadline=25)
    assert res["runs"] == [] and res["failed"] == [] and res["wall_seconds"] < 60
    (stopped,) = res["stopped"]
    assert stopped["label"] == "long" and stopped["curve"][0][0] == 1 and "niah_1x" in stopped["curve"][0][1]
    assert list(hype.learning_curves(res)) == ["long"] and "\nlong " in hype.learning_table(res)


def test_the_command_line_prints_runs_stopped_at_the_deadline(monkeypatch, capsys):
    """A --seeds run whose every process stopped at the deadline prints their learning curves' last points."""
    curve = [[90, {"niah_1x": 0.95, "answer_nll_v1": 0.1, "answer_nll_v2": 0.2, "copy_nll_16": 0.3,
                   "copy_nll_64": 0.4, "attn_needle": [0.5, 0.9]}]]
    stopped = {"runs": [], "failed": [], "stopped": [{"label": "transformer_rope_2", "curve": curve}]}
    monkeypatch.setattr(hype, "run_parallel", lambda *a, **k: stopped)
    hype.main(["--variants", "transformer_rope", "--seeds", "2"])
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[:4] == ["transformer_rope_2", "90", "95", "90"] and row[-2:] == ["50", "90"]


def test_summary_over_seeds():
    runs = [{"models": {"hype": {"niah": {"1": 1.0, "64": a}}}} for a in (0.25, 1.0, 1.0)]
    s = hype.summary(runs)["hype"]
    assert s["seeds"] == 3 and s["niah"]["1"] == (1.0, 1.0, 1.0) and s["niah"]["64"] == (0.75, 0.25, 1.0)
    assert hype.first_step_at([(10, {"niah_1x": 0.5}), (20, {"niah_1x": 0.95}), (30, {"niah_1x": 1.0})]) == 20
    assert hype.first_step_at([(10, {"niah_1x": 0.5})]) is None
    assert hype.first_step_at([(10, {"niah_1x": torch.ones(18).sum().div(20).item()})]) == 10  # 18 of 20 in fp32


def test_haystack_entropy_is_the_loss_of_the_true_chain():
    """Scored with its own transition probabilities, a long sample of the chain costs the computed entropy."""
    task = TokenNIAH(seed=1)
    lo, n = TokenNIAH.HAY[0], 152
    P = np.full((n, n), 0.1 / n)
    for i in range(n):
        for j in task.successors[lo + i]:
            P[i, j - lo] += 0.9 / 3
    x = task.haystack(200000, np.random.default_rng(0)) - lo
    assert hype.haystack_entropy(task) == pytest.approx(-np.log(P[x[:-1], x[1:]]).mean(), abs=0.01)
    assert hype.haystack_entropy(TokenNIAH(haystack="uniform")) == pytest.approx(math.log(152))


def test_needle_attention_finds_the_head_on_the_needle(monkeypatch):
    """Head 1 puts the answering row's mass on the needle's value tokens, the others on the last token: the
    needle share is that head's, its recent share 0, and the mean over heads of the recent share 3/4."""
    samples = TokenNIAH(seed=0).make(64, 0.3, 3)

    def weights(mixer, x, ctx):
        w = torch.zeros(x.shape[0], 4, 64, 64)
        w[:, :, :, -1] = 1
        for j, s in enumerate(samples):
            w[j, 1, -1, :] = 0
            w[j, 1, -1, s.needle_start + 2:s.needle_start + 4] = 0.5
        return w

    monkeypatch.setattr(hype, "attention_weights", weights)
    out = hype.needle_attention(tiny_model(attn_rope=True), samples)
    assert out == {"needle": [1.0], "recent": [0.0], "recent_all_heads": [0.75]}
