"""The byte-level proxy corpus (`--data embedded-bytes`): the data source declares its vocabulary (257 ids,
BOS 256) and the model and loader follow it; a disagreeing vocabulary stops before training; it trains end
to end, reports bits per byte, resumes bitwise and runs on 2 gloo ranks like one process."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core import checkpoint as ck
from core.data import (BYTE_VOCAB, EMBEDDED_CORPUS, GPT2_VOCAB, DataError, declared_vocab, hash_order,
                       iter_documents, read_shard, resolve_data, write_shard)
from core.logger import parse_step_line

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--data", "embedded-bytes", "--width", "32", "--depth", "2", "--head-dim", "16", "--seq-len", "256",
        "--batch-tokens", "512", "--val-seq-len", "256", "--val-tokens", "2048", "--log-every", "2",
        "--val-every", "4", "--use-wandb", "false", "--run-name", "r"]


def test_byte_source_declares_its_vocabulary_and_holds_the_corpus_bytes():
    src = resolve_data(None, data="embedded-bytes")
    assert src.vocab == BYTE_VOCAB and src.name == "embedded-bytes" and src.is_embedded
    assert declared_vocab("embedded-bytes", None) == BYTE_VOCAB and declared_vocab(None, None) == GPT2_VOCAB
    val = np.asarray(read_shard(src.val_files[0], BYTE_VOCAB.size))
    assert val.max() <= 256 and val[0] == BYTE_VOCAB.bos_id
    first_doc = hash_order(iter_documents([EMBEDDED_CORPUS]))[0].encode("utf-8")
    assert bytes(val[1:1 + len(first_doc)].astype(np.uint8)) == first_doc  # the UTF-8 bytes, in order
    assert val[1 + len(first_doc)] == BYTE_VOCAB.bos_id  # the next document starts with BOS
    assert json.loads((src.train_files[0].parent / "vocab.json").read_text())["size"] == 257


def test_a_shard_folder_that_declares_bytes_refuses_larger_ids(tmp_path):
    write_shard(tmp_path / "x_train_000001.bin", [256, 1, 2, 300] * 100)
    write_shard(tmp_path / "x_val_000000.bin", [256, 1, 2, 3] * 20000)
    (tmp_path / "vocab.json").write_text(json.dumps({"name": "bytes", "size": 257, "bos_id": 256}))
    assert declared_vocab(None, str(tmp_path)) == BYTE_VOCAB
    with pytest.raises(DataError, match="token id 300 .* outside the vocabulary \\(size 257\\)"):
        resolve_data(str(tmp_path))


@pytest.mark.parametrize("extra, needle", [
    (["--vocab-size", "50257"], "--vocab-size 50257 disagrees with the data: its vocabulary 'bytes' has size 257"),
    (["--bos-id", "50256"], "--bos-id 50256 disagrees with the data"),
    (["--data-dir", "data"], "--data embedded-bytes and --data-dir data both name the training data"),
])
def test_vocabulary_mismatch_stops_before_training(tmp_path, extra, needle):
    proc = subprocess.run([sys.executable, "train.py", *TINY, "--iterations", "2", "--log-dir", str(tmp_path), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert needle in proc.stderr
    assert not any(parse_step_line(line) for line in proc.stdout.splitlines())  # no step ran


def _run(nproc: int, log_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    proc = subprocess.run(cmd + [*TINY, "--log-dir", str(log_dir), *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _untimed(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("Time/", "Perf/", "Hardware/"))} for r in rows]


def test_bytes_train_resume_and_two_ranks(tmp_path):
    args = ["--iterations", "8", "--save-every", "4", "--keep-last", "0", "--mup", "--base-width", "16"]
    one = _run(1, tmp_path / "one", *args)
    run = tmp_path / "one" / "r"
    assert "vocabulary bytes: 257 ids, BOS 256" in one.stdout and "bits) per byte" in one.stdout
    assert "bits/byte" in one.stdout.splitlines()[-1] and "below the unigram entropy" in one.stdout
    config = json.loads((run / "config.json").read_text())
    assert config["vocab_size"] == 257 and config["bos_id"] == 256 and config["resolved"]["vocab"] == "bytes"
    rows = _rows(run)
    val = [r for r in rows if "Loss/val_loss" in r]
    assert all(r["Loss/val_bits_per_byte"] == pytest.approx(r["Loss/val_loss"] / math.log(2)) for r in val)
    assert val[-1]["Loss/val_loss"] < val[0]["Loss/val_loss"]

    # resume from step 4's checkpoint: bitwise the same rows and weights as the uninterrupted run
    shutil.copytree(run, tmp_path / "resumed" / "r")
    ck.checkpoint_path(tmp_path / "resumed" / "r", 8).unlink()
    _run(1, tmp_path / "resumed", *args, "--resume", "auto")
    assert _untimed(_rows(tmp_path / "resumed" / "r")) == _untimed(rows)
    ref, res = (ck.load_checkpoint(ck.checkpoint_path(d, 8)) for d in (run, tmp_path / "resumed" / "r"))
    assert all((ref["model"][k] == res["model"][k]).all() for k in ref["model"])

    # 2 gloo ranks split the same global batch: the same losses up to float rounding
    _run(2, tmp_path / "two", *args)
    two = {r["step"]: r["Loss/train_loss"] for r in _rows(tmp_path / "two" / "r") if "Loss/train_loss" in r}
    ones = {r["step"]: r["Loss/train_loss"] for r in rows if "Loss/train_loss" in r}
    assert sorted(two) == sorted(ones) == [2, 4, 6, 8]
    assert all(two[s] == pytest.approx(ones[s], rel=1e-5) for s in ones)
