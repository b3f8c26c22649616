"""HALO: distil a pretrained Transformer into a HypeNet hybrid (docs/method.md §4), as a library and a CLI.

    python -m minihalo.halo --preset tiny                 # the whole pipeline on a CPU in minutes
    python -m minihalo.halo --preset small --out runs/s1  # one GPU, longer runs
    python -m minihalo.halo --out runs/s1 --stages distill,finetune,scale,report   # resume / redo stages

The steps (docs/method.md §4; the paper calls steps 1, 3, 4 its stages 1, 2, 3):

| step | name     | function                  | trains            | loss                                |
|------|----------|---------------------------|-------------------|-------------------------------------|
| 0    | —        | convert.to_hypenet        | —                 | weight transfer                     |
| 1    | align    | stage1_align              | every RNN mixer   | MSE(attention output, RNN output)   |
| 2    | select   | select_attention_layers   | —                 | scores of the one-layer swaps M(i)  |
| 3    | distill  | stage2_distill            | the whole student | KL(p_teacher ‖ p_student), T = 1    |
| 4    | finetune | stage3_finetune           | the whole student | next-token CE at a longer context   |
| 5    | scale    | pick_query_scale          | —                 | LM loss on long held-out documents  |

Every training step goes through minihalo.train.train (exact resume from a checkpoint, NaN guard,
tqdm bar). The run folder:

    config.json                     the HaloConfig
    align/, distill/, finetune/     ckpt/last.pt (resumable), history.jsonl, stats.json, model/ (the result)
    align/layers.jsonl              the per-layer alignment MSE of every batch
    select.json, scale.json         the layer scores and choice; the query-scale grid
    hybrid/                         the final HypeNet (HybridLM.from_pretrained), query scale in its config
    report.md, report.json, *.png   teacher vs HypeNet by context length, layer scores, cost

A step whose model/ exists is not redone (delete the folder to redo it); a step reads the previous
step's model/ from the folder, so steps can run alone. `run(HaloConfig(...))` is the same from Python.
At toy scale the paper's benchmarks are at chance, so layer selection uses proxies (docs/method.md §4
step 2): recall = needle-in-a-haystack accuracy, commonsense = exp(-held-out NLL).

Shapes: B batch, T tokens, N = B*T rows, d model width, V vocabulary, L layers.
"""
import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minihalo.convert import LIGHTNING_OPTIONS, from_hf, to_hypenet
from minihalo.data import ByteTokenizer, HFTokenizer, PackedBatches, TokenFile, prepare
from minihalo.evaluate import (heldout_windows, niah_accuracy, niah_grid, perplexity_by_length,
                               plot_niah_heatmap, token_nll)
from minihalo.model import Context, HybridLM
from minihalo.tasks import niah_training_rows
from minihalo.train import TrainConfig, train

TOY_TEACHER = Path(__file__).resolve().parent.parent / "data" / "toy_teacher"  # present in a repository checkout
STEPS = ("align", "select", "distill", "finetune", "scale", "report")


# --------------------------------------------------------------------------------------------
# The teacher
# --------------------------------------------------------------------------------------------
def check_transformer(model):
    """Raise a ValueError unless `model` is a plain Transformer: every layer softmax attention with RoPE."""
    if not isinstance(model, HybridLM):
        raise TypeError(f"the teacher must be a minihalo HybridLM; got {type(model).__name__} "
                        "(convert a transformers model with minihalo.from_hf)")
    c = model.config
    if set(c.layer_types) != {"attention"} or not c.attn_rope or c.attn_output_gate or c.attn_scale_a:
        raise ValueError("HALO distils a Transformer (every layer softmax attention with RoPE, no output gate, "
                         f"no query scale); this model has layer types {c.layer_types}, attn_rope={c.attn_rope}, "
                         f"attn_output_gate={c.attn_output_gate}, attn_scale_a={c.attn_scale_a}")
    return model


def load_teacher(teacher="toy", device="cpu", out_dir=None, steps=None):
    """The Transformer to distil, in fp32 on `device`:
    "toy" (data/toy_teacher of a repository checkout), "toy-scratch" (pretrain one now with
    minihalo.teacher.train_toy_teacher, saved to `out_dir`), a HybridLM folder (save_pretrained),
    a transformers folder or hub id (minihalo.from_hf), or a HybridLM object."""
    if isinstance(teacher, HybridLM):
        return check_transformer(teacher).to(device)
    if teacher == "toy":
        if not (TOY_TEACHER / "config.json").is_file():
            raise ValueError(f"the toy teacher is not at {TOY_TEACHER}: it ships in the repository's data/ folder, "
                             "which a pip install does not have. Pass --teacher toy-scratch (pretrain one: 4,000 "
                             "steps, about 5 minutes on an H200, far longer on a CPU) or a checkpoint folder")
        teacher = str(TOY_TEACHER)
    if teacher == "toy-scratch":
        return _toy_from_scratch(device, out_dir, steps)
    path = Path(teacher)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"teacher folder {path} has no config.json; expected HybridLM.save_pretrained "
                             "output or a transformers checkpoint")
        is_hf = "model_type" in json.loads((path / "config.json").read_text())
        model = from_hf(str(path)) if is_hf else HybridLM.from_pretrained(str(path))
    elif str(teacher).count("/") == 1 and not str(teacher).startswith((".", "/", "~")):  # a hub id: org/name
        from transformers import AutoModelForCausalLM
        model = from_hf(AutoModelForCausalLM.from_pretrained(str(teacher)))
    else:
        raise ValueError(f"teacher {teacher!r}: no such folder. Expected 'toy', 'toy-scratch', a checkpoint "
                         "folder (HybridLM or transformers) or a hub id such as Qwen/Qwen3-0.6B")
    return check_transformer(model.float().to(device).eval())


def _toy_from_scratch(device, out_dir, steps):
    from minihalo.teacher import train_toy_teacher
    saved = Path(out_dir) / "teacher" if out_dir else None
    if saved is not None and (saved / "config.json").is_file():
        return HybridLM.from_pretrained(str(saved), device=device)
    model, report = train_toy_teacher("halo", device=device, **({"steps": steps} if steps else {}))
    model = model.float().eval()
    if saved is not None:
        model.save_pretrained(str(saved))
        (saved / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return model


# --------------------------------------------------------------------------------------------
# Step 1: hidden-state alignment (every layer's RNN learns to imitate its attention layer)
# --------------------------------------------------------------------------------------------
def alignment_losses(teacher, student, input_ids):
    """Per-layer MSE (L,) between each teacher attention output and the student's RNN output
    (both after Wo, before the residual), with teacher forcing (docs/method.md §4 step 1): layer l's
    RNN reads the teacher's own normalized input to layer l, and the teacher's output moves on."""
    B, T = input_ids.shape
    with torch.no_grad():
        x = teacher.embed_tokens(input_ids)  # (B, T, d)
    ctx = Context.causal(teacher.config, B, T, input_ids.device, x.dtype)
    losses = []
    for t_layer, s_layer in zip(teacher.layers, student.layers):
        with torch.no_grad():
            h = t_layer.input_layernorm(x)  # (B, T, d), no graph: the RNN's input is detached
            y_teacher = t_layer.mixer(h, ctx, None)  # (B, T, d)
        y_student = s_layer.mixer(h, ctx, None)  # (B, T, d)
        losses.append(F.mse_loss(y_student.float(), y_teacher.float()))
        with torch.no_grad():
            x = x + y_teacher
            x = x + t_layer.mlp(t_layer.post_attention_layernorm(x))
    return torch.stack(losses)  # (L,)


class LayerLossLog:
    """A stage-1 loss_fn for train(): the sum of the per-layer MSEs (the layers are independent, so each
    RNN gets exactly its own gradient), with each call's per-layer values appended to a JSON-lines file.
    A resumed run repeats the batches after its last checkpoint; `read_jsonl` keeps the latest line."""

    def __init__(self, teacher, path=None):
        self.teacher, self.path, self.batch, self.rows = teacher, path, None, []

    def batches(self, source):
        def numbered(i):
            self.batch = i
            return source(i)
        return numbered

    def __call__(self, student, batch):
        per_layer = alignment_losses(self.teacher, student, batch[:, :-1])  # (L,)
        row = {"batch": self.batch, "layer_mse": per_layer.tolist()}
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return per_layer.sum()


def mixer_parameters(model, kind=None):
    """The parameters of every mixer (of type `kind`, e.g. "lightning", when given)."""
    return [p for layer, t in zip(model.layers, model.config.layer_types) if kind in (None, t)
            for p in layer.mixer.parameters()]


def stage1_align(teacher, batches, cfg: TrainConfig, log_path=None, **lightning_options):
    """Step 1 (docs/method.md §4): a Lightning layer for every layer by weight transfer (to_hypenet(teacher, [])),
    then only their parameters train on the MSE to the teacher's attention outputs; everything else
    of the student stays bitwise as it was. Returns (student, history, per-layer loss rows)."""
    check_transformer(teacher)
    teacher.eval().requires_grad_(False)
    student = to_hypenet(teacher, [], seed=cfg.seed, **lightning_options)
    log = LayerLossLog(teacher, log_path)
    history = train(student, log.batches(batches), cfg, loss_fn=log,
                    params=mixer_parameters(student, "lightning"))
    return student, history, log.rows


# --------------------------------------------------------------------------------------------
# Step 2: layer selection
# --------------------------------------------------------------------------------------------
def swap_layer(teacher, aligned, i):
    """M(i): a copy of the teacher with only layer i's attention replaced by the aligned model's RNN
    (which keeps its RoPE); every other layer is exactly the teacher's (docs/method.md §4 step 2)."""
    types = ["lightning" if j == i else "attention" for j in range(teacher.config.num_layers)]
    options = {k: getattr(aligned.config, k) for k in LIGHTNING_OPTIONS + ("lin_chunk_size", "lin_impl")}
    p = next(teacher.parameters())
    model = HybridLM(replace(teacher.config, layer_types=types, **options)).to(p.device, p.dtype)
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith(f"layers.{i}.mixer.")}
    state.update({f"layers.{i}.mixer.{k}": v for k, v in aligned.layers[i].mixer.state_dict().items()})
    model.load_state_dict(state)
    return model.eval()


def niah_recall(tokenizer, filler, length, num_samples=40, depths=(0.0, 0.25, 0.5, 0.75, 1.0), seed=5):
    """A recall score: model -> NIAH accuracy at `length` (teacher-forced exact match, natural-text
    haystack from `filler`, the variant the toy teacher was trained on)."""
    per = max(1, num_samples // len(depths))
    return lambda model: float(np.mean([niah_accuracy(model, tokenizer, length, d, per, seed=seed, batch_size=8,
                                                      variant="single_2", filler=filler) for d in depths]))


def lm_score(tokens, length, num_windows=16, seed=7):
    """A commonsense proxy, higher is better: exp(-mean NLL) of held-out windows of `length` tokens
    (the geometric-mean probability of the next token, in [0, 1] like an accuracy)."""
    windows = heldout_windows(tokens, length, num_windows, seed)
    return lambda model: math.exp(-token_nll(model, windows).mean().item())


@torch.no_grad()
def score_swapped_models(teacher, aligned, csr_fn, recall_fn, progress=True):
    """{"csr": {i: C(M(i))}, "recall": {i: R(M(i))}, "teacher": {"csr": .., "recall": ..}}."""
    from tqdm.auto import tqdm
    out = {"csr": {}, "recall": {}, "teacher": {"csr": csr_fn(teacher), "recall": recall_fn(teacher)}}
    for i in tqdm(range(teacher.config.num_layers), desc="score M(i)", disable=not progress):
        m = swap_layer(teacher, aligned, i)
        out["csr"][i], out["recall"][i] = csr_fn(m), recall_fn(m)
    return out


def selection_scores(csr, recall, eps=1e-10, cap=50.0):
    """s_i = (max_j R_j - R_i) / (max_j C_j - C_i + eps), clipped at `cap` (docs/method.md §4 step 2).
    `csr` and `recall` map layer -> score of M(i); the maxima are over the swapped models."""
    if set(csr) != set(recall):
        raise ValueError(f"csr and recall must score the same layers; got {sorted(csr)} and {sorted(recall)}")
    r_max, c_max = max(recall.values()), max(csr.values())
    return {i: min((r_max - recall[i]) / (c_max - csr[i] + eps), cap) for i in csr}


def _top_k(scores, k):
    if not 0 <= k <= len(scores):
        raise ValueError(f"cannot keep k={k} attention layers out of {len(scores)}")
    return sorted(sorted(scores, key=lambda i: (-scores[i], i))[:k])  # ties: the lower index first


def select_attention_layers(csr, recall, k):
    """HALO's choice: the k layers with the highest s_i, sorted (docs/method.md §4 step 2)."""
    return _top_k(selection_scores(csr, recall), k)


def recall_drop_layers(recall, teacher_recall, k):
    """Jet-Nemotron's rule, for comparison: the k layers whose swap loses the most recall vs the teacher."""
    return _top_k({i: teacher_recall - r for i, r in recall.items()}, k)


def evenly_spaced_layers(num_layers, k):
    """The last layer of each of k equal groups (e.g. 8 layers, k = 2: [3, 7])."""
    if not 0 <= k <= num_layers:
        raise ValueError(f"cannot keep k={k} attention layers out of {num_layers}")
    return [(j + 1) * num_layers // k - 1 for j in range(k)]


def num_attention_layers(num_layers, k=None, ratio=None):
    """k itself, else floor(ratio * L), else floor(L / 4) (docs/method.md §4 step 2)."""
    k = k if k is not None else math.floor((0.25 if ratio is None else ratio) * num_layers)
    if not 0 <= k <= num_layers:
        raise ValueError(f"k={k} attention layers is out of range for a {num_layers}-layer teacher")
    return k


# --------------------------------------------------------------------------------------------
# Step 3: distillation with a chunked KL, step 4: long-context finetune
# --------------------------------------------------------------------------------------------
def final_hidden(model, input_ids):
    """The last hidden states (B, T, d) after the final norm:
    model(input_ids) == model.lm_head(final_hidden(model, input_ids))."""
    return model(input_ids, output_hidden=True)


def _kl_sum(student_logits, teacher_logits):
    log_q = F.log_softmax(student_logits.float(), dim=-1)  # (n, V) student
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)  # (n, V) teacher
    return (log_p.exp() * (log_p - log_q)).sum()


def kl_divergence(student, teacher, chunk_rows=1024, student_head=None, teacher_head=None):
    """Forward KL(p_teacher ‖ p_student) at temperature 1, the mean over every row (docs/method.md §4 step 3).

    `student`, `teacher`: logits (..., V), or hidden states (..., d) when the heads (e.g. model.lm_head)
    are given. Rows are processed `chunk_rows` at a time and each chunk is recomputed in the backward
    pass, so with heads no more than one chunk of (chunk_rows, V) logits ever exists. At Qwen3's vocabulary
    (151,936) and 8,192 rows the fp32 logits of both models would take 10 GB; a 1,024-row chunk, 1.2 GB.
    """
    s, t = student.flatten(0, -2), teacher.flatten(0, -2)  # (N, V) or (N, d)
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"student and teacher have {s.shape[0]} and {t.shape[0]} rows; they must match")
    heads = student_head is not None
    chunk = lambda a, b: _kl_sum(student_head(a), teacher_head(b)) if heads else _kl_sum(a, b)  # noqa: E731
    total = sum(checkpoint(chunk, s[i:i + chunk_rows], t[i:i + chunk_rows], use_reentrant=False)
                for i in range(0, s.shape[0], chunk_rows))
    return total / s.shape[0]


def distill_loss(teacher, chunk_rows=1024):
    """A loss_fn for train(): the chunked KL from the frozen teacher (eval mode, no graph) to the student."""
    def loss_fn(student, batch):
        ids = batch[:, :-1]  # (B, T)
        with torch.no_grad():
            h_teacher = final_hidden(teacher, ids)  # (B, T, d)
        return kl_divergence(final_hidden(student, ids), h_teacher, chunk_rows, student.lm_head, teacher.lm_head)
    return loss_fn


def stage2_distill(teacher, aligned, attn_layers, batches, cfg: TrainConfig, chunk_rows=1024, **hypenet_options):
    """Step 3 (docs/method.md §4): assemble the HypeNet (the selected layers keep attention, now NoPE with a
    new output gate; the rest take their aligned RNN) and train all of it on the KL to the teacher."""
    check_transformer(teacher)
    teacher.eval().requires_grad_(False)
    student = to_hypenet(teacher, attn_layers, lightning_from=aligned, seed=cfg.seed, **hypenet_options)
    history = train(student, batches, cfg, loss_fn=distill_loss(teacher, chunk_rows))
    return student, history


def stage3_finetune(model, schedule, make_cfg):
    """Step 4 (docs/method.md §4): next-token CE at longer contexts, no teacher. `schedule` lists
    (batches, seq_len) pairs, trained in order; `make_cfg(seq_len)` gives each one's TrainConfig
    (a small constant LR). Returns {seq_len: history}."""
    return {T: train(model, batches, make_cfg(T)) for batches, T in schedule}


# --------------------------------------------------------------------------------------------
# Step 5: the HyPE query scale
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def pick_query_scale(model, loss_fn, grid, niah_fn=None):
    """Try s_t = log_a(t + a) for every `a` in `grid` (docs/method.md §4 step 5), keep the one with the
    lowest `loss_fn(model)` (LM loss on long held-out text) and leave it switched on in the config,
    so save_pretrained stores it. Returns (a, {a: {"loss", "niah"}}), None = s_t off, for reference."""
    table = {}
    for a in [None] + list(grid):
        model.set_query_scale(a)
        table[a] = {"loss": loss_fn(model)} | ({"niah": niah_fn(model)} if niah_fn else {})
    best = min(grid, key=lambda a: table[a]["loss"])
    model.set_query_scale(best)
    return best, table


# --------------------------------------------------------------------------------------------
# The pipeline: configuration, presets, run folder
# --------------------------------------------------------------------------------------------
@dataclass
class HaloConfig:
    out: str = "runs/halo"            # the run folder
    teacher: str = "toy"              # see load_teacher
    teacher_steps: int = None         # --teacher toy-scratch: pretraining steps (default: the preset's)
    tokenizer: str = "byte"           # "byte", or a transformers tokenizer (folder or hub id) for such a teacher
    data_dir: str = None              # a prepared corpus (minihalo.data.prepare); default: english, `tokenizer`
    stages: tuple = STEPS             # which steps to run (names of STEPS)
    device: str = None                # default: cuda if available
    seed: int = 0
    progress: bool = True
    # step 1
    steps_align: int = 150
    lr_align: float = 1e-3
    batch_align: int = 16
    # step 2
    k: int = None                     # attention layers to keep (default floor(L/4))
    attn_ratio: float = None          # or a share of L
    attn_layers: list = None          # or fixed layers (skips the choice)
    selection: str = "halo"           # "halo", "recall_drop" or "even"
    select_samples: int = 40          # NIAH prompts per swapped model
    # step 3
    steps_distill: int = 400
    lr_distill: float = 3e-3
    batch_distill: int = 16
    seq_len: int = None               # steps 1 and 3 (default: the teacher's training length)
    chunk_rows: int = 1024
    retrieval_share: float = 0.4      # share of needle-retrieval rows in the training batches
    copy_share: float = 0.25          # share of copy rows (see minihalo.teacher.teacher_batches)
    # step 4
    finetune_lengths: list = field(default_factory=lambda: [256])
    steps_finetune: int = 100
    lr_finetune: float = 3e-5
    finetune_tokens_per_batch: int = 4096
    warmup_steps: int = 20
    # step 5 and the report
    a_grid: list = field(default_factory=lambda: [16, 64, 256, 1024, 4096])
    scale_length: int = 512           # long held-out text for the loss that picks a
    eval_lengths: list = field(default_factory=lambda: [128, 256, 512, 1024])
    eval_samples: int = 10            # NIAH prompts per (length, depth) cell
    eval_windows: int = 8             # held-out windows per length (perplexity)
    preset: str = None


PRESETS = {
    # A CPU: 0.3M + 0.8M + 0.4M training tokens; the whole pipeline with its report took 6.2 CPU-minutes
    # (user time, one thread, on a busy 2-core CPU); wall time on 2 idle cores is not timed yet.
    "tiny": dict(),
    # One GPU: 2.0M + 4.9M + 9.8M training tokens (align, distill, finetune). On one NVIDIA H200 the whole
    # run took 174 s (notebooks/results/halo_small.json): perplexity at T within 4% of the teacher's, NIAH
    # 89% at 4T where the teacher has 0%.
    "small": dict(steps_align=500, batch_align=32, steps_distill=1200, batch_distill=32,
                  finetune_lengths=[256, 512], steps_finetune=300, finetune_tokens_per_batch=16384,
                  select_samples=100, eval_samples=40, eval_windows=32, scale_length=1024,
                  eval_lengths=[128, 256, 512, 1024, 2048]),
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


class Run:
    """The run folder and what the steps share: the teacher, the data, the device."""

    def __init__(self, cfg: HaloConfig):
        bad = sorted(set(cfg.stages) - set(STEPS))
        if bad:
            raise ValueError(f"unknown stages {bad}; expected some of {STEPS}")
        if cfg.selection not in ("halo", "recall_drop", "even"):
            raise ValueError(f"selection must be 'halo', 'recall_drop' or 'even'; got {cfg.selection!r}")
        self.cfg, self.dir = cfg, Path(cfg.out)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.teacher = load_teacher(cfg.teacher, self.device, self.dir, cfg.teacher_steps).eval()
        self.teacher.requires_grad_(False)
        self.T = cfg.seq_len or self.teacher.config.max_position_embeddings
        self.tok = ByteTokenizer() if cfg.tokenizer == "byte" else HFTokenizer(cfg.tokenizer)
        self.data_dir = cfg.data_dir or prepare("english", self.tok)
        self.val = TokenFile(self.data_dir, "val")
        if self.val.vocab_size > self.teacher.config.vocab_size:
            raise ValueError(f"the corpus in {self.data_dir} has vocabulary {self.val.vocab_size}, the teacher "
                             f"{self.teacher.config.vocab_size}; pass the teacher's tokenizer (--tokenizer)")

    def batches(self, seq_len, batch_size):
        """Training batches by step: corpus windows, with needle-retrieval and copy rows mixed in
        (minihalo.teacher.teacher_batches: built from bytes, so for the byte tokenizer only)."""
        from minihalo.teacher import teacher_batches
        c = self.cfg
        if not isinstance(self.tok, ByteTokenizer):
            return PackedBatches(TokenFile(self.data_dir, "train"), seq_len, batch_size, c.seed)
        return teacher_batches(self.data_dir, seq_len, batch_size, c.retrieval_share, c.copy_share, (4, 16), c.seed)

    def train_cfg(self, step, steps, lr, **kw):
        c = self.cfg
        return TrainConfig(steps=steps, lr=lr, min_lr=lr / 100, warmup_steps=min(c.warmup_steps, steps // 2),
                           seed=c.seed, progress=c.progress, ckpt_dir=str(self.dir / step / "ckpt"),
                           ckpt_every=max(1, steps // 4), **kw)

    def saved(self, step):
        """The model a finished step saved, or None."""
        path = self.dir / step / "model"
        return HybridLM.from_pretrained(str(path), device=self.device) if (path / "config.json").is_file() else None

    def need(self, step):
        model = self.saved(step)
        if model is None:
            raise ValueError(f"{self.dir / step / 'model'} does not exist: run the step '{step}' first "
                             f"(--stages {step},...) with --out {self.dir}")
        return model

    def finish(self, step, model, history, seconds, tokens):
        folder = self.dir / step
        write_jsonl(folder / "history.jsonl", [{"step": s, "loss": l, "lr": r} for s, l, r in
                                               zip(history["step"], history["loss"], history["lr"])])
        stats = {"seconds": seconds, "tokens": tokens, "tokens_per_s": history["tokens_per_s"],
                 "final_loss": history["loss"][-1] if history["loss"] else None}
        (folder / "stats.json").write_text(json.dumps(stats, indent=1))
        model.save_pretrained(str(folder / "model"))
        return model

    # ---- the steps -----------------------------------------------------------------------
    def align(self):
        c = self.cfg
        (self.dir / "align").mkdir(exist_ok=True)
        t0 = time.perf_counter()
        model, hist, _ = stage1_align(self.teacher, self.batches(self.T, c.batch_align),
                                      self.train_cfg("align", c.steps_align, c.lr_align),
                                      log_path=self.dir / "align" / "layers.jsonl")
        return self.finish("align", model, hist, time.perf_counter() - t0, c.steps_align * c.batch_align * self.T)

    def select(self):
        c, L = self.cfg, self.teacher.config.num_layers
        k = num_attention_layers(L, c.k, c.attn_ratio)
        result = {"k": k, "rule": c.selection}
        t0 = time.perf_counter()
        if c.attn_layers is not None:
            result.update(rule="given", layers=sorted(c.attn_layers))
        else:
            csr_fn = lm_score(self.val, self.T, c.eval_windows * 2)
            recall_fn = niah_recall(self.tok, self.val.tokens, self.T, c.select_samples)
            scores = score_swapped_models(self.teacher, self.need("align"), csr_fn, recall_fn, c.progress)
            result.update(scores, halo_scores=selection_scores(scores["csr"], scores["recall"]),
                          halo=select_attention_layers(scores["csr"], scores["recall"], k),
                          recall_drop=recall_drop_layers(scores["recall"], scores["teacher"]["recall"], k),
                          even=evenly_spaced_layers(L, k))
            result["layers"] = result[c.selection]
        result["seconds"] = time.perf_counter() - t0
        (self.dir / "select.json").write_text(json.dumps(result, indent=1))
        print(f"attention layers: {result['layers']} ({result['rule']})")
        return result

    def layers(self):
        path = self.dir / "select.json"
        if not path.is_file():
            raise ValueError(f"{path} does not exist: run the step 'select' first")
        return json.loads(path.read_text())["layers"]

    def distill(self):
        c = self.cfg
        t0 = time.perf_counter()
        model, hist = stage2_distill(self.teacher, self.need("align"), self.layers(),
                                     self.batches(self.T, c.batch_distill),
                                     self.train_cfg("distill", c.steps_distill, c.lr_distill), c.chunk_rows)
        return self.finish("distill", model, hist, time.perf_counter() - t0,
                           c.steps_distill * c.batch_distill * self.T)

    def finetune(self):
        c = self.cfg
        model = self.need("distill")
        schedule = [(self.batches(T, max(1, c.finetune_tokens_per_batch // T)), T) for T in c.finetune_lengths]
        cfg = lambda T: replace(self.train_cfg(f"finetune/len{T}", c.steps_finetune, c.lr_finetune),  # noqa: E731
                                schedule="constant")
        t0 = time.perf_counter()
        hists = stage3_finetune(model, schedule, cfg)
        hist = {k: sum((h[k] for h in hists.values()), []) for k in ("step", "loss", "lr")}
        hist["tokens_per_s"] = float(np.mean([h["tokens_per_s"] for h in hists.values()]))
        tokens = sum(c.steps_finetune * max(1, c.finetune_tokens_per_batch // T) * T for T in c.finetune_lengths)
        return self.finish("finetune", model, hist, time.perf_counter() - t0, tokens)

    def long_documents(self, length, n, seed=11):
        """(2n, length + 1) held-out rows for the loss that picks `a`: n windows of validation text and n
        retrieval documents built from it (needles, then their questions and answers: at toy scale
        these rows are where the attention layers, and so s_t, matter)."""
        text = heldout_windows(self.val, length, n, seed)
        rng = np.random.default_rng([seed, length])
        return np.concatenate([text, niah_training_rows(self.tok, length, self.val.tokens, rng, n).numpy()])

    def scale(self):
        c = self.cfg
        model = (self.saved("finetune") or self.need("distill")).eval()
        docs = self.long_documents(c.scale_length, c.eval_windows)
        loss = lambda m: token_nll(m, docs, batch_size=2).mean().item()  # noqa: E731
        recall = niah_recall(self.tok, self.val.tokens, c.scale_length, c.eval_samples * 2, seed=13)
        t0 = time.perf_counter()
        a, table = pick_query_scale(model, loss, c.a_grid, recall)
        (self.dir / "scale.json").write_text(json.dumps(
            {"a": a, "table": [{"a": k, **v} for k, v in table.items()], "length": c.scale_length,
             "seconds": time.perf_counter() - t0}, indent=1))
        model.save_pretrained(str(self.dir / "hybrid"))
        print(f"HyPE query scale: a = {a}; the HypeNet is in {self.dir / 'hybrid'}")
        return model

    def report(self):
        return write_report(self)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def evaluate_lengths(model, run):
    """Held-out perplexity and a NIAH grid (lengths x DEPTHS) at cfg.eval_lengths."""
    c = run.cfg
    ppl = perplexity_by_length(model, run.val, c.eval_lengths, num_windows=c.eval_windows, batch_size=2)
    grid = niah_grid(model, run.tok, c.eval_lengths, list(DEPTHS), c.eval_samples, seed=3, batch_size=4,
                     progress=c.progress, variant="single_2", filler=run.val.tokens)
    return {"perplexity": {str(k): v for k, v in ppl.items()}, "niah_grid": grid.tolist(),
            "niah": {str(L): float(np.mean(row)) for L, row in zip(c.eval_lengths, grid)}}


def write_report(run):
    """report.json, report.md and figures (PNG) in the run folder: teacher vs HypeNet by length,
    the layer choice, parameters, decoding memory, and tokens and wall time per step."""
    import platform

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, d = run.cfg, run.dir
    hybrid = HybridLM.from_pretrained(str(d / "hybrid"), device=run.device) if (d / "hybrid").is_dir() \
        else (run.saved("finetune") or run.need("distill"))
    models = {"teacher": run.teacher.eval(), "hypenet": hybrid.eval()}
    t0 = time.perf_counter()
    evals = {name: evaluate_lengths(m, run) for name, m in models.items()}
    long = 4 * run.T
    rep = {"device": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else
           f"CPU, {torch.get_num_threads()} thread(s)", "torch": torch.__version__,
           "python": platform.python_version(), "train_length": run.T, "config": asdict(c), "eval": evals,
           "layer_types": hybrid.config.layer_types, "query_scale_a": hybrid.config.attn_scale_a,
           "parameters": {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()},
           "cache_bytes": {n: {str(L): m.config.cache_bytes(L, dtype=torch.float32) for L in (long, 131072)}
                           for n, m in models.items()},
           "steps": {s: json.loads((d / s / "stats.json").read_text()) for s in STEPS
                     if (d / s / "stats.json").is_file()}}
    for name in ("select", "scale"):
        if (d / f"{name}.json").is_file():
            rep[name] = json.loads((d / f"{name}.json").read_text())
    ppl_t, ppl_h = evals["teacher"]["perplexity"], evals["hypenet"]["perplexity"]
    rep["quality"] = {"perplexity_ratio_at_train_length": ppl_h[str(run.T)] / ppl_t[str(run.T)]
                      if str(run.T) in ppl_t else None,
                      f"niah_at_{long}": {n: e["niah"].get(str(long)) for n, e in evals.items()}}
    rep["eval_seconds"] = time.perf_counter() - t0
    (d / "report.json").write_text(json.dumps(rep, indent=1, default=str))
    _figures(rep, c, run.T, d, plt)
    (d / "report.md").write_text(_markdown(rep, c, run.T))
    return rep


def _figures(rep, c, T, d, plt):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, e in rep["eval"].items():
        ax.plot(c.eval_lengths, [e["perplexity"][str(L)] for L in c.eval_lengths], "o-", label=name)
    ax.axvline(T, color="gray", ls="--", lw=1, label="teacher's training length")
    ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="held-out perplexity",
           title="Perplexity by context length")
    ax.minorticks_off()
    ax.set_xticks(c.eval_lengths, [str(L) for L in c.eval_lengths])
    ax.legend()
    fig.tight_layout()
    fig.savefig(d / "perplexity.png", dpi=120)
    fig, axes = plt.subplots(1, 2, figsize=(2 + 1.6 * len(c.eval_lengths), 3.2))
    for ax, (name, e) in zip(axes, rep["eval"].items()):
        plot_niah_heatmap(e["niah_grid"], c.eval_lengths, list(DEPTHS), ax=ax, train_length=T,
                          title=f"{name}: NIAH accuracy (%)")
    fig.tight_layout()
    fig.savefig(d / "niah.png", dpi=120)
    if "halo_scores" in rep.get("select", {}):
        sel = rep["select"]
        layers = sorted(int(i) for i in sel["halo_scores"])
        fig, ax = plt.subplots(figsize=(1.5 + 0.5 * len(layers), 3))
        ax.bar(layers, [sel["halo_scores"][str(i)] for i in layers],
               color=["C3" if i in sel["layers"] else "C0" for i in layers])
        ax.set(xlabel="layer i", ylabel="score s_i (clipped at 50)", yscale="symlog", xticks=layers,
               title=f"Layer selection: attention kept in {sel['layers']} (red)")
        fig.tight_layout()
        fig.savefig(d / "layer_scores.png", dpi=120)
    plt.close("all")


def _markdown(rep, c, T):
    e, q = rep["eval"], rep["quality"]
    lines = [f"# HALO run ({c.preset or 'custom'} preset)", "",
             f"Device: {rep['device']}; torch {rep['torch']}. Teacher: {c.teacher}; training length T = {T}.",
             f"HypeNet layers: {' '.join('A' if t == 'attention' else 'L' for t in rep['layer_types'])} "
             f"(A attention, NoPE; L Lightning, RoPE); HyPE query scale a = {rep['query_scale_a']}.", "",
             "| context length | " + " | ".join(str(L) for L in c.eval_lengths) + " |",
             "|---|" + "---|" * len(c.eval_lengths)]
    for name in e:
        lines.append(f"| {name} perplexity | " + " | ".join(f"{e[name]['perplexity'][str(L)]:.3f}"
                                                              for L in c.eval_lengths) + " |")
    for name in e:
        lines.append(f"| {name} NIAH (%) | " + " | ".join(f"{100 * e[name]['niah'][str(L)]:.0f}"
                                                           for L in c.eval_lengths) + " |")
    ratio = q["perplexity_ratio_at_train_length"]
    niah = q[f"niah_at_{4 * T}"]
    lines += ["", f"Perplexity at T = {T}: HypeNet / teacher = {ratio:.3f}" if ratio else "",
              f"NIAH at 4T = {4 * T}: teacher {100 * niah['teacher']:.0f}%, HypeNet {100 * niah['hypenet']:.0f}%"
              if niah["teacher"] is not None else "", "",
              "![perplexity](perplexity.png)", "", "![NIAH](niah.png)", ""]
    if "select" in rep:
        s = rep["select"]
        lines += [f"## Layer selection ({s['rule']}): attention in layers {s['layers']}", ""]
        if "halo_scores" in s:
            lines += ["Commonsense proxy C = exp(-mean NLL) of held-out text at T; recall R = NIAH accuracy "
                      "at T. Teacher: C = {:.4f}, R = {:.3f}.".format(s["teacher"]["csr"], s["teacher"]["recall"]),
                      f"Other rules: recall drop only {s['recall_drop']}, evenly spaced {s['even']}.", "",
                      "| layer | C(M(i)) | R(M(i)) | s_i |", "|---|---|---|---|"]
            lines += [f"| {i} | {s['csr'][i]:.4f} | {s['recall'][i]:.3f} | {s['halo_scores'][i]:.3g} |"
                      for i in s["csr"]]
            lines += ["", "![layer scores](layer_scores.png)", ""]
    if "scale" in rep:
        lines += [f"## HyPE query scale: a = {rep['scale']['a']}", "",
                  f"Loss on held-out text and retrieval documents of {rep['scale']['length']} tokens; NIAH at "
                  "that length.", "",
                  "| a | loss (nats/token) | NIAH (%) |", "|---|---|---|"]
        lines += [f"| {r['a']} | {r['loss']:.4f} | {100 * r.get('niah', float('nan')):.0f} |"
                  for r in rep["scale"]["table"]]
        lines.append("")
    lines += ["## Cost", "", "| step | tokens | seconds | tokens/s | final loss |", "|---|---|---|---|---|"]
    lines += [f"| {s} | {v['tokens']:,} | {v['seconds']:.1f} | {v['tokens_per_s']:.0f} | {v['final_loss']:.4f} |"
              for s, v in rep["steps"].items()]
    lines += ["", "| model | parameters | decoding memory at " + f"{4 * T} tokens (fp32) | at 131072 tokens |",
              "|---|---|---|---|"]
    for n, b in rep["cache_bytes"].items():
        lines.append(f"| {n} | {rep['parameters'][n]:,} | {b[str(4 * T)]['total_bytes'] / 2**10:.1f} KiB | "
                     f"{b['131072']['total_bytes'] / 2**20:.1f} MiB |")
    return "\n".join(lines) + "\n"


def write_jsonl(path, rows):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def read_jsonl(path, key=None):
    """The rows of a JSON-lines file; with `key`, only the last row for each value of row[key]."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if key is None:
        return rows
    return sorted({r[key]: r for r in rows}.values(), key=lambda r: r[key])


def run(cfg: HaloConfig):
    """The pipeline: each step in cfg.stages, in order; a step that finished before is loaded, not redone
    (delete its folder to redo it). Returns the Run."""
    if not torch.cuda.is_available():
        torch.set_num_threads(min(2, torch.get_num_threads()))
    r = Run(cfg)
    for step in STEPS:
        if step not in cfg.stages:
            continue
        done = r.saved(step) is not None or (step == "select" and (r.dir / "select.json").is_file())
        if done and step in ("align", "select", "distill", "finetune"):
            print(f"{step}: already done in {r.dir}")
            continue
        getattr(r, step)()
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description="HALO: distil a Transformer into a HypeNet (docs/method.md §4). "
                                 "Every HaloConfig field is an option; lists are comma-separated.")
    ap.add_argument("--preset", default="tiny", help=f"one of {sorted(PRESETS)} (default tiny)")
    ap.add_argument("--stages", default=",".join(STEPS), help=f"comma-separated steps (default {','.join(STEPS)})")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    options = [f for f in fields(HaloConfig) if f.name not in ("stages", "progress", "preset")]
    for f in options:
        ap.add_argument("--" + f.name.replace("_", "-"), default=None, metavar=f.type.__name__.upper(),
                        type=str if f.type is list else f.type, help=f"default {getattr(HaloConfig, f.name, '[...]')}")
    args = ap.parse_args(argv)
    number = lambda x: float(x) if "." in x or "e" in x else int(x)  # noqa: E731
    changes = {f.name: [number(x) for x in getattr(args, f.name).split(",")] if f.type is list
               else getattr(args, f.name) for f in options if getattr(args, f.name) is not None}
    cfg = preset_config(args.preset, stages=tuple(s.strip() for s in args.stages.split(",")),
                        progress=not args.no_progress, **changes)
    r = run(cfg)
    if (r.dir / "report.md").is_file():
        print(f"report: {r.dir / 'report.md'}")
    return r


if __name__ == "__main__":
    main()
