"""Evaluation: perplexity by context length, NIAH accuracy grids (with a heatmap), MQAR accuracy.

Works for minihalo models (forward returns logits) and transformers models (forward returns an
object with `.logits`): every function calls the model as `model(input_ids)` only.

Needle retrieval is scored *teacher-forced*: the prompt and the answer go through the model in one
forward pass and a sample counts as correct iff the argmax at every answer position is the answer
token. This is exactly "greedy decoding reproduces the answer": greedy decoding emits the answer iff
each of its steps, given the correct tokens before it, picks the answer's next token. One forward
pass per sample instead of one per generated token.

Shapes: N samples, B batch, T tokens, V vocabulary.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from .tasks import make_niah
from .model import model_logits


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def token_nll(model, windows, batch_size=8, chunk=4096):
    """Per-token negative log-likelihood (nats) of (N, T+1) token windows: returns (N, T) fp32 on CPU.

    The cross-entropy runs in fp32 over `chunk` positions at a time, so that a long window needs one copy of
    its logits in the model's dtype, not the fp32 logits and their log-softmax too (at 64K tokens and
    SmolLM2's 49K vocabulary, per row: 6 GiB in bf16, where the fp32 copy and its log-softmax took 24 GiB more)."""
    device, out = _device(model), []
    for i in range(0, len(windows), batch_size):
        w = torch.as_tensor(windows[i:i + batch_size], dtype=torch.long, device=device)  # (B, T+1)
        logits = model_logits(model(w[:, :-1]))  # (B, T, V)
        nll = torch.cat([F.cross_entropy(logits[:, s:s + chunk].float().transpose(1, 2), w[:, 1 + s:1 + s + chunk],
                                         reduction="none") for s in range(0, logits.shape[1], chunk)], 1)  # (B, T)
        out.append(nll.cpu())
    return torch.cat(out)


def heldout_windows(tokens, length, num_windows, seed=0):
    """`num_windows` windows of `length + 1` tokens at seeded random offsets of a held-out token array."""
    tokens = tokens.tokens if hasattr(tokens, "tokens") else tokens
    if len(tokens) < length + 2:
        raise ValueError(f"held-out text has {len(tokens)} tokens, fewer than length+1 = {length + 1}")
    starts = np.random.default_rng([seed, length]).integers(0, len(tokens) - length - 1, num_windows)
    return np.stack([np.asarray(tokens[s:s + length + 1], dtype=np.int64) for s in starts])


def perplexity_by_length(model, tokens, lengths, num_windows=8, batch_size=4, seed=0, tail=None):
    """Perplexity of held-out text at each context length.

    For each length L: `num_windows` windows of L+1 held-out tokens, the mean NLL over their L
    predictions. With `tail=t`, the mean covers only the last t positions of each window (the
    positions that see the most context): beyond a RoPE model's training length, these go bad first.
    Returns {L: perplexity}.
    """
    result = {}
    for L in lengths:
        nll = token_nll(model, heldout_windows(tokens, L, num_windows, seed), batch_size)  # (N, L)
        if tail is not None:
            nll = nll[:, -min(tail, L):]
        result[L] = math.exp(nll.mean().item())
    return result


@torch.no_grad()
def score_answers(model, prompts, answers, batch_size=8):
    """Teacher-forced exact match: (N,) bool, True where argmax reproduces every answer token.

    `prompts` and `answers` are lists of token-id lists. Rows of a batch are right-padded to the
    longest one; with a causal model, padding after a row cannot change its own predictions.
    """
    device, correct = _device(model), []
    for i in range(0, len(prompts), batch_size):
        P, A = prompts[i:i + batch_size], answers[i:i + batch_size]
        rows = [p + a for p, a in zip(P, A)]
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.tensor(r)
        pred = model_logits(model(ids.to(device))).argmax(-1).cpu()  # (B, T)
        for j, (p, a) in enumerate(zip(P, A)):
            # the token at position len(p)+k is predicted at position len(p)+k-1
            guess = pred[j, len(p) - 1:len(p) - 1 + len(a)]
            correct.append(bool((guess == torch.tensor(a)).all()))
    return torch.tensor(correct)


def niah_accuracy(model, tokenizer, length, depth, num_samples=20, seed=0, batch_size=8, **niah_kwargs):
    """Fraction of `num_samples` NIAH prompts of `length` tokens (needle at `depth`) answered exactly."""
    samples = make_niah(tokenizer, length, depth, num_samples, seed=seed, **niah_kwargs)
    ok = score_answers(model, [s.input_ids for s in samples], [s.answer_ids for s in samples], batch_size)
    return ok.float().mean().item()


def niah_grid(model, tokenizer, lengths, depths, num_samples=10, seed=0, batch_size=8, progress=False,
              **niah_kwargs):
    """NIAH accuracy for every (length, depth): a (len(lengths), len(depths)) numpy array in [0, 1]."""
    grid = np.zeros((len(lengths), len(depths)))
    cells = [(i, j) for i in range(len(lengths)) for j in range(len(depths))]
    if progress:
        from tqdm.auto import tqdm
        cells = tqdm(cells, desc="NIAH")
    for i, j in cells:
        grid[i, j] = niah_accuracy(model, tokenizer, lengths[i], depths[j], num_samples, seed, batch_size,
                                   **niah_kwargs)
    return grid


@torch.no_grad()
def mqar_accuracy(model, inputs, targets, batch_size=32):
    """Fraction of queried positions (targets != -100) where the argmax is the right value."""
    device, hit, total = _device(model), 0, 0
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i:i + batch_size].to(device), targets[i:i + batch_size].to(device)
        pred = model_logits(model(x)).argmax(-1)  # (B, T)
        mask = y != -100
        hit += (pred[mask] == y[mask]).sum().item()
        total += mask.sum().item()
    if total == 0:
        raise ValueError("targets hold no queried positions (every entry is -100)")
    return hit / total


def plot_niah_heatmap(grid, lengths, depths, ax=None, title=None, train_length=None):
    """Draw a NIAH grid: x = context length (tokens), y = needle depth (%), colour = accuracy (%)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(1.0 + 0.8 * len(lengths), 0.5 + 0.45 * len(depths)))
    im = ax.imshow(100 * np.asarray(grid).T, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    for i in range(len(lengths)):
        for j in range(len(depths)):
            ax.text(i, j, f"{100 * grid[i][j]:.0f}", ha="center", va="center", fontsize=8)
    if train_length is not None and train_length in lengths:
        x = list(lengths).index(train_length) + 0.5
        ax.axvline(x, color="black", lw=2, ls="--")
    ax.set_title(title or "NIAH accuracy (%)")
    plt.colorbar(im, ax=ax, label="accuracy (%)")
    return ax


def unigram_loss(train_tokens, val_tokens, vocab_size):
    """Cross-entropy (nats/token) of the best context-free model: token frequencies of the training split
    (add-one smoothed) scored on the validation split. A language model must beat this to have learned
    anything beyond "which tokens are common"."""
    train_tokens = train_tokens.tokens if hasattr(train_tokens, "tokens") else train_tokens
    val_tokens = val_tokens.tokens if hasattr(val_tokens, "tokens") else val_tokens
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val_tokens, dtype=np.int64)].mean())
