"""Synthetic long-context tasks: needle-in-a-haystack (NIAH / passkey) and multi-query associative recall.

NIAH (Kamradt; passkey retrieval, Mohtashami & Jaggi 2023; RULER's NIAH-single, Hsieh et al. 2024):
a *needle* sentence "The special magic number for <key> is <value>." hides at a chosen depth in
*filler* text; the prompt ends with a question whose answer is <value>. Everything is built in
token ids, so the prompt has exactly the requested number of tokens and the needle starts exactly at

    needle_start = round(depth * n_filler),      n_filler = length - len(needle) - len(question)

RULER-style variants (`NIAH_VARIANTS`):
    single_1  filler: one repeated noise paragraph     value: a number (RULER: 7 digits)
    single_2  filler: natural text (the corpus)        value: a number
    single_3  filler: natural text                     value: a UUID (a long key, 36 characters)
    words     filler: natural text                     value: a word
Templates: "ruler" (RULER's wording), "short" (fewer tokens, for byte-level toy models whose
training length is a few hundred bytes) and "passkey" (Mohtashami & Jaggi's pass key, said twice; one
key per prompt).

MQAR (Arora et al. 2023, "Zoology"): a sequence of key-value token pairs, then the keys again in a
random order; at each repeated key the model must predict its value. Accuracy is over the queried
positions only.

Everything is seeded: the same arguments give the same samples on every machine.
Shapes: N samples, T tokens per sample.
"""
from dataclasses import dataclass

import numpy as np
import torch

# Simple, distinct English words (RULER draws keys from an English word list).
WORDS = (
    "apple river candle marble garden silver pencil forest rocket window banana castle dragon "
    "island jacket ladder meadow needle orange parrot quartz saddle tiger violin walnut yellow "
    "anchor bottle cactus desert engine falcon guitar hammer igloo jungle kettle lemon mirror "
    "nickel oyster pepper rabbit salmon tunnel velvet wizard basket cobalt donkey feather goblet "
    "harbor lantern magnet napkin pillow ribbon shadow turnip voyage zipper bridge cherry dolphin "
    "glacier helmet jigsaw lobster muffin nectar planet riddle summit thimble walrus"
).split()

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")

TEMPLATES = {
    "ruler": ("One of the special magic {kind} for {key} is: {value}. ",
              "\nWhat is the special magic {kind} for {key} mentioned in the provided text? "
              "The special magic {kind} for {key} mentioned in the provided text is "),
    "short": (" The magic {kind} for {key} is {value}. ", "\nThe magic {kind} for {key} is "),
    "passkey": (" The pass key is {value}. Remember it. {value} is the pass key. ",  # Mohtashami & Jaggi 2023
                "\nWhat is the pass key? The pass key is "),  # one key: no {key}
}

NIAH_VARIANTS = {  # variant -> (filler, value kind)
    "single_1": ("noise", "number"),
    "single_2": ("text", "number"),
    "single_3": ("text", "uuid"),
    "words": ("text", "word"),
}


@dataclass
class NeedleSample:
    """One NIAH prompt. `input_ids` has exactly the requested length; the needle starts at `needle_start`."""
    input_ids: list
    answer_ids: list
    answer: str
    key: str
    depth: float
    needle_start: int
    needle_len: int
    filler_len: int


def _value(kind, rng, digits):
    if kind == "number":
        return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
    if kind == "word":
        return WORDS[int(rng.integers(len(WORDS)))]
    if kind == "uuid":
        h = "".join("0123456789abcdef"[int(i)] for i in rng.integers(0, 16, 32))
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    raise ValueError(f"unknown value kind {kind!r}; expected 'number', 'word' or 'uuid'")


def _filler_ids(tokenizer, filler, n, rng):
    """n filler token ids: the noise paragraph repeated, or a random window of a token array."""
    if isinstance(filler, str) and filler == "noise":
        unit = tokenizer.encode(NOISE)
        return (unit * (n // len(unit) + 1))[:n]
    if isinstance(filler, str):
        raise ValueError(f"filler must be 'noise' or an array of token ids (natural text); got {filler!r}")
    tokens = filler.tokens if hasattr(filler, "tokens") else filler
    if len(tokens) < n + 1:
        raise ValueError(f"filler text has {len(tokens)} tokens; {n} are needed. Use a larger corpus split")
    start = int(rng.integers(0, len(tokens) - n))
    ids = np.asarray(tokens[start:start + n], dtype=np.int64)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:  # document separators inside the haystack would tell the model "new text"
        ids = np.where(ids == eos, tokenizer.encode(" ")[0], ids)
    return ids.tolist()


def _insert_needles(haystack, needles, cuts):
    """The token list `haystack` with `needles[i]` inserted before `haystack[cuts[i]]` (`cuts` sorted)."""
    row, prev = [], 0
    for cut, needle in zip(cuts, needles):
        row += haystack[prev:cut] + needle
        prev = cut
    return row + haystack[prev:]


def make_niah_sample(tokenizer, length, depth, seed, variant="single_1", filler=None, template="short",
                     digits=7):
    """One NIAH prompt of exactly `length` tokens with the needle at `depth` (0 = start, 1 = end).

    `filler` is needed for the natural-text variants: a token array (e.g. a `TokenFile` of the
    validation split). `seed` may be an int or a tuple of ints.
    """
    if variant not in NIAH_VARIANTS:
        raise ValueError(f"unknown NIAH variant {variant!r}; expected one of {sorted(NIAH_VARIANTS)}")
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {sorted(TEMPLATES)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1]; got {depth}")
    filler_kind, value_kind = NIAH_VARIANTS[variant]
    if filler_kind == "text":
        if filler is None:
            raise ValueError(f"variant {variant!r} needs natural-text filler: pass filler=<token array>")
    else:
        filler = "noise"
    rng = np.random.default_rng(seed)
    key = WORDS[int(rng.integers(len(WORDS)))]
    value = _value(value_kind, rng, digits)
    kind = {"number": "number", "word": "word", "uuid": "uuid"}[value_kind]
    needle_t, question_t = TEMPLATES[template]
    needle = tokenizer.encode(needle_t.format(kind=kind, key=key, value=value))
    question = tokenizer.encode(question_t.format(kind=kind, key=key))
    n_fill = length - len(needle) - len(question)
    if n_fill < 0:
        raise ValueError(f"length={length} is too short for the needle ({len(needle)} tokens) and the "
                         f"question ({len(question)} tokens)")
    hay = _filler_ids(tokenizer, filler, n_fill, rng)
    at = int(round(depth * n_fill))
    ids = hay[:at] + needle + hay[at:] + question
    return NeedleSample(input_ids=ids, answer_ids=tokenizer.encode(value), answer=value, key=key,
                        depth=depth, needle_start=at, needle_len=len(needle), filler_len=n_fill)


def make_niah(tokenizer, length, depth, num_samples, seed=0, **kwargs):
    """`num_samples` NIAH prompts; sample i uses the seed (seed, length, round(1000 * depth), i)."""
    return [make_niah_sample(tokenizer, length, depth, (seed, length, int(round(1000 * depth)), i), **kwargs)
            for i in range(num_samples)]


def exact_match(prediction: str, answer: str) -> bool:
    """True iff the first word of `prediction` (trailing . , ; : stripped) is exactly `answer`."""
    words = prediction.strip().split()
    return bool(words) and words[0].rstrip(".,;:") == answer


def niah_training_rows(tokenizer, seq_len, filler, rng, n, template="short", variant="single_2", digits=7,
                       max_needles=4, min_fraction=0.25):
    """`n` training rows of `seq_len + 1` tokens: a haystack holding 1..`max_needles` needles (distinct keys,
    random depths; fewer if they would leave less than a quarter of the row for haystack), then one question per needle in random order, each followed by its answer; then EOS
    and more filler text.

    The haystack length is drawn uniformly between `min_fraction` of what fits and all of it, so the
    model sees needles at every distance inside its training length. Several questions per row give
    several supervised retrievals per row instead of one. `variant` may be a list: each row picks one
    (long UUID values give many copied tokens per question, which teaches copying fast). Used to mix "retrieval documents" into
    pretraining (a `MixedBatches` source). Returns (n, seq_len + 1) int64.
    """
    variants = [variant] if isinstance(variant, str) else list(variant)
    bad = [v for v in variants if v not in NIAH_VARIANTS]
    if bad:
        raise ValueError(f"unknown NIAH variants {bad}; expected some of {sorted(NIAH_VARIANTS)}")
    needle_t, question_t = TEMPLATES[template]
    rows = []
    for _ in range(n):
        filler_kind, value_kind = NIAH_VARIANTS[variants[int(rng.integers(len(variants)))]]
        source = "noise" if filler_kind == "noise" else filler
        k = int(rng.integers(1, max_needles + 1))
        keys = [WORDS[i] for i in rng.choice(len(WORDS), k, replace=False)]
        values = [_value(value_kind, rng, digits) for _ in keys]
        while True:  # drop needles until at least a quarter of the row is haystack
            needles = [tokenizer.encode(needle_t.format(kind=value_kind, key=a, value=b))
                       for a, b in zip(keys, values)]
            qa = [tokenizer.encode(question_t.format(kind=value_kind, key=keys[i]) + values[i])
                  for i in rng.permutation(len(keys))]
            room = seq_len - sum(map(len, needles)) - sum(map(len, qa)) - 1  # haystack that fits (1: EOS)
            if room >= seq_len // 4 or len(keys) == 1:
                break
            keys, values = keys[:-1], values[:-1]
        if room < 1:
            raise ValueError(f"seq_len={seq_len} is too short for a needle and its question")
        k = len(keys)
        n_fill = int(rng.integers(max(1, int(min_fraction * room)), room + 1))
        hay = _filler_ids(tokenizer, source, n_fill, rng)
        row = _insert_needles(hay, needles, np.sort(rng.integers(0, n_fill + 1, k)))
        row += [t for q in qa for t in q] + [tokenizer.eos_token_id]
        row += _filler_ids(tokenizer, source, seq_len + 1 - len(row), rng) if len(row) < seq_len + 1 else []
        rows.append(row[:seq_len + 1])
    return torch.tensor(rows, dtype=torch.long)  # (n, seq_len + 1)


def copy_rows(rng, n, seq_len, alphabet, min_len=8, max_len=32):
    """`n` rows of `seq_len + 1` tokens, each a random string (length in [min_len, max_len], symbols drawn
    uniformly from the token ids `alphabet`) repeated until the row is full. Returns (n, seq_len + 1) int64.

    From the second repetition on, every token is predictable only by finding the current context earlier
    in the row and copying what followed it: the *induction head* mechanism (Olsson et al. 2022) that
    needle retrieval relies on. Mixed into training, such rows give that mechanism a dense signal, so it
    forms far sooner than from needle rows alone, which supervise a few tokens per row (notes/retrieval.md).
    """
    alphabet = np.asarray(alphabet, dtype=np.int64)
    rows = np.empty((n, seq_len + 1), dtype=np.int64)
    for i in range(n):
        seg = alphabet[rng.integers(0, len(alphabet), int(rng.integers(min_len, max_len + 1)))]
        rows[i] = np.tile(seg, (seq_len + 1) // len(seg) + 1)[:seq_len + 1]
    return torch.from_numpy(rows)


def make_mqar(num_samples, seq_len, num_kv_pairs, vocab_size, seed=0):
    """Multi-query associative recall (Zoology). Returns `inputs` (N, T) and `targets` (N, T).

    Layout of a sample: k_1 v_1 k_2 v_2 ... k_n v_n, then a query region where each key reappears
    once, followed by its value, at random (non-overlapping) positions; the gaps hold token 0.
    Keys are drawn from [1, V/2), values from [V/2, V). `targets[t]` is the token to predict after
    reading `inputs[:, :t+1]`: the value at each queried key, -100 (ignored) elsewhere.
    """
    if seq_len < 4 * num_kv_pairs:
        raise ValueError(f"seq_len={seq_len} must be >= 4 * num_kv_pairs = {4 * num_kv_pairs}")
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise ValueError(f"vocab_size={vocab_size} has too few keys for {num_kv_pairs} distinct pairs")
    rng = np.random.default_rng(seed)
    inputs = np.zeros((num_samples, seq_len), dtype=np.int64)
    targets = np.full((num_samples, seq_len), -100, dtype=np.int64)
    ctx, n_slots = 2 * num_kv_pairs, (seq_len - 2 * num_kv_pairs) // 2
    for i in range(num_samples):
        keys = rng.choice(np.arange(1, vocab_size // 2), num_kv_pairs, replace=False)
        vals = rng.choice(np.arange(vocab_size // 2, vocab_size), num_kv_pairs, replace=True)
        inputs[i, 0:ctx:2], inputs[i, 1:ctx:2] = keys, vals
        slots = np.sort(rng.choice(n_slots, num_kv_pairs, replace=False))  # query slots of 2 tokens
        order = rng.permutation(num_kv_pairs)
        pos = ctx + 2 * slots
        inputs[i, pos], inputs[i, pos + 1] = keys[order], vals[order]
        targets[i, pos] = vals[order]
    return torch.from_numpy(inputs), torch.from_numpy(targets)


class TokenNIAH:
    """A token-level needle-in-a-haystack language, for training tiny models from scratch in seconds.

    Vocabulary (256 ids): 0 unused, 1 NEEDLE marker, 2 QUERY marker, keys [8, 40), values [40, 104),
    haystack [104, 256). The haystack is a fixed random Markov chain (each token has 3 likely
    successors), so it has a next-token loss that a model can learn from local context alone;
    `haystack="uniform"` draws haystack tokens independently and uniformly instead (nothing to learn
    from local context: the haystack's loss is ln 152 whatever the model does). A needle
    is `NEEDLE key v1 v2`; a question is `QUERY key`, answered by `v1 v2`.

    Training rows hold 1..`max_needles` needles with distinct keys at random places and then all the
    questions with their answers (MQAR, Arora et al. 2023, inside a haystack); evaluation prompts hold
    one needle at a requested depth, like NIAH. Answering needs *content* retrieval (find the needle
    with my key, copy what follows it) at any distance, which is what position encodings can break
    beyond the training length.
    """

    NEEDLE, QUERY = 1, 2
    KEYS, VALUES, HAY = (8, 40), (40, 104), (104, 256)
    vocab_size = 256

    def __init__(self, seed=0, value_len=2, max_needles=8, haystack="markov"):
        if haystack not in ("markov", "uniform"):
            raise ValueError(f"haystack must be 'markov' or 'uniform'; got {haystack!r}")
        rng = np.random.default_rng([seed, 77])
        lo, hi = self.HAY
        self.successors = rng.integers(lo, hi, (hi, 3))  # (256, 3): the 3 likely next tokens of each token
        self.value_len, self.max_needles, self.kind = value_len, max_needles, haystack

    def haystack(self, n, rng, rows=None):
        """n haystack tokens: the Markov chain (the next token is one of 3 successors w.p. 0.9, else
        uniform), or independent uniform tokens; `rows=r` gives an (r, n) array, generated for all rows
        at once."""
        lo, hi = self.HAY
        r = 1 if rows is None else rows
        if self.kind == "uniform":
            out = rng.integers(lo, hi, (r, n))
            return out[0] if rows is None else out
        out = np.empty((r, n), dtype=np.int64)
        t = rng.integers(lo, hi, r)
        likely, pick, noise = rng.random((r, n)) < 0.9, rng.integers(0, 3, (r, n)), rng.integers(lo, hi, (r, n))
        for i in range(n):
            t = np.where(likely[:, i], self.successors[t, pick[:, i]], noise[:, i])
            out[:, i] = t
        return out[0] if rows is None else out

    def _pairs(self, k, rng):
        keys = rng.choice(np.arange(*self.KEYS), k, replace=False)
        values = rng.integers(*self.VALUES, (k, self.value_len))
        return keys, values

    def sample(self, length, depth, seed):
        """One NIAH prompt of exactly `length` tokens, needle at `depth`; a `NeedleSample`."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must lie in [0, 1]; got {depth}")
        rng = np.random.default_rng(seed)
        (key,), (value,) = self._pairs(1, rng)
        needle = [self.NEEDLE, int(key)] + value.tolist()
        question = [self.QUERY, int(key)]
        n_fill = length - len(needle) - len(question)
        if n_fill < 0:
            raise ValueError(f"length={length} is shorter than a needle and its question")
        hay = self.haystack(n_fill, rng).tolist()
        at = int(round(depth * n_fill))
        ids = hay[:at] + needle + hay[at:] + question
        return NeedleSample(input_ids=ids, answer_ids=value.tolist(), answer=" ".join(map(str, value.tolist())),
                            key=str(int(key)), depth=depth, needle_start=at, needle_len=len(needle),
                            filler_len=n_fill)

    def make(self, length, depth, num_samples, seed=0):
        return [self.sample(length, depth, (seed, length, int(round(1000 * depth)), i)) for i in range(num_samples)]

    def training_rows(self, rng, n, seq_len):
        """(n, seq_len + 1) rows: haystack with needles, then every question followed by its answer."""
        per = 2 + self.value_len  # tokens per needle; a question + answer has as many
        hay_all = self.haystack(seq_len + 1, rng, rows=n)  # (n, seq_len + 1); each row uses a prefix
        rows = []
        for j in range(n):
            k = int(rng.integers(1, self.max_needles + 1))
            k = min(k, max(1, (seq_len + 1) // (4 * per)))  # keep at least half of the row haystack
            keys, values = self._pairs(k, rng)
            n_fill = seq_len + 1 - 2 * k * per
            hay = hay_all[j, :n_fill].tolist()
            needles = [[self.NEEDLE, int(key)] + val.tolist() for key, val in zip(keys, values)]
            row = _insert_needles(hay, needles, np.sort(rng.integers(0, n_fill + 1, k)))
            for i in rng.permutation(k):
                row += [self.QUERY, int(keys[i])] + values[i].tolist()
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long)  # (n, seq_len + 1)
