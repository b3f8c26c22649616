"""One plain-PyTorch training loop for every stage: pretraining, HALO alignment, distillation, finetuning.

    history = train(model, batches, TrainConfig(steps=1000, lr=1e-3), loss_fn=next_token_loss, params=None)

- `batches(step)` returns the batch of optimizer step `step` (micro-batch `step * grad_accum + i`
  when accumulating). A batch is a pure function of its index (see minihalo.data.PackedBatches),
  so resuming needs only the step number: no iterator state to save.
- `loss_fn(model, batch) -> scalar loss` decides what is learned: next-token cross-entropy by
  default; HALO's stage 1 passes an MSE between mixer outputs, stage 3 a KL to the teacher.
- `params`: the parameters to train (default: all). The others are frozen for the run and their
  `requires_grad` flags restored at the end.

What the loop does, in order, each optimizer step: `grad_accum` forward/backward passes (bf16 autocast
on CUDA), a check that the loss is finite, gradient clipping, AdamW, a learning-rate schedule
(linear warm-up, then cosine decay to `min_lr`, or constant), a tqdm bar with loss and tokens/s,
periodic evaluation, and a checkpoint every `ckpt_every` steps holding everything needed for an
exact resume: model, optimizer, scheduler, step and the RNG states (torch, CUDA, numpy, random).

A non-finite loss or gradient norm stops the run with `NonFiniteLossError`; no checkpoint is written
after the bad step, so the last one on disk is good.

A time budget (`deadline`, a time.time() value) stops the run after the first step that ends past it, with a
checkpoint of that step and `OutOfTime`: the same call continues from there. The history's `seconds` sums the
loop's wall time over every part of a resumed run.

Under torchrun (several processes, see minihalo.distributed) the same call trains data-parallel:
`batches(step)` still returns the global batch and each process trains on its rows; gradients are
averaged by DDP or FSDP2 (`parallel`), the logged loss is the global batch's mean, bars and messages
come from rank 0, and checkpoints hold whole (gathered) tensors keyed by parameter name, so a run
resumes on another number of processes, or on one CPU. `model` ends with the trained weights, whole,
on every process.

`cuda_graph=True` (CUDA only, one process, one micro-batch per step) captures the whole optimizer
step (forward, backward, clipping, AdamW) once as a CUDA graph and replays it: a small model's eager
step is bound by the host launching about a thousand kernels, a replay is one launch. Same parameters and data as the
eager loop; the loss is checked after the step, so a non-finite loss stops the run with the bad update
applied (the last checkpoint on disk is still good).

Shapes: B batch, T sequence length, V vocabulary.
"""
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minihalo import distributed
from minihalo.model import model_logits


@dataclass
class TrainConfig:
    steps: int                       # optimizer steps in total (a resumed run continues up to this)
    lr: float = 1e-3                 # peak learning rate
    min_lr: float = 1e-5             # end of the cosine decay
    warmup_steps: int = 50           # linear warm-up from 0 to lr (docs/method.md §4: 50)
    schedule: str = "cosine"         # "cosine" or "constant" (HALO step 4 uses a constant LR)
    betas: tuple = (0.9, 0.95)       # AdamW betas (docs/method.md §4)
    weight_decay: float = 0.0        # docs/method.md §4: none
    grad_clip: float = 1.0           # max global grad norm; 0 disables
    grad_accum: int = 1              # micro-batches per optimizer step
    bf16: bool = True                # bf16 autocast, on CUDA only (CPU runs stay fp32)
    grad_checkpointing: bool = False # recompute each layer's activations in the backward pass
    eval_every: int = 0              # call eval_fn every N steps (0: never)
    ckpt_every: int = 0              # write a checkpoint every N steps (0: never)
    ckpt_dir: str = None             # where checkpoints go; an existing one is resumed from
    resume: bool = True              # resume from ckpt_dir/last.pt when it exists
    seed: int = 0                    # seeds torch/numpy/random at the start of a fresh run
    progress: bool = True            # show the tqdm bar
    log_every: int = 1               # record the loss in the history every N steps
    cuda_graph: bool = False         # replay the whole step as a CUDA graph (CUDA, grad_accum 1; see above)
    parallel: str = "auto"           # several processes: "ddp", "fsdp" or "auto" (minihalo.distributed)
    deadline: float = None           # time.time() past which the loop checkpoints and raises OutOfTime
    extra: dict = field(default_factory=dict)  # free-form notes saved with checkpoints

    def __post_init__(self):
        if self.steps < 1 or self.grad_accum < 1:
            raise ValueError(f"steps and grad_accum must be >= 1; got {self.steps}, {self.grad_accum}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant'; got {self.schedule!r}")
        if self.ckpt_every and not self.ckpt_dir:
            raise ValueError("ckpt_every > 0 needs a ckpt_dir")
        if self.parallel not in distributed.PARALLEL:
            raise ValueError(f"parallel must be one of {distributed.PARALLEL}; got {self.parallel!r}")
        if self.cuda_graph and (self.grad_accum != 1 or self.grad_checkpointing):
            raise ValueError("cuda_graph=True captures one forward/backward per step: it needs grad_accum=1 "
                             "and grad_checkpointing=False")


class NonFiniteLossError(RuntimeError):
    """Raised when the loss or gradient norm becomes NaN or infinite."""


class OutOfTime(RuntimeError):
    """Raised when a step ends past TrainConfig.deadline; `step` steps are done (and checkpointed, if a ckpt_dir
    is set)."""

    def __init__(self, step, ckpt):
        super().__init__(f"time budget spent after step {step}" + (f"; checkpoint {ckpt}" if ckpt else
                                                                     "; no checkpoint (no ckpt_dir)"))
        self.step = step


def peak_memory(device):
    """(bytes, what they measure): the CUDA allocator's peak since its last reset on a GPU, else the process's
    peak resident set size since it started (ru_maxrss: the whole process, the model and data included)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max allocated"
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"  # Linux: kilobytes


def lr_at(step, cfg: TrainConfig):
    """Learning rate of optimizer step `step` (0-based): warm-up, then cosine to min_lr (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def next_token_loss(model, batch):
    """Mean next-token cross-entropy.

    `batch` is a (B, T+1) token tensor (inputs `[:, :-1]`, targets `[:, 1:]`), or a dict with
    `input_ids` (B, T) and `targets` (B, T) (already shifted; -100 = ignore).
    """
    if isinstance(batch, dict):
        inputs, targets = batch["input_ids"], batch["targets"]
    else:
        inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model_logits(model(inputs))  # (B, T, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


def count_tokens(batch):
    if isinstance(batch, dict):
        return batch["input_ids"].numel()
    if isinstance(batch, torch.Tensor):
        return batch[:, :-1].numel()
    return 0


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def enable_gradient_checkpointing(model):
    """Recompute each decoder layer in the backward pass (activation memory O(L) -> O(1) layers), through
    the model's own switch: HybridLM's `gradient_checkpointing` flag or transformers' `gradient_checkpointing_enable`."""
    if isinstance(getattr(model, "gradient_checkpointing", None), bool):  # minihalo.HybridLM
        model.gradient_checkpointing = True
    elif hasattr(model, "gradient_checkpointing_enable"):  # transformers models
        model.gradient_checkpointing_enable()
    else:
        raise ValueError(f"{type(model).__name__} has no gradient-checkpointing switch (a HybridLM or a "
                         f"transformers model has one); turn grad_checkpointing off")


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def _rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, model, optimizer, scheduler, step, cfg, history):
    """Write everything needed to resume at `step` to `path`, atomically (temp file + rename).

    The model and AdamW states are whole tensors keyed by parameter name (gathered from every process
    under torchrun: `model.load_state_dict` reads them on one CPU); the RNG states are one per process.
    Under torchrun every process calls this and rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rng = distributed.gather_objects(_rng_state())
    if distributed.is_main():
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                 "step": step, "rng": rng, "config": asdict(cfg), "history": history}
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
    distributed.barrier()


def load_checkpoint(path, model, optimizer=None, scheduler=None):
    """Restore a checkpoint written by `save_checkpoint`; returns the dict (step, history, config).
    Under torchrun every process calls this; rank 0 reads the file and sends the tensors to the others
    (no shared file system needed). Each process takes its own RNG state when the number of processes
    is the one that wrote the checkpoint, else rank 0's."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    state = torch.load(path, map_location="cpu", weights_only=False) if distributed.is_main() else {}
    valid = distributed.broadcast_object(isinstance(state, dict) and {"model", "optimizer", "step"} <= set(state))
    if not valid:
        raise ValueError(f"{path} is not a minihalo training checkpoint (expected keys 'model', 'optimizer', "
                         "'step', ...)")
    tensors = {k: state.pop(k, {}) for k in ("model", "optimizer")}
    state = distributed.broadcast_object(state)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed.world_size() > 1)
    set_model_state_dict(model, tensors["model"], options=options)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, tensors["optimizer"], options=options)
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    _set_rng_state(rng[distributed.rank()] if len(rng) == distributed.world_size() else rng[0])
    return state


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def train(model, batches, cfg: TrainConfig, loss_fn=next_token_loss, params=None, eval_fn=None, device=None):
    """Train `model` for `cfg.steps` optimizer steps. Returns the history dict:

        {"step": [...], "loss": [...], "lr": [...], "tokens_per_s": float, "evals": [(step, dict), ...]}

    `eval_fn(model) -> dict` runs every `cfg.eval_every` steps (and after the last), in eval mode
    under `torch.no_grad()` (on every process under torchrun). Checkpoints go to `cfg.ckpt_dir/last.pt`;
    if that file exists and `cfg.resume`, training continues from it and ends with exactly the
    parameters an uninterrupted run would have (on the same device, same seed, same number of processes).
    Under torchrun the model goes to this process's device (`device` is ignored).
    """
    distributed.setup()
    if distributed.world_size() > 1:
        if cfg.cuda_graph:
            raise ValueError("cuda_graph=True runs in one process; under torchrun turn it off")
        device = distributed.device()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if cfg.cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device; the model is on {device}")
    model.to(device).train()
    restore_flags = _freeze_all_but(model, params)
    if cfg.grad_checkpointing:
        enable_gradient_checkpointing(model)
    parallel = distributed.ParallelModel(model, loss_fn, cfg.parallel, device)
    batches = distributed.shard_rows(batches)
    train_params = [p for p in parallel.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(train_params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda", capturable=cfg.cuda_graph)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg) / cfg.lr)
    # a captured graph keeps the autocast casts it recorded: no cache of cast weights across steps
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                              enabled=cfg.bf16 and device.type == "cuda", cache_enabled=not cfg.cuda_graph)
    ckpt = Path(cfg.ckpt_dir) / "last.pt" if cfg.ckpt_dir else None
    start, history = _resume_or_start(ckpt, cfg, parallel.module, optimizer, scheduler)
    main = distributed.is_main()

    def run_eval(step):
        if eval_fn is None:
            return
        with parallel.evaluating() as module, torch.no_grad(), autocast:
            result = eval_fn(module)
        history["evals"].append((step, result))
        if main:
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in result.items()))

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not (cfg.progress and main),
               desc="train", dynamic_ncols=True)
    tokens, t0, seconds_before = 0, time.perf_counter(), history.setdefault("seconds", 0.0)
    graphed = GraphedStep(model, batches, loss_fn, train_params, optimizer, scheduler, cfg, autocast, device) \
        if cfg.cuda_graph else None
    try:
        for step in bar:
            if graphed is not None:
                loss, n = graphed(step, ckpt)
            else:
                loss, n = _optimizer_step(parallel, batches, step, cfg, train_params, optimizer, scheduler,
                                          autocast, device, ckpt)
            tokens += n * distributed.world_size()
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                history["step"].append(done)
                history["loss"].append(loss)
                history["lr"].append(float(scheduler.get_last_lr()[0]))
            history["tokens_per_s"] = tokens / max(time.perf_counter() - t0, 1e-9)
            history["seconds"] = seconds_before + time.perf_counter() - t0
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{history['tokens_per_s']:.0f}")
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                run_eval(done)
            late = cfg.deadline is not None and done < cfg.steps and \
                distributed.broadcast_object(time.time() > cfg.deadline)  # rank 0's clock decides for all
            if ckpt is not None and (late or cfg.ckpt_every and (done % cfg.ckpt_every == 0 or done == cfg.steps)):
                save_checkpoint(ckpt, parallel.module, optimizer, scheduler, done, cfg, history)
            if late:
                raise OutOfTime(done, ckpt)
        if eval_fn is not None and not cfg.eval_every:
            run_eval(cfg.steps)
    except (NonFiniteLossError, OutOfTime):  # every process stops at the same step (a global loss, rank 0's clock)
        parallel.release()
        raise
    finally:
        bar.close()
        restore_flags()
    parallel.release()
    return history


def _freeze_all_but(model, params=None):
    """Make `params` (default: the parameters that require grad) the only trainable ones of `model`.
    Returns a function that restores every parameter's `requires_grad` flag."""
    all_params = list(model.parameters())
    train_params = [p for p in all_params if p.requires_grad] if params is None else list(params)
    if not train_params:
        raise ValueError("no parameters to train: params is empty or every parameter has requires_grad=False")
    chosen = {id(p) for p in train_params}
    if not chosen <= {id(q) for q in all_params}:
        raise ValueError("params must be parameters of the model being trained")
    saved_flags = [p.requires_grad for p in all_params]
    for p in all_params:
        p.requires_grad_(id(p) in chosen)

    def restore_flags():
        for p, flag in zip(all_params, saved_flags):
            p.requires_grad_(flag)

    return restore_flags


def _resume_or_start(ckpt, cfg, model, optimizer, scheduler):
    """(first step, history): from the checkpoint `ckpt` when it exists and `cfg.resume` (model, optimizer,
    scheduler and RNG states restored), else step 0 with every RNG seeded from `cfg.seed` (plus the rank
    under torchrun: each process its own random stream, e.g. for dropout on its rows)."""
    if ckpt is not None and cfg.resume and distributed.broadcast_object(ckpt.exists()):  # rank 0's file system
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        return state["step"], state["history"]
    seed = cfg.seed + distributed.rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return 0, {"step": [], "loss": [], "lr": [], "tokens_per_s": 0.0, "evals": []}


def _optimizer_step(parallel, batches, step, cfg, train_params, optimizer, scheduler, autocast, device, ckpt):
    """One optimizer step: `cfg.grad_accum` forward/backward passes (gradients averaged over processes
    once, after the last), the finiteness checks, gradient clipping, AdamW and the schedule. Returns
    (mean loss over the global batch, tokens this process saw); `ckpt` only names the last good
    checkpoint in the error message."""
    losses, tokens = [], 0
    for micro in range(cfg.grad_accum):
        batch = to_device(batches(step * cfg.grad_accum + micro), device)
        with parallel.no_sync() if micro < cfg.grad_accum - 1 else nullcontext():
            with autocast:
                loss = parallel.loss(batch)
            (loss / cfg.grad_accum).backward()
        losses.append(loss.detach().double())
        tokens += count_tokens(batch)
    loss = distributed.mean_over_ranks(torch.stack(losses).mean()).item()
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"loss is {loss} at step {step}; training stopped before the update. "
            + (f"The last good checkpoint is {ckpt} (step {(step // cfg.ckpt_every) * cfg.ckpt_every}). "
               if ckpt is not None and cfg.ckpt_every and step >= cfg.ckpt_every else "")
            + "Lower the learning rate, check the data, or turn on grad_clip.")
    if cfg.grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(train_params, cfg.grad_clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        if not torch.isfinite(norm):
            raise NonFiniteLossError(f"gradient norm is {norm.item()} at step {step}; training stopped "
                                     f"before the update. Last good checkpoint: {ckpt}")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, tokens


class GraphedStep:
    """The optimizer step of `train` captured as one CUDA graph (TrainConfig.cuda_graph).

    `step(i, ckpt)` copies batch i into a fixed input buffer, replays the graph (forward, backward,
    gradient clipping, fused AdamW with its learning rate read from a device tensor), then builds the
    next batch on the host while the GPU works, and returns (loss, tokens) like `_optimizer_step`.
    The first call captures: a few warm-up steps on a side stream with learning rate 0 (Triton and
    cuBLAS pick their kernels; AdamW creates its state), after which parameters and optimizer state
    are put back exactly as they were, so the run equals the eager loop's.
    """

    def __init__(self, model, batches, loss_fn, train_params, optimizer, scheduler, cfg, autocast, device):
        self.model, self.batches, self.loss_fn, self.params = model, batches, loss_fn, train_params
        self.optimizer, self.scheduler, self.cfg, self.autocast, self.device = \
            optimizer, scheduler, cfg, autocast, device
        self.graph = self.pending = None

    def _step_body(self):
        with self.autocast:
            loss = self.loss_fn(self.model, self.batch)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip) if self.cfg.grad_clip \
            else torch.zeros((), device=self.device)
        self.optimizer.step()
        return loss.detach(), norm

    def _capture(self, batch):
        self.batch = to_device(batch, self.device)
        for group in self.optimizer.param_groups:  # a device tensor, so that a replay reads the current value
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=self.device)
        self.lrs = [group["lr"] for group in self.optimizer.param_groups]
        saved_params = [p.detach().clone() for p in self.params]
        saved_state = {p: {k: v.clone() for k, v in st.items()} for p, st in self.optimizer.state.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for lr in self.lrs:
                lr.zero_()
            for _ in range(3):
                self.optimizer.zero_grad(set_to_none=True)
                self._step_body()
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():  # undo the warm-up: same parameters, AdamW state as before (zeros if new)
            for p, saved in zip(self.params, saved_params):
                p.copy_(saved)
            for p, st in self.optimizer.state.items():
                for k, v in st.items():
                    if p in saved_state:
                        v.copy_(saved_state[p][k])
                    else:
                        v.zero_()
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss, self.norm = self._step_body()

    def __call__(self, step, ckpt):
        batch = self.pending if self.pending is not None else self.batches(step)
        if self.graph is None:
            self._capture(batch)
        else:
            copy_into(self.batch, batch)
        for lr, group_lr in zip(self.lrs, self.scheduler.get_last_lr()):
            lr.fill_(float(group_lr))
        self.graph.replay()
        self.pending = self.batches(step + 1) if step + 1 < self.cfg.steps else None  # overlaps the GPU's work
        loss, norm = self.loss.item(), self.norm.item()
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise NonFiniteLossError(f"loss {loss}, gradient norm {norm} at step {step}; training stopped. "
                                     f"The update of this step was applied; the last checkpoint ({ckpt}) is good. "
                                     "Lower the learning rate or check the data.")
        self.scheduler.step()
        return loss, count_tokens(batch)


def copy_into(dst, src):
    """Copy a batch (tensor, dict or sequence of tensors) into the same-shaped buffers `dst`."""
    if isinstance(dst, torch.Tensor):
        if dst.shape != src.shape:
            raise ValueError(f"cuda_graph=True needs every batch to have one shape; got {tuple(src.shape)}, "
                             f"captured {tuple(dst.shape)}")
        dst.copy_(src, non_blocking=True)
    elif isinstance(dst, dict):
        for k in dst:
            copy_into(dst[k], src[k])
    elif isinstance(dst, (tuple, list)):
        for d, s_ in zip(dst, src):
            copy_into(d, s_)
