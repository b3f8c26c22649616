"""A HypeNet as a transformers folder: what `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`,
lm-evaluation-harness (`--model hf`) and the Hugging Face Hub read.

    python -m minihalo.export runs/s1 hypenet-s1                  # a HALO run folder: its hybrid/ and report
    python -m minihalo.export my_model hypenet --dtype bfloat16 --tokenizer byte   # a HybridLM folder

`export_transformers(model, folder, tokenizer=None, run_dir=None)` writes
    config.json               a HypeNetConfig: every HybridConfig field, auto_map for the Auto classes
    configuration_hypenet.py  the config class         } copied from minihalo/hf_hypenet/: they import
    modeling_hypenet.py       the model and its cache  } only torch and transformers
    model.safetensors         the weights, in the model's dtype
    generation_config.json    eos / pad token
    README.md                 the model card: layout, HyPE, parameters; the teacher, HALO's tokens per step
                              and the report's evaluation table when `run_dir` is a HALO run folder
    tokenizer files           when a tokenizer is given (minihalo's ByteTokenizer becomes a transformers one)
A second export of the same model writes the same bytes.

transformers' names differ from HybridConfig's for four fields (HF_NAMES): its code reads
num_hidden_layers, num_attention_heads, num_key_value_heads, and layer types "full_attention" /
"linear_attention" (transformers 5 renames a layer type "attention" on loading).
"""
import argparse
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from minihalo.convert import tokenizer_in_folder
from minihalo.data import ByteTokenizer, HFTokenizer
from minihalo.model import HybridLM

TEMPLATE = Path(__file__).resolve().parent / "hf_hypenet"
CODE_FILES = ("configuration_hypenet.py", "modeling_hypenet.py")
HF_NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads"}
HF_LAYER_TYPES = {"attention": "full_attention", "lightning": "linear_attention"}
AUTO_MAP = {"AutoConfig": "configuration_hypenet.HypeNetConfig",
            "AutoModel": "modeling_hypenet.HypeNetModel",
            "AutoModelForCausalLM": "modeling_hypenet.HypeNetForCausalLM"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_config(model):
    """The model's HybridConfig as a HypeNetConfig (minihalo/hf_hypenet/configuration_hypenet.py)."""
    from minihalo.hf_hypenet.configuration_hypenet import HypeNetConfig
    fields = {HF_NAMES.get(k, k): v for k, v in asdict(model.config).items()}
    fields["layer_types"] = [HF_LAYER_TYPES[t] for t in fields["layer_types"]]
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    return HypeNetConfig(**fields, architectures=["HypeNetForCausalLM"], auto_map=AUTO_MAP, torch_dtype=dtype)


def hf_state_dict(model):
    """HybridLM's weights under HypeNetForCausalLM's names: "model." before all but lm_head; a tied
    lm_head is left out (it is the embedding)."""
    state = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        # a packed weight is a view of a larger buffer (HybridLM.pack_projections); safetensors stores whole tensors
        t = t.clone() if t.untyped_storage().nbytes() > t.nbytes else t.contiguous()
        state[name if name == "lm_head.weight" else "model." + name] = t
    return state


def byte_tokenizer():
    """minihalo's ByteTokenizer (token id = UTF-8 byte value, EOS = byte 0) as a transformers tokenizer: a
    byte-level BPE without merges over the 256 byte symbols of GPT-2's byte-to-character table, so every
    byte is one token and the ids are the byte values. EOS and padding are byte 0; its symbol, U+0100,
    is read as EOS where it occurs in a text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # bytes that stand for themselves
    spare = iter(range(256, 512))  # the other bytes get the characters 256, 257, ... in order
    symbols = [chr(b) if b in printable else chr(next(spare)) for b in range(256)]
    tok = Tokenizer(models.BPE(vocab={c: b for b, c in enumerate(symbols)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=symbols[0], pad_token=symbols[0],
                                   model_input_names=["input_ids", "attention_mask"])


def transformers_tokenizer(tokenizer):
    """A transformers tokenizer from one, from minihalo's ByteTokenizer or HFTokenizer, from "byte" (as in
    HaloConfig.tokenizer), or from a folder or hub id; None stays None."""
    if isinstance(tokenizer, ByteTokenizer) or tokenizer == "byte":
        return byte_tokenizer()
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.tok
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


def export_transformers(model, folder, tokenizer=None, run_dir=None):
    """Write `model` (a HybridLM) as a transformers folder (see the module docstring). `tokenizer`: a
    transformers tokenizer, minihalo's ByteTokenizer or HFTokenizer, "byte", or a folder or hub id to load
    one from. `run_dir`: the HALO run folder the model came from (its config.json and report.json go into the model
    card). Returns the folder's Path."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig
    if not isinstance(model, HybridLM):
        raise TypeError(f"export_transformers takes a minihalo HybridLM; got {type(model).__name__} "
                        "(load a saved one with HybridLM.from_pretrained)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config(model)
    config.save_pretrained(folder)
    for name in CODE_FILES:
        shutil.copyfile(TEMPLATE / name, folder / name)
    save_file(hf_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = transformers_tokenizer(tokenizer)
    eos = model.config.eos_token_id
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    pad = getattr(tokenizer, "pad_token_id", None)
    GenerationConfig(eos_token_id=eos, pad_token_id=eos if pad is None else pad).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(model_card(model, folder.name, run_dir, tokenizer is not None))
    return folder


def model_card(model, name, run_dir=None, has_tokenizer=False):
    """The folder's README.md (markdown with the Hub's YAML header)."""
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())  # a tied head counted once
    layout = " ".join("A" if t == "attention" else "L" for t in c.layer_types)
    n_attn = c.layer_types.count("attention")
    a = c.attn_scale_a
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [hypenet, hybrid-attention, linear-attention, lightning-attention, minihalo]", "---", "",
             f"# {name}", "",
             f"A HypeNet hybrid made with minihalo: {c.num_layers} layers, {n_attn} of them softmax attention "
             f"and {c.num_layers - n_attn} Lightning attention (an RNN with a fixed decay per head), "
             f"{n_params:,} parameters, stored in {str(model.embed_tokens.weight.dtype).removeprefix('torch.')}.",
             "", "## Architecture", "",
             f"Layers: `{layout}` (A softmax attention, L Lightning attention).", "",
             "| | |", "|---|---|",
             f"| width / MLP width | {c.hidden_size} / {c.intermediate_size} (SwiGLU) |",
             f"| heads | {c.num_heads} query, {c.num_kv_heads} key/value (GQA), head dim {c.head_dim} |",
             f"| vocabulary | {c.vocab_size}, embeddings {'tied' if c.tie_word_embeddings else 'untied'} |",
             f"| attention layers | {'RoPE' if c.attn_rope else 'NoPE'}, QK-norm {_on(c.qk_norm)}, "
             f"output gate {_on(c.attn_output_gate)}, query scale "
             + (f"s_t = log_a(t + a) with a = {a:g} (t the 0-based position)" if a else "off") + " |",
             f"| Lightning layers | RoPE {_on(c.lin_rope)} (theta {c.rope_theta:g}), QK-norm {_on(c.lin_qk_norm)}, "
             f"{'one K/V head per query head' if c.lin_mha else 'shared K/V heads'}, output RMSNorm "
             f"{_on(c.lin_output_norm)}, output gate {_on(c.lin_output_gate)}, decays gamma_h = exp(-m_h) "
             "(m_h the ALiBi slopes) |",
             f"| decoding cache | {c.cache_bytes(1, dtype=torch.float32)['kv_bytes_per_token']:,} bytes per token "
             f"(fp32 K/V) + {c.cache_bytes(1)['rnn_state_bytes']:,} bytes of RNN state, per sequence |", ""]
    if run_dir is not None:
        lines += _halo_section(Path(run_dir))
    lines += ["## Use", "", "The modeling code comes with the folder (it needs torch and transformers only):", "",
              "```python", "import torch",
              "from transformers import AutoModelForCausalLM" + (", AutoTokenizer" if has_tokenizer else ""), "",
              f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True, dtype=torch.bfloat16)']
    if has_tokenizer:
        lines += [f'tokenizer = AutoTokenizer.from_pretrained("{name}", padding_side="left")',
                  'batch = tokenizer(["The capital of France is", "Hello"], return_tensors="pt", padding=True)',
                  "out = model.generate(**batch, max_new_tokens=20, do_sample=False)",
                  "print(tokenizer.batch_decode(out))"]
    else:
        lines += ["out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=20, do_sample=False)"]
    lines += ["```", "",
              "The cache holds the attention layers' keys and values and the Lightning layers' states; greedy, "
              "sampling, beam search and left-padded batches work with `generate`. With minihalo installed "
              "and the model on a GPU, the Lightning layers run minihalo's Triton kernels; otherwise a "
              "chunkwise form in plain PyTorch.", "",
              "lm-evaluation-harness:", "", "```",
              f"lm_eval --model hf --model_args pretrained={name},trust_remote_code=True --tasks hellaswag,arc_easy",
              "```", ""]
    return "\n".join(lines)


def _on(flag):
    return "on" if flag else "off"


def _halo_section(run_dir):
    """The teacher, HALO's tokens per step and the evaluation table, from a run folder's config.json and
    report.json (see minihalo.pipeline)."""
    cfg = json.loads((run_dir / "config.json").read_text())
    rep_path = run_dir / "report.json"
    rep = json.loads(rep_path.read_text()) if rep_path.is_file() else {}
    lines = ["## How it was made", "",
             f"Distilled with HALO from the Transformer `{cfg['teacher']}` (tokenizer `{cfg['tokenizer']}`, "
             f"{cfg.get('preset') or 'custom'} preset)."]
    if "select" in rep:
        lines.append(f"Attention kept in layers {rep['select']['layers']} ({rep['select']['rule']} selection).")
    if "steps" in rep:
        lines += ["", "| HALO step | tokens | seconds | final loss |", "|---|---|---|---|"]
        lines += [f"| {s} | {v['tokens']:,} | {v['seconds']:.1f} | {v['final_loss']:.4f} |"
                  for s, v in rep["steps"].items()]
        lines.append(f"| total | {sum(v['tokens'] for v in rep['steps'].values()):,} | | |")
    if "eval" in rep:
        lengths = cfg["eval_lengths"]
        lines += ["", f"Evaluation ({rep['device']}; the teacher was trained at {rep['train_length']} tokens):",
                  "", "| context length | " + " | ".join(str(L) for L in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for name, e in rep["eval"].items():
            lines.append(f"| {name} perplexity | " + " | ".join(f"{e['perplexity'][str(L)]:.3f}" for L in lengths) + " |")
        for name, e in rep["eval"].items():
            lines.append(f"| {name} NIAH (%) | " + " | ".join(f"{100 * e['niah'][str(L)]:.0f}" for L in lengths) + " |")
    return lines + [""]


def load_for_export(path):
    """(model, tokenizer or None, run folder or None) of a HALO run folder (its hybrid/) or a
    HybridLM.save_pretrained folder."""
    path = Path(path)
    if (path / "hybrid" / "config.json").is_file():
        from minihalo.convert import teacher_folder
        from minihalo.settings import HaloConfig, tokenizer_name
        saved = json.loads((path / "config.json").read_text())
        cfg = HaloConfig(teacher=saved["teacher"], tokenizer=saved.get("tokenizer"))  # None: the teacher's own
        tok = tokenizer_name(cfg, None if cfg.tokenizer else teacher_folder(cfg.teacher))
        return HybridLM.from_pretrained(str(path / "hybrid")), tok, path
    if (path / "config.json").is_file():
        return HybridLM.from_pretrained(str(path)), tokenizer_in_folder(str(path)), None
    raise ValueError(f"{str(path)!r} is neither a HALO run folder (with hybrid/) nor a HybridLM folder "
                     "(with config.json); see python -m minihalo.export --help")


def main(argv=None):
    p = argparse.ArgumentParser(description="Export a HypeNet (a HALO run folder or a HybridLM folder) as a "
                                            "transformers folder (trust_remote_code).")
    p.add_argument("source", help="a HALO run folder (minihalo.halo --out) or a HybridLM.save_pretrained folder")
    p.add_argument("out", help="the folder to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: as saved)")
    p.add_argument("--tokenizer", help="the tokenizer to include: 'byte' (minihalo's byte-level one) or a "
                                       "transformers tokenizer's folder or hub id (default: the run's, or the "
                                       "folder's if it has one)")
    args = p.parse_args(argv)
    model, tok, run_dir = load_for_export(args.source)
    if args.dtype:
        model = model.to(DTYPES[args.dtype])
    folder = export_transformers(model, args.out, args.tokenizer or tok, run_dir)
    print(f"wrote {folder}: load it with AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)")


if __name__ == "__main__":
    main()
