"""How a sweep starts one training run: a fresh `python train.py` process, or a fork of the sweep itself.

A fresh process spends ~3 s importing torch and the trainer (torch._dynamo alone ~1.2 s) before its first
step: a quarter of a 150-step width-32 run of the CPU transfer lab. The fork launcher imports all of that
once in the sweep process and forks a child per run. Every child starts from the same parent state, in
which no tensor op has run and no thread pool exists, so it trains exactly as a fresh process would
(`tests/test_sweep.py` compares the two bitwise). The fork launcher is chosen on CPU only, for one process
per run: CUDA must not be touched before a fork, and torchrun runs (`--nproc` > 1) need their own launcher.

Both launchers return an object with `poll()` (None while running, else the exit code; -N when killed by
signal N) and `send_signal(sig)`, which is all the sweep's scheduler uses of `subprocess.Popen`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LAUNCHERS = ("auto", "fork", "exec")


def resolve_launcher(launcher: str, nproc: int, cuda: bool) -> str:
    """`auto`: fork on a CPU machine with one process per run, else exec. `fork` where it cannot work: an error."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher {launcher!r}: choose from {list(LAUNCHERS)}")
    can_fork = hasattr(os, "fork") and nproc == 1 and not cuda
    if launcher == "auto":
        return "fork" if can_fork else "exec"
    if launcher == "fork" and not can_fork:
        raise ValueError("--launcher fork needs a CPU-only machine (CUDA must not be initialised before a fork) "
                         "and --nproc 1 (torchrun starts its own processes); use --launcher exec")
    return launcher


def preload() -> None:
    """Import what every run imports, once, in the parent (no tensor op runs here: a child must start clean)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import core.trainer  # noqa: F401  (torch, torch._dynamo and every core module a run needs)
    import train  # noqa: F401


class ForkedRun:
    """One `train.main(argv)` in a forked child, its stdout and stderr in `out_path`, the environment `env`."""

    def __init__(self, argv: list[str], out_path: Path, env: dict[str, str]):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os._exit(_child(argv, out_path, env))
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)


def _child(argv: list[str], out_path: Path, env: dict[str, str]) -> int:
    code = 1
    try:
        for s in (signal.SIGTERM, signal.SIGINT):  # the sweep's forwarding handlers are the parent's, not ours
            signal.signal(s, signal.SIG_DFL)
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(REPO_ROOT)
        if env.get("OMP_NUM_THREADS"):  # OpenMP read the variable when the parent loaded torch: set it directly
            import torch
            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        import train
        code = train.main(argv)
    except SystemExit as e:  # argparse's exit 2 on a bad flag
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # a crash: the traceback goes to the run's .out, as from a fresh process
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def start(argv: list[str], out_path: Path, env: dict[str, str], launcher: str, command: list[str]):
    """Start one run: `launcher` "fork" runs train.main(argv) in a child; "exec" runs `command` (python train.py
    ..., or torchrun) as a fresh process. Both write stdout and stderr to out_path."""
    if launcher == "fork":
        return ForkedRun(argv, out_path, env)
    with open(out_path, "w") as out:
        return subprocess.Popen(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
