"""Prepare a corpus as memory-mapped token files (nanoGPT-style entry point).

    python data/prepare.py                                   # the frozen English snapshot, bytes
    python data/prepare.py --corpus stdlib-english           # the same reader on this Python's own docs
    python data/prepare.py --corpus english+code             # plus the standard library's source code
    python data/prepare.py --corpus path/to/texts/           # your own .txt / .md files
    python data/prepare.py --corpus hf:HuggingFaceFW/fineweb-edu --tokenizer path/to/qwen3 --max-docs 200000

Writes data/cache/<corpus>-<tokenizer>-<hash>/{train,val}.bin, {train,val}_docs.npy and meta.json
(git-ignored) and prints the folder. The code lives in minihalo/data.py.
"""
import argparse
import json

from minihalo.data import hf_corpus, load_corpus, prepare

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="english", help="english (the snapshot) | stdlib-english | code | english+code | hf:<dataset> | a path")
    ap.add_argument("--tokenizer", default="byte", help="'byte' or a transformers tokenizer (folder or hub name)")
    ap.add_argument("--out", default=None, help="output folder (default: data/cache/...)")
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-docs", type=int, default=100_000, help="documents to stream from a hf: dataset")
    args = ap.parse_args()
    docs = hf_corpus(args.corpus[3:], max_docs=args.max_docs) if args.corpus.startswith("hf:") else None
    folder = prepare(args.corpus, args.tokenizer, args.out, args.val_fraction, args.seed, docs=docs)
    print(folder)
    print(json.dumps(json.loads((folder / "meta.json").read_text()), indent=1))
