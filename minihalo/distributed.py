"""Training on several GPUs (or CPU processes) with PyTorch's own engine: torchrun, DDP and FSDP2.

    torchrun --nproc_per_node=8 -m minihalo.halo --preset small                  # one machine, 8 GPUs
    python -m minihalo.halo --preset small                                       # the same, one process

torchrun starts one process per GPU and tells each its place through the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `setup()` reads it: NCCL between GPUs, gloo
between CPU processes, each process on GPU LOCAL_RANK. Without torchrun nothing is set up and every
function here is the identity of a world of one process, so single-process code runs unchanged.

What minihalo.train does with it, per optimizer step of a global batch of B rows:
- `shard_rows`: process r trains on rows [r*B/W, (r+1)*B/W) of each batch (W processes). A batch is a
  pure function of its step (minihalo.data), so the shards are deterministic and never overlap.
- `ParallelModel`: the gradients of the W shards are averaged, either by DDP (every process holds the
  whole model and AdamW state; gradients all-reduced) or by FSDP2 (`fully_shard`: every process holds
  1/W of the parameters, gradients and AdamW state; each block's weights are gathered just for its
  forward and backward). The mean of W per-shard mean losses is the global mean loss, so the update
  equals one process's on the whole batch, up to float summation order.
- `mean_over_ranks`: the logged loss is the global batch's; logs and bars on rank 0 (`is_main`).

FSDP2 shards one module tree in place, but a HALO step keeps using its model afterwards in one process
(selection, the report) and calls sub-modules directly (step 1 runs each layer's mixer alone). So
`ParallelModel` shards a *twin*: a copy of the module tree that starts from the same weights, while the
model's own parameters are emptied (their memory freed) until `release()` gathers the trained weights
back into them. The FSDP units are each block's mixer and MLP (`fsdp_units`), so a direct call to one
gathers its weights; the rest (embeddings, norms, the head) form the root unit, gathered for the step.
`sharded_frozen` does the same for a frozen teacher used inside a loss.

Shapes: B rows of a global batch, W processes (world size), r this process's rank.
"""
import copy
import os
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

PARALLEL = ("auto", "ddp", "fsdp")


# --------------------------------------------------------------------------------------------
# The process group
# --------------------------------------------------------------------------------------------
def setup():
    """Join the process group that torchrun describes in the environment (once; later calls do nothing).
    Returns this process's device: cuda:LOCAL_RANK on a GPU machine, else the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # a long timeout: while rank 0 alone selects layers or writes the report, the others wait at a barrier
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=2))
    return device()


def teardown():
    """Leave the process group (at the end of a torchrun program; nothing in one process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def device():
    """This process's device: its GPU (LOCAL_RANK) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device() if world_size() > 1 else 0)
    return torch.device("cpu")


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    """True on the process that writes files, logs and progress bars (rank 0)."""
    return rank() == 0


def barrier():
    if world_size() > 1:
        dist.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. writes a cache), then the others (which find it written)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def mean_over_ranks(x):
    """The mean of a tensor over every process (the tensor itself in one process)."""
    if world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)  # gloo has no AVG: sum, then divide
    return x / world_size()


def broadcast_object(obj):
    """Rank 0's `obj` on every process (pickled)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------
# Data: each process its rows of the global batch
# --------------------------------------------------------------------------------------------
def shard_rows(batches, part=None, parts=None):
    """`batches(i)` -> the rows of process `part` of `parts` (default: this process of the world): the
    contiguous block [part*B/parts, (part+1)*B/parts) of every tensor in the batch (B rows)."""
    part = rank() if part is None else part
    parts = world_size() if parts is None else parts
    if parts == 1:
        return batches

    def cut(x):
        if isinstance(x, dict):
            return {k: cut(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(cut(v) for v in x)
        if not isinstance(x, torch.Tensor):
            return x
        if x.shape[0] % parts:
            raise ValueError(f"a batch of {x.shape[0]} rows does not split evenly over {parts} processes; "
                             f"use a batch size that is a multiple of {parts}")
        n = x.shape[0] // parts
        return x[part * n:(part + 1) * n]

    return lambda i: cut(batches(i))


# --------------------------------------------------------------------------------------------
# The model: DDP or FSDP2
# --------------------------------------------------------------------------------------------
def resolve_parallel(model, parallel="auto", dev=None):
    """"ddp" or "fsdp". "auto": DDP unless the training state would fill more than half of this GPU:
    fp32 weights, gradients and two AdamW moments are 16 bytes per trainable parameter (4 per frozen one)."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}; got {parallel!r}")
    if parallel != "auto":
        return parallel
    dev = torch.device(dev) if dev is not None else device()
    if dev.type != "cuda":
        return "ddp"
    need = sum((16 if p.requires_grad else 4) * p.numel() for p in model.parameters())
    return "fsdp" if need > 0.5 * torch.cuda.get_device_properties(dev).total_memory else "ddp"


def fsdp_units(model):
    """The sub-modules FSDP2 shards as units of their own: each block's mixer and MLP (a HybridLM's
    `layers`); everything else belongs to the root unit. A model without `layers` is one unit."""
    return [getattr(block, name) for block in getattr(model, "layers", []) for name in ("mixer", "mlp")
            if isinstance(getattr(block, name, None), nn.Module)]


class LossModule(nn.Module):
    """`loss_fn(model, batch)` as a module's forward: DDP and FSDP act when their module is called, and a
    loss (HALO's step 1) may reach the model's sub-modules directly."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def _sharded_twin(model, dev, wrap=None):
    """FSDP2 over a copy of `model`'s module tree (same weights, same parameter names and requires_grad
    flags); `model`'s own parameters are emptied. Returns (root FSDP module, the twin model)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    # the twin's tensors alias the model's (no copy) but are objects of their own: FSDP replaces them
    memo = {id(p): nn.Parameter(p.detach(), p.requires_grad) for p in model.parameters()}
    memo.update({id(b): b.detach() for b in model.buffers()})
    twin = copy.deepcopy(model, memo)
    mesh = init_device_mesh(dev.type, (world_size(),))
    for unit in fsdp_units(twin):
        fully_shard(unit, mesh=mesh)
    root = fully_shard(wrap(twin) if wrap else twin, mesh=mesh, reshard_after_forward=False)
    if wrap is None:  # a frozen model's root unit stays gathered: its embeddings and norms may be called alone
        root.unshard()  # (a trained one's must not: AdamW must see the sharded parameters)
    for p in model.parameters():
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    return root, twin


def _gather_into(model, twin, root):
    """Put the twin's (trained) weights back into `model`'s emptied parameters, whole, on every process."""
    from torch.distributed.tensor import DTensor
    root.reshard()
    shards = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        q = shards[name]
        p.data = q.full_tensor().detach() if isinstance(q, DTensor) else q.detach().clone()


class ParallelModel:
    """The model as training sees it in this process: one process, DDP or FSDP2 (see the module docstring).

    - `loss(batch)`: loss_fn(model, batch) through the wrapper (gradients averaged over processes)
    - `module`: the module whose parameters AdamW updates and checkpoints save (the model itself, or
      its FSDP twin: the same parameter names)
    - `no_sync()`: a context for the micro-batches before the last of an accumulated step: gradients
      add up locally and are averaged once, after the last
    - `evaluating()`: a context giving the module in eval mode, for an evaluation on every process
    - `release()`: the trained weights back in the model, whole, on every process (FSDP2; else nothing).
      A run stopped by an error other than NonFiniteLossError is not released: under FSDP2 the model's
      parameters stay empty (its checkpoint holds the weights)
    """

    def __init__(self, model, loss_fn, parallel="ddp", dev=None):
        dev = torch.device(dev) if dev is not None else device()
        self.model, self.kind = model, resolve_parallel(model, parallel, dev) if world_size() > 1 else "none"
        if self.kind == "none":
            self.wrapper, self.module = LossModule(model, loss_fn), model
        elif self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            self.module = model
            self.wrapper = DistributedDataParallel(  # gradients live in DDP's buckets: no second copy
                LossModule(model, loss_fn), device_ids=[dev.index] if dev.type == "cuda" else None,
                gradient_as_bucket_view=True)
        else:
            self.wrapper, self.module = _sharded_twin(model, dev, lambda twin: LossModule(twin, loss_fn))

    def loss(self, batch):
        return self.wrapper(batch)

    def no_sync(self):
        if self.kind == "ddp":
            return self.wrapper.no_sync()
        if self.kind == "fsdp":
            return _fsdp_no_sync(self.wrapper)
        return nullcontext()

    @contextmanager
    def evaluating(self):
        """The model in eval mode, for an evaluation that runs on every process (FSDP2: root unit gathered)."""
        self.module.eval()
        if self.kind == "fsdp":
            self.wrapper.unshard()
        try:
            yield self.module
        finally:
            if self.kind == "fsdp":
                self.wrapper.reshard()
            self.module.train()

    def release(self):
        if self.kind == "fsdp":
            _gather_into(self.model, self.module, self.wrapper)
            self.module = self.wrapper = None


@contextmanager
def _fsdp_no_sync(root):
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


@contextmanager
def sharded_frozen(model, shard=True):
    """A frozen model (a teacher) for use inside a loss: with `shard` and several processes, an FSDP2
    twin holding 1/W of the weights per process (each unit gathered for its call); else the model itself.
    The model's weights are back, whole, when the block ends."""
    if not shard or world_size() == 1:
        yield model
        return
    root, twin = _sharded_twin(model, next(model.parameters()).device)
    try:
        yield twin
    finally:
        _gather_into(model, twin, root)
