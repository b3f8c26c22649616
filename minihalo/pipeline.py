"""The HALO pipeline (docs/method.md §4): every step of minihalo.halo in order, into a run folder, with a report.

    python -m minihalo.halo --preset tiny                 # the whole pipeline on a CPU in minutes
    python -m minihalo.halo --preset small --out runs/s1  # one GPU, longer runs
    python -m minihalo.halo --out runs/s1 --stages distill,finetune,scale,report   # resume / run steps alone
    python -m minihalo.halo --out runs/s1 --k 3 --redo select                      # redo a step with new settings
    python -m minihalo.halo --help                        # every option: what it does, its unit, each preset's value
    torchrun --nproc_per_node=8 -m minihalo.halo --preset small --out runs/s8    # 8 GPUs (minihalo.distributed)

From Python: `run(HaloConfig(...))` or `run(preset_config("tiny", out="runs/mine"))`. The run folder:

    config.json                     the HaloConfig: the settings the results beside it were made with
    steps.json                      each step's record: the settings its results depend on, done or not
    align/, distill/, finetune/     ckpt/last.pt (resumable), history.jsonl, stats.json, model/ (the result)
    align/layers.jsonl              the per-layer alignment MSE of every batch
    select.json, scale.json         the layer scores and choice; the query-scale grid
    hybrid/                         the final HypeNet (HybridLM.from_pretrained), query scale in its config
    report.md, report.json, *.png   teacher vs HypeNet by context length, layer scores, cost (minihalo.report)
    report_parts.json               while a report is unfinished: the evaluations it continues from

Every setting is checked before anything is computed or any folder is made (minihalo.settings: `HaloConfig`,
the presets, `check_config`, `check_data`; a ConfigError names the setting). A finished step is not redone: a rerun loads it. Its record in steps.json holds
the settings of HaloConfig its results depend on (those of the steps before it included; `setting(step=...)`
says which step first uses each); a rerun whose settings would change a step's results refuses
(`StaleResults`) until told to redo that step and the ones after it (`redo`), so that config.json always
describes the results beside it. The report is recomputed on every run that asks for it; under a time budget it
stops between evaluations (one model at one length each) and the same command continues it. Ctrl-C stops
with `Interrupted`, which says where the same command resumes (training steps resume from their checkpoint).
"""
import argparse
import json
import shutil
import time
from dataclasses import MISSING, asdict, fields, replace
from pathlib import Path

import numpy as np
import torch

from minihalo import distributed
from minihalo.convert import teacher_folder
from minihalo.data import ByteTokenizer, HFTokenizer, TokenFile, prepare
from minihalo.evaluate import heldout_windows, token_nll
from minihalo.halo import (STEPS, evenly_spaced_layers, lm_score, load_teacher, niah_recall, num_attention_layers,
                           pick_query_scale, recall_drop_layers, score_swapped_models, select_attention_layers,
                           selection_scores, stage1_align, stage2_distill, stage3_finetune)
from minihalo.model import HybridLM
from minihalo.report import PARTS, write_report
from minihalo.settings import (PRESETS, ConfigError, HaloConfig, check_config, check_data, preset_config,
                               tokenizer_name)
from minihalo.tasks import niah_training_rows
from minihalo.train import NonFiniteLossError, OutOfTime, TrainConfig, peak_memory

__all__ = ["STEPS", "HaloConfig", "PRESETS", "preset_config", "ConfigError", "StaleResults", "Interrupted", "TimeUp",
           "check_config", "Run", "run", "main", "read_jsonl", "write_jsonl"]
# --------------------------------------------------------------------------------------------
# The run folder's records: which settings each step's results were made with
# --------------------------------------------------------------------------------------------
RESULTS = {  # what each step writes into the run folder (the first: its mark in a folder without records)
    "align": ("align",), "select": ("select.json",), "distill": ("distill",), "finetune": ("finetune",),
    "scale": ("scale.json", "hybrid"),
    "report": ("report.json", "report.md", "perplexity.png", "niah.png", "layer_scores.png", PARTS),
}
NEEDS = {"select": "align", "distill": "select", "finetune": "distill", "scale": "distill", "report": "distill"}


class StaleResults(ValueError):
    """The run folder holds results of a step that the current settings would not reproduce."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says where the same command resumes."""


class TimeUp(RuntimeError):
    """The time budget (HaloConfig.max_minutes) is spent; the message says where the same command continues."""


def format_value(value):
    """A setting's value as the command line takes it: lists comma-separated, None as 'unset'."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(format_value, value))
    return "unset" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def step_settings(cfg, step):
    """The settings the results of `step` depend on: every HaloConfig field that `step` or a step before it uses."""
    used = STEPS[:STEPS.index(step) + 1]
    return {f.name: json.loads(json.dumps(getattr(cfg, f.name))) for f in fields(cfg)
            if f.metadata.get("step") in used}


def read_records(folder):
    path = Path(folder) / "steps.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def check_run_folder(cfg):
    """Refuse (StaleResults) if the run folder holds results of a step, finished or started, that were made with
    settings other than `cfg`'s (steps that `cfg.redo` redoes and a report about to be recomputed aside), and
    (ConfigError) if a step of `cfg.stages` needs results that the folder does not hold. Returns the records."""
    d, records = Path(cfg.out), read_records(cfg.out)
    redone = STEPS[STEPS.index(cfg.redo):] if cfg.redo else ()
    defaults = asdict(HaloConfig())
    for step in STEPS:
        if step in redone or (step == "report" and step in cfg.stages):
            continue
        if step not in records:
            if (d / RESULTS[step][0]).exists():
                raise StaleResults(f"{d} holds results of '{step}' with no record of their settings (steps.json): "
                                   f"redo it and every step after it (--redo {step}), or use another run folder "
                                   "(--out)")
            continue
        if not records[step]["done"] and not has_checkpoint(d, step):
            continue  # started, but stopped before anything was saved
        old = records[step]["settings"]
        changes = [f"{k} {format_value(old.get(k, defaults[k]))} → {format_value(v)}"
                   for k, v in step_settings(cfg, step).items() if old.get(k, defaults[k]) != v]
        if changes:
            what = "results" if records[step]["done"] else "an unfinished run"
            raise StaleResults(f"{d} holds {what} of '{step}' made with other settings ({', '.join(changes)}): redo "
                               f"it and every step after it (--redo {step}), or use another run folder (--out)")
    done = {s for s, r in records.items() if r["done"] and s not in redone}
    for step in cfg.stages:
        need = NEEDS.get(step)
        if step == "select" and cfg.attn_layers is not None:
            continue  # the layers are given: no scores, no aligned model needed
        if need and need not in cfg.stages and need not in done:
            raise ConfigError("stages", f"'{step}' needs the results of '{need}', which {d} does not hold; add "
                              f"{need} to the stages ({','.join(cfg.stages)})")
    return records


def has_checkpoint(folder, step):
    return any((Path(folder) / step).glob("**/ckpt/last.pt"))


def checkpoint_step(ckpt_dir):
    """The step of the checkpoint in `ckpt_dir` (minihalo.train), or None."""
    path = Path(ckpt_dir) / "last.pt"
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)["step"] if path.is_file() else None


def part_label(part):
    """'align', or 'finetune (length 256)' for the training run whose folder is finetune/len256."""
    step, _, length = part.partition("/len")
    return f"{step} (length {length})" if length else step


def training_parts(cfg, step):
    """(checkpoint folder relative to the run folder, optimizer steps) of each training run of `step`, in order."""
    if step == "finetune":
        return [(f"finetune/len{T}", cfg.steps_finetune) for T in cfg.finetune_lengths]
    return [(step, getattr(cfg, f"steps_{step}"))] if step in ("align", "distill") else []


def resume_hint(cfg, step, why="interrupted"):
    """What to do after Ctrl-C (or whatever `why` says) during `step` (None: before the first step), as one line."""
    again = f"run the same command without --redo {cfg.redo}" if cfg.redo and step else "run the same command"
    if step is None:
        return f"{why}; {again} to start again"
    for part, steps in training_parts(cfg, step):
        n = checkpoint_step(Path(cfg.out) / part / "ckpt")
        if n is None or n < steps:
            where = f"step {n} of {part_label(part)}" if n else f"the start of {part_label(part)}"
            return f"{why}; {again} to resume from {where}"
    if step == "report" and (Path(cfg.out) / PARTS).is_file():
        return f"{why}; {again} to continue the report where it stopped"
    where = "the end" if training_parts(cfg, step) else "the start"  # the end: saving the trained model
    return f"{why}; {again} to resume from {where} of {step}"


class Run:
    """The run folder and what the steps share: the teacher, the data, the device."""

    def __init__(self, cfg: HaloConfig):
        self.started = time.perf_counter()  # the report's wall_seconds
        teacher_cfg = check_config(cfg)
        device = distributed.setup()  # under torchrun: this process's GPU
        self.cfg, self.dir = cfg, Path(cfg.out)
        self.deadline = time.time() + 60 * cfg.max_minutes if cfg.max_minutes else None
        self.T = cfg.seq_len or teacher_cfg.max_position_embeddings
        with distributed.main_first():  # a GGUF teacher is converted once, by rank 0
            self.teacher_source = teacher_folder(cfg.teacher)
        name = tokenizer_name(cfg, self.teacher_source)
        try:
            self.tok = ByteTokenizer() if name == "byte" else HFTokenizer(name)
        except (OSError, ValueError) as e:
            raise ConfigError("tokenizer", f"cannot load {name!r}: {str(e).splitlines()[0]}") from None
        with distributed.main_first():  # the corpus cache is written once, by rank 0
            self.data_dir = cfg.data_dir or prepare(cfg.corpus or "english", self.tok)
        self.val = TokenFile(self.data_dir, "val")
        check_data(cfg, self.T, self.tok, self.data_dir, teacher_cfg.vocab_size)
        self.records = check_run_folder(cfg)
        if cfg.redo:
            self.remove(STEPS[STEPS.index(cfg.redo):])
        self.dir.mkdir(parents=True, exist_ok=True)
        if distributed.is_main():  # rank 0 writes the run folder
            (self.dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=str))
            if cfg.teacher == "toy-scratch":
                self.forget_other_toy_teacher()
        distributed.barrier()
        self.device = device if distributed.world_size() > 1 else \
            torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.teacher = load_teacher(self.teacher_source, self.device, self.dir, cfg.teacher_steps).eval()
        self.teacher.requires_grad_(False)

    def forget_other_toy_teacher(self):
        """Delete the run folder's toy teacher (load_teacher's "toy-scratch") if it was pretrained for another
        number of steps than the current settings ask for: the next load pretrains the one they describe."""
        from minihalo.teacher import recipe
        saved = self.dir / "teacher" / "report.json"
        if saved.is_file() and json.loads(saved.read_text())["steps"] != (self.cfg.teacher_steps or
                                                                          recipe("halo")["steps"]):
            shutil.rmtree(self.dir / "teacher")

    # ---- the records: each step's settings, started or done (steps.json) --------------------
    def done(self, step):
        return self.records.get(step, {}).get("done", False)

    def record(self, step, done):
        if done:
            self.records[step]["done"] = True
        else:
            self.records[step] = {"done": False, "settings": step_settings(self.cfg, step)}
        self.write_records()

    def write_records(self):
        if not distributed.is_main():
            return
        tmp = self.dir / "steps.json.tmp"
        tmp.write_text(json.dumps(self.records, indent=1))
        tmp.replace(self.dir / "steps.json")

    def remove(self, steps, keep=()):
        """Delete the results and records of `steps`, but the files named in `keep` (rank 0 deletes; the other
        processes forget the records)."""
        for step in steps:
            for name in [n for n in RESULTS[step] if n not in keep] if distributed.is_main() else ():
                path = self.dir / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            self.records.pop(step, None)
        if (self.dir / "steps.json").is_file():
            self.write_records()

    def compute(self, step):
        """Run `step`, after removing the results of the steps after it (they were built on its earlier results)
        and, for the report, its own but the evaluations it continues from; its record says "started" until it is
        done. A step that only rank 0 runs and that stops for the time budget stops every process."""
        later = [s for s in STEPS[STEPS.index(step) + 1:] if s in self.records or (self.dir / RESULTS[s][0]).exists()]
        if later:
            print(f"removing the results of {', '.join(later)}: they were built on an earlier {step}")
        self.remove(later)
        if step == "report":
            self.remove(["report"], keep=(PARTS,))
        training = step in ("align", "distill", "finetune")
        if training and not has_checkpoint(self.dir, step) and distributed.is_main():
            shutil.rmtree(self.dir / step, ignore_errors=True)  # what a start that saved no checkpoint left
        self.record(step, done=False)
        distributed.barrier()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        out_of_time = False
        if training or distributed.is_main():  # under torchrun: training on every process, the rest on rank 0
            try:
                getattr(self, step)()
            except OutOfTime:
                if training:  # every process raised it
                    raise
                out_of_time = True
        if distributed.broadcast_object(out_of_time):
            raise OutOfTime(0, None)
        self.record(step, done=True)

    def batches(self, seq_len, batch_size):
        """Training batches by step: corpus windows, with needle-retrieval rows (written with the run's tokenizer) and,
        for the byte tokenizer, copy rows mixed in (minihalo.teacher.teacher_batches)."""
        from minihalo.teacher import teacher_batches
        c = self.cfg
        byte = isinstance(self.tok, ByteTokenizer)
        share = c.retrieval_share if c.retrieval_share is not None else 0.5 if byte else 0.0
        return teacher_batches(self.data_dir, seq_len, batch_size, share, c.copy_share, (4, 16), c.seed, self.tok)

    def train_cfg(self, step, steps, lr, **kw):
        c = self.cfg
        n = checkpoint_step(self.dir / step / "ckpt")
        if n is not None and n < steps:
            print(f"resuming {part_label(step)} from step {n}")
        return TrainConfig(steps=steps, lr=lr, min_lr=lr / 100, warmup_steps=min(c.warmup_steps, steps // 2),
                           seed=c.seed, progress=c.progress, ckpt_dir=str(self.dir / step / "ckpt"),
                           ckpt_every=max(1, steps // 4), parallel=c.parallel, deadline=self.deadline, **kw)

    def time_is_up(self):
        """Whether the time budget is spent (rank 0's clock decides for every process)."""
        return self.deadline is not None and distributed.broadcast_object(time.time() > self.deadline)

    def peak_memory(self):
        """The peak memory of the step that ran last, and what it measures (minihalo.train.peak_memory)."""
        used, kind = peak_memory(self.device)
        return {"peak_memory_bytes": used, "peak_memory": kind}

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

    def finish(self, step, model, history, tokens):
        """Save the trained model, its loss history and stats.json: tokens, the training loop's wall seconds (summed
        over the runs a time budget split it into), tokens/s over them, peak memory (of the last run)."""
        if not distributed.is_main():  # every process holds the same trained model: rank 0 writes it
            return model
        folder = self.dir / step
        write_jsonl(folder / "history.jsonl", [{"step": s, "loss": l, "lr": r} for s, l, r in
                                               zip(history["step"], history["loss"], history["lr"])])
        seconds = history["seconds"]
        stats = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds if seconds else None,
                 "processes": distributed.world_size(),
                 "final_loss": history["loss"][-1] if history["loss"] else None} | self.peak_memory()
        (folder / "stats.json").write_text(json.dumps(stats, indent=1))
        model.save_pretrained(str(folder / "model"))
        return model

    # ---- the steps -----------------------------------------------------------------------
    def align(self):
        c = self.cfg
        (self.dir / "align").mkdir(exist_ok=True)
        model, hist, _ = stage1_align(self.teacher, self.batches(self.T, c.batch_align),
                                      self.train_cfg("align", c.steps_align, c.lr_align),
                                      log_path=self.dir / "align" / "layers.jsonl" if distributed.is_main() else None,
                                      shard_teacher=c.teacher_parallel == "shard", lin_rope=c.lin_rope)
        return self.finish("align", model, hist, c.steps_align * c.batch_align * self.T)

    def select(self):
        c, L = self.cfg, self.teacher.config.num_layers
        k = num_attention_layers(L, c.k, c.attn_ratio)
        result = {"k": k, "rule": c.selection}
        t0 = time.perf_counter()
        if c.attn_layers is not None:
            result.update(rule="given", layers=sorted(c.attn_layers))
        else:
            csr_fn = lm_score(self.val, self.T, c.eval_windows * 2)
            recall_fn = niah_recall(self.tok, self.val.tokens, self.T, c.select_samples, task=c.recall)
            scores = score_swapped_models(self.teacher, self.need("align"), csr_fn, recall_fn, c.progress)
            result.update(scores, halo_scores=selection_scores(scores["csr"], scores["recall"]),
                          halo=select_attention_layers(scores["csr"], scores["recall"], k),
                          recall_drop=recall_drop_layers(scores["recall"], scores["teacher"]["recall"], k),
                          even=evenly_spaced_layers(L, k))
            result["layers"] = result[c.selection]
        result.update(seconds=time.perf_counter() - t0, **self.peak_memory())
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
        model, hist = stage2_distill(self.teacher, self.need("align"), self.layers(),
                                     self.batches(self.T, c.batch_distill),
                                     self.train_cfg("distill", c.steps_distill, c.lr_distill), c.chunk_rows,
                                     shard_teacher=c.teacher_parallel == "shard", lin_rope=c.lin_rope,
                                     attn_rope=c.attn_rope)
        return self.finish("distill", model, hist, c.steps_distill * c.batch_distill * self.T)

    def finetune(self):
        c = self.cfg
        model = self.need("distill")
        schedule = [(self.batches(T, max(1, c.finetune_tokens_per_batch // T)), T) for T in c.finetune_lengths]
        cfg = lambda T: replace(self.train_cfg(f"finetune/len{T}", c.steps_finetune, c.lr_finetune),  # noqa: E731
                                schedule="constant")
        hists = stage3_finetune(model, schedule, cfg)
        hist = {k: sum((h[k] for h in hists.values()), []) for k in ("step", "loss", "lr")}
        hist["seconds"] = sum(h["seconds"] for h in hists.values())
        tokens = sum(c.steps_finetune * max(1, c.finetune_tokens_per_batch // T) * T for T in c.finetune_lengths)
        return self.finish("finetune", model, hist, tokens)

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
        recall = niah_recall(self.tok, self.val.tokens, c.scale_length, c.eval_samples * 2, seed=13, task=c.recall)
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):  # as the report
            a, table = pick_query_scale(model, loss, c.a_grid, recall)
        (self.dir / "scale.json").write_text(json.dumps(
            {"a": a, "table": [{"a": k, **v} for k, v in table.items()], "length": c.scale_length,
             "seconds": time.perf_counter() - t0, **self.peak_memory()}, indent=1))
        model.save_pretrained(str(self.dir / "hybrid"))
        print(f"HyPE query scale: a = {a}; the HypeNet is in {self.dir / 'hybrid'}")
        return model

    def report(self):
        return write_report(self)


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
    """The pipeline: each step in cfg.stages, in order, into the run folder cfg.out; a step that finished before
    with the same settings is loaded, not redone (see the module's docstring for the rules). Returns the Run.
    Raises ConfigError (a setting that cannot work) or StaleResults before anything is computed, and
    Interrupted on Ctrl-C. Under torchrun the training steps (align, distill, finetune) run on every process;
    select, scale and report on rank 0 while the others wait. With a time budget (cfg.max_minutes), raises TimeUp
    when it is spent: a training step stops at a checkpoint, the others are not started."""
    if not torch.cuda.is_available():
        torch.set_num_threads(min(2, torch.get_num_threads()))
    step, ran = None, False
    try:
        r = Run(cfg)
        for step in STEPS:
            if step not in cfg.stages:
                continue
            if step != "report" and r.done(step):
                if distributed.is_main():
                    print(f"{step}: already done in {r.dir}")
                continue
            if ran and r.time_is_up():  # each command finishes a step or one optimizer step at least
                raise OutOfTime(0, None)
            r.compute(step)
            ran = True
    except KeyboardInterrupt:
        raise Interrupted(resume_hint(cfg, step)) from None
    except OutOfTime:
        raise TimeUp(resume_hint(cfg, step, f"the time budget of {cfg.max_minutes:g} minutes is spent")) from None
    return r


# --------------------------------------------------------------------------------------------
# The command line: one option per HaloConfig field, its help from the field's metadata
# --------------------------------------------------------------------------------------------
PROG = "python -m minihalo.halo"
GROUPS = {
    "run": "the run", "training": "training data and schedule (steps 1, 3 and 4)",
    "align": "step 1, align: every layer's RNN learns to imitate its attention layer (MSE)",
    "select": "step 2, select: which layers keep attention", "distill": "step 3, distill: KL to the teacher",
    "finetune": "step 4, finetune: next-token cross-entropy at longer contexts",
    "scale": "step 5, scale: the HyPE query scale", "evaluation": "evaluation (step 2's scores, step 5, the report)",
}


class OneLineErrors(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr: '<prog>: error: <message>', exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def option_name(name):
    """The command line's option for HaloConfig field `name`: --no-NAME for a switch that is on by default."""
    on = next((f.default is True for f in fields(HaloConfig) if f.name == name), False)
    return ("--no-" if on else "--") + name.replace("_", "-")


def preset_values(f):
    """'[tiny: 150, small: 500]': the value of field `f` in each preset ('' if every preset leaves it unset)."""
    values = {p: PRESETS[p].get(f.name, f.default if f.default is not MISSING else f.default_factory())
              for p in PRESETS}
    return "" if all(v is None for v in values.values()) else \
        " [" + ", ".join(f"{p}: {format_value(v)}" for p, v in values.items()) + "]"


def add_options(ap, names=None, presets=True):
    """One option per HaloConfig field (or per field in `names`), grouped as GROUPS, with its help text and,
    when `presets`, each preset's value."""
    for group, title in GROUPS.items():
        chosen = [f for f in fields(HaloConfig) if f.metadata.get("group", "run") == group and f.name != "preset"
                  and (names is None or f.name in names)]
        options = ap.add_argument_group(title) if chosen else None
        for f in chosen:
            text = f.metadata.get("help", "").replace("%", "%%")
            if f.type is bool:
                options.add_argument(option_name(f.name), dest=f.name, action="store_const", const=not f.default,
                                     help=f"do not {text}" if f.default else text)
                continue
            if presets and (group != "run" or f.metadata.get("step")):  # not for --out, --stages, ...
                text += preset_values(f)
            options.add_argument(option_name(f.name), dest=f.name, metavar=f.metadata.get("unit"), help=text)


def parse_option(f, text):
    """The value of field `f` from the command line's `text`, or a ConfigError."""
    kind = f.metadata.get("items", float) if f.type in (list, tuple) else f.type
    kind = str if f.type is tuple else kind
    parts = [s.strip() for s in text.split(",")] if f.type in (list, tuple) else [text]
    names = {int: "integers", float: "numbers", str: "names"} if f.type in (list, tuple) else \
        {int: "an integer", float: "a number", str: "a name"}
    try:
        values = [kind(s) for s in parts]
    except ValueError:
        raise ConfigError(f.name, f"expected {'comma-separated ' if f.type in (list, tuple) else ''}"
                          f"{names[kind]}, got {text!r}") from None
    return tuple(values) if f.type is tuple else values if f.type is list else values[0]


def config_from_args(args):
    """The HaloConfig of parsed command-line options: the preset's values, changed by the options given."""
    changes = {}
    for f in fields(HaloConfig):
        given = getattr(args, f.name, None)
        if given is not None and f.name != "preset":
            changes[f.name] = given if f.type is bool else parse_option(f, given)
    return preset_config(args.preset, **changes)


def run_command(ap, make_config):
    """run(make_config()) for a command line: a setting that cannot work, stale results or a non-finite loss end the
    command with one line on stderr (exit status 2, 2 and 1), Ctrl-C with where to resume (exit status 130), a spent
    time budget with where the same command continues (exit status 75: try again)."""
    try:
        return run(make_config())
    except ConfigError as e:
        ap.error(f"{option_name(e.field)}: {e.message}")
    except StaleResults as e:
        ap.error(str(e))
    except NonFiniteLossError as e:
        ap.exit(1, f"{ap.prog}: error: {e}\n")
    except Interrupted as e:
        ap.exit(130, f"{e}\n")
    except TimeUp as e:
        ap.exit(75, f"{e}\n")


def main(argv=None):
    ap = OneLineErrors(prog=PROG, description="HALO (docs/method.md §4): distil a Transformer into a HypeNet, step by "
                       f"step ({', '.join(STEPS)}), into a run folder with a report. Each option sets one HaloConfig "
                       "field; lists are comma-separated; [tiny: ..., small: ...] gives each preset's value. A rerun "
                       "loads the steps that are done and resumes an interrupted one from its checkpoint.")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                    help="start from this preset's values; options given change them [default: tiny]")
    add_options(ap)
    args = ap.parse_args(argv)
    r = run_command(ap, lambda: config_from_args(args))
    if (r.dir / "report.md").is_file() and distributed.is_main():
        print(f"report: {r.dir / 'report.md'}")
    distributed.teardown()
    return r


if __name__ == "__main__":
    main()
