"""GPT-2 tokenizer, offline: owns building the `tiktoken` GPT-2 encoding from the BPE ranks shipped in the repo.

The FineWeb shards of modded-nanogpt are GPT-2 tokens (vocab 50257, `<|endoftext|>` = 50256 used as BOS), so
any text we turn into shards must use exactly that encoding. `tiktoken.get_encoding("gpt2")` downloads its
ranks on first use; the same ranks (OpenAI's `r50k_base.tiktoken`, MIT licence, taken from the
`openai-whisper==20250625` sdist, see data/embedded/README.md) ship in `data/embedded/` so that building the
default corpus never needs the network. The file is checked against its published sha256 before use.

    from core.tokenizer import get_gpt2_encoding
    get_gpt2_encoding().encode_ordinary("Hello world")  # [15496, 995]
"""
from __future__ import annotations

import base64
import functools
import hashlib
from pathlib import Path

import tiktoken

REPO_ROOT = Path(__file__).resolve().parent.parent
RANKS_PATH = REPO_ROOT / "data" / "embedded" / "r50k_base.tiktoken"
# The hash tiktoken itself expects for r50k_base (tiktoken_ext/openai_public.py, `r50k_base()`).
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2 pre-tokenisation regex, as in tiktoken_ext/openai_public.py (`r50k_pat_str`, tiktoken 0.14): the
# faster possessive form of the original GPT-2 pattern
# 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"
EOT_ID = 50256
N_VOCAB = 50257


class TokenizerError(RuntimeError):
    """The GPT-2 encoding could not be built; the message says how to get it."""


def load_ranks(path: Path = RANKS_PATH) -> dict[bytes, int]:
    """Read a `.tiktoken` ranks file (one `base64(token_bytes) rank` per line) after checking its sha256."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise TokenizerError(
            f"{path}: sha256 is {digest}, expected {RANKS_SHA256} (the GPT-2 r50k_base ranks). The file is "
            "corrupt or not the GPT-2 ranks: restore it with `git checkout -- data/embedded/r50k_base.tiktoken`."
        )
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=1)
def get_gpt2_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding (vocab 50257, `<|endoftext|>` = 50256), built from the shipped ranks without network.

    Falls back to `tiktoken.get_encoding("gpt2")` (which downloads and caches the ranks) when the shipped file
    is absent. A shipped file with the wrong hash is an error, not a reason to fall back.
    """
    if RANKS_PATH.exists():
        enc = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=load_ranks(RANKS_PATH),
            special_tokens={ENDOFTEXT: EOT_ID},
            explicit_n_vocab=N_VOCAB,
        )
        return enc
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:  # tiktoken raises network errors of several kinds
        raise TokenizerError(
            f"The GPT-2 ranks file {RANKS_PATH} is missing and tiktoken could not download the 'gpt2' encoding "
            f"({type(exc).__name__}: {exc}). Restore the file with `git checkout -- data/embedded/r50k_base.tiktoken`"
            " or run once with network access so tiktoken can cache the encoding."
        ) from exc
