"""What a model must beat before its loss says anything about muP: n-gram references of a run's data.

    python -m core.baselines --data embedded-bytes --val-tokens 32768      # prints both references

* **unigram entropy** (`core.data.unigram_entropy`): the loss of the best context-free model, fitted on
  the validation tokens themselves.
* **bigram cross-entropy**: a bigram model fitted on the training tokens (the first TRAIN_CAP of them) and
  scored on the validation tokens, the one-token-of-context model a network must beat to have learned any
  structure beyond pairs. Unseen pairs get mass from the unigram through a Dirichlet prior,
  p(b | a) = (c(a, b) + beta p(b)) / (c(a) + beta), with beta chosen on a held-out tenth of the training
  tokens, then refitted on all of them (so the reference is a fair, tuned bigram, not a strawman).

The transfer verdict (core/transfer.py) uses the bigram as its "learned" gate: a width whose best loss is
not below it has not learned enough for its optimum to say anything about transfer (Tensor Programs V,
sec. 6.1: transfer needs a minimum scale). `core.sweep collect` computes both once per distinct data
setting of a sweep's runs and writes them to sweep.csv (`unigram_entropy`, `bigram_xent`).
"""
from __future__ import annotations

import argparse
import math

import numpy as np

from core.data import read_shard, resolve_data, unigram_entropy, valid_val_tokens

TRAIN_CAP = 20_000_000  # training tokens the bigram is fitted on (FineWeb has 10^9; 2x10^7 is plenty for pairs)
BETAS = (0.25, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0)  # prior strengths tried on the held-out tenth


def _pair_counts(tokens: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted pair codes a * vocab + b, their counts) of consecutive tokens."""
    codes = tokens[:-1].astype(np.int64) * vocab + tokens[1:].astype(np.int64)
    return np.unique(codes, return_counts=True)


def _score(fit: np.ndarray, score: np.ndarray, vocab: int, beta: float) -> float:
    """Mean -log p(b | a) over the pairs of `score`, with the bigram fitted on `fit`."""
    unigram = (np.bincount(fit, minlength=vocab) + 1.0) / (fit.size + vocab)  # add-one: every token possible
    context = np.bincount(fit[:-1], minlength=vocab).astype(float)
    codes, counts = _pair_counts(fit, vocab)
    a, b = score[:-1].astype(np.int64), score[1:].astype(np.int64)
    wanted = a * vocab + b
    at = np.clip(np.searchsorted(codes, wanted), 0, codes.size - 1)
    pair = np.where(codes[at] == wanted, counts[at], 0)
    p = (pair + beta * unigram[b]) / (context[a] + beta)
    return float(-np.log(p).mean())


def bigram_cross_entropy(train: np.ndarray, val: np.ndarray, vocab: int) -> tuple[float, float]:
    """(cross-entropy in nats of `val` under a bigram fitted on `train`, the prior strength beta it chose)."""
    train = np.asarray(train).ravel()[:TRAIN_CAP].astype(np.int64)
    val = np.asarray(val).ravel().astype(np.int64)
    if train.size < 20 or val.size < 2:
        raise ValueError("bigram_cross_entropy needs at least 20 training and 2 validation tokens")
    cut = train.size * 9 // 10
    beta = min(BETAS, key=lambda b: _score(train[:cut], train[cut:], vocab, b))
    return _score(train, val, vocab, beta), beta


def references(data: str | None, data_dir: str | None, val_tokens: int | None, val_seq_len: int) -> dict:
    """{unigram_entropy, bigram_xent, bigram_beta, train_tokens, val_tokens} of the data a run trained on, with
    its validation set as the run read it (the first val_tokens + 1 tokens, val_tokens cut to val_seq_len)."""
    source = resolve_data(data_dir, data=data)
    n_val = valid_val_tokens(val_tokens or source.val_tokens, val_seq_len)
    val = _first_tokens(source.val_files, n_val + 1, source.vocab.size)
    train = _first_tokens(source.train_files, TRAIN_CAP, source.vocab.size)
    xent, beta = bigram_cross_entropy(train, val, source.vocab.size)
    return {"unigram_entropy": unigram_entropy(val[:-1]), "bigram_xent": xent, "bigram_beta": beta,
            "train_tokens": int(train.size), "val_tokens": int(n_val)}


def _first_tokens(files, limit: int, vocab: int) -> np.ndarray:
    parts, have = [], 0
    for path in files:
        if have >= limit:
            break
        shard = read_shard(path, vocab)
        parts.append(shard[:limit - have])
        have += parts[-1].size
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.baselines", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="embedded | embedded-bytes (as train.py --data)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--val-tokens", type=int, default=None)
    p.add_argument("--val-seq-len", type=int, default=1024)
    a = p.parse_args(argv)
    ref = references(a.data, a.data_dir, a.val_tokens, a.val_seq_len)
    print(f"validation tokens {ref['val_tokens']:,}, bigram fitted on {ref['train_tokens']:,} training tokens "
          f"(prior strength {ref['bigram_beta']:g})")
    for name, key in (("unigram entropy", "unigram_entropy"), ("bigram cross-entropy", "bigram_xent")):
        print(f"{name:<22} {ref[key]:.4f} nats ({ref[key] / math.log(2):.4f} bits) per token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
