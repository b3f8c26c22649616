"""The transformers export (minihalo.export): the exported folder, loaded by transformers in a process that
cannot import minihalo, must compute minihalo's logits, greedy tokens and loss.

The model is small and odd on purpose: layout A L L A L (attention first and in the middle), GQA with 4 query
and 2 key/value heads, the query scale s_t with a small base (a = 3, so s_t moves a lot within 30 tokens),
the attention output gate, random norm weights (a norm in the wrong place changes the logits), and Lightning
chunks of 8 tokens (several chunks and a partial one per prompt).
"""
import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from minihalo import HybridConfig, HybridLM, export_transformers
from minihalo.data import ByteTokenizer
from minihalo.evaluate import token_nll
from minihalo.export import main as export_main
from minihalo.ops import rel_err
from minihalo.train import next_token_loss

V, T, NEW = 97, 29, 10
LAYOUT = ["attention", "lightning", "lightning", "attention", "lightning"]


def tiny_hypenet(vocab_size=V, lin_chunk_size=8):
    torch.manual_seed(0)
    cfg = HybridConfig(vocab_size=vocab_size, hidden_size=48, intermediate_size=80, num_layers=5, num_heads=4,
                       num_kv_heads=2, head_dim=16, layer_types=LAYOUT, attn_rope=False, attn_output_gate=True,
                       attn_scale_a=3.0, lin_chunk_size=lin_chunk_size, max_position_embeddings=64)
    model = HybridLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def inputs():
    """A left-padded batch (rows of 29, 21, 1 and 12 real tokens), labels with ignored positions, and
    continuations to score (context, continuation) as lm-evaluation-harness does."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (4, T), generator=gen)
    mask = torch.ones_like(ids)
    for row, n in enumerate((29, 21, 1, 12)):
        mask[row, :T - n] = 0
    labels = torch.randint(0, V, (3, T), generator=gen)
    labels[0, :7] = -100
    labels[2, 20:] = -100
    pairs = [(torch.randint(0, V, (n,), generator=gen), torch.randint(0, V, (c,), generator=gen))
             for n, c in ((5, 3), (17, 1), (1, 9))]
    return ids, mask, labels, pairs


# Runs in a fresh interpreter where `import minihalo` fails; loads the folder with trust_remote_code
# (its modules cached under a fresh HF_MODULES_CACHE) and saves what transformers computes.
TRANSFORMERS_SIDE = textwrap.dedent("""
    import inspect, sys
    sys.modules["minihalo"] = None  # any import of minihalo now raises ImportError
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import AutoModelForCausalLM
    folder, ins, out = sys.argv[1:]
    ids, mask, labels, pairs = torch.load(ins)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    source = open(inspect.getsourcefile(type(model))).read()
    r = {"module": type(model).__module__, "same_source": source == open(folder + "/modeling_hypenet.py").read(),
         "dtype": str(model.dtype)}
    with torch.no_grad():
        r["logits"] = model(ids, attention_mask=mask).logits
        r["logits_unpadded"] = model(ids).logits
        r["last_logits"] = model(ids, attention_mask=mask, logits_to_keep=1).logits
        r["loss"] = model(ids[:3], labels=labels).loss
        r["greedy"] = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        r["greedy_no_cache"] = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                              use_cache=False)
        for cache in (True, False):
            r[f"beam_{cache}"] = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3,
                                                do_sample=False, use_cache=cache)
            torch.manual_seed(5)
            r[f"sample_{cache}"] = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True,
                                                  top_k=0, use_cache=cache)
        r["scores"] = []  # log P(continuation | context), lm-evaluation-harness's loglikelihood
        for ctx, cont in pairs:
            logits = model(torch.cat([ctx, cont])[None, :-1]).logits[0, -len(cont):]  # (C, V)
            r["scores"].append(F.log_softmax(logits.float(), -1).gather(-1, cont[:, None]).sum().item())
        new = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56)  # "torch_dtype" before
        bf16 = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                    **{"dtype" if new else "torch_dtype": torch.bfloat16}).eval()
        r["bf16_dtypes"] = sorted({str(p.dtype) for p in bf16.parameters()})
        r["bf16_logits"] = bf16(ids, attention_mask=mask).logits.float()
    torch.save(r, out)
""")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(minihalo model, folder, what transformers computed in a process without minihalo)."""
    model = tiny_hypenet()
    tmp = tmp_path_factory.mktemp("export")
    folder = export_transformers(model, tmp / "hypenet")
    torch.save(inputs(), tmp / "inputs.pt")
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp / "modules"), "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": "2", "HOME": str(tmp)}
    subprocess.run([sys.executable, "-c", TRANSFORMERS_SIDE, str(folder), str(tmp / "inputs.pt"),
                    str(tmp / "out.pt")], check=True, env=env, cwd=tmp)
    return model, folder, torch.load(tmp / "out.pt")


def test_loads_the_folder_code_without_minihalo(exported):
    _, _, r = exported
    assert r["module"].startswith("transformers_modules.") and r["same_source"]
    assert r["dtype"] == "torch.float32"


def test_logits_equal_minihalo(exported):
    model, _, r = exported
    ids, mask, _, _ = inputs()
    with torch.no_grad():
        ours, ours_unpadded = model(ids, mask), model(ids)
    real = mask[..., None].bool()  # padded positions' logits are not compared (nothing reads them)
    assert rel_err(r["logits"].masked_select(real), ours.masked_select(real)) <= 1e-4  # fp32: summation order
    assert rel_err(r["logits_unpadded"], ours_unpadded) <= 1e-4
    assert rel_err(r["last_logits"], ours[:, -1:]) <= 1e-4


def test_generate_left_padded_equals_minihalo_greedy(exported):
    model, _, r = exported
    ids, mask, _, _ = inputs()
    ours = model.generate(ids, mask, max_new_tokens=NEW)
    assert torch.equal(r["greedy"], ours)
    assert torch.equal(r["greedy_no_cache"], ours)


def test_loss_with_labels_equals_minihalo(exported):
    model, _, r = exported
    ids, _, labels, _ = inputs()
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)  # next token, -100 = none
    with torch.no_grad():
        ours = next_token_loss(model, {"input_ids": ids[:3], "targets": targets})
    assert abs(r["loss"].item() - ours.item()) <= 1e-5 * ours.item()


def test_beam_search_and_sampling_with_cache_equal_without(exported):
    """The cache (its reordering between beams, its RNN states) changes nothing but the speed."""
    _, _, r = exported
    assert torch.equal(r["beam_True"], r["beam_False"])
    assert torch.equal(r["sample_True"], r["sample_False"])
    assert not torch.equal(r["sample_True"][:, T:], r["greedy"][:, T:T + 6])  # sampling did sample


def test_continuation_scores_equal_minihalo(exported):
    model, _, r = exported
    _, _, _, pairs = inputs()
    for (ctx, cont), theirs in zip(pairs, r["scores"]):
        ours = -token_nll(model, torch.cat([ctx, cont])[None])[0, -len(cont):].sum().item()
        assert abs(theirs - ours) <= 1e-4 * abs(ours)


def test_bfloat16_loading(exported):
    model, _, r = exported
    ids, mask, _, _ = inputs()
    assert r["bf16_dtypes"] == ["torch.bfloat16"]
    with torch.no_grad():
        ours = model(ids, mask)
    real = mask[..., None].bool()
    assert rel_err(r["bf16_logits"].masked_select(real), ours.masked_select(real)) < 3e-2  # bf16: 8-bit mantissa


@pytest.mark.parametrize("changes", [dict(tie_word_embeddings=False, attention_bias=True),
                                     dict(lin_mha=False, qk_norm=False, attn_output_gate=False, attn_scale_a=None),
                                     dict(attn_rope=True, lin_rope=False, lin_output_norm=False, lin_fp32=True),
                                     dict(num_heads=6, num_kv_heads=3)],  # decays of a head count not a power of 2
                         ids=["untied-biases", "shared-kv", "rope-in-attention", "six-heads"])
def test_other_configurations(tmp_path, changes):
    """Other HybridConfig switches survive the export (loaded in this process: the folder's code all the same)."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM
    torch.manual_seed(2)
    model = HybridLM(replace(tiny_hypenet().config, **changes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # biases and norms off their zero / one start
    hf = AutoModelForCausalLM.from_pretrained(str(export_transformers(model, tmp_path / "m")),
                                              trust_remote_code=True).eval()
    ids, mask, _, _ = inputs()
    real = mask[..., None].bool()
    with torch.no_grad():
        ours, theirs = model(ids, mask), hf(ids, attention_mask=mask).logits
    assert rel_err(theirs.masked_select(real), ours.masked_select(real)) <= 1e-4
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == model.config.tie_word_embeddings


def test_export_is_deterministic(exported, tmp_path):
    model, folder, _ = exported
    again = export_transformers(tiny_hypenet(), tmp_path / folder.name)
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert {"config.json", "configuration_hypenet.py", "modeling_hypenet.py", "model.safetensors",
            "generation_config.json", "README.md"} <= set(names)
    for name in names:
        assert (folder / name).read_bytes() == (again / name).read_bytes(), name


def test_config_and_model_card(exported):
    model, folder, _ = exported
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["layer_types"] == ["full_attention", "linear_attention", "linear_attention", "full_attention",
                                  "linear_attention"]
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (5, 4, 2)
    assert cfg["attn_scale_a"] == 3.0 and cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_hypenet.HypeNetForCausalLM"
    card = (folder / "README.md").read_text()
    assert "Layers: `A L L A L`" in card and "a = 3" in card
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in card


def test_cli_from_a_halo_run_folder(tmp_path):
    """A run folder as minihalo.halo writes it: config.json, hybrid/, report.json; the card shows the
    teacher, HALO's tokens per step and the evaluation table."""
    run = tmp_path / "run"
    tiny_hypenet().save_pretrained(str(run / "hybrid"))
    (run / "config.json").write_text(json.dumps({"teacher": "toy", "tokenizer": "byte", "preset": "tiny",
                                                 "eval_lengths": [128, 256]}))
    steps = {s: {"tokens": n, "seconds": 1.5, "tokens_per_s": n / 1.5, "final_loss": 0.25}
             for s, n in (("align", 1000), ("distill", 3000), ("finetune", 2000))}
    evals = {name: {"perplexity": {"128": p, "256": p + 1}, "niah": {"128": 1.0, "256": 0.5}}
             for name, p in (("teacher", 3.0), ("hypenet", 3.25))}
    (run / "report.json").write_text(json.dumps({"steps": steps, "eval": evals, "device": "CPU, 2 thread(s)",
                                                 "train_length": 128, "select": {"layers": [0, 3], "rule": "halo"}}))
    export_main([str(run), str(tmp_path / "out"), "--dtype", "bfloat16"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Distilled with HALO from the Transformer `toy`" in card and "in layers [0, 3]" in card
    assert "| distill | 3,000 |" in card and "| total | 6,000 |" in card
    assert "| hypenet perplexity | 3.250 | 4.250 |" in card and "| teacher NIAH (%) | 100 | 50 |" in card
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"  # transformers 5 writes "dtype", 4.x "torch_dtype"
    from safetensors import safe_open
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    # the run's byte tokenizer, as a transformers tokenizer: ids = UTF-8 bytes, EOS and padding = byte 0
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    text = "Héllo wörld,\n\t 3 € 😀 "
    assert tok(text)["input_ids"] == ByteTokenizer().encode(text) and len(tok) == 256
    assert tok.decode(ByteTokenizer().encode(text) + [0], skip_special_tokens=True) == text
    assert (tok.eos_token_id, tok.pad_token_id) == (0, 0)
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["pad_token_id"] == 0


def test_lm_evaluation_harness_loglikelihood(tmp_path):
    """lm-evaluation-harness's `--model hf` scoring (HFLM.loglikelihood) on an exported byte-level model
    equals minihalo's log-probabilities. lm-eval is not in requirements-dev.txt (it installs pandas, pyarrow,
    scipy, scikit-learn and more): the test runs where it is installed."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    model = tiny_hypenet(vocab_size=256)
    folder = export_transformers(model, tmp_path / "hypenet", ByteTokenizer())
    lm = HFLM(pretrained=str(folder), trust_remote_code=True, device="cpu", batch_size=2)
    requests = [("The capital of France is", " Paris"), ("Hello", " wörld!"), ("abc", "d")]
    scores = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)])
    tok = ByteTokenizer()
    for (context, continuation), (theirs, _) in zip(requests, scores):
        n = len(tok.encode(continuation))
        ours = -token_nll(model, torch.tensor(tok.encode(context + continuation))[None])[0, -n:].sum().item()
        assert abs(theirs - ours) <= 1e-4 * abs(ours)


def test_readme_export_snippet_runs_as_written(tmp_path, monkeypatch):
    """The README's export snippet, after its package snippet (which saves runs/hypenet-toy)."""
    from pathlib import Path

    import transformers
    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (4, 56):
        pytest.skip("the snippet passes dtype=, which transformers takes from 4.56 on")
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    blocks = [re.findall(r"```python\n(.*?)```", readme[readme.index(h):], re.S)[0]
              for h in ("## The package", "## Export to transformers")]
    (tmp_path / "data").symlink_to(root / "data")
    monkeypatch.chdir(tmp_path)
    scope = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), scope)
    out, batch, same = scope["out"], scope["batch"], scope["same"]
    assert scope["model"].dtype == torch.bfloat16 and out.shape == (2, batch["input_ids"].shape[1] + 8)
    ours = same.to(torch.bfloat16).generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=8)
    assert torch.equal(out, ours)  # bf16 on both sides, the same operations


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_with_device_map_and_bfloat16(tmp_path):
    """On a GPU with minihalo installed the exported model's Lightning layers run minihalo's Triton kernels:
    fp32 logits and greedy tokens equal minihalo's; loaded in bf16 with device_map, its logits equal those
    of minihalo's model cast to bf16."""
    from transformers import AutoModelForCausalLM
    model = tiny_hypenet(lin_chunk_size=16).cuda()  # minihalo's kernels take chunks of 16 tokens or more
    folder = export_transformers(model, tmp_path / "hypenet")
    ids, mask, _, _ = (t.cuda() if isinstance(t, torch.Tensor) else t for t in inputs())
    real = mask[..., None].bool()
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            hf = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=dtype,
                                                      device_map="auto").eval()
            ours = model.to(dtype)(ids, mask)
            theirs = hf(ids, attention_mask=mask).logits
            assert theirs.device.type == "cuda" and theirs.dtype == dtype
            assert rel_err(theirs.masked_select(real), ours.masked_select(real)) <= (1e-4 if dtype == torch.float32
                                                                                     else 1e-2)
            if dtype == torch.float32:
                greedy = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
                assert torch.equal(greedy, model.generate(ids, mask, max_new_tokens=NEW))


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(TypeError, match="HybridLM"):
        export_transformers(torch.nn.Linear(2, 2), tmp_path / "x")
    with pytest.raises(ValueError, match="neither a HALO run folder"):
        export_main([str(tmp_path), str(tmp_path / "out")])
