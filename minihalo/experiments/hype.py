"""Why HyPE: train tiny hybrids from scratch with different position encodings; test them at 1x-64x length.

    python -m minihalo.experiments.hype --preset cpu                      # ~2 minutes on 2 CPU cores
    python -m minihalo.experiments.hype --preset gpu --seeds 0,1,2 --out hype_gpu.json
        # every variant x seed as its own process, spread over the visible GPUs (see --parallel)

Every hybrid has the paper's layer pattern, (attention, Lightning, Lightning, Lightning) x 2; the
baseline is a Transformer of the same size (8 attention layers with RoPE). All train on the same tokens:
the token-level needle-in-a-haystack language `minihalo.tasks.TokenNIAH` at the training length T, with a
`copy_share` of rows replaced by copy rows (`minihalo.tasks.copy_rows`). Retrieval is learned in a sudden
jump after a plateau; the copy rows shorten the plateau. Only the CPU preset is short enough to run in a
notebook on CPU, and it stops before any model learns retrieval. Position-encoding variants
(docs/method.md §3.3):

    hype               attention NoPE,  Lightning RoPE   (HyPE)
    all_rope           attention RoPE,  Lightning RoPE   (a Transformer's habit carried into the hybrid)
    all_nope           attention NoPE,  Lightning NoPE
    attn_rope_rnn_nope attention RoPE,  Lightning NoPE   (the opposite of HyPE)
    transformer_rope   8 attention layers with RoPE      (the baseline)

The variants with NoPE attention (hype, all_nope) are also evaluated with HyPE's query scale
s_t = log_a(t + a) (docs/method.md §3.2), reported as `<variant>_st`. One rule picks `a` for every model:
the grid value with the lowest loss on the answer tokens of held-out rows of 16 T tokens (other rows than
the NIAH test; docs/method.md §4 step 5 picks `a` by long-document loss, and at toy scale nearly all of a
long row's loss comes from haystack tokens that need no attention).

Measured at each multiple of T: NIAH accuracy (one needle at depths 10..90%, exact match of both value
tokens) and the mean next-token loss of held-out training-style rows; during training, NIAH at 1x T
(the learning curve).

Shapes: B batch, T training length, L evaluation length.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from minihalo.evaluate import score_answers, token_nll
from minihalo.model import HybridConfig, HybridLM
from minihalo.tasks import TokenNIAH, copy_rows
from minihalo.train import TrainConfig, train

HYBRID = ["attention", "lightning", "lightning", "lightning"] * 2
VARIANTS = {
    "hype": dict(attn_rope=False, lin_rope=True),
    "all_rope": dict(attn_rope=True, lin_rope=True),
    "all_nope": dict(attn_rope=False, lin_rope=False),
    "attn_rope_rnn_nope": dict(attn_rope=True, lin_rope=False),
    "transformer_rope": dict(attn_rope=True, layer_types=["attention"] * len(HYBRID)),
}
WITH_SCALE = ("hype", "all_nope")  # NoPE attention: also evaluated with s_t

PRESETS = {
    "cpu": dict(model=dict(hidden_size=64, intermediate_size=192, num_heads=4, num_kv_heads=2, head_dim=16),
                seq_len=128, batch_size=32, steps=120, lr=3e-3, rope_theta=10000.0, copy_share=0.25,
                niah_samples=5, loss_rows=2, multiples=[1, 2, 4, 8, 16], a_grid=[4, 16, 64, 256, 1024], curve_points=4),
    "gpu": dict(model=dict(hidden_size=256, intermediate_size=768, num_heads=8, num_kv_heads=4, head_dim=32),
                seq_len=128, batch_size=128, steps=3500, lr=2e-3, rope_theta=10000.0, copy_share=0.25,
                niah_samples=40, loss_rows=16, multiples=[1, 2, 4, 8, 16, 32, 64],
                a_grid=[16, 64, 256, 1024, 4096], curve_points=20),
}
DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]


def model_config(p, variant, lin_impl="auto"):
    """The HybridConfig of `variant` under preset dict `p`."""
    spec = {"layer_types": HYBRID, **VARIANTS[variant]}
    return HybridConfig(vocab_size=TokenNIAH.vocab_size, num_layers=len(spec["layer_types"]),
                        rope_theta=p["rope_theta"], max_position_embeddings=p["seq_len"], lin_impl=lin_impl,
                        **spec, **p["model"])


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
    for m in p["multiples"]:
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
    """Train and evaluate each variant with one seed (model initialization and the task's language);
    `changes` alter the preset (e.g. steps=6000, rope_theta=1e6)."""
    unknown = sorted(set(changes) - set(PRESETS[preset]))
    if unknown:
        raise ValueError(f"unknown preset entries {unknown}; the preset has {sorted(PRESETS[preset])}")
    p = {**PRESETS[preset], **changes}
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    task = TokenNIAH(seed=seed)
    batches = lambda step: training_batch(task, p, seed, step)  # noqa: E731
    results = {"preset": preset, "seed": seed, "train_length": p["seq_len"], "multiples": p["multiples"],
               "depths": DEPTHS, "preset_config": p, "models": {}, "env": environment(device)}
    quick = task.make(p["seq_len"], 0.5, 16, seed=9)  # NIAH at 1x T during training: the learning curve
    curve = lambda m: {"niah_1x": score_answers(m, [s.input_ids for s in quick],  # noqa: E731
                                                [s.answer_ids for s in quick]).float().mean().item()}
    for variant in variants:
        torch.manual_seed(seed)
        model = HybridLM(model_config(p, variant, lin_impl)).to(device)
        t0 = time.perf_counter()
        hist = train(model, batches, TrainConfig(steps=p["steps"], lr=p["lr"], min_lr=p["lr"] / 10,
                                                 warmup_steps=30, seed=seed, progress=progress,
                                                 eval_every=max(1, p["steps"] // p["curve_points"]), log_every=10,
                                                 cuda_graph=device.type == "cuda"),
                     eval_fn=curve, device=device)
        model.eval()
        entry = {"train_seconds": time.perf_counter() - t0, "final_train_loss": hist["loss"][-1],
                 "loss_curve": hist["loss"], "tokens_per_s": hist["tokens_per_s"], "curve": hist["evals"],
                 **evaluate_model(model, task, p)}
        results["models"][variant] = entry
        if variant in WITH_SCALE:
            a, losses = pick_scale_a(model, task, p)
            model.set_query_scale(a)
            results["models"][variant + "_st"] = {"scale_a": a, "a_grid_answer_loss": losses,
                                                  **evaluate_model(model, task, p)}
            model.set_query_scale(None)
        entry["eval_seconds"] = time.perf_counter() - t0 - entry["train_seconds"]
        print(f"{variant} seed {seed}: niah {entry['niah']}", file=sys.stderr)
    return results


def run_parallel(preset, variants, seeds, parallel=None, changes=None, lin_impl="auto"):
    """`run` for every (variant, seed) as its own process, at most `parallel` at a time, spread over the
    visible GPUs round-robin (several processes share a GPU: one tiny model leaves it partly idle). Returns
    {"runs": [one `run` result per (variant, seed)], "failed": [(variant, seed, exit code)], ...}; a failed
    run is reported there and the others go on."""
    jobs = [(v, s) for s in seeds for v in variants]
    gpus = max(1, torch.cuda.device_count())
    parallel = parallel or len(jobs)
    out_dir = tempfile.mkdtemp(prefix="hype_")
    pending, running, runs, failed = list(enumerate(jobs)), [], [], []
    t0 = time.perf_counter()
    while pending or running:
        while pending and len(running) < parallel:
            i, (v, s) = pending.pop(0)
            path = os.path.join(out_dir, f"{v}_{s}.json")
            cmd = [sys.executable, "-m", "minihalo.experiments.hype", "--preset", preset, "--variants", v,
                   "--seed", str(s), "--out", path, "--no-progress", "--lin-impl", lin_impl, "--quiet",
                   *[f"--set={k}={json.dumps(x)}" for k, x in (changes or {}).items()]]
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(i % gpus)} if torch.cuda.is_available() else None
            running.append((v, s, path, subprocess.Popen(cmd, env=env)))
        time.sleep(1)
        for job in [j for j in running if j[3].poll() is not None]:
            running.remove(job)
            v, s, path, proc = job
            if proc.returncode:
                print(f"{v} seed {s} failed (exit {proc.returncode})", file=sys.stderr)
                failed.append((v, s, proc.returncode))
                continue
            with open(path) as f:
                runs.append(json.load(f))
    if not runs:
        raise RuntimeError(f"every run failed: {failed}")
    return {"preset": preset, "seeds": list(seeds), "variants": list(variants), "changes": changes or {},
            "wall_seconds": time.perf_counter() - t0, "parallel": parallel, "gpus": gpus, "runs": runs,
            "failed": failed}


def summary(runs):
    """{model: {"niah": {m: (mean, min, max)}, "seeds": n}} over the runs (one per seed)."""
    out = {}
    for r in runs:
        for name, e in r["models"].items():
            d = out.setdefault(name, {"niah": {}, "seeds": 0})
            d["seeds"] += 1
            for m, acc in e["niah"].items():
                d["niah"].setdefault(str(m), []).append(acc)
    for d in out.values():
        d["niah"] = {m: (float(np.mean(v)), float(np.min(v)), float(np.max(v))) for m, v in d["niah"].items()}
    order = [n for v in VARIANTS for n in (v, v + "_st")]
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


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
    """A plain-text table: NIAH accuracy (%) per model and length multiple: a `run` result (one seed), or a
    `run_parallel` result (mean over seeds, with min-max)."""
    runs = results["runs"] if "runs" in results else [results]
    first = runs[0]
    ms = [str(m) for m in first["multiples"]]
    lines = [f"NIAH accuracy (%), training length T = {first['train_length']} tokens "
             f"[{first['preset']} preset, {first['env']['device']}, {len(runs)} run(s)]",
             f"{'model':<22}" + "".join(f"{m + 'xT':>12}" for m in ms)]
    for name, d in summary(runs).items():
        cells = [d["niah"][m] for m in ms]
        lines.append(f"{name:<22}" + "".join(
            f"{100 * mean:>12.0f}" if lo == hi else f"{f'{100 * mean:.0f} ({100 * lo:.0f}-{100 * hi:.0f})':>12}"
            for mean, lo, hi in cells) + (f"  [{d['seeds']} seeds]" if d["seeds"] > 1 else ""))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                    help="cpu: ~2 minutes on 2 CPU cores, too short to learn retrieval; gpu: the experiment")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--lin-impl", default="auto", help="Lightning implementation: auto, chunk, triton")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated position-encoding variants to train (default: all of {', '.join(VARIANTS)})")
    ap.add_argument("--seed", type=int, default=0, help="seed of one run (model initialization and the task)")
    ap.add_argument("--seeds", default=None,
                    help="comma-separated seeds: every variant x seed runs as its own process, in parallel")
    ap.add_argument("--parallel", type=int, default=None,
                    help="with --seeds: at most this many processes at a time (default: all at once)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change a preset entry, VALUE in JSON (e.g. --set steps=6000 --set rope_theta=1e6)")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    ap.add_argument("--quiet", action="store_true", help="do not print the table")
    args = ap.parse_args(argv)
    changes = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; expected some of {sorted(VARIANTS)}")
    if not torch.cuda.is_available():
        torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.seeds:
        res = run_parallel(args.preset, variants, [int(s) for s in args.seeds.split(",")], args.parallel,
                           changes, args.lin_impl)
    else:
        res = run(args.preset, variants, progress=not args.no_progress, lin_impl=args.lin_impl, seed=args.seed,
                  **changes)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    if not args.quiet:
        print(table(res))


if __name__ == "__main__":
    main()
