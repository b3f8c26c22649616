"""Look inside a HybridLM: what each mixer receives and returns in a forward pass (`mixer_io`), and
where each weight of a converted model came from (`weight_provenance`). Used by the notebooks to check
from-scratch layers against the package and to show what `to_hypenet` copies (docs/method.md §4 step 0).

Shapes: B batch, T time, d model width, D head dim.
"""
import torch


@torch.no_grad()
def mixer_io(model, input_ids, **forward_kwargs):
    """One forward pass of `model`; returns a list with one (x, y) per layer: x (B, T, d) is what the
    layer's mixer received (the layer input after its first RMSNorm) and y (B, T, d) what it returned
    (before the residual add). Extra keyword arguments go to `model(input_ids, ...)`."""
    records = [None] * len(model.layers)

    def hook(i):
        def record(module, args, output):
            records[i] = (args[0], output)
        return record

    handles = [layer.mixer.register_forward_hook(hook(i)) for i, layer in enumerate(model.layers)]
    try:
        model(input_ids, **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    return records


def weight_provenance(student, teacher):
    """Where each tensor of `student.state_dict()` came from, found by comparing values with the
    tensor of the same name in `teacher.state_dict()` (nothing is read from the conversion code):

    - "copied": equal to the teacher's tensor;
    - "teacher heads [0, 0, 1, 1]": a projection whose rows are, head by head (blocks of D rows),
      the teacher's heads in that order (a K/V projection taken GQA→MHA, docs/method.md §3.1);
    - "new": anything else (a fresh or changed tensor, or a name the teacher does not have).

    Returns {name: how}, in the student's order.
    """
    D = student.config.head_dim
    source = teacher.state_dict()
    provenance = {}
    for name, w in student.state_dict().items():
        t = source.get(name)
        how = "new"
        if t is not None and t.shape == w.shape and torch.equal(w, t):
            how = "copied"
        elif (t is not None and w.dim() == 2 and t.dim() == 2 and w.shape[1] == t.shape[1]
              and w.shape[0] % D == 0 and t.shape[0] % D == 0):
            w_heads, t_heads = w.unflatten(0, (-1, D)), t.unflatten(0, (-1, D))  # (heads, D, d)
            heads = [next((g for g in range(len(t_heads)) if torch.equal(h, t_heads[g])), None) for h in w_heads]
            if None not in heads:
                how = f"teacher heads {heads}"
        provenance[name] = how
    return provenance
