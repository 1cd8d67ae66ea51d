"""Every bad input gets exit code 2 and a message that names the problem (and the file), before training.

Each entry of CASES is one test: it builds the bad input, runs `train.main` in this process and checks the
exit code, a fragment of the message, and that the refusal came before the first step (no step line on the
console, no metrics row written). The README's table "bad input | message contains" is CASES' names and
fragments, row for row; `test_readme_table_is_the_cases` checks it, and prints the table to paste when they
differ:

    .venv/bin/python tests/test_bad_input.py            # the full messages, as they are now
    .venv/bin/python tests/test_bad_input.py --readme   # the README table
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # also runnable as a script, for the table
    sys.path.insert(0, str(REPO))

from core import checkpoint as ck  # noqa: E402
from core.data import BOS_ID, write_shard  # noqa: E402
from core.logger import parse_step_line  # noqa: E402
from train import EXIT_BAD_INPUT, main  # noqa: E402

TINY = ["--width", "32", "--depth", "2", "--head-dim", "16", "--seq-len", "128", "--batch-tokens", "128",
        "--val-seq-len", "128", "--val-tokens", "256", "--iterations", "2", "--use-wandb", "false",
        "--run-name", "r"]


def docs(n_tokens: int, seed: int = 0, top: int = 50000) -> np.ndarray:
    """`n_tokens` GPT-2-range token ids in documents of 100 tokens, each starting with BOS."""
    tokens = np.random.default_rng(seed).integers(0, top, n_tokens)
    tokens[::100] = BOS_ID
    return tokens


def data_dir(tmp: Path, train=None, val=None, prefix="mine") -> Path:
    """A custom-corpus folder: one train and one val shard (val needs > 65,536 tokens, core/data.py)."""
    folder = tmp / "data"
    write_shard(folder / f"{prefix}_train_000001.bin", docs(5000) if train is None else train)
    write_shard(folder / f"{prefix}_val_000000.bin", docs(70000, seed=1) if val is None else val)
    return folder


def fake_checkpoint(run_dir: Path, step: int = 4, **config) -> Path:
    """A checkpoint file with a given config: enough for the checks that run before the model is built."""
    from core.config import parse_args, resolve_defaults
    from core.data import GPT2_VOCAB
    from core.trainer import resolve_vocab
    cfg = parse_args(TINY)
    resolve_defaults(cfg, "cpu", env={})
    resolve_vocab(cfg, GPT2_VOCAB)  # as a real run on the embedded corpus records it
    for k, v in config.items():
        setattr(cfg, k, v)
    payload = {"format": ck.FORMAT, "format_version": ck.FORMAT_VERSION, "step": step, "world_size": 1,
               "config": cfg.to_dict(), "loader": {"files": ["embedded_train_000001.bin"]}}
    return ck.save_checkpoint(ck.checkpoint_path(run_dir, step), payload)


def corrupt(path: Path, how: str) -> Path:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # flip a byte inside the data.pkl member (its CRC no longer matches)
        i = data.find(b"format_version")
        data[i] ^= 0x01
        path.write_bytes(bytes(data))
    return path


def shard_bytes(tokens, magic=20240520, version=1, count=None) -> bytes:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, len(tokens) if count is None else count)
    return header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes()


@dataclass
class Case:
    name: str          # the row's "bad input"
    expect: str        # a fragment the message must contain
    setup: Callable[[Path], tuple[list[str], dict]]  # tmp -> (extra argv, extra env)


def flags(*argv, env=None):
    return lambda tmp: (list(argv), env or {})


def _bad_magic(tmp):
    folder = data_dir(tmp)
    (folder / "mine_train_000001.bin").write_bytes(shard_bytes(docs(5000), magic=1234))
    return ["--data-dir", str(folder)], {}


def _truncated(tmp):
    folder = data_dir(tmp)
    (folder / "mine_train_000001.bin").write_bytes(shard_bytes(docs(5000), count=9000))
    return ["--data-dir", str(folder)], {}


def _out_of_vocab(tmp):
    bad = docs(70000, seed=1)
    bad[1234] = 60000
    return ["--data-dir", str(data_dir(tmp, val=bad))], {}


def _no_val(tmp):
    folder = data_dir(tmp)
    (folder / "mine_val_000000.bin").unlink()
    return ["--data-dir", str(folder)], {}


def _log_dir_is_a_file(tmp):
    (tmp / "afile").write_text("not a folder")
    return ["--log-dir", str(tmp / "afile" / "logs")], {}


def _run_exists(tmp):
    run = tmp / "logs" / "r"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    return [], {}


def _ckpt(how):
    def build(tmp):
        path = corrupt(fake_checkpoint(tmp / "logs" / "r"), how)
        return ["--resume", str(path)], {}
    return build


def _foreign(tmp):
    path = tmp / "model.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    return ["--resume", str(path)], {}


def _incompatible(**config):
    def build(tmp):
        return ["--resume", str(fake_checkpoint(tmp / "logs" / "r", **config))], {}
    return build


def _all_corrupt(tmp):
    corrupt(fake_checkpoint(tmp / "logs" / "r", step=2), "truncate")
    corrupt(fake_checkpoint(tmp / "logs" / "r", step=4), "flip")
    return ["--resume", "auto"], {}


def _other_data(tmp):
    folder = data_dir(tmp)
    return ["--data-dir", str(folder), "--iterations", "8", "--resume", str(fake_checkpoint(tmp / "logs" / "r"))], {}


CASES = [
    # flags (argparse and validate)
    Case("unknown flag `--widht 64`", "unrecognized arguments: --widht", flags("--widht", "64")),
    Case("malformed number `--width abc`", "argument --width: invalid int value: 'abc'", flags("--width", "abc")),
    Case("`--use-wandb maybe`", "expected true or false, got 'maybe'", flags("--use-wandb", "maybe")),
    Case("`--nan-policy retry`", "argument --nan-policy: invalid choice: 'retry'", flags("--nan-policy", "retry")),
    Case("`--width 40 --head-dim 16`", "--width 40 is not a multiple of --head-dim 16", flags("--width", "40")),
    Case("`--depth 3`", "--depth must be even", flags("--depth", "3")),
    Case("`--mup` without `--base-width`", "--mup needs --base-width", flags("--mup")),
    Case("`--base-width` without `--mup`", "--base-width only has a meaning with --mup", flags("--base-width", "16")),
    Case("`--seq-len 100`", "--seq-len 100 must be a multiple of 128", flags("--seq-len", "100")),
    Case("`--batch-tokens 200` (seq_len 128)", "--batch-tokens 200 must be a multiple of seq_len x world_size",
         flags("--batch-tokens", "200")),
    Case("`--iterations 0`", "--iterations must be a positive integer", flags("--iterations", "0")),
    Case("`--cooldown-frac 1.5`", "--cooldown-frac must be in [0, 1]", flags("--cooldown-frac", "1.5")),
    Case("`--save-every -1`", "--save-every must be >= 0", flags("--save-every", "-1")),
    Case("`--keep-last -1`", "--keep-last must be >= 0", flags("--keep-last", "-1")),
    Case("`--max-nan-skips 0`", "--max-nan-skips must be >= 1", flags("--max-nan-skips", "0")),
    Case("`--spike-factor 0.5`", "--spike-factor must be > 1", flags("--spike-factor", "0.5")),
    Case("`--peak-tflops -5`", "--peak-tflops must be positive", flags("--peak-tflops", "-5")),
    Case("`MONITOR_SPECTRAL_EVERY=often`", "MONITOR_SPECTRAL_EVERY='often' is not an integer",
         flags(env={"MONITOR_SPECTRAL_EVERY": "often"})),
    Case("`--resume` of a missing path", "no such file or folder", flags("--resume", "/nonexistent/step_000004.pt")),
    # data
    Case("`--data-dir` that does not exist", "data folder does not exist", flags("--data-dir", "/nonexistent/data")),
    Case("data folder without shards", "no *_train_*.bin shards",
         lambda tmp: (["--data-dir", str(tmp)], {})),
    Case("train shards without val shards", "no mine_val_*.bin", _no_val),
    Case("shard with a wrong magic number", "mine_train_000001.bin: wrong magic number 1234", _bad_magic),
    Case("truncated shard", "mine_train_000001.bin: truncated", _truncated),
    Case("token id outside the vocabulary", "mine_val_000000.bin: token id 60000 at position 1,234",
         _out_of_vocab),
    Case("too little training data for one step", "mine_train_000001.bin: too little data for one step",
         lambda tmp: (["--data-dir", str(data_dir(tmp, train=docs(100)))], {})),
    Case("validation shard too small", "mine_val_000000.bin: val shards hold 1,000 tokens",
         lambda tmp: (["--data-dir", str(data_dir(tmp, val=docs(1000, seed=1)))], {})),
    Case("`--val-tokens` beyond the validation data", "too few val tokens",
         lambda tmp: (["--data-dir", str(data_dir(tmp)), "--val-tokens", str(128 * 600)], {})),
    # checkpoints
    Case("truncated checkpoint", "is corrupt or truncated", _ckpt("truncate")),
    Case("checkpoint with a flipped byte", "fails its CRC check", _ckpt("flip")),
    Case("a torch file that is not a checkpoint", "is not a speedrun-mup checkpoint", _foreign),
    Case("checkpoint of another width", "width was 64, now 32", _incompatible(width=64)),
    Case("checkpoint with muP, run without", "mup was True, now False", _incompatible(mup=True, base_width=16)),
    Case("checkpoint of another batch size", "batch_tokens was 256, now 128", _incompatible(batch_tokens=256)),
    Case("checkpoint beyond `--iterations`", "is at step 4, beyond --iterations 2", _incompatible()),
    Case("checkpoint trained on other shards", "was trained on the shards [embedded_train_000001.bin]",
         _other_data),
    Case("`--resume auto` when every checkpoint is corrupt", "can be loaded", _all_corrupt),
    # log folder
    Case("log folder that cannot be created", "is not writable", _log_dir_is_a_file),
    Case("run folder that already holds a run", "already holds a run", _run_exists),
]


def run_case(case: Case, tmp: Path, capsys=None) -> tuple[int, str, str]:
    """Run train.main on the case; returns (exit code, stderr, stdout). Works with pytest's capsys or standalone."""
    argv, env = case.setup(tmp)
    args = TINY + ["--log-dir", str(tmp / "logs")] + argv
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        if capsys is None:
            import contextlib
            import io
            err, out = io.StringIO(), io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                code = _main_code(args)
            return code, err.getvalue(), out.getvalue()
        code = _main_code(args)
        captured = capsys.readouterr()
        return code, captured.err, captured.out
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _main_code(args) -> int:
    try:
        return main(args)
    except SystemExit as e:  # argparse reports a malformed flag itself, with exit code 2
        return e.code


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_with_exit_code_2_and_a_message(case, tmp_path, capsys):
    def metrics_rows() -> dict:  # run folder -> its metrics.jsonl rows (a case may plant some before the run)
        rows = {p: p.read_text().splitlines() for p in (tmp_path / "logs").glob("*/metrics.jsonl")}
        return {p: r for p, r in rows.items() if r}
    planted = {}
    setup = case.setup
    def setup_and_snapshot(tmp):
        result = setup(tmp)
        planted.update(metrics_rows())
        return result
    code, err, out = run_case(Case(case.name, case.expect, setup_and_snapshot), tmp_path, capsys)
    assert code == EXIT_BAD_INPUT, err
    assert case.expect in err, err
    assert "Traceback" not in err
    assert not list((tmp_path / "logs").glob("*/checkpoints/.tmp-*"))
    # refused before the first step: no step line, no metrics row
    assert not [ln for ln in (out + err).splitlines() if parse_step_line(ln)], out
    assert metrics_rows() == planted


def test_bad_input_in_a_real_process_prints_one_clean_line():
    proc = subprocess.run([sys.executable, "train.py", "--data-dir", "/nonexistent/data", "--iterations", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_BAD_INPUT
    assert proc.stderr.startswith("error: /nonexistent/data: data folder does not exist")
    assert "Traceback" not in proc.stderr


def readme_table() -> str:
    """The README's bad-input table: one row per case, its name and the fragment the test checks."""
    rows = ["| bad input | message contains |", "|---|---|"]
    return "\n".join(rows + [f"| {c.name} | {c.expect.replace('|', chr(92) + '|')} |" for c in CASES])


def test_readme_table_is_the_cases():
    readme = (REPO / "README.md").read_text()
    table = readme_table()
    assert table in readme, ("README.md's bad-input table differs from CASES in tests/test_bad_input.py; "
                             "replace it with the output of `python tests/test_bad_input.py --readme`:\n" + table)


def markdown_table() -> str:
    import tempfile
    out = ["| bad input | message (exit code 2) |", "|---|---|"]
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            code, err, _ = run_case(case, Path(tmp))
        line = next((ln for ln in err.strip().splitlines() if case.expect in ln), err.strip().splitlines()[-1])
        line = line.replace(tmp, "<tmp>").replace("|", "\\|")
        out.append(f"| {case.name} | {line} |" if code == EXIT_BAD_INPUT else f"| {case.name} | EXIT {code}! |")
    return "\n".join(out)


if __name__ == "__main__":
    print(readme_table() if "--readme" in sys.argv else markdown_table())
