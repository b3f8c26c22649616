"""The training loop: schedule, exact resume after a kill, the NaN guard, parameter subsets."""
import math

import pytest
import torch
import torch.nn as nn

from minihalo import HybridConfig, HybridLM
from minihalo.train import NonFiniteLossError, TrainConfig, lr_at, next_token_loss, train

V, T = 32, 12


class TinyLM(nn.Module):
    """Embedding -> dropout -> MLP -> logits. Dropout makes the run depend on the torch RNG,
    so an exact resume must restore the RNG state too."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        self.drop = nn.Dropout(0.3)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, V))

    def forward(self, x):
        return self.mlp(self.drop(self.emb(x)))


def batches(step):  # (4, T+1), a pure function of the step
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, V, (4, T + 1), generator=g)


def cfg(**kw):
    base = dict(steps=10, lr=1e-2, min_lr=1e-3, warmup_steps=3, grad_accum=2, progress=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule():
    c = cfg(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, c) == pytest.approx(0.1) and lr_at(9, c) == pytest.approx(1.0)  # linear warm-up
    assert lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(55, c) == pytest.approx(0.55)  # half way through the cosine: the mean of lr and min_lr
    assert lr_at(100, c) == pytest.approx(0.1)
    assert lr_at(50, cfg(steps=100, warmup_steps=10, lr=1.0, schedule="constant")) == 1.0


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    torch.manual_seed(0)
    ref = TinyLM()
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    train(ref, batches, cfg(ckpt_dir=str(tmp_path / "a"), ckpt_every=3))

    model = TinyLM()
    model.load_state_dict(init)

    def killed_at_step_7(i):  # micro-batch index; 2 per step
        if i == 2 * 7:
            raise KeyboardInterrupt("simulated kill")
        return batches(i)

    with pytest.raises(KeyboardInterrupt):
        train(model, killed_at_step_7, cfg(ckpt_dir=str(tmp_path / "b"), ckpt_every=3))
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=False)["step"] == 6

    resumed = TinyLM()  # a fresh process: new model, different RNG state
    torch.manual_seed(123)
    hist = train(resumed, batches, cfg(ckpt_dir=str(tmp_path / "b"), ckpt_every=3))
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert hist["step"] == list(range(1, 11))
    assert not torch.equal(init["emb.weight"], resumed.state_dict()["emb.weight"])  # it did train


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()

    def loss_nan_at_step_5(model, batch):
        loss = next_token_loss(model, batch)
        return loss * float("nan") if train_step["n"] == 5 else loss

    train_step = {"n": -1}

    def counting_batches(i):
        train_step["n"] = i // 2
        return batches(i)

    with pytest.raises(NonFiniteLossError, match="step 5"):
        train(model, counting_batches, cfg(ckpt_dir=str(tmp_path), ckpt_every=2), loss_fn=loss_nan_at_step_5)
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # no update from the bad step


def test_gradient_is_clipped_before_the_optimizer_step(monkeypatch):
    """The gradient AdamW steps with has norm <= grad_clip, checked inside the step itself."""
    seen = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            grads = [p.grad.flatten() for group in self.param_groups for p in group["params"] if p.grad is not None]
            seen.append(torch.cat(grads).norm().item())
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    for clip in (0.0, 0.05):
        seen.clear()
        torch.manual_seed(0)
        train(TinyLM(), batches, cfg(steps=4, grad_clip=clip))
        if not clip:
            assert len(seen) == 4 and min(seen) > 0.1  # unclipped, the norm is well above the clip below
    assert len(seen) == 4 and max(seen) <= 0.05 * (1 + 1e-5)


def test_params_subset_trains_only_those():
    torch.manual_seed(0)
    model = TinyLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, batches, cfg(steps=3, grad_accum=1), params=model.mlp.parameters())
    after = model.state_dict()
    assert torch.equal(before["emb.weight"], after["emb.weight"])
    assert not torch.equal(before["mlp.0.weight"], after["mlp.0.weight"])
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_loss_decreases_and_grad_checkpointing_matches():
    c = HybridConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                     num_kv_heads=1, head_dim=16, layer_types=["attention", "lightning"], rope_theta=1e4)

    def run(gc):
        torch.manual_seed(0)
        m = HybridLM(c)
        h = train(m, lambda i: torch.arange(T + 1).repeat(4, 1) % 5, cfg(steps=30, grad_accum=1, lr=3e-2,
                                                                          grad_checkpointing=gc))
        return m, h

    m0, h0 = run(False)
    m1, h1 = run(True)
    assert h0["loss"][-1] < 0.2 * h0["loss"][0]  # a periodic sequence is learnable
    assert m1.gradient_checkpointing and not m0.gradient_checkpointing
    for a, b in zip(m0.parameters(), m1.parameters()):  # recomputation changes nothing (fp32, same ops)
        assert torch.allclose(a, b, atol=1e-6)
    assert math.isclose(h0["loss"][-1], h1["loss"][-1], rel_tol=1e-5)


def test_config_errors():
    with pytest.raises(ValueError, match="ckpt_dir"):
        TrainConfig(steps=3, ckpt_every=1)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(steps=3, schedule="linear")
    with pytest.raises(ValueError, match="parallel must be one of"):
        TrainConfig(steps=3, parallel="zero")
    with pytest.raises(ValueError, match="no gradient-checkpointing switch"):
        train(TinyLM(), batches, cfg(steps=1, grad_checkpointing=True))
    with pytest.raises(ValueError, match="grad_accum=1"):
        TrainConfig(steps=3, cuda_graph=True, grad_accum=2)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        train(TinyLM(), batches, cfg(steps=1, grad_accum=1, cuda_graph=True), device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the H200)")
@pytest.mark.parametrize("layers", [["attention", "lightning", "lightning", "lightning"], ["attention"] * 4])
def test_cuda_graph_training_equals_eager(tmp_path, layers):
    """The captured step trains the same model as the eager loop: same losses and learning rates at every
    step, same weights at the end (bf16 autocast, a cosine schedule), also when resumed from a checkpoint
    written mid-run. The Lightning layers use the chunked PyTorch form: the tests run Triton under
    TRITON_INTERPRET=1 (conftest), which a CUDA graph cannot capture."""
    hc = HybridConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=16, layer_types=layers, lin_impl="chunk")
    def data(i):  # learnable: each row counts up (mod 64) from a random start
        start = torch.randint(0, 64, (8, 1), generator=torch.Generator().manual_seed(i))
        return (start + torch.arange(65)) % 64
    runs = {}
    for name, graph in [("eager", False), ("graph", True), ("graph_resumed", True)]:
        torch.manual_seed(0)
        model = HybridLM(hc).cuda()
        c = cfg(steps=40, grad_accum=1, warmup_steps=5, lr=3e-3, cuda_graph=graph, ckpt_every=20,
                ckpt_dir=str(tmp_path / name))
        if name == "graph_resumed":  # killed after the checkpoint of step 20, resumed by a fresh model
            def killed(i):
                if i == 25:
                    raise KeyboardInterrupt("simulated kill")
                return data(i)
            with pytest.raises(KeyboardInterrupt):
                train(model, killed, c)
            model = HybridLM(hc).cuda()
        runs[name] = (train(model, data, c), model)
    (h0, m0), (h1, m1), (h2, m2) = runs.values()
    assert h0["lr"] == pytest.approx(h1["lr"]) and h0["lr"] == pytest.approx(h2["lr"])
    assert h0["loss"][-1] < h0["loss"][0] - 0.1
    # the same computation up to bf16 rounding and the order of atomic sums in attention backward kernels
    for h, m in [(h1, m1), (h2, m2)]:
        assert len(h["loss"]) == 40 and max(abs(a - b) for a, b in zip(h0["loss"], h["loss"])) < 2e-2
        for a, b in zip(m0.parameters(), m.parameters()):
            assert (a - b).norm() <= 2e-2 * a.norm()
