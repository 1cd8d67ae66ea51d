"""Checkpoints: what a resumable run saves, how it is written safely, found again and checked.

A checkpoint is one file, `logs/<run_name>/checkpoints/step_000012.pt`, holding everything a run needs
to continue exactly where it was after 12 optimizer steps:

    model        the model's state_dict (the uncompiled module's)
    optimizers   DistAdam and Muon state, GATHERED: the same layout one process has (see below)
    loader       the training BatchLoader position (file, position, epoch)
    rng          torch CPU / CUDA, numpy and Python RNG states, one entry per rank
    monitor      the TrainingMonitor state (warm spectral-norm blocks)
    guard        the NonFiniteGuard state (running minimum loss, skip counters)
    trainer      training time so far, best val loss, coordinate-check rows, metrics.jsonl length
    config       the run's TrainConfig as a dict, plus world_size, run_name and the W&B run id

The file is an ordinary `torch.save` zip (readable with `load_checkpoint`, or `torch.load`).

Writing (`write_atomic`): into a temporary file in the same folder, flush, fsync, rename over the
final name, fsync the folder. A crash at any moment leaves either the old set of checkpoints or the
old set plus the complete new one, never a half-written `step_*.pt`; leftover temporary files are
ignored by discovery and removed by the next save. Reading (`load_checkpoint`) first checks every
zip member's CRC32 (`torch.load` alone does not, so a flipped bit would load silently), then
unpickles with `weights_only=True` (no code runs from a checkpoint file).

Several processes: parameters are replicated, but the optimizer state is sharded (DistAdam keeps
rows [r*s, (r+1)*s) of each parameter's moments on rank r; Muon keeps a matrix's momentum only on
its owner rank). `gather_optimizer_state` collects both into the one-process layout, rank 0 writes
the single file, and `shard_optimizer_state` cuts the slice each rank owns when loading. So a
checkpoint does not depend on the world size: a run saved on 8 GPUs resumes on 1 or 4 (with the same
global batch; then the result equals the uninterrupted run up to float rounding, since the
reduction order changes). Same world size: bitwise, as with one process.

Test-only hook (documented here, never set in real runs): `SPEEDRUN_TEST_KILL_IN_CHECKPOINT_WRITE=<step>`
makes the process SIGKILL itself half-way through writing the checkpoint of that step, so a test can
show that the previous checkpoint survives and resumes.
"""
from __future__ import annotations

import io
import os
import random
import re
import signal
import zipfile
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from core.config import ConfigError, TrainConfig
from core.guard import NonFiniteError  # the guard owns the error the trainer maps to its exit code

FORMAT = "speedrun-mup-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
_NAME_RE = re.compile(r"^step_(\d+)\.pt$")
_TMP_PREFIX = ".tmp-"
TEST_KILL_ENV = "SPEEDRUN_TEST_KILL_IN_CHECKPOINT_WRITE"

# Resuming with one of these changed would load weights into a different model or feed it different
# batches, so it is refused. Everything else (iterations, learning rates, logging, ...) may change on
# resume; the trainer logs what changed.
MUST_MATCH = ("width", "depth", "head_dim", "vocab_size", "mup", "base_width", "seq_len", "batch_tokens")


class CheckpointError(ConfigError):
    """A checkpoint that is missing, corrupt, or incompatible with this run. Bad input: exit code 2."""


# ---------------------------------------------------------------------------------------------
# Files: names, discovery, atomic write, verified read


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:06d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint file in the run folder, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        m = _NAME_RE.match(path.name)
        if m and path.is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def _fsync_dir(folder: Path) -> None:
    # A rename is only durable once the directory entry is on disk (POSIX: fsync the directory).
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _KillHalfway:
    """Test-only file wrapper: forwards writes, then SIGKILLs the process once `limit` bytes went to disk."""

    def __init__(self, f, limit: int):
        self._f, self._limit, self._written = f, limit, 0

    def write(self, data) -> int:
        n = self._f.write(data)
        self._written += n
        if self._written >= self._limit:
            self._f.flush()
            os.fsync(self._f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return n

    def flush(self) -> None:
        self._f.flush()


def write_atomic(path: str | Path, write: Callable[[Any], None], *, kill_after_bytes: int | None = None) -> Path:
    """Create `path` with `write(file)`, so that `path` is either absent/old or complete, whatever happens.

    Temporary file in the same folder (same filesystem, so the rename is atomic), flush + fsync, rename,
    fsync the folder. `kill_after_bytes` is for tests only (see the module docstring).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{_TMP_PREFIX}{path.name}.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(_KillHalfway(f, kill_after_bytes) if kill_after_bytes is not None else f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete temporary files left by a process that died while writing a checkpoint."""
    folder = checkpoint_dir(run_dir)
    removed = []
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith(_TMP_PREFIX):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def prune(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Keep the `keep_last` newest checkpoints (0 keeps all); returns the deleted paths."""
    if keep_last <= 0:
        return []
    old = list_checkpoints(run_dir)[:-keep_last]
    for _, path in old:
        path.unlink(missing_ok=True)
    if old:
        _fsync_dir(checkpoint_dir(run_dir))
    return [p for _, p in old]


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Write `payload` (CPU tensors and plain Python values) to `path` atomically."""
    step = payload.get("step")
    kill_at = os.environ.get(TEST_KILL_ENV)
    kill_after = None
    if kill_at is not None and step is not None and kill_at.strip() == str(step):
        probe = io.BytesIO()  # size of the file, so the test kill lands in the middle of it
        torch.save(payload, probe)
        kill_after = max(1, probe.tell() // 2)
    return write_atomic(path, lambda f: torch.save(payload, f), kill_after_bytes=kill_after)


def load_checkpoint(path: str | Path) -> dict:
    """Read and verify a checkpoint file; raises CheckpointError saying what is wrong and what to do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file. Pass a step_*.pt file, a run folder, "
                              "or --resume auto.")
    hint = "Resume from an older checkpoint in the same folder (pass its path), or delete this file."
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # reads every member and checks its CRC32
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({e}). {hint}") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: member {bad} fails its CRC check. {hint}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is not ours
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}). {hint}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a speedrun-mup checkpoint (no format={FORMAT!r} entry); "
                              "pass a step_*.pt file written by train.py --save-every.")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {payload.get('format_version')}, this code "
                              f"reads version {FORMAT_VERSION}; resume it with the code version that wrote it.")
    return payload


def newest_valid(run_dir: str | Path, log: Callable[[str], None] = print) -> tuple[Path, dict]:
    """The newest checkpoint of a run folder that verifies, skipping (and reporting) corrupt ones.

    Raises CheckpointError (with every reason) when the folder has checkpoints but none verifies: starting
    over on top of them would silently throw their work away.
    """
    problems = []
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            found = path, load_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            log(f"resume: skipping {path}: {e}")
            continue
        return found
    if not problems:
        raise CheckpointError(f"{run_dir}: no checkpoints/step_*.pt in this folder; pass a run folder written with "
                              "--save-every, a step_*.pt file, or --resume auto.")
    raise CheckpointError(f"no checkpoint in {checkpoint_dir(run_dir)} can be loaded: " + " | ".join(problems)
                          + " Move the broken files away to start the run again.")


# ---------------------------------------------------------------------------------------------
# Which checkpoint --resume means


def resolve_resume(cfg: TrainConfig, log: Callable[[str], None] = print) -> tuple[Path | None, dict | None]:
    """Apply --resume: returns (checkpoint path, payload), or (None, None) to start a new run.

    Sets cfg.run_name / cfg.log_dir to the checkpoint's run folder, so the run continues there.
      --resume PATH  a step_*.pt file, or a run folder (its newest valid checkpoint). Missing/corrupt: error.
      --resume auto  the newest valid checkpoint of logs/<run_name>/; without --run-name, of the newest
                     run folder in --log-dir named for the same kind of run (same muP / width / base width).
                     None found: a new run (so the same command serves the first start and every restart).
    """
    if not cfg.resume:
        return None, None
    if cfg.resume == "auto":
        run_dir = _auto_run_dir(cfg)
        if run_dir is None:
            log(f"resume auto: no checkpoint under {cfg.log_dir}/ for this run; starting a new run")
            return None, None
        if not list_checkpoints(run_dir):
            log(f"resume auto: {run_dir} holds no checkpoint yet; starting the run again in that folder")
            cfg.log_dir, cfg.run_name = str(run_dir.parent), run_dir.name
            return None, None
        path, payload = newest_valid(run_dir, log)
    else:
        target = Path(cfg.resume)
        if target.is_dir():
            run_dir = target.parent if target.name == CHECKPOINT_DIR else target
            path, payload = newest_valid(run_dir, log)
        else:
            path, payload = target, load_checkpoint(target)
    saved_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
    if cfg.run_name and cfg.run_name != saved_dir.name and cfg.resume != "auto":
        log(f"resume: continuing in the checkpoint's run folder {saved_dir} (not --run-name {cfg.run_name})")
    cfg.log_dir, cfg.run_name = str(saved_dir.parent), saved_dir.name
    return path, payload


def _auto_run_dir(cfg: TrainConfig) -> Path | None:
    log_dir = Path(cfg.log_dir)
    if cfg.run_name:
        run_dir = log_dir / cfg.run_name
        return run_dir if run_dir.is_dir() else None
    if not log_dir.is_dir():
        return None
    # make_run_name: speedrun_<YYYYmmdd>_<HHMMSS>[_mup]_w<width>[_base<base>]
    suffix = f"_mup_w{cfg.width}_base{cfg.base_width}" if cfg.mup else f"_w{cfg.width}"
    pattern = re.compile(r"^speedrun_\d{8}_\d{6}" + re.escape(suffix) + "$")
    candidates = [d for d in log_dir.iterdir() if d.is_dir() and pattern.match(d.name) and list_checkpoints(d)]
    return max(candidates, key=lambda d: d.name) if candidates else None  # the timestamp sorts by name


def check_compatible(saved: dict, cfg: TrainConfig, path: str | Path) -> list[str]:
    """Refuse a checkpoint whose model or batch differs from this run (naming the field); return the
    other fields that changed, for the log."""
    saved_cfg = saved.get("config", {})
    for name in MUST_MATCH:
        if name == "base_width" and not cfg.mup:
            continue
        old, new = saved_cfg.get(name), getattr(cfg, name)
        if old != new:
            flag = "--" + name.replace("_", "-")
            fix = (f"add {flag}" if old else f"drop {flag}") if isinstance(old, bool) else f"use {flag} {old}"
            raise CheckpointError(f"checkpoint {path} does not fit this run: {name} was {old!r}, now {new!r}. "
                                  f"To resume it, {fix} (the model and batch must stay the same); or start a new "
                                  "run without --resume.")
    step = saved.get("step", 0)
    if cfg.iterations is not None and step > cfg.iterations:
        raise CheckpointError(f"checkpoint {path} is at step {step}, beyond --iterations {cfg.iterations}: "
                              f"resume with --iterations {saved_cfg.get('iterations', step)} (or more).")
    ignored = {"resume", "run_name", "log_dir"}
    return [f"{f.name}: {saved_cfg.get(f.name)!r} -> {getattr(cfg, f.name)!r}" for f in fields(TrainConfig)
            if f.name not in ignored and f.name in saved_cfg and saved_cfg[f.name] != getattr(cfg, f.name)]


def check_data(saved: dict, train_files, path: str | Path) -> None:
    """Refuse a checkpoint whose data position belongs to other training shards (before the model is built)."""
    had = list(saved.get("loader", {}).get("files", []))
    have = [Path(f).name for f in train_files]
    if had and had != have:
        def show(names):
            return ", ".join(names[:3]) + (f", ... ({len(names)} files)" if len(names) > 3 else "")
        raise CheckpointError(f"checkpoint {path} was trained on the shards [{show(had)}], this run reads "
                              f"[{show(have)}]; its data position means nothing here. Resume with the same "
                              "--data-dir, or start a new run.")


# ---------------------------------------------------------------------------------------------
# Optimizer state: gathered to the one-process layout, sharded back per rank


def _rows(p: torch.Tensor) -> int:
    return p.shape[0] if p.ndim > 0 else 1


def _params_in_order(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    # torch's state_dict numbers parameters in param_groups order; we use the same numbering.
    return [p for group in opt.param_groups for p in group["params"]]


def _state_keys(opt: torch.optim.Optimizer) -> list[str]:
    """Tensor state keys, taken from any parameter that has state (all have the same keys)."""
    for state in opt.state.values():
        return sorted(k for k, v in state.items() if isinstance(v, torch.Tensor))
    return []


def gather_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """This optimizer's state in the one-process layout ({"state": {i: {...}}, "param_groups": [...]}).

    One process (world_size 1 or no `world_size` attribute): its own state_dict. Several: every rank
    must call this (collectives); DistAdam shards are all-gathered along dim 0 and the padding rows
    dropped; each Muon momentum buffer is all-gathered from its owner rank. Tensors come back on CPU.
    """
    ws = getattr(opt, "world_size", 1)
    sd = opt.state_dict()
    if ws == 1:
        return {"state": {i: {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
                              for k, v in s.items()} for i, s in sd["state"].items()},
                "param_groups": sd["param_groups"]}
    params = _params_in_order(opt)
    full: dict[int, dict] = {}
    if hasattr(opt, "owner_rank"):  # Muon: state lives on the owner rank only
        keys = ["momentum_buffer"]
        for i, p in enumerate(params):
            owner = opt.owner_rank(p)
            st = opt.state.get(p, {})
            have = torch.tensor([1.0 if "momentum_buffer" in st else 0.0], device=p.device)
            dist.broadcast(have, src=owner)
            if have.item() == 0:
                continue
            buf = st["momentum_buffer"].detach().clone() if opt.rank == owner else torch.empty_like(p)
            dist.broadcast(buf, src=owner)
            full[i] = {"momentum_buffer": buf.cpu()}
    else:  # DistAdam: rows [r*s, (r+1)*s) of each moment on rank r
        for i, p in enumerate(params):
            st = opt.state.get(p, {})
            have = torch.tensor([1.0 if st else 0.0], device=p.device)
            dist.all_reduce(have, op=dist.ReduceOp.MIN)
            if have.item() == 0:
                continue
            entry = {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
            for k, v in st.items():
                if not isinstance(v, torch.Tensor):
                    continue
                parts = [torch.empty_like(v) for _ in range(ws)]
                dist.all_gather(parts, v.detach().contiguous())
                entry[k] = torch.cat(parts)[:_rows(p)].reshape(p.shape).cpu()
            full[i] = entry
    return {"state": full, "param_groups": sd["param_groups"]}


def shard_optimizer_state(opt: torch.optim.Optimizer, full: dict, path: str | Path = "checkpoint") -> None:
    """Load a gathered state (`gather_optimizer_state`) into `opt`, keeping only this rank's share.

    The hyperparameters of `opt`'s param groups (LR, betas, momentum, ...) are kept: they come from the
    current config, so a resumed run can change them. The group structure must match the checkpoint's.
    """
    params = _params_in_order(opt)
    mine = opt.state_dict()["param_groups"]
    saved_sizes = [len(g["params"]) for g in full["param_groups"]]
    if saved_sizes != [len(g["params"]) for g in mine]:
        raise CheckpointError(f"checkpoint {path}: {type(opt).__name__} has parameter groups of sizes {saved_sizes}, "
                              f"this model {[len(g['params']) for g in mine]}; the model code changed since the "
                              "checkpoint was written. Resume with the code that wrote it.")
    ws, rank = getattr(opt, "world_size", 1), getattr(opt, "rank", 0)
    state: dict[int, dict] = {}
    for i, entry in full["state"].items():
        i = int(i)
        p = params[i]
        for k, v in entry.items():
            if isinstance(v, torch.Tensor) and v.shape != p.shape:
                raise CheckpointError(f"checkpoint {path}: {type(opt).__name__} state {k!r} of parameter {i} has "
                                      f"shape {tuple(v.shape)}, the parameter {tuple(p.shape)}; the model changed.")
        if ws == 1:
            state[i] = dict(entry)
        elif hasattr(opt, "owner_rank"):
            if opt.owner_rank(p) == rank:
                state[i] = dict(entry)
        else:
            n = _rows(p)
            s = -(-n // ws)  # rows per rank after padding to a multiple of world_size (DistAdam's layout)
            shard = {}
            for k, v in entry.items():
                if not isinstance(v, torch.Tensor):
                    shard[k] = v
                    continue
                v2 = v.reshape(n, *v.shape[1:]) if v.ndim > 0 else v.reshape(1)
                padded = v2.new_zeros((s * ws, *v2.shape[1:]))
                padded[:n] = v2
                shard[k] = padded[rank * s:(rank + 1) * s].clone()
            state[i] = shard
    opt.load_state_dict({"state": state, "param_groups": mine})


# ---------------------------------------------------------------------------------------------
# RNG states


def capture_rng(device: torch.device) -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(_tuples(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _tuples(x):
    # random.setstate needs tuples; a list could come back from serialisation
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def gather_rng(device: torch.device, world_size: int) -> list[dict]:
    """Every rank's RNG states (rank order); one process: a list of one."""
    mine = capture_rng(device)
    if world_size == 1:
        return [mine]
    everyone: list = [None] * world_size
    dist.all_gather_object(everyone, mine)
    return everyone


# ---------------------------------------------------------------------------------------------
# Finite check and CPU copies


def to_cpu(obj):
    """A copy of `obj` with every tensor detached and on CPU (containers rebuilt)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def first_non_finite(tree, prefix: str = "") -> str | None:
    """The name of the first floating-point tensor in `tree` holding a NaN or an infinity, else None."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
            return prefix or "tensor"
        return None
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return None
    for k, v in items:
        found = first_non_finite(v, f"{prefix}.{k}" if prefix else str(k))
        if found:
            return found
    return None


# ---------------------------------------------------------------------------------------------
# A whole run's state: what the trainer calls


def _local_non_finite(model: torch.nn.Module, optimizers) -> str | None:
    """Name of the first parameter or optimizer-state tensor of THIS rank holding NaN/inf (one read-back)."""
    names = {p: n for n, p in model.named_parameters()}
    tensors = [(f"parameter {n}", p.detach()) for n, p in model.named_parameters()]
    for opt in optimizers:
        for p, st in opt.state.items():
            tensors += [(f"{type(opt).__name__} state {k!r} of {names.get(p, '?')}", v) for k, v in st.items()
                        if isinstance(v, torch.Tensor)]
    tensors = [(n, t) for n, t in tensors if t.is_floating_point()]
    if not tensors:
        return None
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).tolist()
    return next((n for (n, _), ok in zip(tensors, finite) if not ok), None)


def build_payload(*, step: int, cfg: TrainConfig, info, model: torch.nn.Module, adam, muon, loader, monitor, guard,
                  trainer_state: dict, wandb_run_id: str | None) -> dict | None:
    """The checkpoint of the run after `step` steps; every rank must call it (collectives), rank 0 gets the
    payload, the others None. Raises NonFiniteError (on every rank) if any value to be saved is NaN/inf."""
    bad = _local_non_finite(model, (adam, muon))
    if info.distributed:
        flag = torch.tensor([1.0 if bad else 0.0], device=info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and not bad:
            bad = "a tensor on another rank"
    if bad:
        raise NonFiniteError(f"not saving the checkpoint of step {step}: {bad} holds NaN/inf, so the state in "
                             "memory is not good any more", step, [bad])
    optimizers = {"adam": gather_optimizer_state(adam), "muon": gather_optimizer_state(muon)}
    rng = gather_rng(info.device, info.world_size)
    guard_state = guard.state_dict()
    if not info.is_main:
        return None
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "world_size": info.world_size,
            "torch_version": str(torch.__version__), "run_name": cfg.run_name, "wandb_run_id": wandb_run_id,
            "config": cfg.to_dict(), "model": to_cpu(model.state_dict()), "optimizers": optimizers,
            "loader": loader.state_dict(), "rng": rng, "monitor": to_cpu(monitor.state_dict()),
            "guard": guard_state, "trainer": to_cpu(trainer_state)}


def save_run_checkpoint(run_dir: str | Path, payload: dict | None, keep_last: int, info) -> Path:
    """Rank 0 writes `payload` atomically and prunes old checkpoints; every rank waits for it and gets the path."""
    path = checkpoint_path(run_dir, payload["step"] if payload is not None else 0)
    if info.is_main:
        remove_stale_temporaries(run_dir)
        save_checkpoint(path, payload)
        prune(run_dir, keep_last)
    if info.distributed:
        dist.barrier()  # nobody goes on (or exits after a stop signal) before the file is complete
    return path


def restore_run(payload: dict, path: str | Path, *, info, model: torch.nn.Module, adam, muon, loader, monitor,
                guard) -> dict:
    """Load a checkpoint payload into the freshly built run objects; returns the saved trainer state."""
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: the model weights do not fit this model ({str(e).splitlines()[0]}"
                              "...). The model code changed since the checkpoint was written.") from None
    shard_optimizer_state(adam, payload["optimizers"]["adam"], path)
    shard_optimizer_state(muon, payload["optimizers"]["muon"], path)
    loader.load_state_dict(payload["loader"])
    rngs = payload["rng"]
    restore_rng(rngs[info.rank] if info.rank < len(rngs) else rngs[0], info.device)
    monitor.load_state_dict(payload["monitor"])
    guard.load_state_dict(payload["guard"])
    return payload["trainer"]


def truncate_metrics(run_dir: str | Path, size: int) -> int:
    """Cut metrics.jsonl back to its length at the checkpoint: rows the interrupted attempt logged after
    the checkpoint are recomputed by the resumed run, so they would appear twice. Returns the rows dropped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists() or path.stat().st_size <= size:
        return 0
    with open(path, "rb+") as f:
        f.seek(size)
        dropped = f.read().count(b"\n")
        f.truncate(size)
    return dropped
