"""HALO's ablations at equal tokens (docs/method.md §4), every arm continued from one shared aligned model.

    python -m minihalo.experiments.ablations --out runs/abl --parallel 2        # the tiny preset, on a CPU
    python -m minihalo.experiments.ablations --out runs/abl --max-minutes 9 --preset smollm2 --steps-align 120 \
        --steps-distill 120 --steps-finetune 20 --eval-lengths 2048,8192,32768   # one GPU; rerun until it exits 0

Every argument the runner does not know goes unchanged to each `python -m minihalo.halo` it runs (the shared
settings), but --out, --stages, --redo, --attn-layers, --selection, --attn-rope and --no-lin-rope: the runner sets
those. Steps 1 and 2 run once, first and alone, into FOLDER/shared (`--stages align,select`; its select.json holds
the layers of every rule). Each arm is a copy of that folder, FOLDER/<arm>, continued with its own flags (and
--redo from the first step they change), so that every arm trains on the same tokens:

    halo         the paper's method: HALO's layers, RNNs with RoPE, attention layers NoPE, the query scale s_t
    even         evenly spaced attention layers           --attn-layers <select.json's even>
    recall_drop  Jet-Nemotron's rule                      --attn-layers <select.json's recall_drop>
    attn_rope    the attention layers keep RoPE           --attn-rope
    no_lin_rope  RNN layers without RoPE, HALO's layers   --no-lin-rope --attn-layers <select.json's halo>
    no_st        no query scale s_t (step 5): a copy of the halo arm made after its finetune step, then
                 `--stages report` (a run without the scale step reports finetune's model); it trains nothing

Each arm's output goes to FOLDER/<arm>/ablation.log. `--parallel N` runs up to N arms at once (the halo CLI's own
--parallel is for torchrun, which the runner does not use). On one GPU, start the CUDA MPS daemon first
(`nvidia-cuda-mps-control -d`; `echo quit | nvidia-cuda-mps-control` stops it) so that the processes' kernels run
concurrently instead of taking turns (on an NVIDIA H200, four processes of small kernels: 1.18 s each without MPS,
0.70 s with it); they share the GPU's memory too.

A rerun skips every arm whose report is done and continues the others where they stopped. `--max-minutes M`: each
halo command gets what is left of M minutes since the runner started (it stops at a checkpoint, exit status 75) and
none starts after. Exit status: 75 if a command exited 75, 1 if one failed otherwise, else 0. The shared command
runs every time (seconds once done) and refuses settings other than those its results were made with; finished arms
are not checked again, so new settings need a new --out. Writes FOLDER/ablations.json and FOLDER/ablations.md.
"""
import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from minihalo.pipeline import RESULTS, read_records

ARMS = {  # arm: (its flags beyond the shared ones, the rule of select.json whose layers it takes, its --redo step)
    "halo": ([], None, None),
    "even": ([], "even", "select"),
    "recall_drop": ([], "recall_drop", "select"),
    "attn_rope": (["--attn-rope"], None, "distill"),
    "no_lin_rope": (["--no-lin-rope"], "halo", "align"),
    "no_st": (["--stages", "report"], None, None),
}
RUNNER_SETS = ("--out", "--stages", "--redo", "--attn-layers", "--selection", "--attn-rope", "--no-lin-rope")
TRAINED = ("align", "distill", "finetune")


def arm_flags(arm, select):
    """The halo CLI flags of `arm` beyond the shared ones; `select` is the shared folder's select.json."""
    flags, rule, _ = ARMS[arm]
    return flags + (["--attn-layers", ",".join(map(str, select[rule]))] if rule else [])


def redo_flags(arm_dir, shared_dir, step):
    """['--redo', step] while the arm's folder still holds the shared result of `step` (its record in steps.json
    as the shared folder's), else []: once a command has redone it, a command stopped by the time budget continues
    instead of starting over. The attn_rope arm never needs it (the shared folder has no distill)."""
    shared = read_records(shared_dir).get(step)
    return ["--redo", step] if shared is not None and read_records(arm_dir).get(step) == shared else []


def is_done(folder):
    """Whether the run folder's report is done: report.json is there and steps.json marks the report done."""
    return (Path(folder) / "report.json").is_file() and read_records(folder).get("report", {}).get("done", False)


def copy_run(src, dst, drop=()):
    """Copy the run folder `src` to `dst` unless it exists (through a temporary name, so a copy is whole or absent),
    leaving out checkpoints (the copied steps are done), the runner's log, and the results and records of the steps
    in `drop`."""
    if dst.exists():
        return
    tmp = dst.with_name(dst.name + ".copying")
    shutil.rmtree(tmp, ignore_errors=True)
    dropped = {name for step in drop for name in RESULTS[step]}
    shutil.copytree(src, tmp, ignore=lambda d, names: [n for n in names if n in ("ckpt", "ablation.log") or
                                                      (Path(d) == Path(src) and n in dropped)])
    records = {step: r for step, r in read_records(tmp).items() if step not in drop}
    (tmp / "steps.json").write_text(json.dumps(records, indent=1))
    tmp.rename(dst)


class Ablations:
    """The runner: FOLDER, the arms asked for, the shared halo arguments and the time budget."""

    def __init__(self, out, arms, halo_args, max_minutes=None):
        self.out, self.arms, self.halo_args = Path(out), arms, halo_args
        self.shared = self.out / "shared"
        self.deadline = time.time() + 60 * max_minutes if max_minutes else None

    def halo(self, arm, flags):
        """Run `python -m minihalo.halo` into FOLDER/<arm> with the shared arguments and `flags`, its output appended
        to FOLDER/<arm>/ablation.log (the shared command's: to this terminal). Returns its exit status (75 without
        starting it once the time budget is spent); a failure is printed with the arm and the log."""
        cmd = [sys.executable, "-m", "minihalo.halo", *self.halo_args, "--out", str(self.out / arm), *flags]
        if self.deadline is not None:
            left = (self.deadline - time.time()) / 60
            if left <= 0:
                print(f"{arm}: not started, the time budget is spent; run the same command to continue")
                return 75
            cmd += ["--max-minutes", f"{left:.4g}"]
        print(f"{arm}: python -m minihalo.halo <shared settings> {shlex.join(cmd[3 + len(self.halo_args):])}",
              flush=True)
        if arm == "shared":
            status, log = subprocess.run(cmd).returncode, "the output above"
        else:
            log = self.out / arm / "ablation.log"
            with open(log, "a") as f:
                f.write(f"$ {shlex.join(cmd)}\n")
                f.flush()
                status = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        if status:
            why = "the time budget is spent; run the same command to continue" if status == 75 else "failed"
            print(f"{arm}: exit status {status} ({why}); its output: {log}", flush=True)
        return status

    def pending(self, arm):
        """Whether `arm` is asked for and its report not done (a finished arm is skipped, and says so)."""
        if arm in self.arms and is_done(self.out / arm):
            print(f"{arm}: skipped, its report is done ({self.out / arm / 'report.json'})")
            return False
        return arm in self.arms

    def job(self, arm):
        """The commands of one arm (the halo arm's job also makes and reports no_st); returns their exit statuses."""
        if arm == "halo":
            return self.halo_job()
        if not self.pending(arm):
            return []
        copy_run(self.shared, self.out / arm)
        select = json.loads((self.shared / "select.json").read_text())
        return [self.halo(arm, arm_flags(arm, select) + redo_flags(self.out / arm, self.shared, ARMS[arm][2]))]

    def halo_job(self):
        """The halo arm and, when asked, no_st: halo up to its finetune step, a copy of it as no_st (the results of
        scale and report left out, should they be there), halo's remaining steps, no_st's report."""
        halo, no_st, statuses = self.out / "halo", self.out / "no_st", []
        copy_run(self.shared, halo)
        if "no_st" in self.arms and not no_st.exists():
            statuses.append(self.halo("halo", ["--stages", "align,select,distill,finetune"]))
            if statuses[-1]:
                return statuses
            copy_run(halo, no_st, drop=("scale", "report"))
        return statuses + [self.halo(arm, ARMS[arm][0]) for arm in ("halo", "no_st") if self.pending(arm)]


def arm_summary(report, layers, flags):
    """One arm's entry of ablations.json from its report.json, its select.json's layers and its flags. NIAH is the
    mean over depths of each row of report['eval'][model]['niah_grid'] (rows: eval_lengths, columns: depths)."""
    lengths = report["config"]["eval_lengths"]
    evals = report["eval"]
    return {"flags": flags, "layers": layers, "rope": report["rope"], "query_scale_a": report["query_scale_a"],
            "train_length": report["train_length"],
            "perplexity_ratio_at_train_length": report["quality"]["perplexity_ratio_at_train_length"],
            "perplexity": {model: {str(L): e["perplexity"][str(L)] for L in lengths} for model, e in evals.items()},
            "niah": {model: {str(L): float(np.mean(row)) for L, row in zip(lengths, e["niah_grid"], strict=True)}
                     for model, e in evals.items()},
            "tokens": {step: report["steps"][step]["tokens"] for step in TRAINED if step in report["steps"]}}


def collect(out, arms, halo_args, command):
    """ablations.json's content: the command, the shared halo arguments, and the entry of every finished arm."""
    select = json.loads((Path(out) / "shared" / "select.json").read_text())
    entries = {arm: arm_summary(json.loads((Path(out) / arm / "report.json").read_text()),
                                json.loads((Path(out) / arm / "select.json").read_text())["layers"],
                                arm_flags(arm, select)) for arm in arms if is_done(Path(out) / arm)}
    return {"command": command, "halo_args": halo_args, "arms": entries}


def number(x):
    """A perplexity or ratio for the table: 3 significant digits, whole numbers from 1,000."""
    return "—" if x is None else f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def ablation_table(results):
    """A markdown table of ablations.json's `results`: one row per arm (the teacher's first) with its attention
    layers, its perplexity over the teacher's at the training length T, its training tokens (align + distill +
    finetune), and the HypeNet's perplexity and NIAH accuracy (%, the mean over depths) at each evaluated length."""
    arms = results["arms"]
    if not arms:
        return "no arm has finished yet\n"
    first = next(iter(arms.values()))
    lengths = list(first["perplexity"]["hypenet"])
    head = ["arm", "attention layers", f"perplexity / teacher's at T = {first['train_length']}", "training tokens",
            *[f"perplexity {L}" for L in lengths], *[f"NIAH % {L}" for L in lengths]]
    rows = [["teacher", "all", "1", "—", *[number(first["perplexity"]["teacher"][L]) for L in lengths],
             *[f"{100 * first['niah']['teacher'][L]:.0f}" for L in lengths]]]
    rows += [[arm, ",".join(map(str, r["layers"])), number(r["perplexity_ratio_at_train_length"]),
              f"{sum(r['tokens'].values()):,}", *[number(r["perplexity"]["hypenet"][L]) for L in lengths],
              *[f"{100 * r['niah']['hypenet'][L]:.0f}" for L in lengths]] for arm, r in arms.items()]
    return "\n".join("| " + " | ".join(row) + " |" for row in [head, ["---"] * len(head), *rows]) + "\n"


def main(argv=None):
    """The command line; returns the exit status (0 done, 75 a time budget spent, 1 a command failed)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m minihalo.experiments.ablations", allow_abbrev=False,
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, metavar="FOLDER", help="the folder of the shared run and of every arm")
    ap.add_argument("--arms", default=",".join(ARMS), metavar="ARM,...", help=f"default: {','.join(ARMS)}")
    ap.add_argument("--parallel", type=int, default=1, metavar="N", help="arms run at once (default: 1)")
    ap.add_argument("--max-minutes", type=float, metavar="MINUTES", help="a time budget for the whole command")
    args, halo_args = ap.parse_known_args(argv)
    for a in halo_args:  # the halo CLI takes abbreviations: --stag is --stages
        name = a.split("=")[0]
        if len(name) > 2 and a.startswith("--") and any(o.startswith(name) for o in RUNNER_SETS):
            ap.error(f"{a}: the runner sets {', '.join(RUNNER_SETS)} for each arm; leave them out")
    arms = list(dict.fromkeys(a.strip() for a in args.arms.split(",")))
    if not arms or not set(arms) <= set(ARMS):
        ap.error(f"--arms: expected names from {','.join(ARMS)}, got {args.arms!r}")
    if "no_st" in arms and "halo" not in arms:
        ap.error("--arms: no_st is the halo arm reported without its scale step; it needs halo too")
    if args.parallel < 1 or (args.max_minutes is not None and args.max_minutes <= 0):
        ap.error("--parallel and --max-minutes: expected a count >= 1 and minutes > 0")
    runner = Ablations(args.out, arms, halo_args, args.max_minutes)
    status = runner.halo("shared", ["--stages", "align,select"])
    if status:
        return 75 if status == 75 else 1
    with ThreadPoolExecutor(args.parallel) as pool:
        statuses = [s for job in pool.map(runner.job, [a for a in arms if a != "no_st"]) for s in job]
    results = collect(args.out, arms, halo_args, ["python", "-m", "minihalo.experiments.ablations", *argv])
    table = ablation_table(results)
    (Path(args.out) / "ablations.json").write_text(json.dumps(results, indent=1))
    (Path(args.out) / "ablations.md").write_text(table)
    print(table, end="")
    return 75 if 75 in statuses else 1 if any(statuses) else 0


if __name__ == "__main__":
    sys.exit(main())
