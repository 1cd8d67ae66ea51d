"""Run logging: the step line, run names, W&B project names, metric key names and `SimpleLogger`.

This module owns everything a run writes to tell people what happened (SPEC section 6):

* **The step line** (`format_step_line`, `parse_step_line`, `STEP_LINE_RE`), modded-nanogpt style::

      step:1000/1750 val_loss:3.2847 train_time:180420ms step_avg:180.42ms

  `val_loss:` appears on validation steps, `train_loss:` on train-log steps (both may appear, val
  first). The one string is printed, written to `console.log` and `training.log`, and read back by
  the sweep parsers, so there is exactly one format to keep in sync.
* **Run names** (`make_run_name`): `speedrun_20250831_143022_mup_w1024_base768`, or
  `speedrun_20250831_143022_w768` without muP. **Projects** (`default_wandb_project`).
* **W&B metric keys**: the module constants below (`TIME_TRAINING_MS = "Time/training_time_ms"`, ...)
  are the names SPEC section 6 lists; the trainer builds its metric dicts from them.
* **`SimpleLogger`**: console + `logs/<run_name>/` files + W&B, on rank 0 only. Its files:

  ==================  ==========================================================================
  `training.log`      every `info` line with a timestamp
  `console.log`       exactly what was printed
  `config.json`       the full run config (kept, not overwritten, when resuming)
  `metrics.jsonl`     one JSON object per `log_metrics` call, `{"step": k, ...}`, the same keys
                      and rows that went to W&B (flushed each call)
  `summary.json`      the run summary given to `set_summary`
  `wandb/`            W&B's own run folder, only when `use_wandb=True`
  ==================  ==========================================================================

W&B policy (why each rule exists: training must never fail or stall because of W&B):

* `wandb` is imported inside `SimpleLogger`, never at module import.
* No API key (`WANDB_API_KEY`, an identity token file or a netrc entry for the W&B host) and no
  `WANDB_MODE` -> offline, with one log line saying so and how to `wandb sync` later.
* Online: the W&B host is probed first (a few seconds at most); unreachable -> offline. Then
  `wandb.init` runs with `settings.init_timeout` bounded. Measured with wandb 0.31 and no network
  (DNS failing): `wandb.init` raises `CommError` after about `init_timeout + 10 s` (the extra 10 s
  is wandb's own identity lookup), against about 100 s with wandb's defaults. On failure: offline.
* Any exception from wandb (init, log, summary, finish) is reported once as a log line and turns
  W&B off for the rest of the run; `metrics.jsonl` keeps every row.

Rank > 0 gets `NullLogger`, a twin with the same methods that does nothing and creates no files:
`SimpleLogger(..., rank=r)` returns one by itself, so the trainer calls the constructor on every rank.
"""
from __future__ import annotations

import json
import netrc
import numbers
import os
import re
import socket
import subprocess
import tempfile
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from core.wandb_file import wait_until_finished

# ----------------------------------------------------------------------------------------------
# W&B metric keys (SPEC section 6). The trainer and monitor build their dicts from these names.

TIME_TRAINING_MS = "Time/training_time_ms"
TIME_STEP_AVG_MS = "Time/step_avg_ms"
TIME_TOTAL_S = "Time/total_time_s"

LOSS_TRAIN = "Loss/train_loss"
LOSS_VAL = "Loss/val_loss"
LOSS_TRAIN_PERPLEXITY = "Loss/train_perplexity"
LOSS_VAL_PERPLEXITY = "Loss/val_perplexity"
LOSS_BEST_VAL = "Loss/best_val_loss"

OPT_LR = "Optimization/lr"
OPT_GRAD_NORM = "Optimization/grad_norm"
OPT_MOMENTUM = "Optimization/momentum"

MODEL_PARAM_NORM = "Model/param_norm"
MODEL_SPECTRAL_NORM_MAX = "Model/spectral_norm_max"
MODEL_SPECTRAL_NORM_MEAN = "Model/spectral_norm_mean"
MODEL_SPECTRAL_NORM_STD = "Model/spectral_norm_std"

PERF_TOKENS_PER_SECOND = "Perf/tokens_per_second"
PERF_MFU = "Perf/mfu"
PERF_FLOPS_PER_SECOND = "Perf/flops_per_second"

HW_PEAK_MEMORY_MB = "Hardware/peak_memory_mb"
HW_RESERVED_MEMORY_MB = "Hardware/reserved_memory_mb"

# Every fixed key above, in SPEC order (per-layer activation keys come from `activation_key`).
METRIC_KEYS = (
    TIME_TRAINING_MS, TIME_STEP_AVG_MS, TIME_TOTAL_S,
    LOSS_TRAIN, LOSS_VAL, LOSS_TRAIN_PERPLEXITY, LOSS_VAL_PERPLEXITY, LOSS_BEST_VAL,
    OPT_LR, OPT_GRAD_NORM, OPT_MOMENTUM,
    MODEL_PARAM_NORM, MODEL_SPECTRAL_NORM_MAX, MODEL_SPECTRAL_NORM_MEAN, MODEL_SPECTRAL_NORM_STD,
    PERF_TOKENS_PER_SECOND, PERF_MFU, PERF_FLOPS_PER_SECOND,
    HW_PEAK_MEMORY_MB, HW_RESERVED_MEMORY_MB,
)

ACTIVATION_STATS = ("mean", "std", "max", "min", "l2_norm")

# Run summary keys (SPEC: "a final summary (best val loss, total steps, total time)").
SUMMARY_BEST_VAL_LOSS = "best_val_loss"
SUMMARY_TOTAL_STEPS = "total_steps"
SUMMARY_TOTAL_TIME_S = "total_time_s"


def activation_key(layer: str, stat: str) -> str:
    """`Activations/<layer>_<stat>`, e.g. `activation_key("blocks.0.mlp", "std")`."""
    if stat not in ACTIVATION_STATS:
        raise ValueError(f"unknown activation statistic {stat!r}; use one of {ACTIVATION_STATS}")
    return f"Activations/{layer}_{stat}"


# ----------------------------------------------------------------------------------------------
# The step line

_FLOAT = r"[-+]?(?:\d+(?:\.\d*)?|nan|inf)"
# Unanchored at the start (preceded by the line start or whitespace) so the same regex also finds
# the step line inside a timestamped `training.log` line; anchored at the end so that a line with
# anything after it is not mistaken for one.
STEP_LINE_RE = re.compile(
    r"(?<!\S)step:(?P<step>\d+)/(?P<total>\d+)"
    rf"(?: val_loss:(?P<val_loss>{_FLOAT}))?"
    rf"(?: train_loss:(?P<train_loss>{_FLOAT}))?"
    r" train_time:(?P<train_time_ms>\d+)ms"
    rf" step_avg:(?P<step_avg_ms>{_FLOAT})ms\s*$"
)


def format_step_line(
    step: int,
    total: int,
    *,
    train_time_ms: float,
    step_avg_ms: float,
    val_loss: float | None = None,
    train_loss: float | None = None,
) -> str:
    """`step:1000/1750 val_loss:3.2847 train_time:180420ms step_avg:180.42ms` (modded-nanogpt style).

    Losses get 4 decimals, the training time is whole milliseconds, the step average 2 decimals.
    """
    parts = [f"step:{int(step)}/{int(total)}"]
    if val_loss is not None:
        parts.append(f"val_loss:{val_loss:.4f}")
    if train_loss is not None:
        parts.append(f"train_loss:{train_loss:.4f}")
    parts.append(f"train_time:{round(train_time_ms):d}ms")
    parts.append(f"step_avg:{step_avg_ms:.2f}ms")
    return " ".join(parts)


def parse_step_line(line: str) -> dict[str, int | float] | None:
    """The fields of a step line (also one prefixed by a `training.log` timestamp), else None.

    Returns `step`, `total`, `train_time_ms` (ints), `step_avg_ms` and whichever of `val_loss` /
    `train_loss` the line has (floats).
    """
    m = STEP_LINE_RE.search(line)
    if m is None:
        return None
    out: dict[str, int | float] = {
        "step": int(m["step"]),
        "total": int(m["total"]),
        "train_time_ms": int(m["train_time_ms"]),
        "step_avg_ms": float(m["step_avg_ms"]),
    }
    for key in ("val_loss", "train_loss"):
        if m[key] is not None:
            out[key] = float(m[key])
    return out


# ----------------------------------------------------------------------------------------------
# Names

def make_run_name(*, mup: bool, width: int, base_width: int | None, now: datetime | None = None) -> str:
    """`speedrun_20250831_143022_mup_w1024_base768`, or `speedrun_20250831_143022_w768` without muP."""
    ts = (now or datetime.now()).strftime("%Y%m%d_%H%M%S")
    if not mup:
        return f"speedrun_{ts}_w{int(width)}"
    if base_width is None:
        raise ValueError("a muP run name needs base_width; pass --base-width with --mup")
    return f"speedrun_{ts}_mup_w{int(width)}_base{int(base_width)}"


def code_version(repo: Path | None = None) -> str:
    """The commit the code runs from, e.g. "669846a", "+dirty" when tracked files differ from it, "unknown"
    outside a git checkout. In config.json and the log, so a sweep can tell which runs share one commit."""
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=7", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def default_wandb_project(mup: bool, group: bool = False) -> str:
    """`speedrun-mup-group` for the width-group sweep (all its runs, SP baselines included, belong
    together), else `speedrun-mup` with muP and `speedrun-basic` without."""
    if group:
        return "speedrun-mup-group"
    return "speedrun-mup" if mup else "speedrun-basic"


# ----------------------------------------------------------------------------------------------
# W&B environment checks (plain functions so tests can replace them)

_DEFAULT_WANDB_BASE_URL = "https://api.wandb.ai"


def _wandb_base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or _DEFAULT_WANDB_BASE_URL


def _netrc_path() -> Path:
    # The same lookup order wandb 0.31 uses (wandb/sdk/lib/wbauth/wbnetrc.py): $NETRC, then
    # ~/.netrc, then ~/_netrc.
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    unix = Path("~/.netrc").expanduser()
    windows = Path("~/_netrc").expanduser()
    return windows if (not unix.exists() and windows.exists()) else unix


def _have_wandb_credentials() -> bool:
    """Whether wandb would find credentials without prompting (env key, token file, netrc entry).

    Only checks that an entry exists; the key itself is never read out or logged.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(_wandb_base_url()).hostname
    try:
        entry = netrc.netrc(str(_netrc_path())).authenticators(host) if host else None
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def _probe_wandb_host(timeout_s: float) -> str | None:
    """None if a TCP connection to the W&B host opens within `timeout_s`, else the reason.

    Runs in a daemon thread because name resolution has no timeout of its own.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return None  # through a proxy a direct connection says nothing; let wandb try
    parts = urlsplit(_wandb_base_url())
    host = parts.hostname
    if not host:
        return f"WANDB_BASE_URL={_wandb_base_url()!r} has no host name"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    result: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result.append(None)
        except Exception as e:  # noqa: BLE001 -- any failure means "not reachable"; never kill the thread
            result.append(f"{type(e).__name__}: {e}")

    t = threading.Thread(target=connect, name="wandb-probe", daemon=True)
    t.start()
    t.join(timeout_s)
    if not result:
        return f"no answer from {host}:{port} within {timeout_s:g} s"
    return result[0]


# ----------------------------------------------------------------------------------------------
# SimpleLogger

def _jsonable(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as plain JSON values (paths, enums, ... become strings), as config.json stores it."""
    return json.loads(json.dumps(dict(config), default=str))


class SimpleLogger:
    """Console + `run_dir` files + optional W&B for one run, on rank 0 (see the module docstring).

    `SimpleLogger(..., rank=r)` with r != 0 returns a `NullLogger`, which does nothing.
    Use as a context manager or call `close()` (idempotent) at the end.
    """

    def __new__(cls, *args: Any, rank: int = 0, **kwargs: Any) -> "SimpleLogger":
        if cls is SimpleLogger and rank != 0:
            return super().__new__(NullLogger)
        return super().__new__(cls)

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: Mapping[str, Any],
        *,
        rank: int = 0,
        use_wandb: bool = False,
        wandb_project: str | None = None,
        wandb_entity: str | None = None,
        wandb_run_name: str | None = None,
        wandb_tags: tuple[str, ...] | list[str] = (),
        wandb_group: str | None = None,
        wandb_resume_id: str | None = None,
        wandb_init_timeout_s: float = 30,
        resume: bool = False,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.config = _jsonable(config)
        self.rank = rank
        self.resume = resume
        self.wandb_run_id: str | None = None
        self.wandb_mode: str | None = None  # "online" / "offline" / None (W&B off)
        self._wandb_run: Any = None
        self._wandb_file: Path | None = None  # the run's .wandb transaction log, to await at close
        self._closed = False

        self._check_run_dir()
        mode = "a" if resume else "w"
        # Files stay open for the whole run: log_metrics must not open a file per call.
        self._training_log = open(self.run_dir / "training.log", mode, encoding="utf-8")
        self._console_log = open(self.run_dir / "console.log", mode, encoding="utf-8")
        self._metrics = open(self.run_dir / "metrics.jsonl", mode, encoding="utf-8")
        self._summary: dict[str, Any] = {}
        if resume and (self.run_dir / "summary.json").exists():
            self._summary = json.loads((self.run_dir / "summary.json").read_text(encoding="utf-8"))
        self._write_config()

        if use_wandb:
            self._start_wandb(
                project=wandb_project, entity=wandb_entity, name=wandb_run_name or self.run_dir.name,
                tags=list(wandb_tags), group=wandb_group, resume_id=wandb_resume_id,
                init_timeout_s=wandb_init_timeout_s,
            )

    # -- setup ------------------------------------------------------------------------------

    def _check_run_dir(self) -> None:
        """Fail before training starts if the run folder cannot be written or would be clobbered."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.run_dir, prefix=".write_test_"):
                pass
        except OSError as e:
            raise PermissionError(
                f"log folder {str(self.run_dir)!r} is not writable ({type(e).__name__}: {e}); "
                "fix its permissions or point the run at a writable logs/ folder"
            ) from e
        if not self.resume:
            existing = [n for n in ("training.log", "metrics.jsonl") if (self.run_dir / n).exists()]
            if existing:
                raise FileExistsError(
                    f"{str(self.run_dir)!r} already holds a run ({', '.join(existing)}); "
                    "resume it (resume=True), choose another run name, or delete the folder"
                )

    def _write_config(self) -> None:
        path = self.run_dir / "config.json"
        if self.resume and path.exists():
            old = json.loads(path.read_text(encoding="utf-8"))
            changed = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
            note = f"; these keys differ now: {', '.join(changed)}" if changed else ""
            self.info(f"resume: keeping the existing config.json{note}")
            return
        path.write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")

    def _start_wandb(self, *, project, entity, name, tags, resume_id, init_timeout_s, group=None) -> None:
        try:
            import wandb  # lazy: importing wandb is slow and must not happen at module import
        except ImportError:
            self.info("W&B: the wandb package is not installed (pip install wandb); "
                      "W&B is off, metrics.jsonl has every row")
            return

        env_mode = os.environ.get("WANDB_MODE")
        mode = env_mode
        if env_mode == "disabled":
            self.info("W&B: WANDB_MODE=disabled, so W&B is off; metrics.jsonl has every row")
            return
        if env_mode is None and not _have_wandb_credentials():
            mode = "offline"
            self.info("W&B: no API key (WANDB_API_KEY or `wandb login`), running offline; "
                      f"upload later with: wandb sync {self.run_dir / 'wandb'}/offline-run-*")
        elif mode not in ("offline", "dryrun"):
            # Cheap reachability check first: without it an unreachable host costs the whole
            # init timeout (plus wandb's own ~10 s identity lookup) before we could go offline.
            reason = _probe_wandb_host(min(5.0, float(init_timeout_s)))
            if reason is not None:
                mode = "offline"
                self.info(f"W&B: {_wandb_base_url()} is unreachable ({reason}), running offline; "
                          f"upload later with: wandb sync {self.run_dir / 'wandb'}/offline-run-*")

        def init(init_mode: str | None) -> Any:
            return wandb.init(
                project=project, entity=entity, name=name, tags=tags or None, group=group,
                config=self.config, dir=str(self.run_dir), mode=init_mode,
                id=resume_id, resume="allow",
                # Each logger owns its run object; several may live in one process (tests, sweeps).
                reinit="create_new",
                settings=wandb.Settings(init_timeout=float(init_timeout_s)),
            )

        try:
            run = init(mode)
        except Exception as e:  # noqa: BLE001 - any W&B failure must not stop training
            if mode in ("offline", "dryrun"):
                self._wandb_failed("init", e)
                return
            self.info(f"W&B: online init failed ({type(e).__name__}: {_first_line(e)}); "
                      "falling back to offline; upload later with: "
                      f"wandb sync {self.run_dir / 'wandb'}/offline-run-*")
            mode = "offline"
            try:
                run = init(mode)
            except Exception as e2:  # noqa: BLE001
                self._wandb_failed("offline init", e2)
                return

        try:
            # Every key shares the trainer's step as its x-axis; W&B's own `_step` just counts rows,
            # so a resumed run never trips over a non-monotonic `_step`.
            run.define_metric("step")
            run.define_metric("*", step_metric="step")
        except Exception as e:  # noqa: BLE001
            self._wandb_run = run
            self._wandb_failed("define_metric", e)
            return
        self._wandb_run = run
        self.wandb_run_id = run.id
        try:
            self._wandb_file = Path(run.settings.sync_file)
        except Exception:  # noqa: BLE001 - only used to wait for the file at close
            self._wandb_file = None
        try:  # what wandb actually chose (a `wandb offline` settings file can also decide it)
            self.wandb_mode = "offline" if run.offline else "online"
        except Exception:  # noqa: BLE001
            self.wandb_mode = "offline" if mode in ("offline", "dryrun") else "online"
        self.info(f"W&B: run {run.id} ({self.wandb_mode}) in project {project!r}, files under "
                  f"{self.run_dir / 'wandb'}")

    def _wandb_failed(self, stage: str, exc: BaseException) -> None:
        """Report a W&B failure once and turn W&B off; metrics.jsonl keeps going."""
        self.info(f"W&B: {stage} failed ({type(exc).__name__}: {_first_line(exc)}); W&B is off for "
                  "the rest of this run, metrics.jsonl keeps every row")
        run, self._wandb_run = self._wandb_run, None
        self.wandb_mode = None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001 - already reported; nothing more to say
                pass

    # -- logging ----------------------------------------------------------------------------

    def info(self, msg: str) -> None:
        """Print `msg`, copy it to console.log, and add it with a timestamp to training.log."""
        print(msg, flush=True)
        self._console_log.write(msg + "\n")
        self._console_log.flush()
        ts = datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        self._training_log.write(f"{ts} | {msg}\n")
        self._training_log.flush()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Append `{"step": step, **metrics}` to metrics.jsonl and send the same row to W&B.

        Values must be Python numbers: a tensor here would force a host sync per call, so read
        device values back once per log step before calling this.
        """
        if "step" in metrics:
            raise ValueError("'step' is reserved for the step argument of log_metrics; drop it from metrics")
        row: dict[str, int | float] = {"step": int(step)}
        for k, v in metrics.items():
            if type(v) is float or type(v) is int:
                row[k] = v
            elif isinstance(v, numbers.Real):  # numpy scalars, bools
                row[k] = float(v)
            else:
                raise TypeError(
                    f"metric {k!r} is a {type(v).__name__}, not a Python number; convert device "
                    "tensors once per log step (e.g. torch.stack(...).tolist()) before log_metrics"
                )
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self._wandb_run is not None:
            try:
                self._wandb_run.log(row)
            except Exception as e:  # noqa: BLE001
                self._wandb_failed(f"log at step {step}", e)

    def set_summary(self, summary: Mapping[str, Any]) -> None:
        """Merge `summary` into the W&B run summary and rewrite summary.json."""
        clean = _jsonable(summary)
        self._summary.update(clean)
        (self.run_dir / "summary.json").write_text(json.dumps(self._summary, indent=2) + "\n",
                                                   encoding="utf-8")
        if self._wandb_run is not None:
            try:
                self._wandb_run.summary.update(clean)
            except Exception as e:  # noqa: BLE001
                self._wandb_failed("summary update", e)

    def close(self, exit_code: int = 0) -> None:
        """Flush and close the files and finish the W&B run. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        run, self._wandb_run = self._wandb_run, None
        if run is not None:
            try:
                run.finish(exit_code=exit_code)
            except Exception as e:  # noqa: BLE001
                self.info(f"W&B: finish failed ({type(e).__name__}: {_first_line(e)}); the local "
                          "W&B files may be incomplete, metrics.jsonl is complete")
            else:
                # finish() returns before wandb-core has written the .wandb file out (see
                # core.wandb_file.wait_until_finished); wait a little so that the file is complete
                # when close() returns, e.g. for a sweep script that reads it next.
                if self._wandb_file is not None and not wait_until_finished(self._wandb_file, 10.0):
                    self.info(f"W&B: {self._wandb_file} is still being written; wandb completes it "
                              "before the process exits")
        for f in (self._metrics, self._console_log, self._training_log):
            f.close()

    def __enter__(self) -> "SimpleLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=0 if exc_type is None else 1)


class NullLogger(SimpleLogger):
    """The no-op twin used on ranks != 0: same methods and attributes, writes and prints nothing."""

    def __init__(self, run_dir: str | os.PathLike | None = None, config: Mapping[str, Any] | None = None,
                 *, rank: int = 0, **_ignored: Any) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.config = dict(config or {})
        self.rank = rank
        self.resume = bool(_ignored.get("resume", False))
        self.wandb_run_id = None
        self.wandb_mode = None
        self._wandb_run = None
        self._closed = False

    def info(self, msg: str) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def set_summary(self, summary: Mapping[str, Any]) -> None:
        pass

    def close(self, exit_code: int = 0) -> None:
        self._closed = True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"



def log_summary_run(*, project: str, group: str, name: str, images: Mapping[str, Path] | None = None,
                    tables: Mapping[str, tuple[list[str], list[list[Any]]]] | None = None,
                    summary: Mapping[str, Any] | None = None, required: bool = False, log=print) -> str | None:
    """One W&B run that carries a study's result (the transfer verdict, a coordinate check): figures as
    `wandb.Image`, tables as `wandb.Table`, verdicts in the run summary; it joins `group`, so it sits beside
    the sweep's runs on the dashboard. Returns the W&B mode it ran in, or None when it did not run.

    Not `required` (--use-wandb auto), it runs only when W&B is configured (an API key or WANDB_MODE set);
    without network it writes an offline run to `wandb sync` later. No W&B failure is ever raised."""
    try:
        import wandb  # lazy, as everywhere: importing wandb is slow
    except ImportError:
        if required:
            log("W&B: wandb is not installed; no summary run")
        return None
    if not required and not (os.environ.get("WANDB_MODE") or _have_wandb_credentials()):
        return None
    mode = os.environ.get("WANDB_MODE") or ("online" if _have_wandb_credentials() else "offline")
    if mode == "online" and _probe_wandb_host(5.0) is not None:
        mode = "offline"
    try:
        run = wandb.init(project=project, group=group, name=name, job_type="summary", mode=mode,
                         reinit="create_new", settings=wandb.Settings(init_timeout=30))
        payload = {key: wandb.Image(str(path)) for key, path in (images or {}).items()}
        for key, (columns, rows) in (tables or {}).items():
            payload[key] = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
        run.log(payload)
        for key, value in (summary or {}).items():
            run.summary[key] = value
        run.finish()
        log(f"W&B: summary run {name!r} logged to {project}, group {group} ({mode})")
        return mode
    except Exception as e:  # noqa: BLE001 - W&B must never fail a study
        log(f"W&B: summary run failed ({type(e).__name__}: {_first_line(e)}); the files on disk are complete")
        return None
