"""The one training configuration: a dataclass with a comment per field, filled from the CLI.

Fields left as None are hardware-dependent and filled by `resolve_defaults`: on CUDA the record
configuration (modded-nanogpt 2025-07-12_BosAlign: 12 x 768, 48k-token sequences, 8 x 48k tokens per
step, 1750 steps); on CPU a small configuration that trains visibly in a few minutes on 2 cores.
`validate` checks every flag before any heavy work and says what to change.
"""
from __future__ import annotations

import argparse
import inspect
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields

from core.attention import BLOCK_SIZE
from core.data import BUILTIN_CORPORA
from core.depth_mup import DEPTH_MISTAKES, DEPTH_MUP_CHOICES
from core.mup import MUP_MISTAKES


class ConfigError(ValueError):
    """A bad flag or flag combination; the message says what to change."""


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------
    width: int | None = None          # model width d (CUDA 768, CPU 128)
    depth: int | None = None          # transformer blocks (CUDA 12, CPU 4)
    head_dim: int | None = None       # head dimension, fixed across widths (CUDA 128, CPU 32)
    vocab_size: int | None = None     # token ids the model reads (None: the data's: GPT-2 50257, bytes 257); lm_head pads to 128
    bos_id: int | None = None         # document-start token (None: the data's: GPT-2 50256, bytes 256)
    # --- muP ---------------------------------------------------------------------------------
    mup: bool = False                 # use muP (core/mup.py); without it the record's standard parametrisation
    base_width: int | None = None     # muP base width d0: hyperparameters tuned there transfer to --width
    coord_check: bool = False         # record per-layer activation sizes (mean |x|) for the coordinate check
    coord_check_every: int = 1        # ... every N steps (steps 0..coord_check_steps)
    coord_check_steps: int = 10       # how many first steps the coordinate check records
    mup_mistake: str | None = None    # experiments only: apply a known muP mistake (core/mup.py MUP_MISTAKES), needs --mup
    # --- depth muP (core/depth_mup.py) --------------------------------------------------------
    depth_mup: str = "off"            # off | completep (alpha 1) | sqrt (alpha 0.5): residual branches x (L0/L)^alpha, LR and Adam eps per core/depth_mup.py
    base_depth: int | None = None     # depth-muP base depth L0: hyperparameters tuned there transfer to --depth
    depth_mistake: str | None = None  # experiments only: apply a known depth-muP mistake (core/depth_mup.py DEPTH_MISTAKES), needs --depth-mup
    # --- data --------------------------------------------------------------------------------
    data: str | None = None           # a built-in corpus: embedded (GPT-2 tokens) | embedded-bytes (UTF-8 bytes, the CPU muP lab)
    data_dir: str | None = None       # folder with fineweb_{train,val}_*.bin; None: data/fineweb10B, else embedded corpus
    seq_len: int | None = None        # tokens per micro-batch sequence (CUDA 48*1024, CPU 256); multiple of 128
    batch_tokens: int | None = None   # tokens per optimizer step over all ranks (CUDA 8*48*1024, CPU 1024 = 4 x 256)
    val_seq_len: int | None = None    # tokens per validation sequence (CUDA 4*64*1024, CPU 1024)
    val_tokens: int | None = None     # fixed validation size so runs compare (CUDA: the data's, 10,485,760 for FineWeb; CPU 32768)
    # --- optimisation (the record's values) ---------------------------------------------------
    iterations: int | None = None     # optimizer steps (CUDA 1750, CPU 150)
    adam_lr: float = 0.008            # DistAdam base LR (embeddings x75, lm_head x27.5, scalars x5)
    muon_lr: float = 0.05             # Muon LR for hidden matrices
    lr_mult: float = 1.0              # global LR multiplier: scales every LR of both optimizers together (sweeps)
    embed_lr_mult: float = 1.0        # experiments: x the Adam LR of the embedding and value embeddings only
    head_lr_mult: float = 1.0         # experiments: x the Adam LR of the lm_head (readout) only
    scalar_lr_mult: float = 1.0       # experiments: x the Adam LR of the scalars (skip weights, lambdas) only
    cooldown_frac: float = 0.45       # LR constant, then linear decay over this final fraction of training
    final_lr_frac: float = 0.05       # LR multiplier at the end of the cool-down (record: 0.05)
    muon_momentum_warmup: int = 300   # Muon momentum 0.85 -> 0.95 over this many steps
    window_max: int = 1792            # long sliding window at the end of training, tokens (grows from 128)
    # --- runtime -----------------------------------------------------------------------------
    device: str = "auto"              # auto | cpu | cuda
    compile: str = "auto"             # auto | true | false; auto: CUDA always, CPU when the run pays back the compile time (core/compile.py)
    fp8: str = "auto"                 # auto | on | off; FP8 lm_head (auto: on for CUDA sm>=89)
    # auto: coordinate-check / activation steps and validation in row chunks, compiled training the record's fused
    # path (the chunked one is unmeasured on a GPU); on: everywhere; off: nowhere (core/chunked_loss.py)
    chunked_loss: str = "auto"        # auto | on | off; readout + soft-cap + cross-entropy in row chunks, never the full fp32 logits
    dist_timeout_s: float | None = None  # seconds a collective waits for the other ranks (None: env DIST_TIMEOUT_S, else 1800)
    seed: int = 1337                  # model init and data order are deterministic given the seed
    warmup_steps: int | None = None   # kernel warm-up steps whose state is discarded (CUDA 10, CPU 0)
    # --- logging and monitoring --------------------------------------------------------------
    log_dir: str = "logs"             # parent of the run folder logs/<run_name>/
    run_name: str | None = None       # default speedrun_<timestamp>[_mup]_w<width>[_base<base>]
    log_every: int = 10               # train-loss / cheap-metric logging interval (steps)
    val_every: int | None = None      # validation interval (CUDA 125, CPU 0); 0 = only at the end
    use_wandb: bool = False           # log to Weights & Biases (offline automatically without an API key)
    wandb_project: str | None = None  # default speedrun-basic / speedrun-mup
    wandb_entity: str | None = None   # W&B entity (team or user)
    wandb_run_name: str | None = None # W&B run name (default: run_name)
    wandb_tags: list[str] = field(default_factory=list)  # W&B tags
    wandb_group: str | None = None    # W&B group (sweeps: one per sweep folder, so the dashboard groups its runs)
    spectral_every: int | None = None # spectral norms of Muon matrices every N steps (env MONITOR_SPECTRAL_EVERY; default 100)
    activations: bool | None = None   # activation statistics via forward hooks (env MONITOR_ACTIVATIONS; default off)
    peak_tflops: float | None = None  # override the hardware peak for MFU (bf16 dense TFLOP/s)
    # --- checkpoints and failure handling (core/checkpoint.py, core/guard.py) -------------------
    save_every: int = 0               # write a checkpoint every N steps, and at the end (0 = only on SIGTERM/SIGINT)
    keep_last: int = 2                # keep the K newest checkpoints of the run (0 = keep all)
    resume: str | None = None         # PATH (a step_*.pt or a run folder) or auto: newest checkpoint of --run-name, else a new run
    nan_policy: str = "abort"         # abort | skip: on a NaN/inf loss or gradient stop, or skip that update
    max_nan_skips: int = 10           # with --nan-policy skip: stop after this many consecutive skipped steps
    spike_factor: float = 10.0        # flag a train loss above this x the running minimum (0 = off)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# CLI


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", description="Train the modded-nanogpt speedrun GPT, with or without muP.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flag_types = {int: int, float: float, str: str}
    for f in fields(TrainConfig):
        name = "--" + f.name.replace("_", "-")
        help_text = _FIELD_HELP.get(f.name, "")
        if f.name == "mup" or f.name == "coord_check":
            # `--mup` alone switches on; `--mup false` also accepted
            p.add_argument(name, type=_bool, nargs="?", const=True, default=f.default, help=help_text)
        elif f.name in ("use_wandb", "activations"):
            p.add_argument(name, type=_bool, nargs="?", const=True, default=f.default, metavar="true|false",
                           help=help_text)
        elif f.name == "wandb_tags":
            p.add_argument(name, nargs="*", default=[], help=help_text)
        elif f.name in ("device", "compile", "fp8", "chunked_loss", "nan_policy", "data", "mup_mistake", "depth_mup",
                        "depth_mistake"):
            choices = {"device": ["auto", "cpu", "cuda"], "compile": ["auto", "true", "false"],
                       "fp8": ["auto", "on", "off"], "chunked_loss": ["auto", "on", "off"], "nan_policy": ["abort", "skip"],
                       "data": list(BUILTIN_CORPORA), "mup_mistake": sorted(MUP_MISTAKES),
                       "depth_mup": list(DEPTH_MUP_CHOICES), "depth_mistake": sorted(DEPTH_MISTAKES)}[f.name]
            p.add_argument(name, choices=choices, default=f.default, help=help_text)
        else:
            base = str(f.type).replace(" | None", "")
            typ = {"int": int, "float": float, "str": str}.get(base, str)
            p.add_argument(name, type=flag_types[typ], default=f.default, help=help_text)
    return p


def _field_help() -> dict[str, str]:
    """Help strings are the field comments above, so they cannot drift from the code."""
    helps = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            helps[m.group(1)] = m.group(2).replace("%", "%%")
    return helps


_FIELD_HELP = _field_help()


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    ns = build_parser().parse_args(argv)
    return TrainConfig(**vars(ns))


# ---------------------------------------------------------------------------------------------
# Hardware-dependent defaults and validation

CUDA_DEFAULTS = dict(width=768, depth=12, head_dim=128, seq_len=48 * 1024, batch_tokens=8 * 48 * 1024,
                     val_seq_len=4 * 64 * 1024, iterations=1750, val_every=125, warmup_steps=10)
# CPU: the 50k-vocabulary readout dominates a step at this width (~1.2 s per 1024 tokens on 2 cores),
# so the default run is 150 steps of 1024 tokens. As in the record, the global batch is split over the
# ranks: 4 sequences of 256 tokens, so 1, 2 or 4 processes (gradient accumulation 4, 2, 1) train on
# the same batch (`torchrun --nproc_per_node=2 train.py` works with the defaults; issue 12).
# Validation only at the end: a pass over the fixed 32K tokens costs about a third of the training work of
# 32 steps, so 4 passes were ~19% of the run (README, "Step benchmark"); the final number is the same
# measurement on the same set. `--val-every 50` brings the curve back.
CPU_DEFAULTS = dict(width=128, depth=4, head_dim=32, seq_len=256, batch_tokens=1024,
                    val_seq_len=1024, val_tokens=32 * 1024, iterations=150, val_every=0, warmup_steps=0)


def resolve_defaults(cfg: TrainConfig, device_type: str, env: dict | None = None) -> TrainConfig:
    """Fill the None fields for this hardware and the monitoring env vars; returns cfg (mutated)."""
    env = os.environ if env is None else env
    defaults = CUDA_DEFAULTS if device_type == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.spectral_every is None:
        raw = env.get("MONITOR_SPECTRAL_EVERY", "100")
        try:
            cfg.spectral_every = int(raw)
        except ValueError:
            raise ConfigError(f"MONITOR_SPECTRAL_EVERY={raw!r} is not an integer (use e.g. 100, or 0 to disable)")
    if cfg.activations is None:
        raw = env.get("MONITOR_ACTIVATIONS", "false")
        try:
            cfg.activations = _bool(raw)
        except argparse.ArgumentTypeError:
            raise ConfigError(f"MONITOR_ACTIVATIONS={raw!r}: use true or false")
    return cfg


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    """Every check that can fail before the model is built. Raises ConfigError saying what to change."""
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    for name in ("width", "depth", "head_dim", "seq_len", "batch_tokens", "val_seq_len", "iterations",
                 "log_every", "coord_check_every", "coord_check_steps", "window_max"):
        value = getattr(cfg, name)
        need(value is not None and value > 0, f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    for name in ("vocab_size", "bos_id"):
        value = getattr(cfg, name)
        need(value is None or value >= (1 if name == "vocab_size" else 0),
             f"--{name.replace('_', '-')} must be {'positive' if name == 'vocab_size' else '>= 0'}, got {value} "
             "(or leave it out: the data source declares it)")
    for name in ("val_every", "spectral_every", "warmup_steps"):
        value = getattr(cfg, name)
        need(value >= 0, f"--{name.replace('_', '-')} must be >= 0, got {value}")
    need(cfg.width % cfg.head_dim == 0,
         f"--width {cfg.width} is not a multiple of --head-dim {cfg.head_dim}: use e.g. "
         f"{max(cfg.head_dim, cfg.width // cfg.head_dim * cfg.head_dim)} or {(cfg.width // cfg.head_dim + 1) * cfg.head_dim}")
    need(cfg.head_dim % 4 == 0, f"--head-dim must be a multiple of 4 (half-truncated RoPE), got {cfg.head_dim}")
    need(cfg.depth % 2 == 0, f"--depth must be even (U-net skips pair the blocks), got {cfg.depth}")
    check_depth_mup(cfg)
    if cfg.base_width is not None and not cfg.mup:
        raise ConfigError("--base-width only has a meaning with --mup: add --mup, or drop --base-width")
    if cfg.mup_mistake is not None:
        need(cfg.mup, f"--mup-mistake {cfg.mup_mistake} is a negative control of muP: it needs --mup --base-width B")
        need(cfg.mup_mistake in MUP_MISTAKES, f"--mup-mistake {cfg.mup_mistake!r}: choose one of {sorted(MUP_MISTAKES)}")
    if cfg.data is not None and cfg.data_dir is not None:
        raise ConfigError(f"--data {cfg.data} and --data-dir {cfg.data_dir} both name the training data: give one")
    if cfg.mup:
        need(cfg.base_width is not None, "--mup needs --base-width (the width where the hyperparameters were tuned)")
        need(cfg.base_width > 0 and cfg.base_width % cfg.head_dim == 0,
             f"--base-width {cfg.base_width} must be a positive multiple of --head-dim {cfg.head_dim}")
    for name in ("seq_len", "val_seq_len"):
        value = getattr(cfg, name)
        need(value % BLOCK_SIZE == 0, f"--{name.replace('_', '-')} {value} must be a multiple of {BLOCK_SIZE} "
                                      f"(FlexAttention block size)")
    per_step = cfg.seq_len * world_size
    need(cfg.batch_tokens % per_step == 0,
         f"--batch-tokens {cfg.batch_tokens} must be a multiple of seq_len x world_size = {cfg.seq_len} x "
         f"{world_size} = {per_step}; e.g. {max(per_step, cfg.batch_tokens // per_step * per_step)}")
    if cfg.val_tokens is not None:
        need(cfg.val_tokens > 0 and cfg.val_tokens % (cfg.val_seq_len * world_size) == 0,
             f"--val-tokens {cfg.val_tokens} must be a positive multiple of val_seq_len x world_size = "
             f"{cfg.val_seq_len * world_size}")
    need(0.0 <= cfg.cooldown_frac <= 1.0, f"--cooldown-frac must be in [0, 1], got {cfg.cooldown_frac}")
    need(cfg.adam_lr > 0 and cfg.muon_lr > 0, "--adam-lr and --muon-lr must be positive")
    need(cfg.lr_mult > 0 and math.isfinite(cfg.lr_mult), f"--lr-mult must be a positive number, got {cfg.lr_mult}")
    for flag in ("embed_lr_mult", "head_lr_mult", "scalar_lr_mult"):
        value = getattr(cfg, flag)
        need(value > 0 and math.isfinite(value), f"--{flag.replace('_', '-')} must be a positive number, got {value}")
    if cfg.peak_tflops is not None:
        need(cfg.peak_tflops > 0, f"--peak-tflops must be positive, got {cfg.peak_tflops}")
    check_dist_timeout(cfg.dist_timeout_s)
    need(cfg.chunked_loss in ("auto", "on", "off"), f"--chunked-loss must be auto, on or off, got {cfg.chunked_loss!r}")
    # checkpoints and failure handling
    need(cfg.save_every >= 0, f"--save-every must be >= 0 (0 = only on a stop signal), got {cfg.save_every}")
    need(cfg.keep_last >= 0, f"--keep-last must be >= 0 (0 = keep all), got {cfg.keep_last}")
    need(cfg.nan_policy in ("abort", "skip"), f"--nan-policy must be abort or skip, got {cfg.nan_policy!r}")
    need(cfg.max_nan_skips >= 1, f"--max-nan-skips must be >= 1, got {cfg.max_nan_skips}")
    need(cfg.spike_factor == 0 or cfg.spike_factor > 1,
         f"--spike-factor must be > 1 (a multiple of the running minimum loss) or 0 to turn it off, got {cfg.spike_factor}")
    if cfg.resume is not None and cfg.resume != "auto":
        need(os.path.exists(cfg.resume), f"--resume {cfg.resume}: no such file or folder; pass a checkpoint "
                                         "(logs/<run>/checkpoints/step_*.pt), a run folder, or auto")


def check_depth_mup(cfg: TrainConfig) -> None:
    """--depth-mup, --base-depth and --depth-mistake together (after --depth itself was checked)."""
    if cfg.depth_mup not in DEPTH_MUP_CHOICES:
        raise ConfigError(f"--depth-mup {cfg.depth_mup!r}: choose one of {list(DEPTH_MUP_CHOICES)}")
    if cfg.depth_mup == "off":
        if cfg.base_depth is not None:
            raise ConfigError("--base-depth only has a meaning with --depth-mup: add --depth-mup completep (CompleteP, "
                              "alpha 1) or --depth-mup sqrt (alpha 0.5), or drop --base-depth")
        if cfg.depth_mistake is not None:
            raise ConfigError(f"--depth-mistake {cfg.depth_mistake} is a negative control of depth muP: it needs "
                              "--depth-mup completep|sqrt --base-depth L0")
        return
    if cfg.base_depth is None:
        raise ConfigError(f"--depth-mup {cfg.depth_mup} needs --base-depth L0 (the depth where the hyperparameters "
                          f"were tuned; --base-depth {cfg.depth} gives the standard model)")
    if cfg.base_depth < 2 or cfg.base_depth % 2:
        raise ConfigError(f"--base-depth must be an even number >= 2 (the base model must exist: U-net skips pair "
                          f"its blocks), got {cfg.base_depth}; e.g. --base-depth {max(2, cfg.base_depth // 2 * 2)}")
    if cfg.base_depth > cfg.depth:
        raise ConfigError(f"--base-depth {cfg.base_depth} is larger than --depth {cfg.depth}: the base depth is the "
                          f"shallow model the hyperparameters were tuned on; use --base-depth <= {cfg.depth}, or a "
                          f"--depth of at least {cfg.base_depth}")
    if cfg.depth_mistake is not None and cfg.depth_mistake not in DEPTH_MISTAKES:
        raise ConfigError(f"--depth-mistake {cfg.depth_mistake!r}: choose one of {sorted(DEPTH_MISTAKES)}")


def check_dist_timeout(seconds: float | None, given_as: str | None = None) -> None:
    """A process-group timeout must be a positive, finite number of seconds (None: not given). `given_as`: how
    the user wrote it, for the message (default `--dist-timeout-s <seconds>`)."""
    if seconds is not None and not (seconds > 0 and math.isfinite(seconds)):
        given_as = given_as or f"--dist-timeout-s {seconds:g}"
        raise ConfigError(f"{given_as}: the process-group timeout must be a positive number of seconds, "
                          "e.g. 1800 (30 min, the default: a cold torch.compile of the record takes minutes)")


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    return cfg.batch_tokens // (cfg.seq_len * world_size)
