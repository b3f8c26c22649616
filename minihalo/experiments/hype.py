"""Why HyPE: train tiny hybrids from scratch with different position encodings; test them at 1x-64x length.

    python -m minihalo.experiments.hype --preset cpu                      # ~2 minutes on 2 CPU cores
    python -m minihalo.experiments.hype --preset gpu --seeds 0,1,2 --out hype_gpu.json
        # every variant x seed as its own process, spread over the visible GPUs (see --parallel)
    python -m minihalo.experiments.hype --preset gpu --mechanism --out mech.json
        # the runs that found why RoPE attention did not learn under the earlier recipe (MECHANISM)

Every hybrid has the paper's layer pattern, (attention, Lightning, Lightning, Lightning) x 2; the
baseline is a Transformer of the same size (8 attention layers with RoPE). All train on the same tokens:
the token-level needle-in-a-haystack language `minihalo.tasks.TokenNIAH` at the training length T, with a
`copy_share` of rows (half) replaced by copy rows (`minihalo.tasks.copy_rows`: a random string repeated),
whose tokens are drawn from every token a needle and its question hold (keys, values, haystack) and whose
periods span 8 to T/2 tokens, the distances between a needle and its question. Copy rows train the copying
circuit (an induction head) that retrieval uses; drawn from haystack tokens only (the earlier recipe,
EARLIER), they trained it for tokens that no needle holds, and no layout with RoPE in its attention layers
learned retrieval within 3500 steps; with periods of 8-32 only, a RoPE Transformer learned in some seeds, or
HyPE lost its extrapolation (notes/retrieval.md). Only the CPU preset is short enough to run
in a notebook on CPU, and it stops before any model learns retrieval. Position-encoding variants
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
tokens), overall and per depth, and the next-token loss of held-out training-style rows, as a mean and
split into haystack (also by span of positions), needles and questions. During training (the learning
curve, `training_probe`): NIAH at 1x T, the loss of each answer token, the loss of copies, and where the
answering position's attention goes (`needle_attention`).

Shapes: B batch, T training length, L evaluation length.
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from minihalo.evaluate import score_answers, token_nll
from minihalo.model import HybridConfig, HybridLM, apply_rope
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

# The training data and schedule; every entry can be --set. copy_alphabet: the tokens copy rows are drawn
# from, "all" (keys, values and haystack: every token a needle or its question holds) or "haystack".
RECIPE = dict(copy_share=0.5, copy_len=[8, 64], copy_alphabet="all", haystack="markov", max_needles=8,
              warmup_steps=30, schedule="cosine", qk_gain=1.0)
# the earlier recipe (3500 steps), under which RoPE attention never learned
EARLIER = dict(copy_alphabet="haystack", copy_share=0.25, copy_len=[8, 32])
PRESETS = {
    "cpu": dict(model=dict(hidden_size=64, intermediate_size=192, num_heads=4, num_kv_heads=2, head_dim=16),
                seq_len=128, batch_size=32, steps=120, lr=3e-3, rope_theta=10000.0, **RECIPE,
                niah_samples=5, loss_rows=2, multiples=[1, 2, 4, 8, 16], a_grid=[4, 16, 64, 256, 1024], curve_points=4),
    "gpu": dict(model=dict(hidden_size=256, intermediate_size=768, num_heads=8, num_kv_heads=4, head_dim=32),
                seq_len=128, batch_size=128, steps=1800, lr=2e-3, rope_theta=10000.0, **RECIPE,
                niah_samples=40, loss_rows=16, multiples=[1, 2, 4, 8, 16, 32, 64],
                a_grid=[16, 64, 256, 1024, 4096], curve_points=20),
}
DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]

# The runs that looked for why RoPE attention did not learn retrieval under the earlier recipe (EARLIER): one
# change each, mostly on the RoPE Transformer; evaluated at 1x T only. label: (variant, preset changes).
MECHANISM_STEPS = dict(steps=2000, multiples=[1], loss_rows=4)
CANDIDATE = dict(copy_len=[8, 128], qk_gain=1.5)
MECHANISM = {
    "earlier/transformer_rope": ("transformer_rope", {}),
    "earlier/hype": ("hype", {}),
    "copy_whole_row/transformer_rope": ("transformer_rope", dict(copy_len=[8, 128])),
    "no_copy_rows/transformer_rope": ("transformer_rope", dict(copy_share=0.0)),
    "uniform_haystack/transformer_rope": ("transformer_rope", dict(haystack="uniform")),
    "one_needle/transformer_rope": ("transformer_rope", dict(max_needles=1)),
    "T512/transformer_rope": ("transformer_rope", dict(seq_len=512, batch_size=32)),
    "warmup500/transformer_rope": ("transformer_rope", dict(warmup_steps=500)),
    "qk_gain1.5/transformer_rope": ("transformer_rope", dict(qk_gain=1.5)),
    **{f"candidate/{v}": (v, CANDIDATE) for v in ("transformer_rope", "all_rope", "all_nope")},
}


def model_config(p, variant, lin_impl="auto"):
    """The HybridConfig of `variant` under preset dict `p`."""
    spec = {"layer_types": HYBRID, **VARIANTS[variant]}
    return HybridConfig(vocab_size=TokenNIAH.vocab_size, num_layers=len(spec["layer_types"]),
                        rope_theta=p["rope_theta"], max_position_embeddings=p["seq_len"], lin_impl=lin_impl,
                        **spec, **p["model"])


COPY_ALPHABETS = {"all": np.arange(TokenNIAH.KEYS[0], TokenNIAH.HAY[1]), "haystack": np.arange(*TokenNIAH.HAY)}


def make_task(p, seed):
    """The TokenNIAH language of seed `seed` under preset dict `p` (its haystack and needles per row)."""
    return TokenNIAH(seed=seed, max_needles=p["max_needles"], haystack=p["haystack"])


def row_parts(rows, T=None):
    """The parts of (N, L+1) rows, as (N, L) masks over the predicted tokens (mask[:, t] marks token t+1,
    predicted at position t): "v1", "v2" (the first and the second value token after each QUERY key),
    "needles" (each needle's 4 tokens), "questions" (from the first QUERY on) and "haystack" (the rest);
    with the training length `T`, also "haystack_by_span": the haystack split by the predicting position t
    into the spans [0, T), [T, 2T), [2T, 4T), ... that hold the row."""
    query = rows[:, :-1] == TokenNIAH.QUERY  # QUERY at t: key at t+1, values at t+2, t+3
    v1, v2 = torch.zeros_like(query), torch.zeros_like(query)  # predicted at t+1 and t+2
    v1[:, 1:] = query[:, :-1]
    v2[:, 2:] = query[:, :-2]
    target = rows[:, 1:]
    pos = torch.arange(target.shape[1])
    questions = pos >= (target == TokenNIAH.QUERY).int().argmax(1, keepdim=True)  # every row holds a question
    marker = (rows == TokenNIAH.NEEDLE).int()  # (N, L+1); a needle is the marker and the 3 tokens after it
    needles = (torch.stack([marker.roll(i, 1) for i in range(4)]).sum(0)[:, 1:] > 0) & ~questions
    out = {"v1": v1, "v2": v2, "needles": needles, "questions": questions, "haystack": ~needles & ~questions}
    if T is not None:
        ends = [T * 2 ** i for i in range(max(1, math.ceil(math.log2(len(pos) / T)) + 1))]
        out["haystack_by_span"] = [out["haystack"] & (pos >= lo) & (pos < hi) for lo, hi in zip([0] + ends, ends)]
    return out


def row_losses(model, rows, T=None):
    """Mean NLLs of (N, L+1) rows: {"answer": the value tokens after each QUERY key, "v1", "v2": the
    first and the second value token alone, "all": every token}, and the summed NLL per row of each part
    of a row (`row_parts`), "sum_haystack", "sum_needles", "sum_questions": "all" is their total over the
    row length. With the training length `T`, also "haystack_by_span": the haystack's summed NLL per row in
    each span of predicting positions: where in the row the haystack loss sits."""
    nll = token_nll(model, rows)  # (N, L): nll[:, t] scores token t+1
    parts = row_parts(rows, T)
    per_row = lambda mask: (nll * mask).sum(1).mean().item()  # noqa: E731
    out = {"answer": nll[parts["v1"] | parts["v2"]].mean().item(), "v1": nll[parts["v1"]].mean().item(),
           "v2": nll[parts["v2"]].mean().item(), "all": nll.mean().item(),
           **{f"sum_{k}": per_row(parts[k]) for k in ("haystack", "needles", "questions")}}
    if T is not None:
        out["haystack_by_span"] = [per_row(m) for m in parts["haystack_by_span"]]
    return out


def haystack_entropy(task):
    """The haystack's next-token entropy (nats per token), the loss of a perfect model on haystack tokens:
    the entropy of each token's next-token distribution, averaged over the haystack's tokens (ln 152 for a
    uniform haystack). Weighting by how often each token occurs instead changes it by less than 0.003 nats
    (seeds 0-2)."""
    lo, hi = TokenNIAH.HAY
    n = hi - lo
    if task.kind == "uniform":
        return math.log(n)
    P = np.full((n, n), 0.1 / n)  # P[i, j]: next token lo + j after lo + i
    for i in range(n):
        for j in task.successors[lo + i]:
            P[i, j - lo] += 0.9 / 3
    return float(-(P * np.log(P)).sum(1).mean())


def training_batch(task, p, seed, step):
    """The (B, T+1) batch of `step`: TokenNIAH rows, a `copy_share` of them replaced by copy rows (a random
    string of `copy_alphabet` tokens, its length drawn from `copy_len`, repeated) that make induction heads,
    the retrieval mechanism, form early."""
    rng = np.random.default_rng([seed, step])
    x = task.training_rows(rng, p["batch_size"], p["seq_len"])
    n = int(round(p["copy_share"] * p["batch_size"]))
    if n:
        x[:n] = copy_rows(rng, n, p["seq_len"], COPY_ALPHABETS[p["copy_alphabet"]], *p["copy_len"])
    return x


def eval_rows(task, length, n, seed):
    return task.training_rows(np.random.default_rng([seed, length]), n, length)


def set_qk_gain(model, gain):
    """Start the QK-norm gains (the weights of q_norm and k_norm, learned like every weight) of the attention
    layers at `gain` instead of 1: every attention logit is multiplied by gain², a larger initial attention
    temperature that training goes on to adjust per dimension."""
    for layer in model.layers:
        if hasattr(layer.mixer, "q_norm"):
            with torch.no_grad():
                layer.mixer.q_norm.weight.fill_(gain)
                layer.mixer.k_norm.weight.fill_(gain)


def attention_weights(mixer, x, ctx):
    """(B, H, T, T) softmax weights of the attention layer `mixer` on its input x (B, T, d), in fp32, the way
    the layer computes them (QK-norm, RoPE, query scale, GQA, causal mask; no cache, no padding)."""
    cfg = mixer.cfg
    B, T, _ = x.shape
    H, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        q = mixer.q_proj(x).view(B, T, H, D)
        k = mixer.k_proj(x).view(B, T, G, D)
        if cfg.qk_norm:
            q, k = mixer.q_norm(q), mixer.k_norm(k)
        if cfg.attn_rope:
            cos, sin = (c.float() for c in ctx.rope)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cfg.attn_scale_a is not None:
            s = torch.log(ctx.positions.float() + cfg.attn_scale_a) / math.log(cfg.attn_scale_a)  # (B, T)
            q = q * s[:, :, None, None]
        k = k.repeat_interleave(H // G, dim=2)  # (B, T, H, D): query head h reads kv head h // (H/G)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)  # (B, H, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1)


@torch.no_grad()
def needle_attention(model, samples, recent=16):
    """Where the answering position looks: for NIAH prompts of one length, the attention weights of the last
    prompt token (the question's key, which must predict the first value token) in every attention layer.
    Returns {"needle": per attention layer, the share on the needle's 4 tokens of the head that puts most
    there, "recent": that head's share on the last `recent` tokens, "recent_all_heads": the mean share of
    all heads on them}, each a mean over the prompts."""
    inputs, hooks = {}, []
    attn = [i for i, layer in enumerate(model.layers) if model.config.layer_types[i] == "attention"]
    for i in attn:
        hooks.append(model.layers[i].mixer.register_forward_pre_hook(
            lambda m, args, i=i: inputs.__setitem__(i, (args[0], args[1]))))
    ids = torch.tensor([s.input_ids for s in samples], device=next(model.parameters()).device)
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    N, T = ids.shape
    on_needle = torch.zeros(N, T, device=ids.device)
    for j, s in enumerate(samples):
        on_needle[j, s.needle_start:s.needle_start + s.needle_len] = 1
    out = {"needle": [], "recent": [], "recent_all_heads": []}
    for i in attn:
        w = attention_weights(model.layers[i].mixer, *inputs[i])[:, :, -1]  # (N, H, T): the answering row
        needle = (w * on_needle[:, None]).sum(-1).mean(0)  # (H,)
        near = w[..., -recent:].sum(-1).mean(0)  # (H,)
        best = int(needle.argmax())
        out["needle"].append(needle[best].item())
        out["recent"].append(near[best].item())
        out["recent_all_heads"].append(near.mean().item())
    return out


def training_probe(task, p):
    """The function `train` calls every `eval_every` steps: NIAH at 1x T (4 prompts at each depth), the NLL
    of the answer tokens (each value token alone) on held-out training rows, the NLL of copy rows after
    their first period (period 16 and period T/2: short and long copies), and `needle_attention`."""
    T = p["seq_len"]
    quick = [s for d in DEPTHS for s in task.make(T, d, 4, seed=9)]
    rows = eval_rows(task, T, 16, 11)
    copies = {P: copy_rows(np.random.default_rng([12, P]), 16, T, np.arange(*TokenNIAH.HAY), P, P)
              for P in (16, T // 2)}

    def probe(model):
        losses = row_losses(model, rows)
        out = {"niah_1x": score_answers(model, [s.input_ids for s in quick],
                                        [s.answer_ids for s in quick]).float().mean().item(),
               "answer_nll_v1": losses["v1"], "answer_nll_v2": losses["v2"]}
        for P, c in copies.items():
            out[f"copy_nll_{P}"] = token_nll(model, c)[:, P:].mean().item()
        return {**out, **{f"attn_{k}": v for k, v in needle_attention(model, quick).items()}}

    return probe


def evaluate_model(model, task, p, batch_size=8):
    """NIAH accuracy (all depths, and per depth) and the mean next-token loss of held-out rows at each
    multiple of T."""
    T, out = p["seq_len"], {"niah": {}, "niah_by_depth": {}, "loss": {}, "loss_parts": {}}
    for m in p["multiples"]:
        L = m * T
        n = p["niah_samples"] // len(DEPTHS) or 1
        samples = [s for d in DEPTHS for s in task.make(L, d, n, seed=1)]
        bs = max(1, batch_size * T // L)
        ok = score_answers(model, [s.input_ids for s in samples], [s.answer_ids for s in samples], bs)
        out["niah"][m] = ok.float().mean().item()
        out["niah_by_depth"][m] = ok.view(len(DEPTHS), n).float().mean(1).tolist()
        losses = [row_losses(model, eval_rows(task, L, 1, 2 + i), T) for i in range(p["loss_rows"])]
        out["loss"][m] = float(np.mean([r["all"] for r in losses]))
        out["loss_parts"][m] = {k: float(np.mean([r[k] for r in losses])) for k in losses[0] if k.startswith("sum_")}
        out["loss_parts"][m]["haystack_by_span"] = np.mean([r["haystack_by_span"] for r in losses], 0).tolist()
    return out


def pick_scale_a(model, task, p):
    """HyPE step 5: the `a` of s_t = log_a(t + a) with the lowest answer loss at 16 T (seed 3 rows)."""
    rows = [eval_rows(task, 16 * p["seq_len"], 1, 3 + i) for i in range(p["loss_rows"])]
    losses = {}
    for a in [None] + p["a_grid"]:
        model.set_query_scale(a)
        losses[str(a)] = float(np.mean([row_losses(model, r)["answer"] for r in rows]))
    model.set_query_scale(None)
    best = min(p["a_grid"], key=lambda a: losses[str(a)])
    return best, losses


def run(preset="cpu", variants=tuple(VARIANTS), device=None, progress=True, lin_impl="auto", seed=0,
        curve_file=None, **changes):
    """Train and evaluate each variant with one seed (model initialization and the task's language);
    `changes` alter the preset (e.g. steps=6000, rope_theta=1e6). With `curve_file`, the learning curve so
    far is written there (JSON) at every evaluation during training, so a run stopped early leaves it."""
    unknown = sorted(set(changes) - set(PRESETS[preset]))
    if unknown:
        raise ValueError(f"unknown preset entries {unknown}; the preset has {sorted(PRESETS[preset])}")
    p = {**PRESETS[preset], **changes}
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    task = make_task(p, seed)
    batches = lambda step: training_batch(task, p, seed, step)  # noqa: E731
    results = {"preset": preset, "seed": seed, "train_length": p["seq_len"], "multiples": p["multiples"],
               "depths": DEPTHS, "preset_config": p, "models": {}, "env": environment(device)}
    probe = training_probe(task, p)
    every = max(1, p["steps"] // p["curve_points"])
    for variant in variants:
        torch.manual_seed(seed)
        model = HybridLM(model_config(p, variant, lin_impl)).to(device)
        if p["qk_gain"] != 1.0:
            set_qk_gain(model, p["qk_gain"])
        points = []

        def curve(m):
            points.append((min(p["steps"], every * (len(points) + 1)), probe(m)))
            if curve_file:  # written whole, then renamed: a run killed meanwhile leaves the previous one
                with open(curve_file + ".tmp", "w") as f:
                    json.dump({"variant": variant, "seed": seed, "curve": points}, f)
                os.replace(curve_file + ".tmp", curve_file)
            return points[-1][1]

        t0 = time.perf_counter()
        hist = train(model, batches, TrainConfig(steps=p["steps"], lr=p["lr"], min_lr=p["lr"] / 10,
                                                 warmup_steps=p["warmup_steps"], schedule=p["schedule"],
                                                 seed=seed, progress=progress, eval_every=every, log_every=10,
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


def run_jobs(preset, jobs, parallel=None, lin_impl="auto", deadline=None):
    """Run each job {"label", "variant", "seed", "changes"} as its own process (`run` with one variant), at
    most `parallel` at a time, spread over the visible GPUs round-robin (several processes share a GPU: one
    tiny model leaves it partly idle). After `deadline` seconds the processes still running are stopped and
    reported under "stopped" with their learning curve so far. Returns {"runs": [one `run` result per job,
    with its "label"], "failed": [(label, exit code)], "stopped": [{"label", "curve"}], ...}; a failed run
    is reported and the others go on."""
    gpus = max(1, torch.cuda.device_count())
    parallel = parallel or len(jobs)
    out_dir = tempfile.mkdtemp(prefix="hype_")
    pending, running, runs, failed, stopped = list(enumerate(jobs)), [], [], [], []
    t0 = time.perf_counter()
    while pending or running:
        while pending and len(running) < parallel:
            i, job = pending.pop(0)
            path = os.path.join(out_dir, f"{i}.json")
            cmd = [sys.executable, "-m", "minihalo.experiments.hype", "--preset", preset, "--variants",
                   job["variant"], "--seed", str(job["seed"]), "--out", path, "--curve-file", path + ".curve",
                   "--no-progress", "--lin-impl", lin_impl, "--quiet",
                   *[f"--set={k}={json.dumps(x)}" for k, x in job.get("changes", {}).items()]]
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(i % gpus)} if torch.cuda.is_available() else None
            running.append((job, path, subprocess.Popen(cmd, env=env)))
        time.sleep(1)
        late = deadline is not None and time.perf_counter() - t0 > deadline
        for entry in list(running):
            job, path, proc = entry
            if proc.poll() is None and not late:
                continue
            running.remove(entry)
            if proc.poll() is None:  # past the deadline: stop it, keep its curve
                proc.kill()
                proc.wait()
                curve = []
                if os.path.exists(path + ".curve"):
                    with open(path + ".curve") as f:
                        curve = json.load(f)["curve"]
                print(f"{job['label']} stopped at the deadline", file=sys.stderr)
                stopped.append({"label": job["label"], "curve": curve})
            elif proc.returncode:
                print(f"{job['label']} failed (exit {proc.returncode})", file=sys.stderr)
                failed.append((job["label"], proc.returncode))
            else:
                with open(path) as f:
                    runs.append({"label": job["label"], "changes": job.get("changes", {}), **json.load(f)})
        if late:
            pending.clear()
    if not runs and not stopped:
        raise RuntimeError(f"every run failed: {failed}")
    return {"preset": preset, "wall_seconds": time.perf_counter() - t0, "parallel": parallel, "gpus": gpus,
            "runs": runs, "failed": failed, "stopped": stopped}


def run_parallel(preset, variants, seeds, parallel=None, changes=None, lin_impl="auto", deadline=None):
    """`run_jobs` for every (variant, seed) with the same preset `changes`."""
    jobs = [{"label": f"{v}_{s}", "variant": v, "seed": s, "changes": changes or {}} for s in seeds for v in variants]
    return {"seeds": list(seeds), "variants": list(variants), "changes": changes or {},
            **run_jobs(preset, jobs, parallel, lin_impl, deadline)}


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


def first_step_at(curve, level=0.9):
    """The first step of a learning curve [(step, probe dict)] with NIAH at 1x T >= `level`, or None (the
    accuracies are fp32 means: 18 of 20 is 0.89999998)."""
    return next((step for step, c in curve if c["niah_1x"] >= level - 1e-6), None)


def learning_curves(results):
    """{label: learning curve [(step, probe dict)]} of the runs of a `run_jobs` result, those stopped at the
    deadline included, in the order of MECHANISM and then of VARIANTS."""
    curves = [(r["label"], e["curve"]) for r in results["runs"] for n, e in r["models"].items() if not n.endswith("_st")]
    curves += [(s["label"], s["curve"]) for s in results.get("stopped", []) if s["curve"]]
    order = list(MECHANISM) + [f"{v}_{s}" for s in range(10) for v in VARIANTS]
    return dict(sorted(curves, key=lambda lc: order.index(lc[0]) if lc[0] in order else len(order)))


def learning_table(results):
    """A plain-text table of `run_jobs` results, finished runs and runs stopped at the deadline alike, from the
    last point of each learning curve: NIAH at 1x T (the probe's 20 prompts), the first step at >= 90%, the
    NLL of each answer token, of short and of long copies, and the needle share of the answering position's
    attention (the best head of each attention layer)."""
    lines = [f"{'run':<34}{'steps':>6}{'niah':>6}{'90% at':>8}{'v1 nll':>8}{'v2 nll':>8}{'copy16':>8}"
             f"{'copyT/2':>8}  attention on needle (%)"]
    for label, curve in learning_curves(results).items():
        step, last = curve[-1]
        copy = [v for k, v in last.items() if k.startswith("copy_nll_")]
        lines.append(f"{label:<34}{step:>6}{100 * last['niah_1x']:>6.0f}{str(first_step_at(curve)):>8}"
                     f"{last['answer_nll_v1']:>8.2f}{last['answer_nll_v2']:>8.2f}{copy[0]:>8.2f}{copy[1]:>8.2f}  "
                     + " ".join(f"{100 * a:.0f}" for a in last["attn_needle"]))
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
    ap.add_argument("--mechanism", action="store_true",
                    help="run the MECHANISM plan (each run with its own preset changes) instead of variants x seeds")
    ap.add_argument("--deadline", type=float, default=None,
                    help="with --seeds or --mechanism: stop the runs still going after this many seconds, keeping "
                         "their learning curves")
    ap.add_argument("--curve-file", default=None, help="write the learning curve here at every evaluation")
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
    if args.mechanism:
        jobs = [{"label": label, "variant": v, "seed": args.seed,
                 "changes": {**EARLIER, **MECHANISM_STEPS, **c, **changes}}
                for label, (v, c) in MECHANISM.items()]
        res = run_jobs(args.preset, jobs, args.parallel, args.lin_impl, args.deadline)
    elif args.seeds:
        res = run_parallel(args.preset, variants, [int(s) for s in args.seeds.split(",")], args.parallel,
                           changes, args.lin_impl, args.deadline)
    else:
        res = run(args.preset, variants, progress=not args.no_progress, lin_impl=args.lin_impl, seed=args.seed,
                  curve_file=args.curve_file, **changes)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    if not args.quiet:
        # runs stopped at the deadline have a learning curve but no evaluation at every length
        print(learning_table(res) if args.mechanism or res.get("stopped") else table(res))


if __name__ == "__main__":
    main()
