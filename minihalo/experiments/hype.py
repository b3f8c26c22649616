"""Why HyPE: train tiny hybrids from scratch with different position encodings; test them at 1x-16x length.

    python -m minihalo.experiments.hype --preset cpu                     # ~2 minutes on 2 CPU cores
    python -m minihalo.experiments.hype --preset gpu --out hype_gpu.json # ~5 minutes per model on an H200

Every model has the paper's layer pattern, (attention, Lightning, Lightning, Lightning) x 2, and the
same data: the token-level needle-in-a-haystack language `minihalo.tasks.TokenNIAH` at the training
length T, with a `copy_share` of rows replaced by copy rows (`minihalo.tasks.copy_rows`). Retrieval is
learned in a sudden jump after a plateau; the copy rows shorten the plateau, and the GPU preset trains long
enough (3000 steps) for HyPE to pass it. Only the CPU preset is short enough to run in a notebook on CPU,
and it stops before any model learns retrieval. Position-encoding variants (docs/method.md §3.3):

    hype              attention NoPE,  Lightning RoPE   (HyPE, evaluated without and with s_t)
    all_rope          attention RoPE,  Lightning RoPE   (a Transformer's habit carried into the hybrid)
    all_nope          attention NoPE,  Lightning NoPE
    attn_rope_rnn_nope attention RoPE, Lightning NoPE   (the opposite of HyPE)

HyPE's query scale s_t = log_a(t + a) is used at inference only (docs/method.md §3.2): `a` is picked on a grid by
the loss on held-out sequences of 16 T tokens (docs/method.md §4 step 5). At toy scale nearly all of a long
sequence's loss comes from haystack tokens that need no attention, so the loss that picks `a` is
measured on the answer tokens, the ones that need retrieval (a different seed from the NIAH test).

Measured at 1, 2, 4, 8, 16 x T: NIAH accuracy (one needle at depths 10..90%, exact match of both value
tokens) and the mean next-token loss of held-out training-style sequences.

Shapes: B batch, T training length, L evaluation length.
"""
import argparse
import json
import platform
import sys
import time

import numpy as np
import torch

from minihalo.evaluate import score_answers, token_nll
from minihalo.model import HybridConfig, HybridLM
from minihalo.tasks import TokenNIAH, copy_rows
from minihalo.train import TrainConfig, train

VARIANTS = {
    "hype": dict(attn_rope=False, lin_rope=True),
    "all_rope": dict(attn_rope=True, lin_rope=True),
    "all_nope": dict(attn_rope=False, lin_rope=False),
    "attn_rope_rnn_nope": dict(attn_rope=True, lin_rope=False),
}

PRESETS = {
    "cpu": dict(model=dict(hidden_size=64, intermediate_size=192, num_heads=4, num_kv_heads=2, head_dim=16),
                seq_len=128, batch_size=32, steps=120, lr=3e-3, niah_samples=5, loss_rows=2, copy_share=0.25,
                a_grid=[4, 16, 64, 256, 1024]),
    "gpu": dict(model=dict(hidden_size=256, intermediate_size=768, num_heads=8, num_kv_heads=4, head_dim=32),
                seq_len=128, batch_size=128, steps=3000, lr=2e-3, niah_samples=40, loss_rows=16, copy_share=0.25,
                a_grid=[16, 64, 256, 1024, 4096]),
}
MULTIPLES = [1, 2, 4, 8, 16]
DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]
PATTERN = ["attention", "lightning", "lightning", "lightning"] * 2


def model_config(preset, variant, lin_impl="auto"):
    p = preset if isinstance(preset, dict) else PRESETS[preset]
    return HybridConfig(vocab_size=TokenNIAH.vocab_size, num_layers=len(PATTERN), layer_types=PATTERN,
                        rope_theta=10000.0, max_position_embeddings=p["seq_len"], lin_impl=lin_impl,
                        **VARIANTS[variant], **p["model"])


def answer_loss(model, rows):
    """(mean NLL of the answer tokens, mean NLL of all tokens) of (N, L+1) rows; answers are the value
    tokens after each QUERY key."""
    nll = token_nll(model, rows)  # (N, L)
    query = rows[:, :-1] == TokenNIAH.QUERY  # QUERY at t: key at t+1, values at t+2, t+3
    mask = torch.zeros_like(query)  # predictions made at t+1 and t+2 are the two value tokens
    mask[:, 1:] |= query[:, :-1]
    mask[:, 2:] |= query[:, :-2]
    return nll[mask].mean().item(), nll.mean().item()


def training_batch(task, p, seed, step):
    """The (B, T+1) batch of `step`: TokenNIAH rows, a `copy_share` of them replaced by copy rows (random
    haystack-token strings repeated) that make induction heads, the retrieval mechanism, form early."""
    rng = np.random.default_rng([seed, step])
    x = task.training_rows(rng, p["batch_size"], p["seq_len"])
    n = int(round(p["copy_share"] * p["batch_size"]))
    if n:
        x[:n] = copy_rows(rng, n, p["seq_len"], np.arange(*TokenNIAH.HAY))
    return x


def eval_rows(task, length, n, seed):
    return task.training_rows(np.random.default_rng([seed, length]), n, length)


def evaluate_model(model, task, p, batch_size=8):
    T, out = p["seq_len"], {"niah": {}, "loss": {}}
    for m in MULTIPLES:
        L = m * T
        samples = [s for d in DEPTHS for s in task.make(L, d, p["niah_samples"] // len(DEPTHS) or 1, seed=1)]
        bs = max(1, batch_size * T // L)
        ok = score_answers(model, [s.input_ids for s in samples], [s.answer_ids for s in samples], bs)
        out["niah"][m] = ok.float().mean().item()
        out["loss"][m] = float(np.mean([answer_loss(model, eval_rows(task, L, 1, 2 + i))[1]
                                        for i in range(p["loss_rows"])]))
    return out


def pick_scale_a(model, task, p):
    """HyPE step 5: the `a` of s_t = log_a(t + a) with the lowest answer loss at 16 T (seed 3 rows)."""
    rows = [eval_rows(task, 16 * p["seq_len"], 1, 3 + i) for i in range(p["loss_rows"])]
    losses = {}
    for a in [None] + p["a_grid"]:
        model.set_query_scale(a)
        losses[str(a)] = float(np.mean([answer_loss(model, r)[0] for r in rows]))
    model.set_query_scale(None)
    best = min(p["a_grid"], key=lambda a: losses[str(a)])
    return best, losses


def run(preset="cpu", variants=tuple(VARIANTS), device=None, progress=True, lin_impl="auto", seed=0, **changes):
    """Train and evaluate each variant; `changes` alter the preset (e.g. steps=3000)."""
    p = {**PRESETS[preset], **changes}
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    task = TokenNIAH(seed=seed)
    batches = lambda step: training_batch(task, p, seed, step)  # noqa: E731
    results = {"preset": preset, "train_length": p["seq_len"], "multiples": MULTIPLES, "depths": DEPTHS,
               "preset_config": p, "models": {}, "env": environment(device)}
    for variant in variants:
        torch.manual_seed(seed)
        model = HybridLM(model_config(p, variant, lin_impl)).to(device)
        t0 = time.perf_counter()
        quick = task.make(p["seq_len"], 0.5, 16, seed=9)  # NIAH at 1x T during training: the learning curve
        curve = lambda m: {"niah_1x": score_answers(m, [s.input_ids for s in quick],  # noqa: E731
                                                    [s.answer_ids for s in quick]).float().mean().item()}
        hist = train(model, batches, TrainConfig(steps=p["steps"], lr=p["lr"], min_lr=p["lr"] / 10,
                                                 warmup_steps=30, seed=seed, progress=progress,
                                                 eval_every=max(1, p["steps"] // 5)), eval_fn=curve, device=device)
        model.eval()
        entry = {"train_seconds": time.perf_counter() - t0, "final_train_loss": hist["loss"][-1],
                 "tokens_per_s": hist["tokens_per_s"], "curve": hist["evals"], **evaluate_model(model, task, p)}
        results["models"][variant] = entry
        if variant == "hype":
            a, losses = pick_scale_a(model, task, p)
            model.set_query_scale(a)
            results["models"]["hype_st"] = {"scale_a": a, "a_grid_answer_loss": losses,
                                            **evaluate_model(model, task, p)}
            model.set_query_scale(None)
        print(f"{variant}: niah {entry['niah']}", file=sys.stderr)
    return results


def environment(device):
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def table(results):
    """A plain-text table: NIAH accuracy (%) and loss per model and length multiple."""
    ms = results["multiples"]
    lines = [f"NIAH accuracy (%), training length T = {results['train_length']} tokens "
             f"[{results['preset']} preset, {results['env']['device']}]",
             f"{'model':<22}" + "".join(f"{str(m) + 'xT':>8}" for m in ms)]
    for name, r in results["models"].items():
        lines.append(f"{name:<22}" + "".join(f"{100 * r['niah'][m] if m in r['niah'] else 100 * r['niah'][str(m)]:>8.0f}"
                                             for m in ms))
    lines.append("mean next-token loss (nats)")
    for name, r in results["models"].items():
        lines.append(f"{name:<22}" + "".join(f"{r['loss'][m] if m in r['loss'] else r['loss'][str(m)]:>8.3f}"
                                             for m in ms))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                    help="cpu: ~2 minutes on 2 CPU cores, too short to learn retrieval; gpu: 3000 steps per model")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--lin-impl", default="auto", help="Lightning implementation: auto, chunk, triton")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated position-encoding variants to train (default: all of {', '.join(VARIANTS)})")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(min(2, torch.get_num_threads()))
    res = run(args.preset, args.variants.split(","), progress=not args.no_progress, lin_impl=args.lin_impl)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print(table(res))


if __name__ == "__main__":
    main()
