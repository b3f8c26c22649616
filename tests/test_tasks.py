"""Synthetic tasks: the needle lands at the requested depth, the scorer is exact, MQAR is consistent."""
import re

import numpy as np
import pytest
import torch

from minihalo.data import ByteTokenizer
from minihalo.tasks import copy_rows, exact_match, make_mqar, make_niah, make_niah_sample, niah_training_rows

TOK = ByteTokenizer()


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.37, 0.5, 1.0])
@pytest.mark.parametrize("length", [120, 257, 1000])
def test_needle_at_requested_depth(length, depth):
    s = make_niah_sample(TOK, length, depth, seed=7, variant="single_1")
    assert len(s.input_ids) == length
    assert s.needle_start == round(depth * s.filler_len)
    needle = TOK.decode(s.input_ids[s.needle_start:s.needle_start + s.needle_len])
    assert needle == f" The magic number for {s.key} is {s.answer}. "
    assert re.fullmatch(r"\d{7}", s.answer) and TOK.decode(s.answer_ids) == s.answer
    text = TOK.decode(s.input_ids)
    assert text.count(s.answer) == 1  # the answer is only in the needle
    assert text.endswith(f"\nThe magic number for {s.key} is ")


def test_natural_text_filler_and_variants():
    filler = np.frombuffer(("Some natural text, repeated. " * 400).encode(), dtype=np.uint8)
    s = make_niah_sample(TOK, 500, 0.5, seed=1, variant="single_3", filler=filler, template="ruler")
    assert len(s.input_ids) == 500
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", s.answer)
    assert "special magic uuid" in TOK.decode(s.input_ids)
    w = make_niah_sample(TOK, 300, 0.2, seed=1, variant="words", filler=filler)
    assert w.answer.isalpha()
    with pytest.raises(ValueError, match="natural-text filler"):
        make_niah_sample(TOK, 300, 0.5, seed=1, variant="single_2")
    with pytest.raises(ValueError, match="too short"):
        make_niah_sample(TOK, 40, 0.5, seed=1)


def test_niah_is_seeded():
    a = make_niah(TOK, 200, 0.5, 4, seed=3)
    b = make_niah(TOK, 200, 0.5, 4, seed=3)
    c = make_niah(TOK, 200, 0.5, 4, seed=4)
    assert [x.input_ids for x in a] == [x.input_ids for x in b]
    assert [x.answer for x in a] != [x.answer for x in c]
    assert len({x.answer for x in a}) == 4  # samples differ from each other


def test_exact_match():
    assert exact_match("1234567", "1234567")
    assert exact_match(" 1234567. And more", "1234567")
    assert not exact_match("123456", "1234567")
    assert not exact_match("12345678", "1234567")
    assert not exact_match("", "1234567")
    assert not exact_match("the answer is 1234567", "1234567")


def test_training_rows_answer_their_questions():
    filler = np.frombuffer(("plain filler words here. " * 800).encode(), dtype=np.uint8)
    rows = niah_training_rows(TOK, 256, filler, np.random.default_rng(0), 20)
    assert rows.shape == (20, 257)
    for row in rows:
        text = TOK.decode(row.tolist())
        facts = dict(re.findall(r" The magic number for (\w+) is (\d{7})\. ", text))
        asked = re.findall(r"\nThe magic number for (\w+) is (\d{7})", text)
        assert facts and len(asked) == len(facts)
        assert all(facts[k] == v for k, v in asked)


def test_mqar():
    inputs, targets = make_mqar(8, 64, 6, vocab_size=64, seed=0)
    assert inputs.shape == targets.shape == (8, 64)
    for x, y in zip(inputs, targets):
        pairs = {int(x[2 * i]): int(x[2 * i + 1]) for i in range(6)}
        assert all(1 <= k < 32 and 32 <= v < 64 for k, v in pairs.items())
        queried = (y != -100).nonzero().flatten()
        assert len(queried) == 6 and (queried >= 12).all()
        for t in queried:  # each query is a key from the context; its target is that key's value
            assert pairs[int(x[t])] == int(y[t])
    with pytest.raises(ValueError):
        make_mqar(1, 10, 6, 64)


def test_token_niah():
    from minihalo.tasks import TokenNIAH

    task = TokenNIAH(seed=0)
    for depth in (0.0, 0.3, 1.0):
        s = task.sample(300, depth, seed=5)
        assert len(s.input_ids) == 300 and s.needle_start == round(depth * s.filler_len)
        assert s.input_ids[s.needle_start:s.needle_start + 4] == [task.NEEDLE, int(s.key)] + s.answer_ids
        assert s.input_ids[-2:] == [task.QUERY, int(s.key)]
        assert s.input_ids.count(task.NEEDLE) == 1
    rows = task.training_rows(np.random.default_rng(1), 6, 128)
    assert rows.shape == (6, 129)
    for row in rows.tolist():
        facts = {row[i + 1]: row[i + 2:i + 4] for i in range(len(row)) if row[i] == task.NEEDLE}
        asked = [(row[i + 1], row[i + 2:i + 4]) for i in range(len(row)) if row[i] == task.QUERY]
        assert facts and len(asked) == len(facts) and all(facts[k] == v for k, v in asked)


def test_copy_rows_repeat_one_string_from_the_alphabet():
    alphabet = np.arange(33, 127)
    rows = copy_rows(np.random.default_rng(0), 50, 128, alphabet, min_len=4, max_len=16)
    assert rows.shape == (50, 129) and rows.dtype == torch.long
    assert np.isin(rows.numpy(), alphabet).all()
    periods = []
    for row in rows.tolist():
        p = next(p for p in range(4, 17) if row[p:] == row[:-p])  # the shortest period in [4, 16]
        periods.append(p)
    assert min(periods) == 4 and max(periods) == 16  # both ends of the range occur in 50 rows


def test_token_niah_haystack_kinds():
    """The default haystack follows its chain (9 of 10 steps to one of 3 successors); haystack="uniform"
    draws every token independently and uniformly from the same range; needles and questions are the same."""
    from minihalo.tasks import TokenNIAH

    rng = np.random.default_rng(0)
    for kind, lo_share, hi_share in (("markov", 0.88, 0.93), ("uniform", 0.0, 0.04)):
        task = TokenNIAH(seed=0, haystack=kind)
        x = task.haystack(20000, rng)
        assert ((TokenNIAH.HAY[0] <= x) & (x < TokenNIAH.HAY[1])).all()
        to_successor = (task.successors[x[:-1]] == x[1:, None]).any(1).mean()
        assert lo_share < to_successor < hi_share
        counts = np.bincount(x - TokenNIAH.HAY[0], minlength=152)
        assert counts.min() > 0
        s = task.sample(100, 0.5, seed=1)
        assert s.input_ids[s.needle_start:s.needle_start + 2] == [task.NEEDLE, int(s.key)]
    assert TokenNIAH(seed=3).kind == "markov"
    with pytest.raises(ValueError, match="haystack"):
        TokenNIAH(haystack="zipf")
