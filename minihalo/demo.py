"""The main job (`make demo`): HALO end to end on a CPU, tiny preset (docs/method.md §4).

    python -m minihalo.demo                       # the toy teacher in data/toy_teacher -> runs/demo
    python -m minihalo.demo --out runs/mine --teacher toy-scratch

Distils the 8-layer toy Transformer into a HypeNet (align every layer, pick the attention layers,
distil, finetune at a longer context, pick the HyPE query scale), then writes a report comparing the
two by context length. Every step checkpoints; rerunning resumes. For more knobs:
`python -m minihalo.halo --help`.
"""
import argparse
import json

from minihalo.pipeline import STEPS, preset_config, run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo", help="the run folder (default runs/demo)")
    ap.add_argument("--teacher", default="toy", help="'toy' (data/toy_teacher), 'toy-scratch', or a checkpoint folder")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = ap.parse_args(argv)
    r = run(preset_config("tiny", out=args.out, teacher=args.teacher, device=args.device,
                          progress=not args.no_progress))
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
