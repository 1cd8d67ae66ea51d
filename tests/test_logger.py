"""Tests for core/logger.py: step line, names, SimpleLogger files, rank > 0, and W&B behaviour.

W&B runs here are offline (`WANDB_MODE=offline`) or have `wandb.init` replaced; nothing uses the network.
"""
import builtins
import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from core import logger as L
from core.logger import (
    LOSS_TRAIN, LOSS_VAL, OPT_LR, TIME_STEP_AVG_MS, TIME_TRAINING_MS, NullLogger, SimpleLogger,
    default_wandb_project, format_step_line, make_run_name, parse_step_line,
)
from core.wandb_file import find_wandb_file, read_wandb_file

CONFIG = {"width": 64, "base_width": 32, "mup": True, "lr": 0.02, "log_dir": Path("logs")}


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _public(rows):
    """History rows without W&B's own `_step`, `_runtime`, `_timestamp`."""
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def _metrics(k):
    return {LOSS_TRAIN: 10.0 / (k + 1), OPT_LR: 0.5 ** k, TIME_TRAINING_MS: 12.5 * k,
            TIME_STEP_AVG_MS: 12.5}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    return pytest.importorskip("wandb")


# ---------------------------------------------------------------------------------------------
# step line and names

def test_step_line_exact_format():
    line = format_step_line(1000, 1750, val_loss=3.28471, train_time_ms=180420.4, step_avg_ms=180.4204)
    assert line == "step:1000/1750 val_loss:3.2847 train_time:180420ms step_avg:180.42ms"
    line = format_step_line(5, 10, train_loss=4.0, train_time_ms=62.6, step_avg_ms=12.52)
    assert line == "step:5/10 train_loss:4.0000 train_time:63ms step_avg:12.52ms"


@pytest.mark.parametrize("kw", [
    dict(val_loss=3.2847),
    dict(train_loss=5.5),
    dict(val_loss=3.5, train_loss=3.25),
    dict(),
    dict(val_loss=float("inf")),
])
def test_step_line_round_trip(kw):
    line = format_step_line(17, 1750, train_time_ms=5123, step_avg_ms=301.35, **kw)
    parsed = parse_step_line(line)
    assert parsed == {"step": 17, "total": 1750, "train_time_ms": 5123, "step_avg_ms": 301.35, **kw}
    # The same line inside a timestamped training.log line parses the same.
    assert parse_step_line(f"2025-08-31 14:30:22.123 | {line}") == parsed


def test_step_line_nan_loss_parses_as_nan():
    parsed = parse_step_line(format_step_line(1, 2, val_loss=float("nan"), train_time_ms=1, step_avg_ms=1))
    assert parsed["val_loss"] != parsed["val_loss"]


@pytest.mark.parametrize("line", [
    "",
    "step:1/10 train_time:5ms",                                   # no step_avg
    "step:1/10 val_loss:abc train_time:5ms step_avg:5.00ms",      # not a number
    "substep:1/10 train_time:5ms step_avg:5.00ms",                # another word
    "step:1/10 train_time:5ms step_avg:5.00ms extra",             # trailing text
    "step:1/10 train_loss:1.0 val_loss:2.0 train_time:5ms step_avg:5.00ms",  # wrong order
    "step:1/10 train_time:5.5ms step_avg:5.00ms",                 # train_time is integer ms
    "W&B: run abc (offline) in project 'x'",
])
def test_parse_rejects_other_lines(line):
    assert parse_step_line(line) is None


def test_run_names_and_projects():
    now = datetime(2025, 8, 31, 14, 30, 22)
    assert make_run_name(mup=True, width=1024, base_width=768, now=now) == \
        "speedrun_20250831_143022_mup_w1024_base768"
    assert make_run_name(mup=False, width=768, base_width=None, now=now) == "speedrun_20250831_143022_w768"
    assert make_run_name(mup=False, width=768, base_width=256, now=now) == "speedrun_20250831_143022_w768"
    assert re.fullmatch(r"speedrun_\d{8}_\d{6}_w512", make_run_name(mup=False, width=512, base_width=None))
    with pytest.raises(ValueError, match="--base-width"):
        make_run_name(mup=True, width=1024, base_width=None)
    assert default_wandb_project(False) == "speedrun-basic"
    assert default_wandb_project(True) == "speedrun-mup"
    assert default_wandb_project(True, group=True) == "speedrun-mup-group"


def test_activation_key():
    assert L.activation_key("blocks.0.mlp", "l2_norm") == "Activations/blocks.0.mlp_l2_norm"
    with pytest.raises(ValueError, match="l2_norm"):
        L.activation_key("x", "median")
    assert len(set(L.METRIC_KEYS)) == 20 and all("/" in k for k in L.METRIC_KEYS)


# ---------------------------------------------------------------------------------------------
# files

def test_files_written(tmp_path, capsys):
    run_dir = tmp_path / "logs" / "run_a"
    with SimpleLogger(run_dir, CONFIG) as lg:
        lg.info("hello")
        lg.info(format_step_line(1, 10, train_loss=4.5, train_time_ms=10, step_avg_ms=10))
        for k in range(3):
            lg.log_metrics(_metrics(k), step=k)
        lg.set_summary({"best_val_loss": 3.5, "total_steps": 3})
        assert lg.wandb_run_id is None
    printed = capsys.readouterr().out
    assert (run_dir / "console.log").read_text() == printed == \
        "hello\nstep:1/10 train_loss:4.5000 train_time:10ms step_avg:10.00ms\n"
    log_lines = (run_dir / "training.log").read_text().splitlines()
    assert len(log_lines) == 2
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \| ", ln) for ln in log_lines)
    assert parse_step_line(log_lines[1])["train_loss"] == 4.5
    assert json.loads((run_dir / "config.json").read_text()) == {**CONFIG, "log_dir": "logs"}
    assert _rows(run_dir / "metrics.jsonl") == [{"step": k, **_metrics(k)} for k in range(3)]
    assert json.loads((run_dir / "summary.json").read_text()) == {"best_val_loss": 3.5, "total_steps": 3}
    assert not (run_dir / "wandb").exists()


def test_metrics_flushed_each_call_and_no_file_open(tmp_path, monkeypatch):
    lg = SimpleLogger(tmp_path / "r", CONFIG)

    def no_open(*a, **k):
        raise AssertionError("log_metrics opened a file")

    monkeypatch.setattr(builtins, "open", no_open)
    lg.log_metrics(_metrics(0), step=0)
    monkeypatch.undo()
    assert _rows(tmp_path / "r" / "metrics.jsonl") == [{"step": 0, **_metrics(0)}]  # before close
    lg.close()


def test_log_metrics_rejects_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    lg = SimpleLogger(tmp_path / "r", CONFIG)
    with pytest.raises(TypeError, match="'Loss/train_loss' is a Tensor"):
        lg.log_metrics({LOSS_TRAIN: torch.tensor(1.0)}, step=0)
    with pytest.raises(ValueError, match="reserved"):
        lg.log_metrics({"step": 3.0}, step=0)
    lg.log_metrics({LOSS_TRAIN: torch.tensor(2.0).item(), "flag": True}, step=1)
    lg.close()
    assert _rows(tmp_path / "r" / "metrics.jsonl") == [{"step": 1, LOSS_TRAIN: 2.0, "flag": 1.0}]


def test_resume_appends_and_keeps_config(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with SimpleLogger(run_dir, CONFIG) as lg:
        lg.info("first session")
        lg.log_metrics(_metrics(0), step=0)
        lg.set_summary({"best_val_loss": 4.0})
    with pytest.raises(FileExistsError, match="resume"):
        SimpleLogger(run_dir, CONFIG)
    with SimpleLogger(run_dir, {**CONFIG, "lr": 0.5}, resume=True) as lg:
        lg.info("second session")
        lg.log_metrics(_metrics(1), step=1)
        lg.set_summary({"total_steps": 2})
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 0.02
    console = (run_dir / "console.log").read_text().splitlines()
    assert console[0] == "first session" and console[-1] == "second session"
    assert "keeping the existing config.json; these keys differ now: lr" in console[1]
    assert len((run_dir / "training.log").read_text().splitlines()) == 3
    assert _rows(run_dir / "metrics.jsonl") == [{"step": k, **_metrics(k)} for k in range(2)]
    assert json.loads((run_dir / "summary.json").read_text()) == {"best_val_loss": 4.0, "total_steps": 2}


def test_rank_nonzero_writes_nothing(tmp_path, capsys, offline):
    run_dir = tmp_path / "run"
    lg = SimpleLogger(run_dir, CONFIG, rank=1, use_wandb=True)
    assert isinstance(lg, NullLogger) and isinstance(lg, SimpleLogger)
    lg.info("hello")
    lg.log_metrics(_metrics(0), step=0)
    lg.set_summary({"a": 1})
    lg.close()
    lg.close()
    assert lg.wandb_run_id is None
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().out == ""
    lg0 = SimpleLogger(tmp_path / "r0", CONFIG, rank=0)
    assert type(lg0) is SimpleLogger
    lg0.close()


def test_unwritable_run_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the log folder should be")
    with pytest.raises(PermissionError, match="not writable.*writable logs/ folder"):
        SimpleLogger(blocker / "run", CONFIG)


def test_close_is_idempotent_and_exit_marks_failure(tmp_path, offline):
    with pytest.raises(RuntimeError):
        with SimpleLogger(tmp_path / "r", CONFIG, use_wandb=True) as lg:
            lg.log_metrics(_metrics(0), step=0)
            raise RuntimeError("training crashed")
    lg.close()
    assert read_wandb_file(find_wandb_file(tmp_path / "r"))["exit_code"] == 1


def test_wandb_mode_disabled_writes_no_wandb_files(tmp_path, offline, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    t0 = time.perf_counter()
    with SimpleLogger(tmp_path / "r", CONFIG, use_wandb=True) as lg:
        lg.log_metrics(_metrics(0), step=0)
        assert lg.wandb_mode is None and lg.wandb_run_id is None
    assert time.perf_counter() - t0 < 5
    assert not (tmp_path / "r" / "wandb").exists()
    assert "WANDB_MODE=disabled" in (tmp_path / "r" / "console.log").read_text()


def test_use_wandb_false_never_imports_wandb(tmp_path):
    code = ("import sys; from core.logger import SimpleLogger; "
            f"lg = SimpleLogger({str(tmp_path / 'r')!r}, {{'a': 1}}); lg.log_metrics({{'x': 1.0}}, 0); "
            "lg.close(); assert 'wandb' not in sys.modules, 'wandb was imported'")
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=repo, check=True, capture_output=True)
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == \
        ["config.json", "console.log", "metrics.jsonl", "training.log"]


# ---------------------------------------------------------------------------------------------
# W&B

def test_offline_wandb_run_matches_metrics_jsonl(tmp_path, offline):
    run_dir = tmp_path / "logs" / "speedrun_x"
    with SimpleLogger(run_dir, CONFIG, use_wandb=True, wandb_project="speedrun-mup",
                      wandb_tags=("test",)) as lg:
        assert lg.wandb_mode == "offline" and lg.wandb_run_id
        for k in range(5):
            lg.log_metrics(_metrics(k), step=10 * k)
        lg.log_metrics({LOSS_VAL: 3.75}, step=40)  # a second row at the same step
        lg.set_summary({"best_val_loss": 3.75, "total_steps": 40, "total_time_s": 1.5})
        run_id = lg.wandb_run_id
    wfile = find_wandb_file(run_dir)
    assert wfile.is_relative_to(run_dir / "wandb")
    data = read_wandb_file(wfile)
    assert data["run_id"] == run_id and data["project"] == "speedrun-mup"
    jsonl = _rows(run_dir / "metrics.jsonl")
    assert len(jsonl) == 6 and _public(data["history"]) == jsonl
    assert {"best_val_loss": 3.75, "total_steps": 40, "total_time_s": 1.5}.items() <= data["summary"].items()
    config = {k: v for k, v in data["config"].items() if k != "_wandb"}
    assert config == json.loads((run_dir / "config.json").read_text())
    assert sum("W&B: run" in ln for ln in (run_dir / "console.log").read_text().splitlines()) == 1


def test_resumed_wandb_run_keeps_its_id(tmp_path, offline):
    run_dir = tmp_path / "run"
    with SimpleLogger(run_dir, CONFIG, use_wandb=True) as lg:
        lg.log_metrics(_metrics(0), step=0)
        run_id = lg.wandb_run_id
    time.sleep(1.1)  # W&B names its run folders by the second
    with SimpleLogger(run_dir, CONFIG, use_wandb=True, wandb_resume_id=run_id, resume=True) as lg:
        assert lg.wandb_run_id == run_id
        lg.log_metrics(_metrics(1), step=1)
    data = read_wandb_file(find_wandb_file(run_dir))  # the newest session's file
    assert data["run_id"] == run_id and _public(data["history"]) == [{"step": 1, **_metrics(1)}]


def test_wandb_init_raising_does_not_stop_training(tmp_path, offline, monkeypatch, capsys):
    def broken_init(*a, **k):
        raise RuntimeError("wandb exploded\nsecond line")

    monkeypatch.setattr(offline, "init", broken_init)
    with SimpleLogger(tmp_path / "r", CONFIG, use_wandb=True) as lg:
        assert lg.wandb_run_id is None and lg.wandb_mode is None
        for k in range(4):
            lg.log_metrics(_metrics(k), step=k)
        lg.set_summary({"best_val_loss": 1.0})
    assert _rows(tmp_path / "r" / "metrics.jsonl") == [{"step": k, **_metrics(k)} for k in range(4)]
    log = (tmp_path / "r" / "training.log").read_text()
    assert log.count("W&B: init failed (RuntimeError: wandb exploded); W&B is off") == 1
    assert "second line" not in log


def test_wandb_log_raising_is_reported_once(tmp_path, offline):
    with SimpleLogger(tmp_path / "r", CONFIG, use_wandb=True) as lg:
        lg.log_metrics(_metrics(0), step=0)
        calls = []

        def broken_log(row, *a, **k):
            calls.append(row)
            raise ConnectionError("socket closed")

        lg._wandb_run.log = broken_log
        for k in range(1, 6):
            lg.log_metrics(_metrics(k), step=k)
        lg.set_summary({"best_val_loss": 2.0})
        assert lg.wandb_mode is None
    assert len(calls) == 1  # W&B turned off after the first failure
    assert _rows(tmp_path / "r" / "metrics.jsonl") == [{"step": k, **_metrics(k)} for k in range(6)]
    log = (tmp_path / "r" / "training.log").read_text()
    assert log.count("W&B: log at step 1 failed (ConnectionError: socket closed)") == 1
    assert log.count("failed") == 1
    assert json.loads((tmp_path / "r" / "summary.json").read_text()) == {"best_val_loss": 2.0}


@pytest.fixture
def online_env(offline, monkeypatch, tmp_path):
    """As if online with credentials: WANDB_MODE unset and a (fake) API key."""
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    calls = []
    real_init = offline.init

    def init(*a, **k):
        calls.append((k.get("mode"), k["settings"].init_timeout))
        if k.get("mode") != "offline":
            raise AssertionError("test tried to go online")
        return real_init(*a, **k)

    monkeypatch.setattr(offline, "init", init)
    return calls


def test_online_init_timeout_falls_back_to_offline(tmp_path, offline, online_env, monkeypatch):
    monkeypatch.setattr(L, "_probe_wandb_host", lambda timeout_s: None)  # host looks reachable
    real = offline.init

    def timing_out_init(*a, **k):
        if k.get("mode") != "offline":
            online_env.append(("online", k["settings"].init_timeout))
            raise offline.errors.CommError("Timed out while retrying: Post graphql: no such host")
        return real(*a, **k)

    monkeypatch.setattr(offline, "init", timing_out_init)
    t0 = time.perf_counter()
    with SimpleLogger(tmp_path / "r", CONFIG, use_wandb=True, wandb_init_timeout_s=7) as lg:
        assert lg.wandb_mode == "offline" and lg.wandb_run_id
        lg.log_metrics(_metrics(0), step=0)
    assert time.perf_counter() - t0 < 20
    assert online_env == [("online", 7.0), ("offline", 7.0)]
    log = (tmp_path / "r" / "training.log").read_text()
    assert log.count("W&B: online init failed (CommError: Timed out") == 1 and "wandb sync" in log
    assert _public(read_wandb_file(find_wandb_file(tmp_path / "r"))["history"]) == [{"step": 0, **_metrics(0)}]


def test_unreachable_host_goes_offline_without_trying(tmp_path, offline, online_env, monkeypatch):
    monkeypatch.setattr(L, "_probe_wandb_host", lambda timeout_s: "no answer from api.wandb.ai:443")
    with SimpleLogger(tmp_path / "r", CONFIG, use_wandb=True) as lg:
        assert lg.wandb_mode == "offline"
    assert online_env == [("offline", 30.0)]
    assert "is unreachable (no answer from api.wandb.ai:443), running offline" in \
        (tmp_path / "r" / "console.log").read_text()


def test_probe_is_bounded_when_the_network_hangs(monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(L.socket, "create_connection", lambda *a, **k: time.sleep(30))
    t0 = time.perf_counter()
    reason = L._probe_wandb_host(0.3)
    assert time.perf_counter() - t0 < 2 and "within 0.3 s" in reason
    monkeypatch.undo()
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:1")  # nothing listens on port 1
    assert "ConnectionRefusedError" in L._probe_wandb_host(2.0)


def test_no_api_key_runs_offline_and_says_how_to_sync(tmp_path, offline, online_env, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    with SimpleLogger(tmp_path / "r", CONFIG, use_wandb=True) as lg:
        assert lg.wandb_mode == "offline"
    assert online_env == [("offline", 30.0)]
    console = (tmp_path / "r" / "console.log").read_text()
    assert console.count("W&B: no API key") == 1
    assert f"wandb sync {tmp_path / 'r' / 'wandb'}/offline-run-*" in console


def test_credentials_detection(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc_file = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert not L._have_wandb_credentials()
    netrc_file.write_text("machine example.com login user password p\n")
    assert not L._have_wandb_credentials()
    netrc_file.write_text("machine api.wandb.ai login user password " + "1" * 40 + "\n")
    assert L._have_wandb_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not L._have_wandb_credentials()
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert L._have_wandb_credentials()
