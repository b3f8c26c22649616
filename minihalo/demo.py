"""The main job (`make demo`): HALO end to end on a CPU, the tiny preset of `python -m minihalo.halo`, a few minutes
on 2 cores (docs/method.md §4).

    python -m minihalo.demo                       # the toy teacher in data/toy_teacher -> runs/demo
    python -m minihalo.demo --out runs/mine --teacher toy-scratch

It distils a Transformer (by default the committed 8-layer toy teacher) into a HypeNet in six steps: align
(each layer's new RNN learns to imitate its attention layer), select (which layers keep attention), distill
(KL to the teacher), finetune (a longer context), scale (the HyPE query scale), report. The run folder
(runs/demo unless --out) gets each step's model, config.json, and report.md with its figures: teacher vs
HypeNet perplexity and needle-in-a-haystack accuracy by context length. At the end the demo prints the two
numbers that matter: the HypeNet's perplexity over the teacher's at the training length T, and both models'
needle retrieval at 4T.

Ctrl-C stops it; the same command resumes where it stopped. Every other setting is an option of
`python -m minihalo.halo` (see its --help).
"""
import argparse
import json

from minihalo.pipeline import STEPS, OneLineErrors, add_options, config_from_args, run_command


def main(argv=None):
    ap = OneLineErrors(prog="python -m minihalo.demo", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(ap, names=("out", "teacher", "device", "progress"), presets=False)
    ap.set_defaults(preset="tiny", out="runs/demo")
    args = ap.parse_args(argv)
    r = run_command(ap, lambda: config_from_args(args))
    rep = json.loads((r.dir / "report.json").read_text())
    q, long = rep["quality"], 4 * rep["train_length"]
    niah = q[f"niah_at_{long}"]
    print(f"HypeNet / teacher perplexity at T = {rep['train_length']}: {q['perplexity_ratio_at_train_length']:.3f}")
    if niah["teacher"] is not None:
        print(f"NIAH at 4T = {long} tokens: teacher {100 * niah['teacher']:.0f}%, HypeNet {100 * niah['hypenet']:.0f}%")
    seconds = {s: (rep["steps"].get(s) or rep.get(s, {})).get("seconds") for s in STEPS[:-1]}
    print(f"wall time of this command: {rep['wall_seconds']:.0f} s (seconds per step: "
          + ", ".join(f"{s} {v:.0f}" for s, v in seconds.items() if v is not None)
          + f", evaluation {rep['eval_seconds']:.0f})")
    print(f"report: {r.dir / 'report.md'}")


if __name__ == "__main__":
    main()
