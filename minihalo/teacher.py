"""The toy teacher: a small Qwen3-style Transformer (every layer softmax attention + RoPE, bytes as tokens).

HALO starts from a pretrained Transformer. The paper uses Qwen3-1.7B; to run the whole pipeline on a
laptop, minihalo pretrains its own tiny one in minutes:

    model, report = train_toy_teacher("cpu")              # about 3 minutes on 2 CPU cores: no retrieval yet
    model, report = train_toy_teacher("cpu", steps=3000)  # about 15 minutes on 2 CPU cores: retrieves
    model, report = train_toy_teacher("gpu")              # about 2 minutes on one GPU, a longer context

Its data: the frozen English snapshot (minihalo.data.english_corpus), packed into sequences of
`seq_len` bytes, with a share of the rows replaced by *retrieval documents* (a needle-in-a-haystack
prompt: natural-text haystack, needles at random depths, then the questions and their answers) and,
in the CPU preset, *copy documents* (tasks.copy_rows). Retrieval is learned in a sudden jump after a
plateau (an induction head forms): ~1250-1500 steps of the CPU recipe, ~1100 of the GPU one. After
it the teacher finds a needle anywhere inside its training length and, being a RoPE Transformer,
fails beyond it (notebook 05).

Shapes: B batch, T sequence length (`seq_len`).
"""
import time

import numpy as np
import torch

from .data import ByteTokenizer, MixedBatches, PackedBatches, TokenFile, prepare
from .evaluate import heldout_windows, niah_accuracy, niah_grid, perplexity_by_length, token_nll, unigram_loss
from .model import HybridConfig, HybridLM
from .tasks import copy_rows, make_niah_sample, niah_training_rows
from .train import TrainConfig, train

PRESETS = {
    # 4 layers, d = 128, 0.8M parameters; 480 steps x 32 x 128 bytes = 2.0M tokens (~3 minutes on 2 cores).
    # Learns English but not yet retrieval: that takes ~1500 steps (steps=3000: ~15 minutes), see README.
    "cpu": dict(model=dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
                           head_dim=32),
                corpus="english", seq_len=128, batch_size=32, steps=480, lr=3e-3, min_lr=3e-4, warmup_steps=30,
                retrieval_share=0.4, copy_share=0.25, copy_len=(4, 16)),
    # The teacher HALO starts from (data/toy_teacher): 8 layers, so that layer selection has a choice;
    # the CPU recipe, longer. Trained once (on a GPU in minutes) and committed; see data/README.md.
    "halo": dict(model=dict(hidden_size=128, intermediate_size=384, num_layers=8, num_heads=4, num_kv_heads=2,
                            head_dim=32),
                 corpus="english", seq_len=128, batch_size=32, steps=4000, lr=3e-3, min_lr=3e-4, warmup_steps=30,
                 retrieval_share=0.4, copy_share=0.25, copy_len=(4, 16)),
    # 6 layers, d = 256, 4.8M parameters; 3000 steps x 32 x 1024 bytes = 98M tokens
    "gpu": dict(model=dict(hidden_size=256, intermediate_size=768, num_layers=6, num_heads=8, num_kv_heads=4,
                           head_dim=32),
                corpus="english+code", seq_len=1024, batch_size=32, steps=3000, lr=2e-3, min_lr=2e-4,
                warmup_steps=50, retrieval_share=0.2, copy_share=0.0, copy_len=(8, 32)),
}


def recipe(preset="cpu", **changes):
    """A preset's recipe (a dict like PRESETS[preset]) with some entries changed, e.g. `lr=1e-3`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    unknown = set(changes) - set(PRESETS[preset])
    if unknown:
        raise ValueError(f"unknown recipe entries {sorted(unknown)}; expected some of {sorted(PRESETS[preset])}")
    return {**PRESETS[preset], **changes}


def teacher_config(preset="cpu", **overrides):
    """The HybridConfig of the toy teacher: every layer attention with RoPE (a Qwen3 in miniature).
    `preset` is a preset's name or a recipe dict."""
    p = preset if isinstance(preset, dict) else recipe(preset)
    kw = dict(vocab_size=256, layer_types=["attention"] * p["model"]["num_layers"], attn_rope=True,
              rope_theta=10000.0, tie_word_embeddings=True, qk_norm=True, max_position_embeddings=p["seq_len"],
              eos_token_id=ByteTokenizer.eos_token_id, **p["model"])
    kw.update(overrides)
    return HybridConfig(**kw)


def retrieval_source(tokenizer, seq_len, filler):
    """A MixedBatches source: `f(rng, n)` -> n retrieval rows (n, seq_len + 1)."""
    return lambda rng, n: niah_training_rows(tokenizer, seq_len, filler, rng, n)


COPY_ALPHABET = np.arange(33, 127)  # printable ASCII without the space: the symbols of copy documents


def teacher_batches(data_dir, seq_len, batch_size, retrieval_share, copy_share=0.0, copy_len=(8, 32), seed=0,
                    tokenizer=None):
    """Batches by step: corpus windows, a `retrieval_share` of rows that are NIAH documents and a
    `copy_share` of copy documents (a random string of `copy_len` bytes, repeated: see tasks.copy_rows).
    `tokenizer`: the corpus' own (default: bytes), which writes the NIAH documents; copy rows need bytes."""
    tok, train_split = tokenizer or ByteTokenizer(), TokenFile(data_dir, "train")
    if copy_share > 0 and not isinstance(tok, ByteTokenizer):
        raise ValueError("copy rows are strings of bytes: copy_share needs the byte tokenizer")
    text = PackedBatches(train_split, seq_len, batch_size, seed)
    if retrieval_share <= 0 and copy_share <= 0:
        return text
    sources = [text, retrieval_source(tok, seq_len, train_split.tokens)]
    weights = [1 - retrieval_share - copy_share, retrieval_share]
    if copy_share > 0:
        sources.append(lambda rng, n: copy_rows(rng, n, seq_len, COPY_ALPHABET, *copy_len))
        weights.append(copy_share)
    return MixedBatches(sources, weights, batch_size, seed)


def train_toy_teacher(preset="cpu", seed=0, device=None, data_dir=None, progress=True, ckpt_dir=None,
                      niah_samples=40, bf16=True, **changes):
    """Pretrain the toy teacher; returns (model, report). `changes` alter the preset's recipe (see `recipe`).

    `report` holds the held-out loss next to the unigram baseline (nats/token), NIAH accuracy at the
    training length (needle depths 0, 0.25, 0.5, 0.75, 1), tokens/s and wall time.
    """
    p = recipe(preset, **changes)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data_dir = data_dir or prepare(p["corpus"], "byte")
    torch.manual_seed(seed)
    model = HybridLM(teacher_config(p)).to(device)
    cfg = TrainConfig(steps=p["steps"], lr=p["lr"], min_lr=p["min_lr"], warmup_steps=p["warmup_steps"], bf16=bf16,
                      seed=seed, progress=progress, ckpt_dir=ckpt_dir, ckpt_every=200 if ckpt_dir else 0)
    batches = teacher_batches(data_dir, p["seq_len"], p["batch_size"], p["retrieval_share"], p["copy_share"],
                              p["copy_len"], seed)
    t0 = time.perf_counter()
    val = TokenFile(data_dir, "val")
    curve = lambda m: {"niah": niah_accuracy(m, ByteTokenizer(), p["seq_len"], 0.5, 10, seed=9,  # noqa: E731
                                             variant="single_2", filler=val.tokens)}
    cfg.eval_every = max(1, cfg.steps // 8)
    history = train(model, batches, cfg, device=device, eval_fn=curve)
    wall = time.perf_counter() - t0
    model.eval()
    report = evaluate_teacher(model, data_dir, p["seq_len"], niah_samples=niah_samples)
    report.update(preset=preset, recipe=p, steps=cfg.steps, seq_len=p["seq_len"], train_seconds=wall,
                  tokens_per_s=history["tokens_per_s"], final_train_loss=history["loss"][-1],
                  curve=history["evals"],
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    return model, report


def evaluate_teacher(model, data_dir, seq_len, niah_samples=40, num_windows=16):
    """Held-out loss at the training length vs the unigram baseline, and NIAH accuracy at that length."""
    train_split, val = TokenFile(data_dir, "train"), TokenFile(data_dir, "val")
    nll = token_nll(model, heldout_windows(val, seq_len, num_windows), batch_size=8)
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    per_depth = [niah_accuracy(model, ByteTokenizer(), seq_len, d, niah_samples // len(depths), seed=1,
                               variant="single_2", filler=val.tokens) for d in depths]
    return {"val_loss": nll.mean().item(), "unigram_loss": unigram_loss(train_split, val, 256),
            "niah_at_train_length": float(np.mean(per_depth)), "niah_by_depth": dict(zip(depths, per_depth))}


def length_report(model, data_dir, seq_len, multiples=(0.25, 0.5, 1, 2, 4, 8), depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                  niah_samples=8, num_windows=8):
    """NIAH accuracy grid and held-out perplexity at lengths seq_len x `multiples` (for notebook 05).

    Perplexity is measured on the last quarter of each window's positions: the predictions that see
    the longest context, where a RoPE model meets rotations it never saw in training. NIAH skips the
    lengths too short for a needle, its question and 16 bytes of haystack (`lengths` lists the others).
    """
    val, tok = TokenFile(data_dir, "val"), ByteTokenizer()
    lengths = [int(m * seq_len) for m in multiples]
    probe = make_niah_sample(tok, 4096, 0.5, 0, variant="single_2", filler=val.tokens)
    niah_lengths = [n for n in lengths if n >= 4096 - probe.filler_len + 16]
    grid = niah_grid(model, tok, niah_lengths, list(depths), niah_samples, seed=2, batch_size=4,
                     variant="single_2", filler=val.tokens)
    ppl = perplexity_by_length(model, val, lengths, num_windows=num_windows, batch_size=2, tail=seq_len // 4)
    return {"lengths": niah_lengths, "depths": list(depths), "niah_grid": grid.tolist(),
            "perplexity_tail": {str(k): v for k, v in ppl.items()}}


def main(argv=None):
    import argparse
    import json
    import platform

    ap = argparse.ArgumentParser(description="Pretrain the toy teacher and report its loss and NIAH accuracy.")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                    help="cpu: 4 layers, 128-byte sequences, ~3 minutes on 2 CPU cores; halo: the 8-layer "
                         "teacher HALO starts from; gpu: 6 layers, 1024-byte sequences, ~2 minutes on one GPU")
    ap.add_argument("--out", default=None, help="write the report as JSON here")
    ap.add_argument("--save", default=None, help="save the model here in fp32 (HybridLM.save_pretrained)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initialization and the data order")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ap.add_argument("--lengths", action="store_true", help="also measure NIAH and perplexity from T/4 to 8T")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(min(2, torch.get_num_threads()))
    changes = {"steps": args.steps} if args.steps else {}
    model, report = train_toy_teacher(args.preset, seed=args.seed, progress=not args.no_progress, **changes)
    report.update(torch=torch.__version__, python=platform.python_version())

    def write():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1, default=str)

    write()  # the training report first: a failure in what follows must not lose it
    if args.lengths:
        report["by_length"] = length_report(model, prepare(PRESETS[args.preset]["corpus"], "byte"), report["seq_len"])
        write()
    if args.save:
        model.float().save_pretrained(args.save)
    print(f"held-out loss {report['val_loss']:.3f} nats/byte vs unigram {report['unigram_loss']:.3f}; "
          f"NIAH at T={report['seq_len']}: {100 * report['niah_at_train_length']:.0f}% "
          f"({report['train_seconds']:.0f} s on {report['device']})")


if __name__ == "__main__":
    main()
