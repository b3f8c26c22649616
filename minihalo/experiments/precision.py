"""What bf16 costs inside Lightning attention: a trained hybrid at long context, three ways.

    python -m minihalo.experiments.precision --model runs/small/hybrid --lengths 16384 32768 65536

Under bf16 autocast the Lightning op can take its inputs in bf16 (its dots run on bf16 tensor
cores; the fp32 state is rounded to bf16 as an operand of the q·S product) or in fp32 (the authors'
code casts q, k, v to fp32 before the kernel). `HybridConfig.lin_fp32` chooses. For each context
length this measures, on held-out text (the model's training corpus, validation split):

- "fp32":       the whole model in fp32, no autocast: the reference;
- "bf16":       bf16 autocast, Lightning inputs in bf16 (lin_fp32=False);
- "bf16+fp32":  bf16 autocast, Lightning inputs in fp32 (lin_fp32=True);

the mean next-token loss (nats/token), the relative error of every logit against the reference
(minihalo.ops.rel_err), and the forward time. Decisions drawn from it: docs/method.md §6.

Shapes: N windows, T context length, V vocabulary.
"""
import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from minihalo.data import TokenFile, prepare
from minihalo.evaluate import heldout_windows
from minihalo.model import HybridLM
from minihalo.ops import rel_err

MODES = ("fp32", "bf16", "bf16+fp32")


@torch.no_grad()
def forward(model, ids, mode):
    """Logits (1, T, V) in fp32 of one window under one precision mode."""
    model.config.lin_fp32 = mode == "bf16+fp32"  # read by every Lightning layer at each call
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=mode != "fp32"):
        return model(ids).float()


def measure(model, windows, modes=MODES):
    """{mode: {"loss", "logits_rel_err", "seconds"}} averaged over `windows` (N, T+1)."""
    out = {m: {"loss": [], "logits_rel_err": [], "seconds": []} for m in modes}
    for w in windows:
        ids = torch.as_tensor(w, device=next(model.parameters()).device)[None]  # (1, T+1)
        ref = None
        for m in modes:
            forward(model, ids[:, :-1], m)  # warm-up (Triton compiles once per dtype)
            torch.cuda.synchronize() if ids.is_cuda else None
            t0 = time.perf_counter()
            logits = forward(model, ids[:, :-1], m)  # (1, T, V)
            torch.cuda.synchronize() if ids.is_cuda else None
            out[m]["seconds"].append(time.perf_counter() - t0)
            out[m]["loss"].append(F.cross_entropy(logits[0], ids[0, 1:]).item())
            ref = logits if m == "fp32" else ref
            out[m]["logits_rel_err"].append(rel_err(logits, ref) if ref is not None else float("nan"))
    return {m: {k: float(np.mean(v)) for k, v in d.items()} for m, d in out.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Loss and logit error of a hybrid with bf16 vs fp32 Lightning inputs.")
    ap.add_argument("--model", required=True, help="a HybridLM folder (save_pretrained) with Lightning layers")
    ap.add_argument("--corpus", default="english", help="corpus of the held-out windows (minihalo.data.prepare)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536], help="context lengths")
    ap.add_argument("--windows", type=int, default=2, help="held-out windows per length")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = HybridLM.from_pretrained(args.model, device=device, dtype=torch.float32).eval()
    if "lightning" not in model.config.layer_types:
        raise ValueError(f"{args.model} has no Lightning layers: nothing to compare")
    val = TokenFile(prepare(args.corpus, "byte"), "val")
    results = {"model": args.model, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "torch": torch.__version__, "by_length": {}}
    for T in args.lengths:
        results["by_length"][T] = measure(model, heldout_windows(val, T, args.windows, seed=5))
    print(f"{'T':>7} " + " ".join(f"{m + ' loss':>15} {m + ' err':>15} {m + ' ms':>12}" for m in MODES))
    for T, r in results["by_length"].items():
        print(f"{T:>7} " + " ".join(f"{r[m]['loss']:>15.4f} {r[m]['logits_rel_err']:>15.2e} "
                                     f"{1e3 * r[m]['seconds']:>12.1f}" for m in MODES))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
