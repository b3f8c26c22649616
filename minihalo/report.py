"""The report of a HALO run (minihalo.pipeline): teacher vs HypeNet by context length (held-out perplexity, a
needle-in-a-haystack grid), the layer choice, parameters, decoding memory, tokens and wall time per step;
written as report.json, report.md and PNG figures into the run folder.
"""
import json
import platform
import time
from dataclasses import asdict

import numpy as np
import torch

from minihalo.evaluate import niah_grid, perplexity_by_length, plot_niah_heatmap
from minihalo.halo import RECALL_TASKS, STEPS
from minihalo.model import HybridLM
from minihalo.train import OutOfTime

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


PARTS = "report_parts.json"  # an unfinished report's evaluations, for the command that continues it


class Evaluations:
    """A report's evaluations, one (model, length) at a time, each saved in the run folder (PARTS) as it finishes:
    a report stopped by the time budget continues where it stopped. The saved ones count only for the settings
    they were made with (the report's record in steps.json); a step redone before the report deletes them."""

    def __init__(self, run):
        self.run, self.path, self.fresh = run, run.dir / PARTS, 0
        settings = run.records["report"]["settings"]
        saved = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.saved = saved if saved.get("settings") == settings else {"settings": settings, "done": {}}

    def at(self, name, model, length):
        """{"perplexity": .., "niah": [accuracy at each of DEPTHS]} of `model` at `length` tokens, saved or computed
        (on a GPU under bf16 autocast, as the model trained: a Transformer's attention at 64K tokens takes seconds).
        Raises OutOfTime before computing one when the budget is spent, unless it is this command's first."""
        done = self.saved["done"].setdefault(name, {})
        if str(length) not in done:
            run, c = self.run, self.run.cfg
            if self.fresh and run.deadline is not None and time.time() > run.deadline:  # rank 0's clock alone
                raise OutOfTime(0, None)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.device.type == "cuda"):
                ppl = perplexity_by_length(model, run.val, [length], num_windows=c.eval_windows, batch_size=2)
                grid = niah_grid(model, run.tok, [length], list(DEPTHS), c.eval_samples, seed=3, batch_size=4,
                                 progress=c.progress, filler=run.val.tokens, **RECALL_TASKS[c.recall])
            done[str(length)] = {"perplexity": ppl[length], "niah": grid[0].tolist()}
            self.fresh += 1
            self.path.write_text(json.dumps(self.saved))
        return done[str(length)]

    def lengths(self, name, model):
        """Held-out perplexity and a NIAH grid (lengths x DEPTHS) of `model` at every cfg.eval_lengths."""
        L = self.run.cfg.eval_lengths
        e = {n: self.at(name, model, n) for n in L}
        return {"perplexity": {str(n): e[n]["perplexity"] for n in L}, "niah_grid": [e[n]["niah"] for n in L],
                "niah": {str(n): float(np.mean(e[n]["niah"])) for n in L}}


def generations(models, run, num_prompts=3, prompt_tokens=24, new_tokens=40):
    """Greedy continuations, side by side, of the first `prompt_tokens` tokens of held-out documents (all
    `new_tokens` of them: no stop at an end-of-text token; eager steps, no graph to compile for a few tokens):
    [{"prompt": text, <model name>: text, ...}]."""
    docs = [d[:prompt_tokens] for d in run.val.documents(min_tokens=prompt_tokens)][:num_prompts]
    rows = []
    for doc in docs:
        ids = torch.as_tensor(np.asarray(doc, dtype=np.int64), device=run.device)[None]  # (1, P)
        row = {"prompt": run.tok.decode(doc)}
        for name, m in models.items():
            out = m.generate(ids, max_new_tokens=new_tokens, eos_token_id=-1, cuda_graph=False)  # (1, P + N)
            row[name] = run.tok.decode(out[0, prompt_tokens:].tolist())
        rows.append(row)
    return rows


def write_report(run):
    """report.json, report.md and figures (PNG) in the run folder: teacher vs HypeNet by length,
    the layer choice, parameters, decoding memory, and tokens and wall time per step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, d = run.cfg, run.dir
    hybrid = HybridLM.from_pretrained(str(d / "hybrid"), device=run.device) if (d / "hybrid").is_dir() \
        else (run.saved("finetune") or run.need("distill"))
    models = {"teacher": run.teacher.eval(), "hypenet": hybrid.eval()}
    t0 = time.perf_counter()
    evaluations = Evaluations(run)
    evals = {name: evaluations.lengths(name, m) for name, m in models.items()}
    samples = generations(models, run)
    long = 4 * run.T
    rep = {"device": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else
           f"CPU, {torch.get_num_threads()} thread(s)", "torch": torch.__version__,
           "python": platform.python_version(), "train_length": run.T, "config": asdict(c), "eval": evals,
           "eval_dtype": "bfloat16 autocast" if run.device.type == "cuda" else "float32", "generations": samples,
           "corpus": {k: run.val.meta.get(k) for k in ("corpus", "sha256")},
           "layer_types": hybrid.config.layer_types, "query_scale_a": hybrid.config.attn_scale_a,
           "rope": {"attention": "RoPE" if hybrid.config.attn_rope else "NoPE",
                    "lightning": "RoPE" if hybrid.config.lin_rope else "NoPE"},
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
    rep["wall_seconds"] = time.perf_counter() - run.started  # this invocation: the whole pipeline unless resumed
    (d / "report.json").write_text(json.dumps(rep, indent=1, default=str))
    _figures(rep, c, run.T, d, plt)
    (d / "report.md").write_text(_markdown(rep, c, run.T))
    evaluations.path.unlink(missing_ok=True)
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
             f"Corpus: {rep['corpus']['corpus']} (sha256 {rep['corpus']['sha256']}). "
             f"Wall time of the command that wrote this report: {rep['wall_seconds']:.0f} s.",
             f"HypeNet layers: {' '.join('A' if t == 'attention' else 'L' for t in rep['layer_types'])} "
             f"(A attention, {rep['rope']['attention']}; L Lightning, {rep['rope']['lightning']}); HyPE query scale "
             f"a = {rep['query_scale_a']}.", "",
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
    lines += ["## Greedy continuations of held-out text", ""]
    for g in rep["generations"]:
        lines += ["```text"] + [f"{n + ':':9}{g[n]!r}" for n in ["prompt", *rep["eval"]]] + ["```", ""]
    lines += ["## Cost", "", "| step | tokens | seconds | tokens/s | final loss |", "|---|---|---|---|---|"]
    lines += [f"| {s} | {v['tokens']:,} | {v['seconds']:.1f} | {v['tokens_per_s']:.0f} | {v['final_loss']:.4f} |"
              for s, v in rep["steps"].items()]
    lines += ["", "| model | parameters | decoding memory at " + f"{4 * T} tokens (fp32) | at 131072 tokens |",
              "|---|---|---|---|"]
    for n, b in rep["cache_bytes"].items():
        lines.append(f"| {n} | {rep['parameters'][n]:,} | {b[str(4 * T)]['total_bytes'] / 2**10:.1f} KiB | "
                     f"{b['131072']['total_bytes'] / 2**20:.1f} MiB |")
    lines += ["", "Export as a transformers folder (AutoModelForCausalLM with trust_remote_code, lm-evaluation-harness, "
              f"the Hub): `python -m minihalo.export {c.out} OUT`"]
    return "\n".join(lines) + "\n"
