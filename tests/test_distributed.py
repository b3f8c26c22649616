"""Data-parallel training in 2 CPU processes (gloo), spawned here the way torchrun starts them: the same
losses and weights as one process on the same global batch (DDP and FSDP2), an exact resume after a kill,
and checkpoints that load in one process."""
import json
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

from minihalo import HybridConfig, HybridLM, distributed
from minihalo.pipeline import main, read_jsonl
from minihalo.train import NonFiniteLossError, TrainConfig, load_checkpoint, lr_at, next_token_loss, train

V, T, B = 64, 16, 4  # B: rows of the global batch
CONFIG = HybridConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=16, layer_types=["attention", "lightning"], lin_impl="chunk")


def batches(i):  # (B, T+1), a pure function of the micro-batch index; learnable: rows count up mod V
    start = torch.randint(0, V, (B, 1), generator=torch.Generator().manual_seed(i))
    return (start + torch.arange(T + 1)) % V


def cfg(**kw):
    return TrainConfig(**{**dict(steps=6, lr=1e-2, min_lr=1e-3, warmup_steps=2, grad_accum=2, progress=False),
                          **kw})


def noisy_loss(model, batch):
    """Next-token loss times a factor drawn from the torch RNG, as dropout would draw: a resumed run
    matches only if every process gets its own RNG state back."""
    return next_token_loss(model, batch) * (1 + 0.5 * torch.rand(()))


# --------------------------------------------------------------------------------------------
# Spawning: each process gets torchrun's environment variables, then runs the job
# --------------------------------------------------------------------------------------------
def _process(rank, world_size, port, timeout, job, args, kw):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if timeout:  # else distributed.setup() joins, with its long timeout
        torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=timeout))
    try:
        job(*args, **kw)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # neither process leaves the group while the other still uses it
    finally:
        distributed.teardown()


def spawn(job, *args, timeout=None, **kw):
    """Run job(*args, **kw) in 2 fresh processes, as `torchrun --nproc_per_node=2` would. With `timeout`
    (seconds), a collective that waits longer fails instead of hanging."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_process, args=(2, port, timeout, job, args, kw), nprocs=2)


def held_out_loss(model):  # an eval_fn: the whole model on every process
    return {"loss": next_token_loss(model, batches(10_000)).item()}


def train_job(folder, parallel, loss_fn=next_token_loss, kill_at=None, eval_fn=None, **kw):
    """Train a fresh model (same initial weights on every process); save its history and final weights
    per rank. With `kill_at`, the run stops at that micro-batch as a killed one would."""
    torch.manual_seed(0)
    model = HybridLM(CONFIG)

    def data(i):
        if i == kill_at:
            raise KeyboardInterrupt("simulated kill")
        return batches(i)

    try:
        hist = train(model, data, cfg(parallel=parallel, ckpt_dir=str(folder / "ckpt"), ckpt_every=2, **kw),
                     loss_fn=loss_fn, eval_fn=eval_fn)
    except KeyboardInterrupt:
        return
    torch.save({"history": hist, "weights": model.state_dict()}, folder / f"rank{distributed.rank()}.pt")


def reference_run(c):
    """The training loop from scratch, one process: each step ONE forward over the whole global batch
    (the grad_accum micro-batches concatenated), AdamW at lr_at, clipping. Returns (losses, weights)."""
    torch.manual_seed(0)
    model = HybridLM(CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)
    losses = []
    for step in range(c.steps):
        rows = torch.cat([batches(step * c.grad_accum + m) for m in range(c.grad_accum)])  # (accum*B, T+1)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, c)
        loss = next_token_loss(model, rows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model.state_dict()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------
def test_shard_rows_split_the_global_batch():
    parts = [distributed.shard_rows(batches, r, 2)(5) for r in range(2)]
    assert [p.shape[0] for p in parts] == [B // 2, B // 2]
    assert torch.equal(torch.cat(parts), batches(5))  # disjoint, together the whole batch, in order
    with pytest.raises(ValueError, match="multiple of 3"):
        distributed.shard_rows(batches, 0, 3)(0)


def test_parallel_choice():
    model = HybridLM(CONFIG)
    assert distributed.resolve_parallel(model, "auto", "cpu") == "ddp"  # no GPU memory to run out of
    assert distributed.resolve_parallel(model, "fsdp", "cpu") == "fsdp"
    with pytest.raises(ValueError, match="parallel must be one of"):
        distributed.resolve_parallel(model, "zero")
    assert distributed.fsdp_units(model) == [m for block in model.layers for m in (block.mixer, block.mlp)]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, parallel):
    """2 processes x 2 rows = one process x 4 rows = the loop from scratch on the 2 x 4 rows of a step at
    once: the same loss at every step, the same evaluations and the same weights, on both processes; also
    when 2 processes are killed after a checkpoint and one process resumes. fp32 throughout, so the only
    difference is the order of float sums (means of micro-batches and of processes averaged vs one mean;
    the all-reduces): 1e-5 relative, not bitwise."""
    one, two, two_then_one = tmp_path / "one", tmp_path / "two", tmp_path / "two_then_one"
    one.mkdir(), two.mkdir(), two_then_one.mkdir()
    train_job(one, parallel, eval_fn=held_out_loss, eval_every=3)
    spawn(train_job, two, parallel, eval_fn=held_out_loss, eval_every=3)
    spawn(train_job, two_then_one, parallel, kill_at=2 * 5, eval_fn=held_out_loss, eval_every=3)  # killed ...
    train_job(two_then_one, parallel, eval_fn=held_out_loss, eval_every=3)  # ... resumed by one process
    ref = torch.load(one / "rank0.pt")
    runs = [torch.load(two / f"rank{r}.pt") for r in range(2)]
    assert ref["history"]["loss"][-1] < ref["history"]["loss"][0] - 0.3  # it learns
    losses, weights = reference_run(cfg())  # one process = the loop from scratch on the whole global batch
    assert ref["history"]["loss"] == pytest.approx(losses, rel=1e-5)
    for name, w in weights.items():
        assert rel(ref["weights"][name], w) < 1e-5, name
    for run in runs + [torch.load(two_then_one / "rank0.pt")]:
        assert run["history"]["step"] == ref["history"]["step"]
        assert run["history"]["loss"] == pytest.approx(ref["history"]["loss"], rel=1e-5)
        assert [e["loss"] for _, e in run["history"]["evals"]] == \
            pytest.approx([e["loss"] for _, e in ref["history"]["evals"]], rel=1e-5)
        for name, w in ref["weights"].items():
            assert rel(run["weights"][name], w) < 1e-5, name
    for name, w in runs[0]["weights"].items():  # every process ends with the whole, same model
        assert torch.equal(runs[1]["weights"][name], w), name
    # the 2-process checkpoint: whole tensors by name, loadable with its AdamW state in one CPU process
    model = HybridLM(CONFIG)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    assert load_checkpoint(two / "ckpt" / "last.pt", model, optimizer, scheduler)["step"] == 6
    for name, w in model.state_dict().items():
        assert torch.equal(w, runs[0]["weights"][name]), name
    params = dict(model.named_parameters())
    ref_state = torch.load(one / "ckpt" / "last.pt", weights_only=False)["optimizer"]["state"]
    assert set(ref_state) == set(params)
    for name, state in ref_state.items():
        assert rel(optimizer.state[params[name]]["exp_avg"], state["exp_avg"]) < 1e-4, name


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_killed_and_resumed_match_uninterrupted(tmp_path, parallel):
    """A 2-process run killed at step 5 (last checkpoint: step 4) and resumed by fresh processes ends
    bitwise like an uninterrupted 2-process run; the loss draws from each process's RNG."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    spawn(train_job, whole, parallel, noisy_loss)
    spawn(train_job, killed, parallel, noisy_loss, 2 * 5)  # micro-batch 10 = step 5
    assert torch.load(killed / "ckpt" / "last.pt", weights_only=False)["step"] == 4
    assert not (killed / "rank0.pt").exists()
    spawn(train_job, killed, parallel, noisy_loss)
    for r in range(2):
        a, b = torch.load(whole / f"rank{r}.pt"), torch.load(killed / f"rank{r}.pt")
        assert a["history"]["loss"] == b["history"]["loss"] and len(a["history"]["loss"]) == 6
        for name, w in a["weights"].items():
            assert torch.equal(b["weights"][name], w), name


def nan_job(folder, parallel):
    """Rank 1's loss is NaN at step 3 (micro-batch 6); rank 0's is fine."""
    torch.manual_seed(0)
    model = HybridLM(CONFIG)
    micro = {"i": -1}

    def data(i):
        micro["i"] = i
        return batches(i)

    def loss_fn(model, batch):
        loss = next_token_loss(model, batch)
        return loss * float("nan") if micro["i"] == 6 and distributed.rank() == 1 else loss

    try:
        train(model, data, cfg(parallel=parallel), loss_fn=loss_fn)
    except NonFiniteLossError as e:
        torch.save({"error": str(e), "weights": model.state_dict()}, folder / f"rank{distributed.rank()}.pt")


def test_a_nan_on_one_process_stops_every_process(tmp_path):
    """The NaN guard reads the loss averaged over processes: both stop at the same step, before its
    update, instead of one stopping while the other waits for it in the next all-reduce."""
    spawn(nan_job, tmp_path, "fsdp", timeout=30)
    runs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for run in runs:
        assert "loss is nan at step 3" in run["error"]
        assert all(torch.isfinite(w).all() for w in run["weights"].values())  # whole again, no bad update
    for name, w in runs[0]["weights"].items():
        assert torch.equal(runs[1]["weights"][name], w), name


# --------------------------------------------------------------------------------------------
# The HALO pipeline under torchrun: the same command, 2 processes
# --------------------------------------------------------------------------------------------
from test_pipeline import tiny_args, world  # noqa: E402,F401  (the tiny teacher and corpus)


@pytest.fixture(scope="module")
def one_process_run(world):  # noqa: F811
    main(tiny_args(world, "one"))
    return world[0] / "one"


@pytest.mark.parametrize("parallel, teacher", [("ddp", "replicate"), ("fsdp", "shard")])
def test_pipeline_in_two_processes_matches_one(world, one_process_run, parallel, teacher):  # noqa: F811
    """Every step of `python -m minihalo.halo` in 2 processes (training on both, selection, query scale and
    report on rank 0) gives one process's run: losses, per-layer alignment errors, layer scores and choice,
    query scale, final weights. fp32; float summation order only, compounded over the steps: 1e-4 (weights:
    1e-3, see below)."""
    root = world[0]
    spawn(main, tiny_args(world, parallel, "--parallel", parallel, "--teacher-parallel", teacher))
    one, two = one_process_run, root / parallel
    for step in ("align", "distill", "finetune"):
        a, b = read_jsonl(one / step / "history.jsonl"), read_jsonl(two / step / "history.jsonl")
        assert [r["step"] for r in a] == [r["step"] for r in b]
        assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4), step
    a, b = read_jsonl(one / "align" / "layers.jsonl"), read_jsonl(two / "align" / "layers.jsonl")
    assert len(a) == len(b) == 3  # written once, by rank 0
    for r, s in zip(a, b):
        assert s["layer_mse"] == pytest.approx(r["layer_mse"], rel=1e-4)
    sel_a, sel_b = (json.loads((d / "select.json").read_text()) for d in (one, two))
    assert sel_b["layers"] == sel_a["layers"]
    assert list(sel_b["csr"].values()) == pytest.approx(list(sel_a["csr"].values()), rel=1e-4)
    scale_a, scale_b = (json.loads((d / "scale.json").read_text()) for d in (one, two))
    assert scale_b["a"] == scale_a["a"]
    ha, hb = (HybridLM.from_pretrained(str(d / "hybrid")).state_dict() for d in (one, two))
    for name, w in ha.items():  # AdamW's early steps move a weight by about the learning rate whatever its gradient's
        # size, so where a gradient is near zero the float-order noise sets the sign of the step: a few weights differ
        # by ~lr (measured up to 1.7e-4 relative at the tiny preset's rates); shards, syncs or averaging done wrong
        # change whole updates, 10-100x more
        assert rel(hb[name], w) < 1e-3, name
    assert (two / "report.md").is_file()
    assert [json.loads((d / "distill" / "stats.json").read_text())["processes"] for d in (one, two)] == [1, 2]


def test_readme_memory_table_counts():
    """The parameter counts behind README's memory table (Several GPUs), from HybridLM on the meta device
    with Qwen3's shapes and 1/4 attention layers, and the table's cells from them."""
    from dataclasses import replace

    def billions(model, modules=None):
        return sum(p.numel() for m in (modules or [model]) for p in m.parameters()) / 1e9

    table = {}
    for name, d, ff, L, H, tied in [("1.7B", 2048, 6144, 28, 16, True), ("8B", 4096, 12288, 36, 32, False)]:
        tc = HybridConfig(vocab_size=151936, hidden_size=d, intermediate_size=ff, num_layers=L, num_heads=H,
                          num_kv_heads=8, head_dim=128, tie_word_embeddings=tied)
        hype = dict(attn_rope=False, attn_output_gate=True)  # to_hypenet's defaults for the kept attention layers
        with torch.device("meta"):
            teacher = HybridLM(tc)
            student = HybridLM(replace(tc, layer_types=["attention"] * (L // 4) + ["lightning"] * (L - L // 4), **hype))
            step1 = HybridLM(replace(tc, layer_types=["lightning"] * L))
        units = distributed.fsdp_units(student)
        c = dict(P=billions(student), T=billions(teacher), P1=billions(step1),
                 M=billions(step1, [b.mixer for b in step1.layers]), R=billions(student) - billions(student, units),
                 U=max(billions(u) for u in units))
        table[name] = c
    assert {k: round(v, 2) for k, v in table["1.7B"].items() if k != "U"} == \
        dict(P=1.93, T=1.72, P1=1.96, M=0.59, R=0.31)
    assert {k: round(v, 2) for k, v in table["8B"].items() if k != "U"} == \
        dict(P=9.47, T=8.19, P1=9.70, M=3.02, R=1.24)
    assert round(table["1.7B"]["U"], 3) == 0.038 and round(table["8B"]["U"], 3) == 0.151

    def column(c, W):  # GB per GPU: student steps 3-4 DDP, FSDP2; step 1 DDP, FSDP2; teacher replicate, shard
        P, T, P1, M, R, U = (c[k] for k in ("P", "T", "P1", "M", "R", "U"))
        return [round(x, 1) for x in (18 * P, 16 * P / W + 8 * R + 12 * U, 18 * M + 4 * (P1 - M),
                                      (16 * M + 4 * (P1 - M)) / W + 4 * R + 12 * U, 4 * T, 4 * T / W + 4 * R + 8 * U)]

    assert column(table["1.7B"], 8) == [34.7, 6.8, 16.0, 3.6, 6.9, 2.4]
    assert column(table["8B"], 2) == [170.5, 87.6, 81.1, 44.3, 32.8, 22.6]
    assert column(table["8B"], 8) == [170.5, 30.7, 81.1, 16.2, 32.8, 10.3]
