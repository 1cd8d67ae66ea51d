"""Tests for core/wandb_file.py against files written by the installed wandb (offline, no network), and against
committed files written by every wandb minor version requirements.txt admits."""
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also runnable as a script (--write-fixture)
from core import wandb_file as wf  # noqa: E402

N_ROWS = 400
BIG = "x" * 70_000  # > 2 blocks of 32 KiB: forces a FIRST / MIDDLE / LAST record chain


def _offline_env(mp, root):
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        mp.setenv(var, str(root / var.lower()))


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    """One offline run written by wandb itself: config with a big value, N_ROWS history rows, a summary."""
    wandb = pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("wbrun")
    with pytest.MonkeyPatch.context() as mp:
        _offline_env(mp, root)
        run = wandb.init(project="reader-test", dir=str(root), mode="offline", reinit="create_new",
                         config={"width": 64, "nested": {"lr": 0.02}, "big": BIG})
        rows = []
        for k in range(N_ROWS):
            row = {"step": k, "Loss/train_loss": 10.0 / (k + 1), "Optimization/lr": 0.5 ** (k % 7)}
            run.log(row)
            rows.append(row)
        run.summary.update({"best_val_loss": 3.25, "total_steps": N_ROWS})
        run_id = run.id
        run.finish()
    assert wf.wait_until_finished(wf.find_wandb_file(root), timeout_s=10)
    return root, run_id, rows


def test_reads_history_summary_config(wandb_run):
    root, run_id, rows = wandb_run
    path = wf.find_wandb_file(root)
    data = wf.read_wandb_file(path)
    assert data["run_id"] == run_id and data["project"] == "reader-test" and data["exit_code"] == 0
    history = [{k: v for k, v in r.items() if not k.startswith("_")} for r in data["history"]]
    assert history == rows
    assert [r["_step"] for r in data["history"]] == list(range(N_ROWS))
    assert data["summary"]["best_val_loss"] == 3.25 and data["summary"]["total_steps"] == N_ROWS
    assert data["summary"]["Loss/train_loss"] == rows[-1]["Loss/train_loss"]  # last logged value
    assert data["config"]["width"] == 64 and data["config"]["nested"] == {"lr": 0.02}
    assert data["config"]["big"] == BIG


def test_fragmented_records_and_blocks(wandb_run):
    root, _, _ = wandb_run
    blob = wf.find_wandb_file(root).read_bytes()
    assert blob[:4] == b":W&B" and blob[4:6] == b"\xe1\xbe"  # 0xBEE1 little-endian
    assert len(blob) > 3 * wf.BLOCK_SIZE
    chunks = list(wf.iter_chunks(blob))
    types = Counter(t for _, t, _ in chunks)
    assert types[wf.FIRST] >= 1 and types[wf.MIDDLE] >= 1 and types[wf.LAST] == types[wf.FIRST]
    # Every chunk header lies inside one block, and the reader consumed the file to its end.
    assert all(off % wf.BLOCK_SIZE <= wf.BLOCK_SIZE - wf.RECORD_HEADER.size for off, _, _ in chunks)
    off, _, payload = chunks[-1]
    assert off + wf.RECORD_HEADER.size + len(payload) == len(blob)


def test_checksum_mismatch_is_reported(wandb_run, tmp_path):
    root, _, _ = wandb_run
    blob = bytearray(wf.find_wandb_file(root).read_bytes())
    first_payload = wf.FILE_HEADER.size + wf.RECORD_HEADER.size
    blob[first_payload + 2] ^= 0xFF
    bad = tmp_path / "run-bad.wandb"
    bad.write_bytes(bytes(blob))
    with pytest.raises(wf.WandbFileError, match="checksum mismatch.*byte 7"):
        wf.read_wandb_file(bad)


def test_truncated_file_gives_the_intact_prefix(wandb_run, tmp_path):
    root, _, rows = wandb_run
    blob = wf.find_wandb_file(root).read_bytes()
    cut = tmp_path / "run-cut.wandb"
    cut.write_bytes(blob[: len(blob) * 2 // 3])
    data = wf.read_wandb_file(cut)
    history = [{k: v for k, v in r.items() if not k.startswith("_")} for r in data["history"]]
    assert 0 < len(history) < len(rows) and history == rows[: len(history)]
    assert data["exit_code"] is None  # the exit record was cut off
    assert not wf.is_finished(cut) and wf.is_finished(wf.find_wandb_file(root))
    t0 = time.perf_counter()
    assert wf.wait_until_finished(cut, timeout_s=0.2) is False
    assert time.perf_counter() - t0 < 2


@pytest.mark.parametrize("header, match", [
    (b"LEVL\xe1\xbe\x00", "not a .wandb file"),
    (b":W&B\xbe\xe1\x00", "not a .wandb file"),
    (b":W&B\xe1\xbe\x07", "version 7"),
    (b":W&", "too short"),
])
def test_bad_header(tmp_path, header, match):
    p = tmp_path / "run-x.wandb"
    p.write_bytes(header)
    with pytest.raises(wf.WandbFileError, match=match):
        wf.read_wandb_file(p)


def test_find_wandb_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--use-wandb true"):
        wf.find_wandb_file(tmp_path)
    old = tmp_path / "wandb" / "offline-run-20250101_000000-aaa" / "run-aaa.wandb"
    new = tmp_path / "wandb" / "offline-run-20250102_000000-aaa" / "run-aaa.wandb"
    for i, p in enumerate((old, new)):
        p.parent.mkdir(parents=True)
        p.write_bytes(b":W&B\xe1\xbe\x00")
        os.utime(p, (1_000_000 + i, 1_000_000 + i))
    assert wf.find_wandb_file(tmp_path) == new.resolve()
    assert wf.find_wandb_file(old) == old
    assert wf.read_wandb_file(new)["history"] == []


def test_cli_prints_the_run(wandb_run, capsys):
    root, run_id, rows = wandb_run
    assert wf.main([str(root)]) == 0
    out = capsys.readouterr().out
    assert f"run: {run_id}" in out and f"history: {N_ROWS} rows" in out
    last = json.loads(out.split("last row: ", 1)[1].splitlines()[0])
    assert last["step"] == rows[-1]["step"]


# ---------------------------------------------------------------------------------------------
# The pinned range (requirements.txt): files written by each wandb minor version in it are committed
# under tests/golden/wandb_files/ and read back here with whatever wandb is installed, so the reader is
# tested against the format of every version the pin allows, not only the installed one. To widen the
# pin, write a fixture with that version (`python tests/test_wandb_file.py --write-fixture`, run with it
# installed) and extend the range.

FIXTURES = sorted((Path(__file__).parent / "golden" / "wandb_files").glob("wandb-*.wandb"))
FIXTURE_BIG = "y" * 33_000  # > one 32 KiB block: a FIRST / LAST record chain


def _fixture_rows():
    return [{"step": k, "Loss/train_loss": 10.0 / (k + 1), "Optimization/lr": 0.5 ** (k % 7)} for k in range(50)]


def _pinned_range():
    from packaging.requirements import Requirement
    lines = (Path(__file__).resolve().parent.parent / "requirements.txt").read_text().splitlines()
    (req,) = [Requirement(ln.split("#")[0].strip()) for ln in lines if ln.strip().startswith("wandb")]
    return req.specifier


def test_requirements_pin_a_wandb_range_covered_by_fixtures():
    from packaging.version import Version
    spec = _pinned_range()
    assert spec, "requirements.txt must pin wandb to the range core/wandb_file.py is tested against"
    fixture_versions = [Version(p.stem.removeprefix("wandb-")) for p in FIXTURES]
    assert all(v in spec for v in fixture_versions), (spec, fixture_versions)
    # every minor version the range admits has a fixture (the range must have an upper bound)
    upper = [s for s in spec if s.operator in ("<", "<=")]
    assert upper, f"wandb{spec}: give the range an upper bound (a newer format is untested)"
    lower = min(fixture_versions)
    admitted = {(0, m) for m in range(lower.minor, 100) if Version(f"0.{m}.0") in spec}
    assert admitted <= {(v.major, v.minor) for v in fixture_versions}, (spec, fixture_versions)


def test_installed_wandb_is_in_the_pinned_range():
    wandb = pytest.importorskip("wandb")
    from packaging.version import Version
    assert Version(wandb.__version__) in _pinned_range(), (
        f"wandb {wandb.__version__} is outside requirements.txt's wandb{_pinned_range()}: the reader is untested there")


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_reads_files_of_every_pinned_wandb_version(path):
    pytest.importorskip("wandb")  # the record protobuf comes from the installed wandb
    data = wf.read_wandb_file(path)
    history = [{k: v for k, v in r.items() if not k.startswith("_")} for r in data["history"]]
    assert history == _fixture_rows() and data["exit_code"] == 0 and data["project"] == "reader-fixture"
    assert data["config"]["width"] == 64 and data["config"]["nested"] == {"lr": 0.02}
    assert data["config"]["big"] == FIXTURE_BIG
    assert data["summary"]["best_val_loss"] == 3.25 and data["summary"]["total_steps"] == 50
    assert wf.is_finished(path)


def write_fixture() -> Path:
    import shutil
    import tempfile
    import wandb
    out = Path(__file__).parent / "golden" / "wandb_files" / f"wandb-{wandb.__version__}.wandb"
    with tempfile.TemporaryDirectory() as tmp:
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            os.environ[var] = str(Path(tmp) / var.lower())
        os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
        run = wandb.init(project="reader-fixture", dir=tmp, mode="offline",
                         config={"width": 64, "nested": {"lr": 0.02}, "big": FIXTURE_BIG})
        for row in _fixture_rows():
            run.log(row)
        run.summary.update({"best_val_loss": 3.25, "total_steps": 50})
        run.finish()
        src = wf.find_wandb_file(tmp)
        assert wf.wait_until_finished(src, timeout_s=10)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out)
    return out


if __name__ == "__main__":
    if "--write-fixture" not in sys.argv:
        sys.exit("usage: python tests/test_wandb_file.py --write-fixture   (with the wandb to record installed)")
    print(f"wrote {write_fixture()}")
