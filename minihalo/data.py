"""Corpora, tokenizers, memory-mapped token files and packed training batches.

The path from text to training batches, nanoGPT-style:

    documents (list of str)  ->  tokenizer  ->  {train,val}.bin (one flat uint16/uint32 array per split,
                                                documents separated by an end-of-document token)
                             ->  PackedBatches(step) -> (B, T+1) int64 tensor

Corpora
- `english_corpus()`: the frozen English snapshot `data/english-3.11.7.jsonl.xz` (what the presets, the toy
  teacher and the HALO pipeline train and evaluate on): the same text on every machine.
- `stdlib_english_corpus()`: English that ships with the running Python itself: the reference-manual topics
  of `pydoc_data.topics` plus the docstrings of the standard library (read with `ast`, nothing imported).
  Works offline on any machine, Colab included; its contents depend on the Python version.
  `write_snapshot(path)` freezes it into a snapshot file (data/README.md).
- `code_corpus()`: the standard library's Python source files.
- `text_files_corpus(paths)`: any local text files, one document per file.
- `hf_corpus(name)`: a Hugging Face dataset streamed by name (FineWeb-Edu, as in the paper);
  needs `pip install datasets` and a network. Never used by tests or notebooks.

The split into train and validation is by *document*: a document lands wholly in one file, so
packing (which only ever reads one file) can never put validation text into a training batch.

Tokenizers
- `ByteTokenizer`: UTF-8 bytes, vocabulary 256. Byte 0 (NUL) never occurs in text, so it doubles
  as the end-of-document token.
- `HFTokenizer`: wraps any transformers tokenizer (a checkpoint folder or a hub name).

Shapes: B batch, T sequence length (tokens per training example, the model sees T and predicts T).
"""
import ast
import hashlib
import json
import lzma
import os
import sysconfig
from pathlib import Path

import numpy as np
import torch

_REPO_DATA = Path(__file__).resolve().parent.parent / "data"
# In a repository checkout: data/cache/ (git-ignored). Installed with pip (e.g. on Colab): ~/.cache/minihalo.
DEFAULT_CACHE = _REPO_DATA / "cache" if _REPO_DATA.is_dir() else Path.home() / ".cache" / "minihalo"
# The frozen English text (made by write_snapshot on CPython 3.11.7); see data/README.md.
ENGLISH_SNAPSHOT = _REPO_DATA / "english-3.11.7.jsonl.xz"


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------
class ByteTokenizer:
    """Byte-level tokenizer: token id = UTF-8 byte value; vocabulary 256; EOS = byte 0 (NUL).

    `decode(encode(s)) == s` for every string without NUL characters (`encode` rejects those).
    """

    name = "byte"
    vocab_size = 256
    eos_token_id = 0

    def encode(self, text: str) -> list:
        if "\x00" in text:
            raise ValueError("ByteTokenizer uses byte 0 (NUL) as its end-of-document token; "
                             "remove NUL characters from the text first (text.replace('\\x00', ''))")
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        bad = [i for i in ids if not 0 <= int(i) < 256]
        if bad:
            raise ValueError(f"ByteTokenizer ids must lie in [0, 256); got {bad[:5]}")
        # A window cut from the middle of a multi-byte character decodes to U+FFFD instead of failing.
        return bytes(int(i) for i in ids if int(i) != self.eos_token_id).decode("utf-8", errors="replace")

    def __repr__(self):
        return "ByteTokenizer(vocab_size=256, eos_token_id=0)"


class HFTokenizer:
    """Any transformers tokenizer behind the same three-member interface as `ByteTokenizer`.

    `name_or_path` is a local checkpoint folder or a hub name (hub names need a network unless cached).
    """

    def __init__(self, name_or_path):
        from transformers import AutoTokenizer  # imported lazily: the byte tokenizer needs no transformers

        self.tok = AutoTokenizer.from_pretrained(str(name_or_path))
        self.name = str(name_or_path)
        self.vocab_size = len(self.tok)
        eos = self.tok.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer {name_or_path!r} has no eos_token_id; documents need a separator")
        self.eos_token_id = int(eos)

    def encode(self, text: str) -> list:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tok.decode(ids, skip_special_tokens=True)

    def __repr__(self):
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def tokenizer_by_name(name_or_path="byte"):
    """"byte" -> ByteTokenizer(); anything else -> HFTokenizer(name_or_path)."""
    if name_or_path == "byte":
        return ByteTokenizer()
    return HFTokenizer(name_or_path)


# --------------------------------------------------------------------------------------------
# Corpora: each returns a list of documents (str), in a fixed order
# --------------------------------------------------------------------------------------------
def _stdlib_files():
    """The standard library's .py files, sorted, without tests and installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def _clean(text):
    return text.replace("\x00", "")


def stdlib_english_corpus(min_chars: int = 200) -> list:
    """English prose that ships with the running Python: `pydoc_data.topics` + standard-library docstrings.

    One document per manual topic and one per docstring of at least `min_chars` characters
    (module, class and function docstrings, read with `ast` so no module is imported).
    About 1.8 MB of text for CPython 3.11; the exact contents depend on the Python version.
    """
    import pydoc_data.topics

    docs = [_clean(pydoc_data.topics.topics[k]) for k in sorted(pydoc_data.topics.topics)]
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(_clean(doc))
    return docs


def corpus_sha256(docs) -> str:
    """The sha256 of a list of documents: of their JSON-lines text (one JSON string per line, UTF-8),
    i.e. of a snapshot file's uncompressed contents (`xz -dc FILE | sha256sum`)."""
    h = hashlib.sha256()
    for doc in docs:
        h.update((json.dumps(doc) + "\n").encode("utf-8"))
    return h.hexdigest()


def write_snapshot(path, docs=None):
    """Freeze documents (default: `stdlib_english_corpus()` of the running Python) into an xz-compressed
    JSON-lines file, one JSON string per line. Returns their `corpus_sha256`."""
    docs = stdlib_english_corpus() if docs is None else docs
    text = "".join(json.dumps(doc) + "\n" for doc in docs).encode("utf-8")
    Path(path).write_bytes(lzma.compress(text, preset=9 | lzma.PRESET_EXTREME))
    return corpus_sha256(docs)


def read_snapshot(path) -> list:
    """The documents of a snapshot file (see `write_snapshot`), in order."""
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def english_corpus() -> list:
    """The frozen English text: `ENGLISH_SNAPSHOT`, 2,517 documents (1.8 MB) that `stdlib_english_corpus()`
    read on CPython 3.11.7. The same on every machine and Python; the default of the presets."""
    if not ENGLISH_SNAPSHOT.is_file():
        raise ValueError(f"the English snapshot is not at {ENGLISH_SNAPSHOT}: it ships in the repository's data/ "
                         "folder, which a pip install does not have. Use the corpus 'stdlib-english' (the live "
                         "text of this Python) or a path to your own text files")
    return read_snapshot(ENGLISH_SNAPSHOT)


def code_corpus(max_chars_per_file: int = 100_000) -> list:
    """Python source code: one document per standard-library file (first `max_chars_per_file` chars)."""
    docs = []
    for path in _stdlib_files():
        try:
            docs.append(_clean(path.read_text(encoding="utf-8"))[:max_chars_per_file])
        except (UnicodeDecodeError, OSError):
            continue
    return docs


def text_files_corpus(paths) -> list:
    """Local text files (paths, or folders searched for *.txt and *.md), one document per file."""
    files = []
    for p in [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]:
        if p.is_dir():
            files += sorted(list(p.rglob("*.txt")) + list(p.rglob("*.md")))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"{p} is neither a file nor a folder")
    if not files:
        raise ValueError(f"no text files found in {paths!r}")
    return [_clean(f.read_text(encoding="utf-8", errors="replace")) for f in files]


def hf_corpus(name: str = "HuggingFaceFW/fineweb-edu", config: str = "sample-10BT", split: str = "train",
              text_field: str = "text", max_docs: int = 100_000) -> list:
    """The first `max_docs` documents of a Hugging Face dataset, streamed (no full download).

    Default: FineWeb-Edu's 10B-token sample, the paper's training data. Needs `pip install datasets`
    and a network connection; tests and notebooks never call this.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError("hf_corpus needs the `datasets` package: pip install datasets") from e
    stream = datasets.load_dataset(name, config, split=split, streaming=True)
    docs = []
    for row in stream:
        if text_field not in row:
            raise ValueError(f"dataset {name!r} has no field {text_field!r}; fields: {sorted(row)}")
        docs.append(_clean(row[text_field]))
        if len(docs) >= max_docs:
            break
    return docs


CORPORA = {"english": english_corpus, "stdlib-english": stdlib_english_corpus, "code": code_corpus}


def load_corpus(name: str, **kwargs) -> list:
    """"english" (the snapshot), "stdlib-english", "code", parts joined by "+" (e.g. "english+code"),
    "hf:<dataset name>", or a path to local text files."""
    if name.startswith("hf:"):
        return hf_corpus(name[3:], **kwargs)
    if all(part in CORPORA for part in name.split("+")):
        return [doc for part in name.split("+") for doc in CORPORA[part](**kwargs)]
    if Path(name).exists():
        return text_files_corpus(name)
    raise ValueError(f"unknown corpus {name!r}; expected 'english', 'stdlib-english', 'code', parts joined by "
                     f"'+' (e.g. 'english+code'), 'hf:<dataset>' or an existing path")


# --------------------------------------------------------------------------------------------
# Token files: {split}.bin (flat token array) + {split}_docs.npy (document start offsets) + meta.json
# --------------------------------------------------------------------------------------------
def split_documents(docs, val_fraction=0.05, seed=0):
    """Shuffle document indices with `seed` and give the first `val_fraction` of them to validation.

    Returns (train_docs, val_docs); every document lands wholly in exactly one of them.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1); got {val_fraction}")
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to split into train and val; got {len(docs)}")
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = max(1, int(round(val_fraction * len(docs))))
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
    return [docs[i] for i in train_idx], [docs[i] for i in val_idx]


def _token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


def write_token_file(docs, tokenizer, path):
    """Tokenize `docs`, append EOS to each, write them to `path` (.bin) and their offsets (_docs.npy).

    Returns the number of tokens written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = _token_dtype(tokenizer.vocab_size)
    starts, chunks, n = [], [], 0
    for doc in docs:
        ids = tokenizer.encode(doc) + [tokenizer.eos_token_id]
        starts.append(n)
        chunks.append(np.asarray(ids, dtype=dtype))
        n += len(ids)
    arr = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    tmp = path.with_suffix(".tmp")
    arr.tofile(tmp)
    os.replace(tmp, path)  # atomic: a half-written file never looks finished
    np.save(path.with_name(path.stem + "_docs.npy"), np.asarray(starts, dtype=np.int64))
    return n


def prepare(corpus="english", tokenizer="byte", out_dir=None, val_fraction=0.05, seed=0, docs=None):
    """Build (or reuse) the token files of a corpus. Returns the folder holding them.

    Output folder (default `data/cache/<corpus>-<tokenizer>-<hash>/`, git-ignored; ~/.cache/minihalo/... when
    minihalo is installed rather than checked out):
        train.bin, val.bin           flat token arrays (uint16 if the vocabulary fits, else uint32)
        train_docs.npy, val_docs.npy document start offsets into the .bin files
        meta.json                    corpus, its sha256 (corpus_sha256), tokenizer, vocab size, dtype,
                                     token and document counts
    The cache is by content: the folder's hash covers the documents' sha256, the tokenizer, `val_fraction`
    and `seed`, and a folder is reused only when its meta.json records the same. `docs` overrides the corpus
    with a list of documents you already have.
    """
    tok = tokenizer_by_name(tokenizer) if isinstance(tokenizer, str) else tokenizer
    docs = load_corpus(corpus) if docs is None else docs
    sha = corpus_sha256(docs)
    if out_dir is None:
        key = hashlib.sha1(f"{sha}|{tok.name}|{val_fraction}|{seed}".encode()).hexdigest()[:8]
        safe = "".join(c if c.isalnum() else "_" for c in f"{corpus}-{tok.name}")[-60:]
        out_dir = DEFAULT_CACHE / f"{safe}-{key}"
    out_dir = Path(out_dir)
    meta = {"corpus": corpus, "sha256": sha, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
            "eos_token_id": tok.eos_token_id, "dtype": np.dtype(_token_dtype(tok.vocab_size)).name,
            "val_fraction": val_fraction, "seed": seed}
    if (out_dir / "meta.json").is_file():
        old = json.loads((out_dir / "meta.json").read_text())
        if all(old.get(k) == v for k, v in meta.items() if k != "corpus"):
            return out_dir
    (out_dir / "meta.json").unlink(missing_ok=True)  # until rewritten below, the folder is not a finished one
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        meta[f"{split}_tokens"] = write_token_file(split_docs, tok, out_dir / f"{split}.bin")
        meta[f"{split}_docs"] = len(split_docs)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    return out_dir


class TokenFile:
    """One split of a prepared corpus, memory-mapped: `.tokens` (N,) array, `.doc_starts` (n_docs,)."""

    def __init__(self, folder, split="train"):
        folder = Path(folder)
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val'; got {split!r}")
        if not (folder / "meta.json").exists():
            raise ValueError(f"{folder} holds no prepared corpus (meta.json missing); run minihalo.data.prepare")
        self.meta = json.loads((folder / "meta.json").read_text())
        self.split = split
        self.tokens = np.memmap(folder / f"{split}.bin", dtype=self.meta["dtype"], mode="r")
        self.doc_starts = np.load(folder / f"{split}_docs.npy")
        self.eos_token_id = self.meta["eos_token_id"]
        self.vocab_size = self.meta["vocab_size"]

    def __len__(self):
        return len(self.tokens)

    def documents(self, min_tokens=0):
        """Yield each document's tokens (without its EOS) that has at least `min_tokens` tokens."""
        ends = list(self.doc_starts[1:]) + [len(self.tokens)]
        for s, e in zip(self.doc_starts, ends):
            if e - 1 - s >= min_tokens:
                yield np.asarray(self.tokens[s:e - 1])


# --------------------------------------------------------------------------------------------
# Packing: the token stream cut into windows of T + 1 tokens, served as batches by step number
# --------------------------------------------------------------------------------------------
class PackedBatches:
    """Fixed-length training sequences packed from one token file, addressed by step number.

    The split's token stream (documents joined by EOS) is cut into non-overlapping windows of
    `seq_len + 1` tokens; each epoch visits the windows in a fresh order drawn from (seed, epoch).
    `batches(step)` returns the (batch_size, seq_len + 1) int64 tensor for that step: inputs are
    `[:, :-1]`, next-token targets `[:, 1:]`. Because a batch is a pure function of the step, a
    training run resumes exactly by remembering only its step (see minihalo.train).
    """

    def __init__(self, tokens, seq_len, batch_size, seed=0):
        tokens = tokens.tokens if isinstance(tokens, TokenFile) else tokens
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, int(seq_len), int(batch_size), seed
        self.num_windows = len(tokens) // (self.seq_len + 1)
        if self.num_windows < self.batch_size:
            raise ValueError(f"only {len(tokens)} tokens: fewer than batch_size={batch_size} windows of "
                             f"seq_len+1={seq_len + 1}; use a larger corpus or smaller seq_len/batch_size")
        self.steps_per_epoch = self.num_windows // self.batch_size

    def window_ids(self, step):
        epoch, i = divmod(int(step), self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return order[i * self.batch_size:(i + 1) * self.batch_size]

    def windows(self, ids) -> torch.Tensor:
        """The windows with indices `ids`, stacked: (len(ids), T+1) int64."""
        W = self.seq_len + 1
        return torch.from_numpy(np.stack([np.asarray(self.tokens[j * W:(j + 1) * W], dtype=np.int64) for j in ids]))

    def __call__(self, step) -> torch.Tensor:
        return self.windows(self.window_ids(step))  # (B, T+1)


class MixedBatches:
    """Each row of a batch comes from one of several sources, chosen with probabilities `weights`.

    `sources` are callables `f(rng, n) -> (n, T+1) int64 tensor` or PackedBatches; the choice of
    rows is drawn from (seed, step), so a batch is again a pure function of the step.
    """

    def __init__(self, sources, weights, batch_size, seed=0):
        if len(sources) != len(weights) or not sources:
            raise ValueError(f"need one weight per source; got {len(sources)} sources, {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum; got {weights}")
        self.sources, self.p, self.batch_size, self.seed = sources, w / w.sum(), batch_size, seed

    def __call__(self, step) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, 1, int(step)])
        counts = rng.multinomial(self.batch_size, self.p)
        parts = []
        for k, (src, n) in enumerate(zip(self.sources, counts)):
            if n == 0:
                continue
            if isinstance(src, PackedBatches):  # n distinct windows drawn from (seed, step, source)
                idx = np.random.default_rng([self.seed, 2, int(step), k]).choice(src.num_windows, n, replace=False)
                parts.append(src.windows(idx))
            else:
                parts.append(src(np.random.default_rng([self.seed, 3, int(step), k]), int(n)))
        batch = torch.cat(parts)  # (B, T+1)
        return batch[torch.from_numpy(rng.permutation(self.batch_size))]


# --------------------------------------------------------------------------------------------
# For a real teacher: long held-out documents, and text the teacher writes itself
# --------------------------------------------------------------------------------------------
def long_heldout_documents(split: TokenFile, length, num_docs, seed=0):
    """(num_docs, length + 1) int64 rows for evaluation far past a teacher's context: each row is whole documents
    of `split` (the validation split: never trained on) joined by their end-of-document tokens, in a seeded random
    order, starting at a document's first token and cut at length + 1. Rows share documents when the split holds
    fewer than num_docs * (length + 1) tokens (each row is then another order of them)."""
    if split.split != "val":
        raise ValueError(f"long held-out documents come from the validation split; got the {split.split!r} split")
    if len(split) < length + 1:
        raise ValueError(f"the validation split has {len(split)} tokens, fewer than length + 1 = {length + 1}")
    ends = list(split.doc_starts[1:]) + [len(split.tokens)]
    docs = [np.asarray(split.tokens[s:e], dtype=np.int64) for s, e in zip(split.doc_starts, ends)]  # with EOS
    rows = []
    for i in range(num_docs):
        order = np.random.default_rng([seed, length, i]).permutation(len(docs))
        row, n = [], 0
        for j in order:
            row.append(docs[j])
            n += len(docs[j])
            if n >= length + 1:
                break
        rows.append(np.concatenate(row)[:length + 1])
    return np.stack(rows)


@torch.no_grad()
def write_generated_corpus(model, source, out_dir, num_docs, prompt_len=32, max_new_tokens=512, batch_size=32,
                           temperature=1.0, top_p=0.95, seed=0, progress=True):
    """Sequence-level distillation data: `model` (the teacher, a minihalo HybridLM) continues the first
    `prompt_len` tokens of `num_docs` training documents of the prepared corpus `source`, sampling (temperature,
    top_p) with minihalo's batched `generate` (a static cache; a CUDA graph per step on a GPU), until its
    end-of-sequence token or `max_new_tokens`. Writes a corpus folder that `prepare` could have written: train.bin
    holds prompt + continuation of each document, val.bin is `source`'s validation split, untouched (held-out
    text stays real text); meta.json records how the text was made and the generation's tokens/s.
    Returns the folder."""
    import shutil
    import time

    from tqdm.auto import tqdm
    src, out_dir = TokenFile(source, "train"), Path(out_dir)
    prompts = [d[:prompt_len] for d in src.documents(min_tokens=prompt_len)][:num_docs]
    if len(prompts) < num_docs:
        raise ValueError(f"{source} has {len(prompts)} training documents of at least {prompt_len} tokens; "
                         f"asked for {num_docs}")
    device = next(model.parameters()).device
    eos = src.eos_token_id
    generator = torch.Generator(device).manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    chunks, starts, n, new_tokens = [], [], 0, 0
    t0 = time.perf_counter()
    for i in tqdm(range(0, num_docs, batch_size), desc="generate", disable=not progress):
        batch = torch.from_numpy(np.stack(prompts[i:i + batch_size]).astype(np.int64)).to(device)  # (B, P)
        out = model.generate(batch, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             eos_token_id=eos, generator=generator).cpu().numpy()  # (B, P + N)
        for row in out:
            new = row[prompt_len:]
            stop = np.flatnonzero(new == eos)
            new = new[:stop[0]] if len(stop) else new
            new_tokens += len(new)
            starts.append(n)
            chunks.append(np.concatenate([row[:prompt_len], new, [eos]]).astype(src.meta["dtype"]))
            n += len(chunks[-1])
    seconds = time.perf_counter() - t0
    np.concatenate(chunks).tofile(out_dir / "train.bin")
    np.save(out_dir / "train_docs.npy", np.asarray(starts, dtype=np.int64))
    for name in ("val.bin", "val_docs.npy"):
        shutil.copyfile(Path(source) / name, out_dir / name)
    meta = dict(src.meta, corpus=f"generated from {src.meta['corpus']}", train_tokens=n, train_docs=len(starts),
                generation={"source": str(source), "prompt_len": prompt_len, "max_new_tokens": max_new_tokens,
                            "temperature": temperature, "top_p": top_p, "seed": seed, "new_tokens": new_tokens,
                            "seconds": seconds, "new_tokens_per_s": new_tokens / seconds, "device": str(device)})
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))  # last: the folder is finished
    return out_dir
