"""Data: the byte tokenizer round-trips, the split is by document, packing never leaves its split, the English
text is the frozen snapshot, prepared folders are cached by content."""
import hashlib
import json
import lzma

import pytest
import torch

from minihalo import data
from minihalo.data import (ENGLISH_SNAPSHOT, ByteTokenizer, MixedBatches, PackedBatches, TokenFile, corpus_sha256,
                           load_corpus, prepare, read_snapshot, split_documents, text_files_corpus, tokenizer_by_name,
                           write_snapshot)

# The sha256 of the English snapshot's documents (data/README.md): change it only with a new snapshot.
ENGLISH_SHA256 = "603773313becc0e578d915b515be855bf2b031377b2958a88647d0bd5b2a092c"


def test_byte_tokenizer_round_trip():
    tok = tokenizer_by_name("byte")
    assert isinstance(tok, ByteTokenizer)
    text = "HyPE: ln(t + a) / ln(a) — déjà vu, 東京, emoji 🙂\n\ttabs"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text
    with pytest.raises(ValueError, match="NUL"):
        tok.encode("a\x00b")
    with pytest.raises(ValueError, match="256"):
        tok.decode([65, 300])


def test_split_is_by_document():
    docs = [f"document {i} " * (i + 1) for i in range(50)]
    train, val = split_documents(docs, val_fraction=0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert sorted(train + val) == sorted(docs)  # every document in exactly one split
    assert split_documents(docs, 0.2, seed=3) == (train, val)  # seeded
    with pytest.raises(ValueError):
        split_documents(docs, val_fraction=1.5)


def _marked_corpus(tmp_path):
    """Documents written in disjoint alphabets, so any byte reveals which document it came from."""
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    docs = [letters[i] * (40 + 13 * i) for i in range(len(letters))]
    return docs, prepare("marked", "byte", out_dir=tmp_path, val_fraction=0.25, seed=0, docs=docs)


def test_token_files_hold_each_document_once(tmp_path):
    docs, folder = _marked_corpus(tmp_path)
    meta = json.loads((folder / "meta.json").read_text())
    tok = ByteTokenizer()
    seen = []
    for split in ("train", "val"):
        f = TokenFile(folder, split)
        assert len(f) == meta[f"{split}_tokens"]
        assert f.tokens[f.doc_starts - 1][1:].tolist() == [0] * (len(f.doc_starts) - 1)  # EOS before each doc
        seen += [tok.decode(d) for d in f.documents()]
    assert sorted(seen) == sorted(docs)


def test_packing_never_crosses_the_split(tmp_path):
    docs, folder = _marked_corpus(tmp_path)
    train, val = TokenFile(folder, "train"), TokenFile(folder, "val")
    val_bytes = set(val.tokens.tolist()) - {0}
    train_bytes = set(train.tokens.tolist()) - {0}
    assert val_bytes and not (val_bytes & train_bytes)
    batches = PackedBatches(train, seq_len=31, batch_size=4, seed=1)
    windows = []
    for step in range(2 * batches.steps_per_epoch):  # two epochs
        b = batches(step)
        assert b.shape == (4, 32) and b.dtype == torch.long
        assert not (set(b.flatten().tolist()) & val_bytes)
        windows += batches.window_ids(step).tolist()
    # each epoch visits every window exactly once, in a new order
    n = batches.steps_per_epoch * 4
    assert sorted(windows[:n]) == sorted(windows[n:]) == list(range(n))
    assert windows[:n] != windows[n:]
    # a window is a verbatim slice of the train stream, and batches are a pure function of the step
    j = batches.window_ids(5)[0]
    assert batches(5)[0].tolist() == train.tokens[j * 32:(j + 1) * 32].tolist()
    assert torch.equal(batches(7), PackedBatches(train, 31, 4, seed=1)(7))


def test_mixed_batches_are_seeded_and_mixed(tmp_path):
    _, folder = _marked_corpus(tmp_path)
    text = PackedBatches(TokenFile(folder, "train"), seq_len=15, batch_size=8)
    ones = lambda rng, n: torch.full((n, 16), 255, dtype=torch.long)  # noqa: E731
    mixed = MixedBatches([text, ones], [0.5, 0.5], batch_size=8, seed=2)
    rows = torch.cat([mixed(s) for s in range(20)])
    from_ones = (rows == 255).all(1).float().mean().item()
    assert 0.3 < from_ones < 0.7  # about half the rows from each source
    windows = {tuple(text.windows([j])[0].tolist()) for j in range(text.num_windows)}
    assert all(tuple(r) in windows for r in rows.tolist() if r != [255] * 16)  # text rows: whole packed windows
    assert torch.equal(mixed(3), MixedBatches([text, ones], [0.5, 0.5], 8, seed=2)(3))


def test_text_files_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.md").write_text("second")
    assert text_files_corpus(tmp_path) == ["first", "second"]
    with pytest.raises(ValueError):
        text_files_corpus(tmp_path / "missing")


def test_english_is_the_frozen_snapshot(monkeypatch):
    def live(*args, **kwargs):
        raise AssertionError("the corpus 'english' must not read the running Python's standard library")
    monkeypatch.setitem(data.CORPORA, "stdlib-english", live)
    monkeypatch.setattr(data, "stdlib_english_corpus", live)
    docs = load_corpus("english")
    assert len(docs) == 2517 and corpus_sha256(docs) == ENGLISH_SHA256
    assert hashlib.sha256(lzma.decompress(ENGLISH_SNAPSHOT.read_bytes())).hexdigest() == ENGLISH_SHA256


def test_snapshot_round_trip_and_prepare_caches_by_content(tmp_path, monkeypatch):
    docs = ["plain", "quote \" and newline\n", "déjà vu 東京 🙂"] + [f"document {i}" for i in range(17)]
    sha = write_snapshot(tmp_path / "s.jsonl.xz", docs)
    assert read_snapshot(tmp_path / "s.jsonl.xz") == docs
    assert sha == corpus_sha256(docs) == hashlib.sha256(lzma.decompress((tmp_path / "s.jsonl.xz").read_bytes())).hexdigest()
    monkeypatch.setattr(data, "DEFAULT_CACHE", tmp_path / "cache")
    first = prepare("mine", "byte", docs=docs)
    assert json.loads((first / "meta.json").read_text())["sha256"] == sha
    stamp = (first / "train.bin").stat().st_mtime_ns
    assert prepare("mine", "byte", docs=list(docs)) == first and (first / "train.bin").stat().st_mtime_ns == stamp
    edited = docs[:-1] + ["document 16, edited"]
    second = prepare("mine", "byte", docs=edited)  # same name, other text: another folder
    assert second != first and json.loads((second / "meta.json").read_text())["sha256"] == corpus_sha256(edited)
    third = prepare("mine", "byte", out_dir=first, docs=edited)  # a given folder holding other text is rewritten
    assert third == first and json.loads((first / "meta.json").read_text())["sha256"] == corpus_sha256(edited)
    texts = [ByteTokenizer().decode(d) for split in ("train", "val") for d in TokenFile(first, split).documents()]
    assert sorted(texts) == sorted(edited)
