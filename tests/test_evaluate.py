"""Evaluation: uniform model -> perplexity = vocabulary; teacher-forced scoring = greedy decoding; MQAR."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from minihalo import HybridConfig, HybridLM
from minihalo.data import ByteTokenizer
from minihalo.evaluate import (mqar_accuracy, niah_grid, perplexity_by_length, score_answers, token_nll,
                               unigram_loss)
from minihalo.tasks import make_mqar


class Uniform(nn.Module):
    """Predicts the uniform distribution; returns a transformers-style output with `.logits`."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return SimpleNamespace(logits=torch.zeros(*x.shape, self.vocab) + self.dummy)


def test_uniform_model_perplexity_is_vocab_size():
    tokens = np.random.default_rng(0).integers(0, 300, 5000)
    ppl = perplexity_by_length(Uniform(300), tokens, [16, 100, 257], num_windows=3, tail=8)
    for L, p in ppl.items():
        assert p == pytest.approx(300, rel=1e-5), L


def test_perplexity_of_a_known_model():
    """A model that is sure of the true next token (p = 0.9, rest spread) has NLL -ln 0.9 exactly."""
    class Oracle(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):  # the stream is t -> t+1 mod 10; put logit c on the true next token
            c = math.log(0.9 * 9 / 0.1)
            return nn.functional.one_hot((x + 1) % 10, 10).float() * c + self.w

    tokens = np.arange(1000) % 10
    for chunk in (4096, 7, 1):  # the cross-entropy over positions in chunks: each chunk's own targets
        nll = token_nll(Oracle(), np.stack([tokens[:21], tokens[5:26]]), chunk=chunk)
        assert nll.shape == (2, 20)
        assert torch.allclose(nll, torch.full((2, 20), -math.log(0.9)), atol=1e-6), chunk


def test_unigram_loss():
    tokens = np.array([0, 1] * 5000)
    assert unigram_loss(tokens, tokens, 2) == pytest.approx(math.log(2))


def test_teacher_forced_scoring_equals_greedy_decoding():
    torch.manual_seed(0)
    cfg = HybridConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                       num_kv_heads=1, head_dim=16, layer_types=["attention", "lightning"], rope_theta=1e4)
    model = HybridLM(cfg).eval()
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (5, 9, 17)]
    greedy = [model.generate(torch.tensor([p]), max_new_tokens=4)[0, len(p):].tolist() for p in prompts]
    wrong = [g[:2] + [(g[2] + 1) % 64] + g[3:] for g in greedy]  # third token off by one
    assert score_answers(model, prompts, greedy, batch_size=2).tolist() == [True, True, True]
    assert score_answers(model, prompts, wrong, batch_size=2).tolist() == [False, False, False]


def test_mqar_accuracy_oracle_and_constant():
    inputs, targets = make_mqar(6, 48, 5, vocab_size=40, seed=1)

    class Recall(nn.Module):
        """Perfect associative memory: after a key seen before, predict the value that followed it."""
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            out = torch.zeros(*x.shape, 40)
            for b in range(x.shape[0]):
                memory = {}
                for t in range(x.shape[1]):
                    k = int(x[b, t])
                    if k in memory:
                        out[b, t, memory[k]] = 1.0
                    if t + 1 < x.shape[1] and k != 0 and k not in memory:
                        memory[k] = int(x[b, t + 1])
            return out + self.w

    class Zero(Recall):
        def forward(self, x):
            return torch.zeros(*x.shape, 40) + self.w

    assert mqar_accuracy(Recall(), inputs, targets, batch_size=4) == 1.0
    assert mqar_accuracy(Zero(), inputs, targets) == 0.0


class Copier(nn.Module):
    """A byte model that retrieves perfectly: at each position it finds the latest earlier occurrence of the
    last 12 bytes and predicts the byte that followed it (an ideal induction head), else byte 0."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        out = torch.zeros(*x.shape, 256)
        for b, row in enumerate(x.tolist()):
            text = bytes(row)
            for t in range(12, len(row)):
                s = text.rfind(text[t - 11:t + 1], 0, t)  # an occurrence that ends before t
                out[b, t, text[s + 12] if s >= 0 else 0] = 1.0
        return out + self.w


def test_niah_grid_scores_a_retriever_1_and_a_uniform_model_0():
    lengths, depths = [100, 150], [0.0, 0.5, 1.0]
    grid = niah_grid(Copier(), ByteTokenizer(), lengths, depths, num_samples=2)
    assert grid.shape == (2, 3) and (grid == 1).all()
    grid = niah_grid(Uniform(256), ByteTokenizer(), lengths, depths, num_samples=2)
    assert grid.shape == (2, 3) and (grid == 0).all()  # argmax of a uniform model is token 0, never a digit
