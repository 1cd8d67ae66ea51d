"""Data layer: owns the token shard format, finding/validating/building the data, and the batch loaders.

Shard format (modded-nanogpt's FineWeb `.bin`): a header of 256 little-endian int32 (magic 20240520, version 1,
token count, zeros), then `count` little-endian uint16 tokens. Every document starts with BOS.

Vocabularies: every data source declares its `Vocab` (size and BOS id) and the model and loader follow it.
GPT-2 tokens (50257, BOS 50256) are the default: FineWeb and the `embedded` corpus. The `embedded-bytes`
corpus is the same embedded text as UTF-8 bytes (256 byte ids plus BOS 256): the CPU muP lab's proxy,
where a small model learns far more per FLOP than with a 50K readout. A shard folder declares a
non-GPT-2 vocabulary in a `vocab.json` beside its shards.

Sections:
  shards      `write_shard`, `read_header`, `read_shard`, `DataError`
  building    text documents -> BOS-prefixed tokens -> train/val shards (shared with
              scripts/data_process/tokenize_corpus.py: there is one implementation of "documents -> shards")
  sources     `resolve_data`: FineWeb shards if present, else the embedded public-domain corpus
              (data/embedded/corpus.jsonl.xz, built once into `data/cache/`); `--data embedded-bytes`
              picks its byte-level build
  loading     `BatchLoader` (BOS-aligned distributed training batches, resumable), `val_batches`
  baseline    `unigram_entropy`

Typical use in a trainer (rank r of W processes, A = grad accumulation steps):

    src = resolve_data(cfg.data_dir)                 # validates every shard before training starts
    loader = BatchLoader(src.train_files, seq_len, micro_batches_per_step=W * A, rank=r, world_size=W, device=dev)
    for inputs, targets in loader.next_step(): ...   # A sequences of seq_len tokens for this rank
    val = val_batches(src.val_files, val_seq_len, src.val_tokens, rank=r, world_size=W, device=dev)
"""
from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

try:
    import fcntl  # POSIX only: the cache lock is a no-op without it
except ImportError:
    fcntl = None

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
BOS_ID = 50256  # GPT-2 <|endoftext|>, placed before every document as in the FineWeb shards
GPT2_VOCAB_SIZE = 50257


@dataclass(frozen=True)
class Vocab:
    """What a data source's token ids mean, as far as training needs: how many, and which one starts a document."""
    name: str
    size: int
    bos_id: int


GPT2_VOCAB = Vocab("gpt2", GPT2_VOCAB_SIZE, BOS_ID)
BYTE_VOCAB = Vocab("bytes", 257, 256)  # UTF-8 bytes 0..255, then BOS
VOCABS = {v.name: v for v in (GPT2_VOCAB, BYTE_VOCAB)}
VOCAB_FILE = "vocab.json"  # beside a folder's shards: {"name": ..., "size": ..., "bos_id": ...}; absent = GPT-2
# Built-in corpora selectable with --data (a shard folder is --data-dir instead).
BUILTIN_CORPORA = ("embedded", "embedded-bytes")
# Fixed FineWeb validation size of the reference record, "important to keep this fixed for consistent
# comparisons" (modded-nanogpt records/track_1_short/2025-07-12_BosAlign, Hyperparameters.val_tokens).
FINEWEB_VAL_TOKENS = 10_485_760
# The embedded corpus is ~2.7M tokens: hold out whole documents worth 2**18 tokens for validation.
EMBEDDED_VAL_TOKENS = 2**18
# ... and ~10.5M bytes: hold out 2**19 bytes (runs use the first --val-tokens of them).
EMBEDDED_BYTES_VAL_TOKENS = 2**19
# Custom corpora (tokenize_corpus.py output) get the largest multiple of this that their val shards hold,
# so that common (seq_len * world_size) values divide it.
CUSTOM_VAL_MULTIPLE = 2**16
DEFAULT_SHARD_TOKENS = 100_000_000  # the FineWeb shards hold 10**8 tokens each

REPO_ROOT = Path(__file__).resolve().parent.parent
FINEWEB_DIR = REPO_ROOT / "data" / "fineweb10B"
EMBEDDED_CORPUS = REPO_ROOT / "data" / "embedded" / "corpus.jsonl.xz"
# Bump when the embedded build changes (split, order, format) so stale caches are not reused.
EMBEDDED_BUILD_VERSION = 1
DOWNLOAD_HINT = "bash scripts/data_process/download_hf_data.sh"


class DataError(ValueError):
    """Bad or missing data. Every message names the file(s) and says what to do."""


# -----------------------------------------------------------------------------
# shards

def write_shard(path: str | Path, tokens) -> Path:
    """Write `tokens` (1-D ints: numpy, torch or list) as one shard, atomically (temp file + rename)."""
    path = Path(path)
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: tokens must be a non-empty 1-D integer array, got shape {arr.shape} "
                        f"dtype {arr.dtype}")
    if int(arr.min()) < 0 or int(arr.max()) > np.iinfo(np.uint16).max:
        raise DataError(f"{path}: token ids must fit in uint16 (0..65535), got range "
                        f"[{int(arr.min())}, {int(arr.max())}]; this format only holds GPT-2-sized vocabularies")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, arr.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"  # open(..., "xb") keeps the umask permissions
    try:
        with open(tmp, "xb") as f:
            f.write(header.tobytes())
            f.write(arr.astype("<u2", copy=False).tobytes())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_header(path: str | Path) -> int:
    """Check a shard's header and size against each other (cheap: reads 1 KiB); return its token count."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such shard file. Check the path, or re-download/re-tokenize the data.")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: empty file (0 bytes), probably an interrupted download. Delete it and "
                        f"download again (`{DOWNLOAD_HINT}`) or re-run tokenize_corpus.py.")
    if size < HEADER_BYTES:
        raise DataError(f"{path}: truncated: {size} bytes is shorter than the {HEADER_BYTES}-byte header. "
                        "Delete it and download/tokenize it again.")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != MAGIC:
        raise DataError(f"{path}: wrong magic number {int(header[0])} (expected {MAGIC}): not a modded-nanogpt "
                        "token shard. Use the FineWeb GPT-2 shards or make shards with "
                        "scripts/data_process/tokenize_corpus.py.")
    if int(header[1]) != VERSION:
        raise DataError(f"{path}: unsupported shard version {int(header[1])} (expected {VERSION}). Re-create the "
                        "shard with scripts/data_process/tokenize_corpus.py or download the v1 FineWeb shards.")
    n_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * n_tokens
    if n_tokens <= 0:
        raise DataError(f"{path}: header says the shard holds {n_tokens} tokens; a shard needs at least one. "
                        "Delete it and re-create it.")
    if size < expected:
        raise DataError(f"{path}: truncated: header says {n_tokens:,} tokens ({expected:,} bytes) but the file "
                        f"has {size:,} bytes. Delete it and download/tokenize it again.")
    if size > expected:
        raise DataError(f"{path}: {size - expected:,} unexpected bytes after the {n_tokens:,} tokens the header "
                        "announces: the file is corrupt. Delete it and download/tokenize it again.")
    return n_tokens


def read_shard(path: str | Path, vocab_size: int = GPT2_VOCAB_SIZE, check_tokens: bool = True) -> np.ndarray:
    """Memory-map a shard's tokens (uint16, read-only) after validating header, size and (by default) token ids."""
    path = Path(path)
    n_tokens = read_header(path)
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n_tokens,))
    if check_tokens:
        top = int(tokens.max())
        if top >= vocab_size:
            where = int(np.flatnonzero(tokens >= vocab_size)[0])
            raise DataError(f"{path}: token id {int(tokens[where])} at position {where:,} is outside the "
                            f"vocabulary (size {vocab_size}); max id in the file is {top}. The shard was made "
                            "with another tokenizer or is corrupt: re-create it with the GPT-2 encoding.")
    return tokens


# -----------------------------------------------------------------------------
# building: documents -> BOS-prefixed tokens -> shards

def _open_text(path: Path):
    """Open .txt/.jsonl files, optionally compressed (.gz, .xz), as UTF-8 text."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _corpus_kind(path: Path) -> str | None:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".xz")]
    return {".txt": "txt", ".jsonl": "jsonl"}.get(suffixes[-1] if suffixes else "")


def list_corpus_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (recursively, sorted) to the .txt/.jsonl files (optionally .gz/.xz) in them."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and _corpus_kind(p))
            if not found:
                raise DataError(f"{item}: folder holds no .txt or .jsonl files (optionally .gz/.xz compressed).")
            files += found
        elif item.is_file():
            if not _corpus_kind(item):
                raise DataError(f"{item}: unsupported input; give .txt (one document per file) or .jsonl "
                                "(one JSON object per line), optionally compressed as .gz or .xz.")
            files.append(item)
        else:
            raise DataError(f"{item}: no such file or folder.")
    return files


def iter_documents(files: Sequence[str | Path], text_field: str = "text") -> Iterator[str]:
    """Yield document texts: a `.txt` file is one document; each `.jsonl` line is one (its `text_field`)."""
    for path in map(Path, files):
        kind = _corpus_kind(path)
        with _open_text(path) as f:
            if kind == "txt":
                yield f.read()
                continue
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({exc}); .jsonl needs one object per line.")
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise DataError(f"{path}:{lineno}: no string field {text_field!r}; pass the right field "
                                    "name with --text-field.")
                yield record[text_field]


def encode_documents(texts: Iterable[str], encoding=None) -> Iterator[np.ndarray]:
    """GPT-2-encode each text (special-token strings are treated as plain text) and prefix BOS; yields uint16."""
    if encoding is None:
        from core.tokenizer import get_gpt2_encoding  # lazy: tiktoken is only needed when building shards
        encoding = get_gpt2_encoding()
    for text in texts:
        ids = encoding.encode_ordinary(text)
        doc = np.empty(len(ids) + 1, dtype=np.uint16)
        doc[0] = BOS_ID
        doc[1:] = ids
        yield doc


def encode_documents_as_bytes(texts: Iterable[str]) -> Iterator[np.ndarray]:
    """Each text as its UTF-8 bytes (ids 0..255), prefixed with BYTE_VOCAB's BOS (256); yields uint16."""
    for text in texts:
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        doc = np.empty(raw.size + 1, dtype=np.uint16)
        doc[0] = BYTE_VOCAB.bos_id
        doc[1:] = raw
        yield doc


def hash_order(texts: Iterable[str]) -> list[str]:
    """Deterministic shuffle: sort documents by the sha256 of their text (independent of any RNG or library)."""
    return sorted(texts, key=lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest())


class _ShardWriter:
    """Accumulates tokens and writes `<prefix>_<split>_<index:06d>.bin` shards of exactly `shard_tokens`."""

    def __init__(self, out_dir: Path, prefix: str, split: str, first_index: int, shard_tokens: int):
        self.out_dir, self.prefix, self.split = out_dir, prefix, split
        self.index, self.shard_tokens = first_index, shard_tokens
        self.buf: list[np.ndarray] = []
        self.n_buf = 0
        self.files: list[Path] = []
        self.total = 0

    def add(self, tokens: np.ndarray) -> None:
        # Like FineWeb, a document may be cut across two shards; the loader starts at the first BOS of a shard.
        while tokens.size:
            take = min(tokens.size, self.shard_tokens - self.n_buf)
            self.buf.append(tokens[:take])
            self.n_buf += take
            self.total += take
            tokens = tokens[take:]
            if self.n_buf == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.n_buf:
            path = self.out_dir / f"{self.prefix}_{self.split}_{self.index:06d}.bin"
            self.files.append(write_shard(path, np.concatenate(self.buf)))
            self.index += 1
            self.buf, self.n_buf = [], 0


def write_token_shards(docs: Iterable[np.ndarray], out_dir: str | Path, prefix: str, *, val_tokens: int | None = None,
                       val_docs: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                       progress: bool = False) -> dict:
    """Write BOS-prefixed token documents as val then train shards; return files and counts.

    The first documents go to validation: `val_docs` of them, or whole documents until the val split holds at
    least `val_tokens + 1` tokens (the +1 is the target of the last val position), so val never shares a
    document with train. Val shards are numbered from 000000, train shards from 000001 (the FineWeb naming).
    """
    if (val_tokens is None) == (val_docs is None):
        raise DataError("give exactly one of val_tokens / val_docs (--val-tokens / --val-docs)")
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    val = _ShardWriter(out_dir, prefix, "val", 0, shard_tokens)
    train = _ShardWriter(out_dir, prefix, "train", 1, shard_tokens)
    n_val_docs = n_train_docs = 0
    bar = None
    if progress:
        from tqdm import tqdm  # here, not at the top: only a progress bar needs it
        bar = tqdm(unit="tok", unit_scale=True, desc=f"tokenizing -> {out_dir}")
    for doc in docs:
        in_val = n_val_docs < val_docs if val_docs is not None else val.total < val_tokens + 1
        if in_val:
            val.add(doc)
            n_val_docs += 1
        else:
            train.add(doc)
            n_train_docs += 1
        if bar is not None:
            bar.update(doc.size)
    if bar is not None:
        bar.close()
    val.flush()
    train.flush()
    if val_docs is not None:
        short, wanted = n_val_docs < val_docs, f"{val_docs} documents"
    else:
        short, wanted = val.total < val_tokens + 1, f"{val_tokens + 1:,} tokens"
    if short or n_val_docs == 0:
        raise DataError(f"{out_dir}: the corpus ran out while filling validation ({n_val_docs} documents, "
                        f"{val.total:,} tokens of the {wanted} asked for); use a smaller --val-tokens/--val-docs.")
    if not train.files:
        raise DataError(f"{out_dir}: no documents left for training after the {n_val_docs} validation documents; "
                        "use a smaller --val-tokens/--val-docs or a larger corpus.")
    return dict(train_files=train.files, val_files=val.files, train_tokens=train.total, val_tokens=val.total,
                train_docs=n_train_docs, val_docs=n_val_docs)


# -----------------------------------------------------------------------------
# sources: FineWeb, a custom shard folder, or the embedded corpus

@dataclass
class DataSource:
    train_files: list[Path]  # training shards, in reading order
    val_files: list[Path]  # validation shards; the first `val_tokens` tokens are the val set
    name: str  # "fineweb", "embedded", "embedded-bytes" or the shard prefix of a custom corpus
    is_embedded: bool  # True for the small shipped corpus (a smoke-test / CPU dataset, not a benchmark)
    val_tokens: int  # fixed validation size, so runs on the same data compare
    vocab: Vocab = GPT2_VOCAB  # what the token ids mean; the model's vocabulary and the loader's BOS follow it

    def summary(self) -> str:
        """One line for the run log: name, shard counts and token counts (header reads only)."""
        n_train = sum(read_header(p) for p in self.train_files)
        return (f"data: {self.name} ({'embedded corpus' if self.is_embedded else self.train_files[0].parent}) "
                f"train {len(self.train_files)} shards {n_train:,} tokens, val {len(self.val_files)} shards "
                f"using {self.val_tokens:,} tokens")


def _find_shards(folder: Path) -> tuple[str, list[Path], list[Path]] | None:
    """The (prefix, train, val) shard sets in `folder`, preferring `fineweb`; None if it has no train shards."""
    train = sorted(folder.glob("*_train_*.bin"))
    if not train:
        return None
    prefixes = sorted({p.name.rsplit("_train_", 1)[0] for p in train})
    if "fineweb" in prefixes:
        prefix = "fineweb"
    elif len(prefixes) == 1:
        prefix = prefixes[0]
    else:
        raise DataError(f"{folder}: holds train shards of several corpora ({', '.join(prefixes)}); "
                        "keep one corpus per folder.")
    train = sorted(folder.glob(f"{prefix}_train_*.bin"))
    val = sorted(folder.glob(f"{prefix}_val_*.bin"))
    if not val:
        raise DataError(f"{folder}: has {prefix}_train_*.bin shards but no {prefix}_val_*.bin. Download the val "
                        f"shard too (`{DOWNLOAD_HINT}`) or re-run tokenize_corpus.py.")
    return prefix, train, val


def read_vocab(folder: Path) -> Vocab:
    """The vocabulary a shard folder declares in vocab.json; GPT-2 when it declares none (FineWeb, tokenize_corpus.py)."""
    path = folder / VOCAB_FILE
    if not path.is_file():
        return GPT2_VOCAB
    try:
        raw = json.loads(path.read_text())
        vocab = Vocab(str(raw["name"]), int(raw["size"]), int(raw["bos_id"]))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a vocabulary declaration ({e}); it must be a JSON object with name, size and "
                        f"bos_id, e.g. {json.dumps(vars(BYTE_VOCAB))}. Fix or delete it.") from None
    if not 0 <= vocab.bos_id < vocab.size:
        raise DataError(f"{path}: bos_id {vocab.bos_id} is outside the vocabulary of size {vocab.size}.")
    return vocab


def write_vocab(folder: Path, vocab: Vocab) -> Path:
    path = folder / VOCAB_FILE
    path.write_text(json.dumps(vars(vocab)) + "\n")
    return path


def validate_shards(train_files: Sequence[Path], val_files: Sequence[Path], vocab_size: int = GPT2_VOCAB_SIZE) -> None:
    """Fail before training on bad data: every header, plus full token checks of all val and the first train shard."""
    for path in list(train_files) + list(val_files):
        read_header(path)
    for path in list(val_files) + list(train_files[:1]):
        read_shard(path, vocab_size)


def _source_from_shards(prefix: str, train: list[Path], val: list[Path], is_embedded: bool,
                        val_tokens: int | None = None) -> DataSource:
    vocab = read_vocab(train[0].parent)
    validate_shards(train, val, vocab.size)
    available = sum(read_header(p) for p in val)
    if val_tokens is None:
        if prefix == "fineweb":
            val_tokens = FINEWEB_VAL_TOKENS
        else:
            val_tokens = min(FINEWEB_VAL_TOKENS, (available - 1) // CUSTOM_VAL_MULTIPLE * CUSTOM_VAL_MULTIPLE)
            if val_tokens <= 0:
                raise DataError(f"{', '.join(map(str, val))}: val shards hold {available:,} tokens; a custom corpus "
                                f"needs at least {CUSTOM_VAL_MULTIPLE + 1:,}. Re-run tokenize_corpus.py with "
                                f"--val-tokens {CUSTOM_VAL_MULTIPLE} or more.")
    if available < val_tokens + 1:
        raise DataError(f"{', '.join(map(str, val))}: val shards hold {available:,} tokens but the fixed val set "
                        f"needs {val_tokens + 1:,} ({val_tokens:,} + 1 target). Re-download the val shard "
                        f"(`{DOWNLOAD_HINT}`) or re-create the shards with a larger --val-tokens.")
    return DataSource(train_files=list(train), val_files=list(val), name=prefix, is_embedded=is_embedded,
                      val_tokens=val_tokens, vocab=vocab)


def build_embedded(cache_dir: str | Path, corpus: Path = EMBEDDED_CORPUS,
                   vocab: Vocab = GPT2_VOCAB) -> tuple[list[Path], list[Path]]:
    """Tokenize the shipped corpus into `cache_dir/embedded[-bytes]-v<version>-<hash>/` once; later calls reuse it.

    `vocab` GPT2_VOCAB: GPT-2 BPE tokens (val: the first documents holding >= 2**18 + 1 tokens); BYTE_VOCAB: UTF-8
    bytes (val >= 2**19 + 1 bytes), with a vocab.json declaring it. Deterministic: documents are ordered by the
    sha256 of their text, the first ones become val, the rest train. The folder name carries a hash of the corpus file and the build version, so a
    changed corpus is rebuilt. The build goes to a temporary folder renamed into place, under a file lock, so
    concurrent ranks (torchrun) neither see half-written shards nor build twice.
    """
    if not corpus.is_file():
        raise DataError(f"{corpus}: the embedded corpus is missing. Restore it with `git checkout -- {corpus}` "
                        f"or download FineWeb (`{DOWNLOAD_HINT}`) and pass --data-dir data/fineweb10B.")
    if vocab not in (GPT2_VOCAB, BYTE_VOCAB):
        raise DataError(f"the embedded corpus is built as GPT-2 tokens or bytes, not {vocab}")
    digest = hashlib.sha256(corpus.read_bytes()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    as_bytes = vocab == BYTE_VOCAB
    prefix = "embedded-bytes" if as_bytes else "embedded"
    target = cache_dir / f"{prefix}-v{EMBEDDED_BUILD_VERSION}-{digest}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / ".embedded.lock"):
        if not (target / "DONE").is_file():
            tmp = cache_dir / f".embedded-build-{uuid.uuid4().hex}"
            tmp.mkdir()
            texts = hash_order(iter_documents([corpus]))
            if as_bytes:
                write_token_shards(encode_documents_as_bytes(texts), tmp, prefix, val_tokens=EMBEDDED_BYTES_VAL_TOKENS)
                write_vocab(tmp, BYTE_VOCAB)
            else:
                write_token_shards(encode_documents(texts), tmp, prefix, val_tokens=EMBEDDED_VAL_TOKENS)
            (tmp / "DONE").write_text(f"built from {corpus.name} sha256[:16]={digest}\n")
            if target.exists():  # a stale, incomplete build (no DONE marker): replace it
                shutil.rmtree(target)
            os.rename(tmp, target)
    found = _find_shards(target)
    if found is None:
        raise DataError(f"{target}: embedded cache has no shards; delete the folder and run again.")
    return found[1], found[2]


class _file_lock:
    """Exclusive advisory lock on a file (POSIX flock); a no-op where fcntl is unavailable (atomic rename suffices)."""

    def __init__(self, path: Path):
        self.path = path
        self.f = None

    def __enter__(self):
        if fcntl is None:
            return self
        self.f = open(self.path, "a")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.f is not None:
            fcntl.flock(self.f, fcntl.LOCK_UN)
            self.f.close()


def declared_vocab(data: str | None, data_dir: str | None) -> Vocab:
    """The vocabulary the data will have, without building or reading any shard (so a checkpoint can be checked
    against it first): a built-in corpus's, a folder's vocab.json, else GPT-2 (FineWeb and the embedded corpus)."""
    if data == "embedded-bytes":
        return BYTE_VOCAB
    if data_dir is not None and Path(data_dir).is_dir():
        return read_vocab(Path(data_dir))
    return GPT2_VOCAB


def resolve_data(data_dir: str | None, cache_dir: str = "data/cache", data: str | None = None) -> DataSource:
    """Find, validate and return the training data.

    `data_dir` given: its shards (`fineweb_*` preferred, else one `<prefix>_train_*`/`<prefix>_val_*` set made by
    tokenize_corpus.py) or a DataError saying how to get them. `data` given: that built-in corpus (`embedded`:
    GPT-2 tokens, `embedded-bytes`: UTF-8 bytes). Neither: `data/fineweb10B` if it holds shards, else the
    embedded corpus, built once into `cache_dir` (relative paths are taken from the repo root).
    """
    if data is not None and data_dir is not None:
        raise DataError(f"--data {data} and --data-dir {data_dir} both name the training data: give one (--data names "
                        f"a built-in corpus: {', '.join(BUILTIN_CORPORA)}; --data-dir a folder of shards)")
    if data is not None and data not in BUILTIN_CORPORA:
        raise DataError(f"--data {data!r} is not a built-in corpus; choose one of {', '.join(BUILTIN_CORPORA)}, or "
                        "pass a folder of shards with --data-dir")
    if data_dir is not None:
        folder = Path(data_dir)
        hint = (f"Download FineWeb with `{DOWNLOAD_HINT}` (puts shards in data/fineweb10B), make shards from text "
                "with scripts/data_process/tokenize_corpus.py, or omit --data-dir to train on the embedded corpus.")
        if not folder.is_dir():
            raise DataError(f"{folder}: data folder does not exist. {hint}")
        found = _find_shards(folder)
        if found is None:
            raise DataError(f"{folder}: no *_train_*.bin shards in this folder. {hint}")
        return _source_from_shards(*found, is_embedded=False)
    if data is None and FINEWEB_DIR.is_dir():
        found = _find_shards(FINEWEB_DIR)
        if found is not None:
            return _source_from_shards(*found, is_embedded=False)
    cache = Path(cache_dir)
    if not cache.is_absolute():
        cache = REPO_ROOT / cache
    if data == "embedded-bytes":
        train, val = build_embedded(cache, vocab=BYTE_VOCAB)
        return _source_from_shards("embedded-bytes", train, val, is_embedded=True, val_tokens=EMBEDDED_BYTES_VAL_TOKENS)
    train, val = build_embedded(cache)
    return _source_from_shards("embedded", train, val, is_embedded=True, val_tokens=EMBEDDED_VAL_TOKENS)


# -----------------------------------------------------------------------------
# loading

def _to_device(buf: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs int32 (T,), targets int64 (T,)) from T+1 tokens; async H2D copy from pinned memory on CUDA."""
    host = torch.from_numpy(buf.astype(np.int32))  # (T+1,), a fresh host copy (never a view of the memmap)
    if device.type == "cuda":
        # The caching host allocator keeps a pinned block alive until the copy that reads it has finished.
        dev = host.pin_memory().to(device, non_blocking=True)
    else:
        dev = host.to(device, non_blocking=True)
    return dev[:-1], dev[1:].to(torch.int64)


class BatchLoader:
    """BOS-aligned, distributed, resumable training batches (after modded-nanogpt's `distributed_data_generator`
    and `find_batch_starts`, records/track_1_short/2025-07-12_BosAlign; written anew).

    One optimizer step consumes `micro_batches_per_step` (= world_size * grad_accum) sequences of `seq_len`
    input tokens (+1 target). The step's start positions depend only on that total, never on the rank split:
    rank r takes sequences [r*A, (r+1)*A), so 1 process with A=2 reads exactly what 2 ranks with A=1 read
    together. With `align_to_bos` each sequence starts at a BOS and the next one starts at the first BOS at
    least `seq_len` tokens later (the tail of a document that would not fit is skipped); otherwise sequences
    are consecutive. Input ranges never overlap (a target may be the next sequence's first input, as in the
    reference). All sequences of a step come from one shard; the loader moves to the next shard when fewer
    than one maximal batch span is left, as the record does (`_starts_in_shard`). After the last shard it
    wraps to the first and increments `epoch`.
    """

    def __init__(self, files: Sequence[str | Path], seq_len: int, micro_batches_per_step: int, rank: int = 0,
                 world_size: int = 1, align_to_bos: bool = True, device: str | torch.device = "cpu",
                 vocab: Vocab = GPT2_VOCAB):
        self.files = [Path(f) for f in files]
        if not self.files:
            raise DataError("BatchLoader got no shard files; resolve_data() returns them.")
        if seq_len <= 0 or micro_batches_per_step <= 0:
            raise DataError(f"seq_len ({seq_len}) and micro_batches_per_step ({micro_batches_per_step}) must be > 0")
        if not 0 <= rank < world_size or micro_batches_per_step % world_size:
            raise DataError(f"micro_batches_per_step ({micro_batches_per_step}) must be a multiple of world_size "
                            f"({world_size}) and 0 <= rank ({rank}) < world_size")
        self.seq_len = seq_len
        self.micro_batches_per_step = micro_batches_per_step
        self.rank, self.world_size = rank, world_size
        self.grad_accum = micro_batches_per_step // world_size
        self.align_to_bos = align_to_bos
        self.vocab = vocab
        self.device = torch.device(device)
        self.file_index, self.pos, self.epoch = 0, 0, 0
        self._loaded: int | None = None
        self._tokens: np.ndarray | None = None
        self._bounds: np.ndarray | None = None
        sizes = [read_header(f) for f in self.files]  # cheap: fail on broken files now, not mid-run
        need = micro_batches_per_step * seq_len + 1
        if max(sizes) < need:
            raise DataError(f"{', '.join(map(str, self.files))}: too little data for one step: a step needs "
                            f"{micro_batches_per_step} sequences x {seq_len} tokens + 1 = {need:,} tokens in one "
                            f"shard, the largest shard has {max(sizes):,}. Use a smaller --seq-len or batch, or "
                            "more data.")
        self._plan()  # dry run: raises DataError if no shard can give a (BOS-aligned) step

    def _load(self, index: int) -> np.ndarray:
        if self._loaded != index:
            self._tokens = read_shard(self.files[index], self.vocab.size)
            # Document starts, plus the shard end as a final boundary (the next shard starts a new document).
            self._bounds = np.append(np.flatnonzero(self._tokens == self.vocab.bos_id), self._tokens.size)
            self._loaded = index
        return self._tokens

    def _starts_in_shard(self, pos: int) -> tuple[list[int], int] | None:
        """The step's start positions in the loaded shard from `pos`, and the position after them; None if the
        loader moves on to the next shard.

        When to move on follows the record (2025-07-12_BosAlign, `distributed_data_generator`): as soon as fewer
        than one maximal batch span + 1 tokens are left after `pos` (the span is 2 x the step's tokens with BOS
        alignment, which leaves room for the skipped document tails, else 1 x), even if the step would still
        fit; so the batch sequence matches the record's across shard changes. Exception, at `pos == 0` only: a
        shard shorter than the span is used from its start if one step fits (the record would skip it; no
        FineWeb shard is that short, but small test and CPU corpora are).
        """
        tokens, bounds, n, T = self._tokens, self._bounds, self.micro_batches_per_step, self.seq_len
        max_span = (2 if self.align_to_bos else 1) * n * T
        if pos > 0 and pos + max_span + 1 >= tokens.size:
            return None
        if not self.align_to_bos:
            if pos + n * T + 1 > tokens.size:
                return None
            return [pos + k * T for k in range(n)], pos + n * T
        starts = []
        s = int(bounds[np.searchsorted(bounds, pos)])  # first document start at or after pos
        for _ in range(n):
            if s + T + 1 > tokens.size:
                return None
            starts.append(s)
            s = int(bounds[np.searchsorted(bounds, s + T)])  # next document start >= s + T: inputs never overlap
        return starts, s

    def _plan(self) -> tuple[list[int], int, int, int]:
        """(starts, file_index, next_pos, epoch) of the next step, moving to later shards as needed."""
        index, pos, epoch = self.file_index, self.pos, self.epoch
        for _ in range(len(self.files) + 1):
            self._load(index)
            found = self._starts_in_shard(pos)
            if found is not None:
                return found[0], index, found[1], epoch
            index, pos = index + 1, 0
            if index == len(self.files):
                index, epoch = 0, epoch + 1
        aligned = "BOS-aligned " if self.align_to_bos else ""
        raise DataError(f"{', '.join(map(str, self.files))}: no shard can give one {aligned}step of "
                        f"{self.micro_batches_per_step} sequences x {self.seq_len} tokens (each sequence must start "
                        f"at a BOS={self.vocab.bos_id} and fit in its shard). Use a smaller --seq-len or batch, more data, or "
                        "check that the documents start with BOS.")

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's `grad_accum` (inputs int32 (T,), targets int64 (T,)) pairs for the next optimizer step."""
        starts, self.file_index, self.pos, self.epoch = self._plan()
        tokens = self._tokens
        mine = starts[self.rank * self.grad_accum:(self.rank + 1) * self.grad_accum]
        return [_to_device(tokens[s:s + self.seq_len + 1], self.device) for s in mine]

    def state_dict(self) -> dict:
        """Position of the next step; with `load_state_dict` a resumed run reads exactly the batches that follow."""
        return dict(file_index=self.file_index, pos=self.pos, epoch=self.epoch,
                    files=[f.name for f in self.files], seq_len=self.seq_len,
                    micro_batches_per_step=self.micro_batches_per_step, align_to_bos=self.align_to_bos)

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("files", "seq_len", "micro_batches_per_step", "align_to_bos"):
            if key in state and state[key] != mine[key]:
                raise DataError(f"{', '.join(map(str, self.files))}: cannot resume: the checkpoint's data loader "
                                f"had {key}={state[key]!r}, this one has {mine[key]!r}. Resume with the same data "
                                "and batch settings (world size may differ).")
        if not 0 <= state["file_index"] < len(self.files):
            raise DataError(f"loader state file_index {state['file_index']} is out of range for {len(self.files)} "
                            "shard files; resume with the same data.")
        self.file_index, self.pos, self.epoch = int(state["file_index"]), int(state["pos"]), int(state["epoch"])


def valid_val_tokens(val_tokens: int, seq_len: int, world_size: int = 1) -> int:
    """The largest val size <= `val_tokens` that `val_batches` accepts (a multiple of seq_len * world_size)."""
    return val_tokens // (seq_len * world_size) * (seq_len * world_size)


def val_batches(files: Sequence[str | Path], seq_len: int, val_tokens: int, rank: int = 0, world_size: int = 1,
                device: str | torch.device = "cpu", vocab: Vocab = GPT2_VOCAB) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the fixed val set: the first `val_tokens` tokens of the val shards (concatenated, not
    BOS-aligned, as in the reference), cut into `seq_len` sequences; rank r takes sequences r, r+W, r+2W, ..."""
    files = [Path(f) for f in files]
    names = ", ".join(map(str, files))
    chunk = seq_len * world_size
    if val_tokens <= 0 or val_tokens % chunk:
        lo = valid_val_tokens(val_tokens, seq_len, world_size)
        options = f"{lo:,} or {lo + chunk:,}" if lo > 0 else f"{chunk:,}"
        raise DataError(f"{names}: val_tokens ({val_tokens:,}) must be a positive multiple of seq_len x world_size "
                        f"= {seq_len} x {world_size} = {chunk:,}; nearest valid values: {options}.")
    parts, have = [], 0
    for path in files:
        if have >= val_tokens + 1:
            break
        shard = read_shard(path, vocab.size)
        parts.append(shard[:val_tokens + 1 - have])
        have += parts[-1].size
    if have < val_tokens + 1:
        raise DataError(f"{names}: too few val tokens: {have:,} available, {val_tokens + 1:,} needed "
                        f"({val_tokens:,} + 1 target). Lower val_tokens or add validation data.")
    tokens = np.concatenate(parts)
    device = torch.device(device)
    n_seq = val_tokens // seq_len
    return [_to_device(tokens[k * seq_len:(k + 1) * seq_len + 1], device) for k in range(rank, n_seq, world_size)]


# -----------------------------------------------------------------------------
# baseline

def unigram_entropy(tokens) -> float:
    """Entropy (nats) of the empirical unigram distribution of `tokens`: the loss of the best model that ignores
    context, so a trained model's val loss must end well below it."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens).ravel().astype(np.int64)
    if arr.size == 0:
        raise ValueError("unigram_entropy needs at least one token")
    counts = np.bincount(arr)
    p = counts[counts > 0] / arr.size
    return float(-(p * np.log(p)).sum())
