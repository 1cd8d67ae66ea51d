r"""Turn any text corpus into GPT-2 token shards in the modded-nanogpt `.bin` format (train + val).

Inputs (files or folders, searched recursively, in sorted order):
  *.txt    one document per file
  *.jsonl  one document per line, its text in field --text-field (default "text")
  either may be compressed as .gz or .xz.
Every document is GPT-2 encoded (special-token strings are kept as plain text) and preceded by BOS (50256),
as in the FineWeb shards. The first documents (input order, or a deterministic hash order with --shuffle) go
to validation: --val-docs N of them, or whole documents until at least --val-tokens N (+1) tokens. Output:
<out-dir>/<prefix>_val_000000.bin, ... and <prefix>_train_000001.bin, ... of --shard-tokens tokens each.
Train on the result with `python train.py --data-dir <out-dir>`. The work itself is core/data.py
(`write_token_shards`), the same code that builds the embedded default corpus.

    python scripts/data_process/tokenize_corpus.py --input books/ --out-dir data/books --prefix books \
        --val-tokens 262144
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from core.data import (DEFAULT_SHARD_TOKENS, EMBEDDED_VAL_TOKENS, DataError, encode_documents,  # noqa: E402
                       hash_order, iter_documents, list_corpus_files, write_token_shards)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH", help=".txt/.jsonl files or folders")
    parser.add_argument("--out-dir", required=True, type=Path, help="folder for the .bin shards")
    parser.add_argument("--prefix", default="corpus", help="shard name prefix (default: corpus)")
    val = parser.add_mutually_exclusive_group()
    val.add_argument("--val-docs", type=int, help="number of whole documents held out for validation")
    val.add_argument("--val-tokens", type=int,
                     help=f"hold out whole documents until the val split has at least this many tokens + 1 "
                          f"(default {EMBEDDED_VAL_TOKENS})")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,}, as FineWeb)")
    parser.add_argument("--text-field", default="text", help="JSON field holding the text in .jsonl inputs")
    parser.add_argument("--shuffle", action="store_true",
                        help="order documents by the sha256 of their text (deterministic; loads the whole corpus)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.val_docs is None and args.val_tokens is None:
        args.val_tokens = EMBEDDED_VAL_TOKENS
    try:
        texts = iter_documents(list_corpus_files(args.input), text_field=args.text_field)
        if args.shuffle:
            texts = hash_order(texts)
        info = write_token_shards(encode_documents(texts), args.out_dir, args.prefix, val_tokens=args.val_tokens,
                                  val_docs=args.val_docs, shard_tokens=args.shard_tokens,
                                  progress=not args.no_progress)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"train: {len(info['train_files'])} shards, {info['train_docs']:,} documents, {info['train_tokens']:,} "
          f"tokens; val: {len(info['val_files'])} shards, {info['val_docs']:,} documents, {info['val_tokens']:,} "
          f"tokens -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
