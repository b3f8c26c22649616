"""The route for real pretrained teachers: a teacher by name (smollm2, a GGUF file, a transformers folder) converted
once and loaded with its own tokenizer; a tiny random Qwen3 (q/k norms, GQA) through the whole command line."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from minihalo import settings
from minihalo.convert import convert_gguf, converted_folder, from_hf, gguf_file, save_transformers_folder, to_hypenet
from minihalo.export import load_for_export
from minihalo.data import (ByteTokenizer, HFTokenizer, TokenFile, long_heldout_documents, prepare,
                           write_generated_corpus)
from minihalo.halo import RECALL_TASKS, load_teacher, niah_recall
from minihalo.model import HybridLM
from minihalo.pipeline import ConfigError, HaloConfig, main
from minihalo.tasks import make_niah_sample
from minihalo.train import OutOfTime, TrainConfig, train
from test_halo import batches, make_teacher
from test_pipeline import tiny_args, word_corpus


def tiny_qwen3(folder, seed=0):
    """A random transformers Qwen3 (vocabulary 256: the byte tokenizer; 4 heads over 2 KV heads; q/k norm and
    layer norm weights away from 1, so a norm left at its initial ones shows), saved to `folder`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=256, hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=12, max_position_embeddings=96, tie_word_embeddings=False,
                      eos_token_id=0, bos_token_id=0, pad_token_id=0)
    hf = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(str(folder))
    return hf


@pytest.fixture(scope="module")
def qwen3_world(tmp_path_factory):
    """test_pipeline's world (a corpus of word documents, a teacher folder) with a tiny random Qwen3 as the teacher."""
    root = tmp_path_factory.mktemp("qwen3")
    return (root, word_corpus(root / "data")), tiny_qwen3(root / "teacher")


def qk_norms(mixer):
    return torch.cat([mixer.q_norm.weight, mixer.k_norm.weight])


@pytest.fixture(scope="module")
def qwen3_finished(qwen3_world):
    """The whole command line in one run folder (a transformers folder without tokenizer files, vocabulary 256:
    the byte tokenizer)."""
    world, _ = qwen3_world
    main(tiny_args(world, "finished"))
    return world[0] / "finished"


def test_a_tiny_qwen3_goes_through_the_whole_command_line(qwen3_world, qwen3_finished):
    world, hf = qwen3_world
    root, d = world[0], qwen3_finished
    rep = json.loads((d / "report.json").read_text())
    assert (d / "report.md").is_file() and set(rep["eval"]) == {"teacher", "hypenet"}
    layers = json.loads((d / "select.json").read_text())["layers"]
    hybrid = HybridLM.from_pretrained(str(d / "hybrid"))
    types = hybrid.config.layer_types
    assert [i for i, t in enumerate(types) if t == "attention"] == layers and "lightning" in types
    ids = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(hybrid(ids)).all()
    # the q/k norms are the teacher's in both kinds of layer: exactly at the conversion, and after the few small
    # training steps far closer to them than to the fresh ones a dropped weight would leave
    teacher_norms = [qk_norms(layer.self_attn) for layer in hf.model.layers]  # transformers' own tensors
    converted = to_hypenet(load_teacher(str(root / "teacher")), layers)
    for i, layer in enumerate(converted.layers):
        assert torch.equal(qk_norms(layer.mixer), teacher_norms[i]), (i, types[i])
    for i, layer in enumerate(hybrid.layers):
        got, want = qk_norms(layer.mixer), teacher_norms[i]
        assert (got - want).norm() < 0.05 * (torch.ones_like(want) - want).norm(), (i, types[i])
    assert load_for_export(d)[1] == "byte"  # the tokenizer the run used (unset: the teacher has none, so bytes)


def test_the_tokenizer_defaults_to_the_teachers_own(qwen3_world, tmp_path):
    world, hf = qwen3_world
    root, data = world
    folder = tmp_path / "teacher"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((root / "teacher" / name).read_bytes())
    cfg = HaloConfig(out=str(tmp_path / "run"), teacher=str(folder), data_dir=str(data))
    assert settings.tokenizer_name(cfg) == "byte"  # no tokenizer files: bytes (its vocabulary has 256 tokens)
    (folder / "tokenizer.json").write_text("{}")
    assert settings.tokenizer_name(cfg) == str(folder)
    assert settings.tokenizer_name(cfg, "elsewhere") == "elsewhere"  # where its weights load from (a conversion)
    assert settings.tokenizer_name(HaloConfig(teacher="smollm2")) == "smollm2"
    assert settings.tokenizer_name(HaloConfig(teacher="toy")) == "byte"
    assert settings.tokenizer_name(HaloConfig(teacher="smollm2", tokenizer="byte")) == "byte"  # --tokenizer wins
    # a teacher with a large vocabulary and no tokenizer files is refused before anything runs
    big = tmp_path / "big"
    tiny_qwen3(big).config  # noqa: B018
    config = json.loads((big / "config.json").read_text())
    (big / "config.json").write_text(json.dumps(config | {"vocab_size": 300}))
    with pytest.raises(ConfigError, match="^tokenizer: expected the teacher's tokenizer .*300 tokens"):
        settings.check_config(HaloConfig(out=str(tmp_path / "run"), teacher=str(big), data_dir=str(data)))


def test_retrieval_rows_in_a_bpe_corpus_only_when_asked_for(smollm2_folder, tmp_path):
    """With a teacher's own tokenizer, training rows are text alone unless --retrieval-share asks for needle documents,
    which the run's tokenizer writes over training text; copy rows (bytes) are refused before anything runs."""
    from minihalo.pipeline import Run
    from minihalo.teacher import teacher_batches
    tok = HFTokenizer(str(smollm2_folder))
    docs = [" ".join(["The river runs past the old mill and the bridge."] * 40) for _ in range(30)]
    data = prepare("river", tok, out_dir=tmp_path / "data", docs=docs)
    text = teacher_batches(data, 256, 8, 0.0, seed=0, tokenizer=tok)(0)  # (8, 257)
    mixed = teacher_batches(data, 256, 8, 0.5, seed=0, tokenizer=tok)(0)
    assert not any("magic number" in tok.decode(r.tolist()) for r in text)
    needles = ["The magic number for" in tok.decode(r.tolist()) for r in mixed]
    assert 0 < sum(needles) < 8 and all("river" in tok.decode(r.tolist()) for r in mixed)
    with pytest.raises(ValueError, match="copy rows are strings of bytes"):
        teacher_batches(data, 256, 8, 0.25, 0.25, tokenizer=tok)
    cfg = HaloConfig(out=str(tmp_path / "run"), teacher=str(smollm2_folder), data_dir=str(data), seq_len=256,
                     eval_lengths=[256], scale_length=256, finetune_lengths=[256], finetune_tokens_per_batch=256)
    with pytest.raises(ConfigError, match="^copy_share: expected 0 with a teacher's own tokenizer"):
        settings.check_config(replace(cfg, copy_share=0.1))
    run = Run(cfg)  # the default: text alone with a teacher's own tokenizer
    assert not any("magic number" in tok.decode(r.tolist()) for r in run.batches(256, 8)(0))
    run.cfg.retrieval_share = 0.5
    assert any("magic number" in tok.decode(r.tolist()) for r in run.batches(256, 8)(0))


def test_a_missing_gguf_file_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="^teacher: no such GGUF file"):
        settings.check_config(HaloConfig(out=str(tmp_path / "run"), teacher=str(tmp_path / "model.gguf")))
    assert gguf_file("toy") is None and gguf_file(str(tmp_path / "a.gguf")) == tmp_path / "a.gguf"


@pytest.fixture(scope="module")
def smollm2_folder(smollm2, tmp_path_factory):
    """SmolLM2 as convert_gguf writes it (from transformers' load of the GGUF file, as convert_gguf loads it)."""
    hf, tok = smollm2
    return save_transformers_folder(hf, tok, tmp_path_factory.mktemp("smollm2") / "smollm2")


def test_smollm2_by_name_converted_once_with_transformers_logits(smollm2, smollm2_folder):
    hf, tok = smollm2
    gguf, folder = gguf_file("smollm2"), smollm2_folder
    assert converted_folder(gguf).name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert convert_gguf(gguf, folder) == folder  # a finished conversion is reused, not redone
    model = from_hf(str(folder))  # the fp32 folder holds the GGUF's de-quantized weights, bit for bit
    assert model.config.num_layers == 30 and model.config.num_kv_heads == 3 and model.config.tie_word_embeddings
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids), hf(ids).logits)
    assert HFTokenizer(folder).encode("The capital of France is") == ids[0].tolist()
    cfg = settings.read_teacher_config(str(gguf))  # the GGUF's metadata, or its conversion's config.json
    assert (cfg.num_layers, cfg.vocab_size, cfg.max_position_embeddings) == (30, 49152, 8192)


def test_a_time_budget_stops_at_a_checkpoint_and_the_same_command_continues(qwen3_world, qwen3_finished, capsys):
    world, _ = qwen3_world
    out = world[0] / "budget"
    command = tiny_args(world, out, "--max-minutes", "1e-6")  # spent after every optimizer step
    messages = []
    for _ in range(20):
        try:
            main(command)
            break
        except SystemExit as stop:
            assert stop.code == 75
            messages.append(capsys.readouterr().err.strip())
    assert messages[0] == "the time budget of 1e-06 minutes is spent; run the same command to resume from step 1 " \
                          "of align"
    # one optimizer step, one other step or one of the report's evaluations (a model at a length) per command
    wheres = [m.split("; run the same command to ")[1].removeprefix("resume from ") for m in messages]
    assert wheres == ["step 1 of align", "step 2 of align", "the start of select", "the start of distill",
                      "step 1 of distill", "step 2 of distill", "the start of finetune (length 192)", "step 1 of "
                      "finetune (length 192)", "step 2 of finetune (length 192)", "step 3 of finetune (length 192)",
                      "the start of scale", "the start of report"] + ["continue the report where it stopped"] * 3
    for name in ("distill/model/model.safetensors", "hybrid/model.safetensors"):  # as if never stopped
        assert (out / name).read_bytes() == (qwen3_finished / name).read_bytes(), name
    stats = json.loads((out / "distill" / "stats.json").read_text())
    finished = json.loads((qwen3_finished / "distill" / "stats.json").read_text())
    assert stats["tokens"] == finished["tokens"] == 3 * 2 * 96
    assert 0 < stats["seconds"] < 60 and stats["tokens_per_s"] == pytest.approx(stats["tokens"] / stats["seconds"])
    assert stats["peak_memory"] == "process peak RSS" and stats["peak_memory_bytes"] > 100e6  # torch alone: more
    select = json.loads((out / "select.json").read_text())
    assert select["peak_memory"] == "process peak RSS" and select["seconds"] > 0


def test_a_deadline_checkpoints_the_step_it_stops_at_and_the_resumed_run_is_exact(tmp_path):
    """No periodic checkpoints (ckpt_every=0): the one the deadline writes is all a resumed run has."""
    cfg = TrainConfig(steps=5, lr=1e-2, warmup_steps=2, progress=False, ckpt_dir=str(tmp_path / "ckpt"))
    whole = make_teacher()
    train(whole, batches, cfg)
    model, stops = make_teacher(), []
    for _ in range(cfg.steps):
        try:
            history = train(model, batches, TrainConfig(**{**cfg.__dict__, "deadline": 0.0}))
            break
        except OutOfTime as e:
            stops.append(e.step)
    assert stops == [1, 2, 3, 4] and history["step"] == [1, 2, 3, 4, 5]
    for (name, a), b in zip(whole.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert history["seconds"] > 0


# ------------------------------------------------------------------------------------------------
# Data for a real teacher
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def lettered(tmp_path):
    """A byte corpus of 40 documents, each one letter repeated (so any token tells its document's letter)."""
    docs = [chr(ord("A") + i) * (20 + 7 * i) for i in range(26)] + [chr(ord("a") + i) * 30 for i in range(14)]
    return prepare("letters", "byte", out_dir=tmp_path / "data", docs=docs, val_fraction=0.2), docs


def test_long_heldout_documents_hold_validation_documents_only(lettered):
    folder, docs = lettered
    val, train_split = TokenFile(folder, "val"), TokenFile(folder, "train")
    val_docs = {bytes(d.astype(np.uint8)).decode() for d in val.documents()}
    train_letters = {bytes(d[:1].astype(np.uint8)).decode() for d in train_split.documents()}
    rows = long_heldout_documents(val, 300, 4, seed=1)
    assert rows.shape == (4, 301) and len(val) < 4 * 301  # more rows than the split holds: other orders
    for row in rows:
        pieces = bytes(row.astype(np.uint8)).decode().split("\x00")  # documents, end-of-document tokens between
        assert all(p in val_docs for p in pieces[:-1]) and any(d.startswith(pieces[-1]) for d in val_docs)
        assert not set("".join(pieces)) & train_letters  # not one training token
    assert not np.array_equal(rows[0], rows[1])
    assert np.array_equal(long_heldout_documents(val, 300, 4, seed=1), rows)
    with pytest.raises(ValueError, match="from the validation split"):
        long_heldout_documents(train_split, 300, 4)
    with pytest.raises(ValueError, match="fewer than length"):
        long_heldout_documents(val, len(val), 1)


def greedy_reference(model, prompt, n, eos):
    """Greedy continuation from full forward passes, one token at a time, stopping after `eos`."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        if ids[-1] == eos:
            break
    return ids[len(prompt):]


def test_the_teacher_writes_a_training_corpus_with_the_held_out_split_untouched(lettered, tmp_path):
    folder, _ = lettered
    model = make_teacher(vocab=256, layers=2, seq_len=64)
    src = TokenFile(folder, "train")
    prompts = [d[:6].astype(np.int64).tolist() for d in src.documents(min_tokens=6)][:5]
    with torch.no_grad():  # the end-of-document token (0) wins where the third greedy token of prompt 0 would
        t = greedy_reference(model, prompts[0], 3, eos=0)[-1]
        model.lm_head.weight[0] = 1.5 * model.lm_head.weight[t]
    out = write_generated_corpus(model, folder, tmp_path / "gen", num_docs=5, prompt_len=6, max_new_tokens=9,
                                 batch_size=2, temperature=0.0, progress=False)
    gen = TokenFile(out, "train")
    docs = list(gen.documents())
    assert min(len(d) for d in docs) < 6 + 9  # some document ended at the model's EOS
    assert len(docs) == 5 and gen.meta["train_docs"] == 5 and gen.meta["train_tokens"] == len(gen)
    for doc, prompt in zip(docs, prompts):
        assert list(doc[:6]) == list(prompt)
        want = greedy_reference(model, prompt, 9, eos=0)
        assert list(doc[6:]) == [t for t in want if t != 0]  # the document ends at the model's EOS
    assert (out / "val.bin").read_bytes() == (folder / "val.bin").read_bytes()
    info = gen.meta["generation"]
    assert info["new_tokens"] == len(gen) - 5 * 7 and info["new_tokens_per_s"] > 0
    sampled = write_generated_corpus(model, folder, tmp_path / "s", 5, 6, 9, 2, temperature=1.0, seed=3,
                                     progress=False)
    assert (sampled / "train.bin").read_bytes() != (out / "train.bin").read_bytes()
    again = write_generated_corpus(model, folder, tmp_path / "s2", 5, 6, 9, 2, temperature=1.0, seed=3,
                                   progress=False)
    assert (again / "train.bin").read_bytes() == (sampled / "train.bin").read_bytes()  # seeded


# ------------------------------------------------------------------------------------------------
# Recall for a real model: passkey retrieval in natural text
# ------------------------------------------------------------------------------------------------
def test_a_passkey_prompt_hides_the_key_in_natural_text(lettered):
    folder, _ = lettered
    tok = ByteTokenizer()
    s = make_niah_sample(tok, 300, 0.5, seed=4, filler=TokenFile(folder, "val"), **RECALL_TASKS["passkey"])
    text = tok.decode(s.input_ids)
    assert len(s.input_ids) == 300 and len(s.answer) == 5 and s.answer.isdigit()
    needle = f" The pass key is {s.answer}. Remember it. {s.answer} is the pass key. "
    assert text[s.needle_start:s.needle_start + len(needle)] == needle
    assert text.endswith("\nWhat is the pass key? The pass key is ") and tok.decode(s.answer_ids) == s.answer


def test_smollm2_finds_a_passkey_in_english_text(smollm2, smollm2_folder, tmp_path):
    """The teacher must score high at the length where selection measures recall; it does at 256 tokens
    (95% of 20 prompts, measured on a 2-core CPU; here the 5 prompts, one per depth, that take ~4 s)."""
    hf, _ = smollm2
    folder = smollm2_folder
    import pydoc_data.topics
    docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)][:80]
    data = prepare("topics", HFTokenizer(folder), out_dir=tmp_path / "data", docs=docs, val_fraction=0.25)
    model = from_hf(hf).eval()
    score = niah_recall(HFTokenizer(folder), TokenFile(data, "val").tokens, 256, 5, task="passkey")
    assert score(model) >= 0.8
