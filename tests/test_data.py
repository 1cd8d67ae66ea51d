"""Tests for the data layer: shard format and validation, BOS-aligned distributed loading, resume, val split,
GPT-2 tokenizer, the embedded corpus, tokenize_corpus.py and the offline download error."""
import gzip
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core import data as D
from core.data import (BOS_ID, HEADER_BYTES, MAGIC, VERSION, BatchLoader, DataError, read_header, read_shard,
                       resolve_data, unigram_entropy, val_batches, write_shard)
from core.tokenizer import TokenizerError, get_gpt2_encoding, load_ranks

REPO = Path(__file__).resolve().parent.parent


# -----------------------------------------------------------------------------
# helpers

def make_docs(rng, n_docs, min_len, max_len, offset=0):
    """Documents whose tokens encode their absolute position (pos % 50000), each starting with BOS, so a
    sequence's position in the shard can be read back from its tokens."""
    lens = rng.integers(min_len, max_len + 1, size=n_docs)
    tokens = (np.arange(offset, offset + lens.sum()) % 50000).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    tokens[starts] = BOS_ID
    return tokens


def position_of(inputs):
    """Shard position of a sequence made by make_docs: its second token is (start + 1) % 50000."""
    return (int(inputs[1]) - 1) % 50000


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(write_shard(tmp_path / f"t_train_{i + 1:06d}.bin", make_docs(rng, 60, 5, 120)))
    return paths


def collect(loader, steps):
    return [[(x.clone(), y.clone()) for x, y in loader.next_step()] for _ in range(steps)]


# -----------------------------------------------------------------------------
# shards

def test_shard_round_trip(tmp_path):
    tokens = np.array([BOS_ID, 0, 1, 65535, 50000, 7], dtype=np.int64)
    path = write_shard(tmp_path / "a.bin", tokens)
    back = read_shard(path, vocab_size=65536)
    assert back.dtype == np.uint16 and np.array_equal(back, tokens)
    assert path.stat().st_size == HEADER_BYTES + 2 * tokens.size
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [MAGIC, VERSION, tokens.size]
    write_shard(tmp_path / "b.bin", torch.tensor(tokens[:3]))  # torch input works too
    assert read_shard(tmp_path / "b.bin").tolist() == tokens[:3].tolist()


def test_write_shard_rejects_values_outside_uint16(tmp_path):
    with pytest.raises(DataError, match="uint16"):
        write_shard(tmp_path / "x.bin", np.array([1, 70000]))
    with pytest.raises(DataError, match="non-empty"):
        write_shard(tmp_path / "x.bin", np.array([], dtype=np.int64))
    assert not (tmp_path / "x.bin").exists()


def _corrupt(path, kind):
    raw = bytearray(path.read_bytes())
    if kind == "magic":
        raw[0:4] = np.int32(1234).tobytes()
    elif kind == "version":
        raw[4:8] = np.int32(2).tobytes()
    elif kind == "truncated":
        raw = raw[:-10]
    elif kind == "trailing":
        raw += b"\0\0"
    elif kind == "short_header":
        raw = raw[:100]
    elif kind == "empty":
        raw = b""
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind,pattern", [
    ("magic", "wrong magic"), ("version", "unsupported shard version"), ("truncated", "truncated"),
    ("trailing", "unexpected bytes"), ("short_header", "truncated"), ("empty", "empty file")])
def test_bad_shards_raise_naming_the_file(tmp_path, kind, pattern):
    path = write_shard(tmp_path / f"bad_{kind}.bin", np.arange(100))
    _corrupt(path, kind)
    with pytest.raises(DataError, match=pattern) as info:
        read_shard(path)
    assert str(path) in str(info.value)


def test_token_outside_vocab_raises_with_position(tmp_path):
    tokens = np.full(50, 3)
    tokens[17] = 50257  # fits in uint16, but not in the GPT-2 vocabulary
    path = write_shard(tmp_path / "oov.bin", tokens)
    with pytest.raises(DataError, match="50257 at position 17") as info:
        read_shard(path)
    assert str(path) in str(info.value)
    assert read_shard(path, vocab_size=50304)[17] == 50257  # a larger vocab accepts it


def test_resolve_data_validates_shards_before_training(tmp_path):
    write_shard(tmp_path / "fineweb_train_000001.bin", make_docs(np.random.default_rng(1), 10, 5, 20))
    bad_val = np.full(D.FINEWEB_VAL_TOKENS + 1, 5)
    bad_val[-1] = 60000
    write_shard(tmp_path / "fineweb_val_000000.bin", bad_val)
    with pytest.raises(DataError, match="outside the vocabulary") as info:
        resolve_data(str(tmp_path))
    assert "fineweb_val_000000.bin" in str(info.value)


# -----------------------------------------------------------------------------
# BatchLoader

def test_sequences_start_at_bos_and_do_not_overlap(shards):
    T = 64
    loader = BatchLoader(shards[:1], seq_len=T, micro_batches_per_step=4)
    tokens = read_shard(shards[0])
    bos = set(np.flatnonzero(tokens == BOS_ID).tolist())
    starts = []
    for _ in range(1000):  # the shard holds fewer than 1000 steps
        step = loader.next_step()
        if loader.epoch > 0:  # this step wrapped around to the start of the shard
            break
        assert len(step) == 4
        for x, y in step:
            assert x.dtype == torch.int32 and y.dtype == torch.int64 and x.shape == y.shape == (T,)
            assert int(x[0]) == BOS_ID
            s = position_of(x)
            assert s in bos
            assert torch.equal(x.long(), torch.from_numpy(tokens[s:s + T].astype(np.int64)))
            assert torch.equal(y, torch.from_numpy(tokens[s + 1:s + T + 1].astype(np.int64)))
            starts.append(s)
    assert loader.epoch == 1 and len(starts) > 8 and starts[0] == 0
    # input ranges never overlap, and the next start is the first document start at or after the previous end
    for a, b in zip(starts, starts[1:]):
        assert b - a >= T and b == min(p for p in bos if p >= a + T)
    assert loader.file_index == 0 and position_of(step[0][0]) == 0


def test_shard_starting_mid_document_uses_first_bos(tmp_path):
    tokens = make_docs(np.random.default_rng(2), 30, 10, 40)
    first_bos = int(np.flatnonzero(tokens == BOS_ID)[1])
    path = write_shard(tmp_path / "mid.bin", tokens[first_bos - 3:])  # begins with the tail of a document
    x, _ = BatchLoader([path], seq_len=16, micro_batches_per_step=1).next_step()[0]
    assert int(x[0]) == BOS_ID and position_of(x) == first_bos


def test_unaligned_sequences_are_consecutive(shards):
    T = 50
    loader = BatchLoader(shards[:1], seq_len=T, micro_batches_per_step=3, align_to_bos=False)
    tokens = read_shard(shards[0])
    seqs = [x for step in collect(loader, 4) for x, _ in step]
    for k, x in enumerate(seqs):
        assert torch.equal(x.long(), torch.from_numpy(tokens[k * T:(k + 1) * T].astype(np.int64)))


def record_batch_starts(shard_tokens: list[np.ndarray], T: int, n: int, steps: int, align_to_bos: bool = True):
    """The record's loader (records/track_1_short/2025-07-12_BosAlign, `distributed_data_generator` and
    `find_batch_starts`), restated in numpy for the test: (shard index, starts) of each step. It moves to the
    next shard as soon as pos + max_batch_span + 1 >= len(tokens)."""
    out, index, tokens, pos = [], 0, shard_tokens[0], 0
    max_span = 2 * n * T if align_to_bos else n * T
    for _ in range(steps):
        if pos + max_span + 1 >= len(tokens):
            index += 1
            tokens, pos = shard_tokens[index], 0
        if align_to_bos:
            bos = np.flatnonzero(tokens[pos:pos + max_span] == BOS_ID) + pos
            start, starts, end = int(bos[0]), [], None
            for b in bos[1:]:
                if b - start >= T:
                    starts.append(start)
                    if len(starts) == n:
                        end = int(b)
                        break
                    start = int(b)
            assert end is not None
            span = end - pos
        else:
            starts, span = [pos + k * T for k in range(n)], n * T
        out.append((index, starts))
        pos += span
    return out


@pytest.mark.parametrize("align_to_bos", [True, False])
def test_batch_sequence_matches_the_record_across_shard_changes(tmp_path, align_to_bos):
    rng = np.random.default_rng(7)
    shard_tokens = [make_docs(rng, 80, 5, 60) for _ in range(3)]
    paths = [write_shard(tmp_path / f"r_train_{i:06d}.bin", t) for i, t in enumerate(shard_tokens)]
    T, n = 40, 3
    want = record_batch_starts(shard_tokens, T, n, steps=40 if align_to_bos else 55, align_to_bos=align_to_bos)
    assert {i for i, _ in want} == {0, 1, 2}  # the steps cross two shard changes
    loader = BatchLoader(paths, seq_len=T, micro_batches_per_step=n, align_to_bos=align_to_bos)
    got = []
    for _ in want:
        step = loader.next_step()
        got.append((loader.file_index, [int(np.flatnonzero(
            np.all(np.lib.stride_tricks.sliding_window_view(shard_tokens[loader.file_index], T)
                   == x.numpy(), axis=1))[0]) for x, _ in step]))
    assert got == want


def test_one_process_with_grad_accum_reads_what_two_ranks_read(shards):
    T, steps = 48, 120  # enough steps to cross shard boundaries and wrap to a second epoch
    single = BatchLoader(shards, seq_len=T, micro_batches_per_step=2, rank=0, world_size=1)
    ranks = [BatchLoader(shards, seq_len=T, micro_batches_per_step=2, rank=r, world_size=2) for r in range(2)]
    seen_files = set()
    for _ in range(steps):
        a = single.next_step()
        b = [r.next_step() for r in ranks]
        seen_files.add(single.file_index)
        assert len(a) == 2 and len(b[0]) == len(b[1]) == 1
        for (xa, ya), (xb, yb) in zip(a, [b[0][0], b[1][0]]):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not torch.equal(b[0][0][0], b[1][0][0])  # the two ranks read different sequences
    assert single.epoch >= 1 and seen_files == {0, 1, 2}
    assert single.state_dict() == ranks[0].state_dict() == ranks[1].state_dict()


def test_state_dict_resume_gives_the_next_batches(shards):
    a = BatchLoader(shards, seq_len=32, micro_batches_per_step=4, rank=1, world_size=2)
    collect(a, 17)
    state = json.loads(json.dumps(a.state_dict()))  # must survive a JSON/torch.save round trip
    expected = collect(a, 25)
    b = BatchLoader(shards, seq_len=32, micro_batches_per_step=4, rank=1, world_size=2)
    b.load_state_dict(state)
    got = collect(b, 25)
    for step_a, step_b in zip(expected, got):
        for (xa, ya), (xb, yb) in zip(step_a, step_b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.state_dict() == b.state_dict()
    c = BatchLoader(shards, seq_len=64, micro_batches_per_step=4, rank=1, world_size=2)
    with pytest.raises(DataError, match="seq_len"):
        c.load_state_dict(state)


def test_too_little_data_for_one_step(tmp_path):
    path = write_shard(tmp_path / "small.bin", make_docs(np.random.default_rng(3), 4, 10, 10))  # 40 tokens
    with pytest.raises(DataError, match="too little data for one step") as info:
        BatchLoader([path], seq_len=16, micro_batches_per_step=4)
    msg = str(info.value)
    assert str(path) in msg and "= 65 tokens" in msg and "has 40" in msg  # 4 x 16 + 1 needed, 40 available


def test_no_bos_aligned_step_possible(tmp_path):
    tokens = np.full(500, 7)
    tokens[0] = BOS_ID  # one document of 500 tokens: only one BOS-aligned sequence fits
    path = write_shard(tmp_path / "onedoc.bin", tokens)
    with pytest.raises(DataError, match="BOS-aligned") as info:
        BatchLoader([path], seq_len=16, micro_batches_per_step=2)
    assert str(path) in str(info.value)
    BatchLoader([path], seq_len=16, micro_batches_per_step=2, align_to_bos=False).next_step()


# -----------------------------------------------------------------------------
# validation batches

def test_val_batches_split_across_ranks_and_files(tmp_path):
    rng = np.random.default_rng(4)
    whole = rng.integers(0, 50257, size=700)
    files = [write_shard(tmp_path / "v_val_000000.bin", whole[:300]),
             write_shard(tmp_path / "v_val_000001.bin", whole[300:])]
    T, n_tokens = 32, 512
    one = val_batches(files, T, n_tokens)
    assert len(one) == n_tokens // T
    for k, (x, y) in enumerate(one):
        assert x.tolist() == whole[k * T:(k + 1) * T].tolist()
        assert y.tolist() == whole[k * T + 1:(k + 1) * T + 1].tolist()
    r0, r1 = (val_batches(files, T, n_tokens, rank=r, world_size=2) for r in range(2))
    assert [x.tolist() for x, _ in one] == [x.tolist() for pair in zip(r0, r1) for x, _ in pair]


def test_val_batches_errors(tmp_path):
    path = write_shard(tmp_path / "v_val_000000.bin", np.arange(1000))
    with pytest.raises(DataError, match="nearest valid values: 960 or 1,024"):
        val_batches([path], seq_len=32, val_tokens=1000, world_size=2)
    with pytest.raises(DataError, match="too few val tokens") as info:
        val_batches([path], seq_len=32, val_tokens=1024)
    assert str(path) in str(info.value)


# -----------------------------------------------------------------------------
# resolve_data

def test_resolve_data_explicit_dir_errors(tmp_path):
    with pytest.raises(DataError, match="download_hf_data.sh") as info:
        resolve_data(str(tmp_path / "missing"))
    assert "omit --data-dir" in str(info.value)
    with pytest.raises(DataError, match="no \\*_train_\\*.bin shards") as info:
        resolve_data(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_resolve_data_fineweb_needs_full_val_set(tmp_path):
    write_shard(tmp_path / "fineweb_train_000001.bin", make_docs(np.random.default_rng(5), 10, 5, 20))
    write_shard(tmp_path / "fineweb_val_000000.bin", np.full(1000, 5))
    with pytest.raises(DataError, match="10,485,761") as info:
        resolve_data(str(tmp_path))
    assert "fineweb_val_000000.bin" in str(info.value)


def test_resolve_data_custom_corpus(tmp_path):
    rng = np.random.default_rng(6)
    write_shard(tmp_path / "books_train_000001.bin", make_docs(rng, 20, 5, 20))
    write_shard(tmp_path / "books_val_000000.bin", rng.integers(0, 50257, size=3 * 65536 + 10))
    src = resolve_data(str(tmp_path))
    assert src.name == "books" and not src.is_embedded and src.val_tokens == 3 * 65536
    assert [p.name for p in src.train_files] == ["books_train_000001.bin"]


# -----------------------------------------------------------------------------
# tokenizer

def test_tokenizer_hello_world_and_round_trip():
    enc = get_gpt2_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == BOS_ID
    text = ("It was the best of times, it was the worst of times; it was the age of wisdom...\n\n"
            "  Numbers 12345, émigré café, tabs\tand 'quotes' don't break it. <|endoftext|> stays text.")
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text and BOS_ID not in ids
    assert max(ids) < 50257


def test_tokenizer_rejects_corrupt_ranks(tmp_path):
    bad = tmp_path / "r50k_base.tiktoken"
    bad.write_bytes(D.REPO_ROOT.joinpath("data/embedded/r50k_base.tiktoken").read_bytes()[:-5] + b"99999")
    with pytest.raises(TokenizerError, match="sha256"):
        load_ranks(bad)


# -----------------------------------------------------------------------------
# embedded corpus

def test_embedded_corpus_builds_once_with_disjoint_split(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FINEWEB_DIR", tmp_path / "no_fineweb")  # ignore a local FineWeb download
    t0 = time.perf_counter()
    src = resolve_data(None, cache_dir=str(tmp_path / "cache"))
    assert src.is_embedded and src.name == "embedded" and src.val_tokens == D.EMBEDDED_VAL_TOKENS
    train = np.concatenate([read_shard(p) for p in src.train_files])
    val = np.concatenate([read_shard(p) for p in src.val_files])
    assert train.size + val.size >= 2_000_000
    assert val.size >= src.val_tokens + 1
    assert train[0] == BOS_ID and val[0] == BOS_ID

    def documents(tokens):
        return {tokens[a:b].tobytes() for a, b in
                zip(np.flatnonzero(tokens == BOS_ID), list(np.flatnonzero(tokens == BOS_ID)[1:]) + [tokens.size])}
    train_docs, val_docs = documents(train), documents(val)
    assert len(train_docs) > 1000 and len(val_docs) > 50 and not (train_docs & val_docs)
    assert 5.0 < unigram_entropy(val) < 8.0  # English GPT-2 unigram entropy (measured: 6.45)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = resolve_data(None, cache_dir=str(tmp_path / "cache"))  # cached: no rebuild
    assert again.train_files == src.train_files
    assert time.perf_counter() - t0 < first
    x, y = BatchLoader(src.train_files, 256, 4).next_step()[0]
    assert int(x[0]) == BOS_ID and len(val_batches(src.val_files, 1024, src.val_tokens)) == 256


# -----------------------------------------------------------------------------
# tokenize_corpus.py

def test_tokenize_corpus_script(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "scripts" / "data_process"))
    import tokenize_corpus
    texts = [f"Document number {i}. " + "The quick brown fox jumps over the lazy dog. " * (i + 3) for i in range(6)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(texts[0])
    with gzip.open(tmp_path / "in" / "b.jsonl.gz", "wt") as f:
        for t in texts[1:]:
            f.write(json.dumps({"body": t}) + "\n")
    out = tmp_path / "out"
    rc = tokenize_corpus.main(["--input", str(tmp_path / "in"), "--out-dir", str(out), "--prefix", "toy",
                               "--val-docs", "2", "--shard-tokens", "100", "--text-field", "body", "--no-progress"])
    assert rc == 0
    val = np.concatenate([read_shard(p) for p in sorted(out.glob("toy_val_*.bin"))])
    train_files = sorted(out.glob("toy_train_*.bin"))
    assert train_files[0].name == "toy_train_000001.bin" and len(train_files) > 1
    assert all(read_header(p) == 100 for p in train_files[:-1])
    train = np.concatenate([read_shard(p) for p in train_files])
    enc = get_gpt2_encoding()
    decoded = [enc.decode(d.tolist()) for d in np.split(np.concatenate([val, train]),
                                                        np.flatnonzero(np.concatenate([val, train]) == BOS_ID))[1:]]
    assert [d.removeprefix("<|endoftext|>") for d in decoded] == texts
    assert (val == BOS_ID).sum() == 2
    rc = tokenize_corpus.main(["--input", str(tmp_path / "in" / "b.jsonl.gz"), "--out-dir", str(out),
                               "--text-field", "text", "--val-docs", "1", "--no-progress"])
    assert rc == 2 and "no string field 'text'" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# download

@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_download_fails_fast_without_network(tmp_path, env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full_env.update(env, HF_HOME=str(tmp_path / "hf"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "scripts/data_process/download_fineweb.py"), "1",
                           "--out-dir", str(tmp_path / "fw"), "--timeout", "5"],
                          env=full_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "cannot download from the Hugging Face Hub" in proc.stderr and "embedded corpus" in proc.stderr
    assert time.perf_counter() - t0 < 30
    assert not list((tmp_path / "fw").glob("*.bin"))  # nothing half-written left behind


def test_download_skips_valid_files_without_network(tmp_path):
    fw = tmp_path / "fw"
    write_shard(fw / "fineweb_val_000000.bin", np.arange(10))
    write_shard(fw / "fineweb_train_000001.bin", np.arange(10))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, str(REPO / "scripts/data_process/download_fineweb.py"), "1",
                           "--out-dir", str(fw)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "already present" in proc.stdout


# -----------------------------------------------------------------------------
# baseline

def test_unigram_entropy_matches_closed_forms():
    assert unigram_entropy(np.arange(16).repeat(3)) == pytest.approx(math.log(16))
    assert unigram_entropy(torch.full((10,), 7)) == 0.0
    p = np.array([0.5, 0.25, 0.25])
    assert unigram_entropy([0, 0, 1, 2]) == pytest.approx(float(-(p * np.log(p)).sum()))


# -----------------------------------------------------------------------------
# GPU path

@pytest.mark.gpu
def test_loader_on_cuda_matches_cpu(shards):
    cpu = BatchLoader(shards, seq_len=32, micro_batches_per_step=2)
    gpu = BatchLoader(shards, seq_len=32, micro_batches_per_step=2, device="cuda")
    for _ in range(5):
        for (xc, yc), (xg, yg) in zip(cpu.next_step(), gpu.next_step()):
            assert xg.is_cuda and yg.is_cuda and xg.dtype == torch.int32 and yg.dtype == torch.int64
            assert torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())
    vc = val_batches([shards[0]], 32, 64 * 2, world_size=2, rank=1, device="cuda")
    assert vc[0][0].is_cuda
