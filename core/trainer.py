"""The training run: a `Trainer` that sets a run up, then loops validate -> step -> log -> checkpoint.

`train.py` parses the CLI and calls `run(cfg)`. Reading order of `Trainer`:

  - `__init__`: one setup method per concern, in the order they run: config and the --resume
    checkpoint, data, logging, model (+ muP + optimizers), monitoring, loaders, kernel warm-up, resume;
  - `train`: the loop, top to bottom, made of `evaluate`, `train_step`, `log_step` and
    `checkpoint_or_stop` (-> `save_checkpoint`); it ends in `_finish`, or in `_on_stop` / `_on_nonfinite`
    when a guard ends the run (core/guard.py: a stop signal, a non-finite step).

The building blocks of a step (`build_model`, `forward_backward`, `evaluate`, ...) live in
core/steps.py, shared with the coordinate check, the benchmarks and the tests. The trainer calls them
through this module's namespace, so a test can wrap one (`monkeypatch.setattr(core.trainer, ...)`).
"""
from __future__ import annotations

import contextlib
import copy
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

import core.logger
from core import checkpoint as ckpt_io
from core import depth_mup, mup
from core.compile import describe_compiled, resolve_compile, run_train_tflop
from core.config import ConfigError, TrainConfig, grad_accum_steps, resolve_defaults, validate
from core.coord_check import CoordRecorder
from core.data import BatchLoader, Vocab, declared_vocab, resolve_data, unigram_entropy, val_batches
from core.chunked_loss import resolve_loss_paths
from core.distributed import (DistInfo, all_reduce_mean, broadcast_object, process_group_timeout, setup_distributed,
                              teardown, timeout_note)
from core.fp8 import fallback_warning as fp8_fallback_warning, resolve_fp8_mode
from core.fp8 import grad_scale_for_accumulation as fp8_grad_scale
from core.guard import EXIT_NONFINITE, EXIT_STOPPED, GracefulStop, NonFiniteError, NonFiniteGuard, StopRequested
from core.logger import SimpleLogger, default_wandb_project, format_step_line
from core.memory import PhasePeaks, allocator_note
from core.mfu import detect_peak_flops, flops_per_token
from core.monitor import TrainingMonitor
from core.optimizers import ns_dtype
from core.schedule import window_blocks
from core.steps import (activation_modules, build_model, build_optimizer_pair, evaluate, forward_backward,
                        memory_metrics, set_schedules, sync)


@dataclass
class RunResult:
    run_dir: Path
    train_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) at log steps
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    final_val_loss: float = float("nan")
    best_val_loss: float = float("inf")
    unigram_entropy: float | None = None


def run(cfg: TrainConfig) -> RunResult:
    """Train as `train.py` does: set up, run the loop, and leave the process group (also on an error)."""
    # --dist-timeout-s (else DIST_TIMEOUT_S, else 30 min); a value <= 0 is a ConfigError (exit 2) before any group
    info = setup_distributed(cfg.device, cfg.dist_timeout_s)
    finished = False
    try:
        result = Trainer(cfg, info).train()
        finished = True
        return result
    finally:
        teardown(info, finished)


class StepOutput(NamedTuple):
    """What a training step hands to `log_step`: device tensors, read back only on log steps."""
    loss_sum: torch.Tensor           # the step's loss summed over its micro-batches
    grad_norm: torch.Tensor | None   # the averaged gradient's norm (several ranks, log steps only)
    lr_factor: float
    window: int                      # long sliding window, in 128-token blocks


class TrainingClock:
    """Training time in ms, paused around validation and checkpoints (the record: they are not training)."""

    def __init__(self, device: torch.device, ms: float = 0.0):
        self.device, self.ms, self._t0 = device, ms, 0.0

    def start(self) -> None:
        sync(self.device)
        self._t0 = time.perf_counter()

    def now_ms(self) -> float:
        """Training time so far, without waiting for the device."""
        return self.ms + 1000 * (time.perf_counter() - self._t0)

    @contextlib.contextmanager
    def paused(self):
        sync(self.device)
        self.ms += 1000 * (time.perf_counter() - self._t0)
        try:
            yield
        finally:
            self.start()


class Trainer:
    """One training run of `cfg` on this process's share of `info`'s ranks."""

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        self.cfg, self.info, self.device = cfg, info, info.device
        self.notes: list[str] = []  # what setup has to say before the logger exists
        self._setup_config()
        self._setup_data()
        self._setup_logging()
        self.result = RunResult(run_dir=self.run_dir)  # what run() returns, filled in as the run goes
        self._log_environment()
        self._setup_model()
        self._log_model()
        self._setup_monitoring()
        self._setup_loaders()
        self.peaks = PhasePeaks(self.device)  # peak memory per phase, in the log at the end (core/memory.py)
        self._warm_up_kernels()
        self._log_unigram_entropy()
        self.start_step, self.clock = 0, TrainingClock(self.device)
        self._resume()

    # -----------------------------------------------------------------------------------------
    # Setup, one concern per method

    def _setup_config(self) -> None:
        """Device defaults and validation; the --resume checkpoint is found, verified and checked against
        the config before any heavy work (a bad or incompatible one exits with 2)."""
        cfg, info = self.cfg, self.info
        resolve_defaults(cfg, self.device.type)
        validate(cfg, info.world_size)
        resolve_vocab(cfg, declared_vocab(cfg.data, cfg.data_dir))
        self.resume_path, self.resumed = ckpt_io.resolve_resume(cfg, self.notes.append)
        self.config_changes = ([] if self.resumed is None
                               else ckpt_io.check_compatible(self.resumed, cfg, self.resume_path))
        self.grad_accum = grad_accum_steps(cfg, info.world_size)
        self.fp8_mode, self.fp8_reason = resolve_fp8_mode(cfg.fp8, self.device)  # --fp8 on where FP8 cannot run: exit 2
        self.fp8_warning = fp8_fallback_warning(cfg.fp8, self.fp8_mode, self.device)
        self.use_compile, self.compile_reason = resolve_compile(cfg.compile, self.device, run_train_tflop(cfg),
                                                                cfg.vocab_size)
        self.loss_paths = resolve_loss_paths(cfg.chunked_loss, self.use_compile, self.device.type)
        self.dist_timeout_s = (info.timeout_s if info.timeout_s is not None
                               else process_group_timeout(flag=cfg.dist_timeout_s))

    def _setup_data(self) -> None:
        """The shards, before any model is built, so that bad ones fail fast; the validation size."""
        cfg, info = self.cfg, self.info
        if info.is_main:  # rank 0 builds the embedded cache while the others wait
            self.data = resolve_data(cfg.data_dir, data=cfg.data)
        if info.distributed:
            torch.distributed.barrier()
        if not info.is_main:
            self.data = resolve_data(cfg.data_dir, data=cfg.data)
        resolve_vocab(cfg, self.data.vocab)  # the shards agree with what was declared
        if self.resumed is not None:
            ckpt_io.check_data(self.resumed, self.data.train_files, self.resume_path)
        val_tokens = cfg.val_tokens or self.data.val_tokens
        self.val_tokens = val_tokens - val_tokens % (cfg.val_seq_len * info.world_size)
        if self.val_tokens <= 0:
            raise ConfigError(f"the validation set of {self.data.val_tokens} tokens is smaller than one validation "
                              f"batch (val_seq_len x world_size = {cfg.val_seq_len * info.world_size}): lower "
                              "--val-seq-len")

    def _setup_logging(self) -> None:
        """Run name and folder, the logger (console, files, W&B), and the notes setup kept until now."""
        cfg, info, resumed = self.cfg, self.info, self.resumed
        # rank 0's name on every rank: the timestamps of the ranks' clocks may differ by a second (called
        # through core.logger, so that a test can give each rank's clock its own second)
        cfg.run_name = broadcast_object(
            cfg.run_name or core.logger.make_run_name(mup=cfg.mup, width=cfg.width, base_width=cfg.base_width), info)
        self.run_dir = Path(cfg.log_dir) / cfg.run_name
        continuing = bool(cfg.resume) and self.run_dir.is_dir()  # a resumed run appends to its folder's logs
        if continuing and info.is_main:
            dropped = ckpt_io.truncate_metrics(self.run_dir, resumed["trainer"]["metrics_bytes"] if resumed else 0)
            if dropped:
                self.notes.append(f"resume: dropped {dropped} metrics.jsonl row(s) logged after the checkpoint by "
                                  "the interrupted attempt; this run logs those steps again")
        # what "auto" resolved to on this machine, next to the flags, in config.json and the W&B config
        self.resolved = {"device": str(self.device), "world_size": info.world_size, "grad_accum": self.grad_accum,
                         "fp8_mode": self.fp8_mode, "fp8_reason": self.fp8_reason, "compile": self.use_compile,
                         "ns_dtype": str(ns_dtype(self.device)).replace("torch.", ""), "vocab": self.data.vocab.name,
                         "chunked_loss": {k: getattr(self.loss_paths, k) for k in ("train", "eager", "val")},
                         "dist_timeout_s": self.dist_timeout_s, "code": core.logger.code_version()}
        try:
            self.logger = SimpleLogger(
                self.run_dir, {**cfg.to_dict(), "resolved": self.resolved}, rank=info.rank, use_wandb=cfg.use_wandb,
                wandb_project=cfg.wandb_project or default_wandb_project(cfg.mup),
                wandb_entity=cfg.wandb_entity, wandb_run_name=cfg.wandb_run_name or cfg.run_name,
                wandb_tags=tuple(cfg.wandb_tags), wandb_group=cfg.wandb_group, resume=continuing,
                wandb_resume_id=resumed.get("wandb_run_id") if resumed else None)
        except FileExistsError as e:
            raise ConfigError(f"{e} (from the command line: add --resume auto to continue it)") from None
        except PermissionError as e:
            raise ConfigError(str(e)) from None
        self.log = self.logger.info
        for note in self.notes:
            self.log(note)

    def _log_environment(self) -> None:
        """What this run resumes from, and the software, device and data it runs on."""
        cfg, info, device, resumed, log = self.cfg, self.info, self.device, self.resumed, self.log
        if resumed is not None:
            log(f"resume: {self.resume_path} (after step {resumed['step']}, written by {resumed['world_size']} "
                "process(es))")
            for change in self.config_changes:
                log(f"resume: config changed since the checkpoint: {change}")
            if resumed["world_size"] != info.world_size:
                log(f"resume: world size {resumed['world_size']} -> {info.world_size}: same global batch, so the run "
                    "continues the same training, equal to an uninterrupted one up to float rounding (not bitwise)")
        log(f"code {self.resolved['code']} | python {sys.version.split()[0]} | torch {torch.__version__} | "
            f"{platform.platform()}")
        log(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
            + f" | world size {info.world_size} | backend {info.backend or 'none (single process)'}")
        log(timeout_note(self.dist_timeout_s, info))
        data = self.data
        log(f"data: {data.name} ({len(data.train_files)} train shard(s), {self.val_tokens:,} validation tokens, "
            f"vocabulary {data.vocab.name}: {data.vocab.size} ids, BOS {data.vocab.bos_id})"
            + (" -- no FineWeb shards found, using the embedded corpus" if data.is_embedded else ""))

    def _setup_model(self) -> None:
        """The model (the same weights on every rank), muP's LR multipliers, Adam + Muon, torch.compile."""
        cfg, info = self.cfg, self.info
        self.model = build_model(cfg, self.device, self.fp8_mode)
        # e5m2 range as on the record's ranks
        self.model.lm_head.grad_s = fp8_grad_scale(self.model.lm_head.grad_s, self.grad_accum)
        if info.distributed:
            for p in self.model.parameters():
                torch.distributed.broadcast(p.detach(), 0)
        self.adam, self.muon, self.mup_table = build_optimizer_pair(self.model, cfg, info.rank, info.world_size)
        self.optimizers = [self.adam, self.muon]
        self.train_model = torch.compile(self.model, dynamic=False) if self.use_compile else self.model
        self.peak_flops, self.peak_reason = detect_peak_flops(self.device, cfg.peak_tflops)
        self._flops_per_token: dict[int, float] = {}  # by long window: it takes a handful of values

    def _log_model(self) -> None:
        """The derived values: parameters, batch, attention and precision, MFU, the parametrisation."""
        cfg, model, info, log = self.cfg, self.model, self.info, self.log
        n_params = sum(p.numel() for p in model.parameters())
        n_embed = sum(p.numel() for n, p in model.named_parameters() if "embed" in n)
        log(f"model: depth {cfg.depth} width {cfg.width} heads {cfg.width // cfg.head_dim}x{cfg.head_dim} | "
            f"params {n_params:,} ({n_embed:,} in embeddings, {n_params - n_embed:,} other)")
        log(f"batch: {cfg.batch_tokens:,} tokens/step = {info.world_size} rank(s) x {self.grad_accum} accumulation "
            f"x {cfg.seq_len} seq_len | {cfg.iterations} steps | val every {cfg.val_every}")
        cuda = self.device.type == "cuda"
        log("attention: " + ("FlexAttention (compiled)" if cuda else "scaled_dot_product_attention with the same "
                             "document-causal sliding-window mask (FlexAttention has no CPU backward)"))
        log(f"compile: {self.use_compile} ({self.compile_reason}); compiled: "
            f"{describe_compiled(self.use_compile, self.device)}")
        log(f"fp8 lm_head: {self.fp8_mode} ({self.fp8_reason}) | dtype: "
            f"{'bf16 activations' if cuda else 'fp32'} | Muon Newton-Schulz in {self.resolved['ns_dtype']} "
            f"({'tensor cores' if cuda else 'bf16 would be emulated on a CPU'})")
        if cfg.lr_mult != 1.0:
            log(f"lr-mult {cfg.lr_mult:g}: Adam LR {cfg.adam_lr * cfg.lr_mult:g}, Muon LR {cfg.muon_lr * cfg.lr_mult:g}")
        groups = {"embeddings": cfg.embed_lr_mult, "lm_head": cfg.head_lr_mult, "scalars": cfg.scalar_lr_mult}
        if any(m != 1.0 for m in groups.values()):
            log("Adam LR per group (x the record's multiplier): "
                + ", ".join(f"{name} x{m:g}" for name, m in groups.items()))
        if self.fp8_warning:  # a GPU with FP8 tensor cores whose FP8 probe failed: say it where nobody can miss it
            log(self.fp8_warning)
            print(self.fp8_warning, file=sys.stderr, flush=True)
        log(allocator_note(device_type=self.device.type))
        log(f"loss path: {self.loss_paths.reason}")
        log("MFU: " + (f"peak {self.peak_flops / 1e12:.0f} TFLOP/s ({self.peak_reason})" if self.peak_flops
                       else "unavailable: " + self.peak_reason))
        if cfg.mup:
            log(f"muP: width {cfg.width} base {cfg.base_width} width_mult {cfg.width / cfg.base_width:g} | "
                f"output multiplier {model.lm_head.output_mult:g} | soft-cap divisor {model.softcap_divisor:.3f} | "
                f"fp8 grad_s {model.lm_head.grad_s:.3e}")
            for line in mup.describe_rules().splitlines():
                log("  " + line)
            if cfg.mup_mistake:
                log(f"muP NEGATIVE CONTROL --mup-mistake {cfg.mup_mistake}: {mup.MUP_MISTAKES[cfg.mup_mistake]} "
                    "(a deliberately wrong muP; for experiments only)")
        else:
            log("parametrisation: standard (the record's); use --mup --base-width B for muP")
        if cfg.depth_mup != "off":
            for line in depth_mup.describe(cfg.depth, cfg.base_depth, cfg.depth_mup, cfg.depth_mistake).splitlines():
                log(line)

    def _setup_monitoring(self) -> None:
        """Training-health metrics, the coordinate-check recorder (--coord-check) and the non-finite guard."""
        cfg, model = self.cfg, self.model
        kinds = model.param_kinds()
        hidden = {n: p for n, p in model.named_parameters() if kinds[n] == "hidden"}
        # the monitor counts completed steps (1..N): step k's metrics describe the model after k updates
        self.monitor = TrainingMonitor(model, hidden, log_every=cfg.log_every, spectral_every=cfg.spectral_every,
                                       activations=cfg.activations, activation_modules=activation_modules(model),
                                       total_steps=cfg.iterations)
        self.coord = CoordRecorder(model) if cfg.coord_check else None
        self.guard = NonFiniteGuard(model, kinds, self.optimizers, policy=cfg.nan_policy,
                                    max_skips=cfg.max_nan_skips, spike_factor=cfg.spike_factor, device=self.device,
                                    distributed=self.info.distributed)

    def _setup_loaders(self) -> None:
        """This rank's training batches and its share of the validation set."""
        cfg, info, data = self.cfg, self.info, self.data
        self.train_loader = BatchLoader(data.train_files, cfg.seq_len, info.world_size * self.grad_accum,
                                        rank=info.rank, world_size=info.world_size, device=self.device,
                                        vocab=data.vocab)
        self.val_set = val_batches(data.val_files, cfg.val_seq_len, self.val_tokens, rank=info.rank,
                                   world_size=info.world_size, device=self.device, vocab=data.vocab)

    def _log_unigram_entropy(self) -> None:
        """The embedded corpus's baseline: a model that learned anything beyond token frequencies beats it."""
        cfg, info, data = self.cfg, self.info, self.data
        if data.is_embedded and info.is_main:
            # the whole validation set, not rank 0's share, so the baseline does not depend on the world size
            whole = self.val_set if not info.distributed else val_batches(data.val_files, cfg.val_seq_len,
                                                                          self.val_tokens, vocab=data.vocab)
            entropy = self.result.unigram_entropy = unigram_entropy(torch.cat([inputs.cpu() for inputs, _ in whole]))
            self.log(f"unigram entropy of the validation {_unit(data.vocab)}s: {entropy:.4f} nats"
                     + (f" ({entropy / math.log(2):.4f} bits) per byte" if _is_bytes(data.vocab) else "")
                     + " (a model that learned anything beyond token frequencies beats it)")

    def _warm_up_kernels(self) -> None:
        """Compile / autotune on real batches, then restore the initial state (record: warm-up is not training).

        The loader is restored too, so the measured run sees exactly the batches it would have seen. A run with
        eager measuring steps (--coord-check, activation statistics) also warms the eager module once: on CUDA
        its FlexAttention and FP8 kernels are compiled lazily on first use (core/attention.py), which would
        otherwise happen inside the timed loop at the first coordinate-check step.
        """
        cfg, model, loader = self.cfg, self.model, self.train_loader
        if cfg.warmup_steps <= 0:
            return
        self.peaks.switch("warmup")
        t = time.perf_counter()
        initial = dict(model=copy.deepcopy(model.state_dict()),
                       optimizers=[copy.deepcopy(opt.state_dict()) for opt in self.optimizers],
                       loader=copy.deepcopy(loader.state_dict()))
        eager = bool(cfg.coord_check or cfg.activations)  # an eager measuring step will run
        runs = [(self.train_model, self.loss_paths.train)] * cfg.warmup_steps + [(model, self.loss_paths.eager)] * eager
        for i, (step_model, chunked) in enumerate(runs):
            # visit the window sizes the run will use, so no recompile happens inside the timed loop
            step = (min(i, cfg.warmup_steps - 1) * cfg.iterations) // max(cfg.warmup_steps, 1)
            forward_backward(step_model, loader.next_step(), self.window_at(step), self.grad_accum, chunked=chunked)
            for opt in self.optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
        model.load_state_dict(initial["model"])
        for opt, state in zip(self.optimizers, initial["optimizers"]):
            opt.load_state_dict(state)
        loader.load_state_dict(initial["loader"])
        self.log(f"kernel warm-up: {cfg.warmup_steps} steps" + (" + 1 eager step (the measuring steps' kernels)"
                                                                 if eager else "")
                 + f" in {time.perf_counter() - t:.1f}s (state restored)")

    def _resume(self) -> None:
        """--resume: every piece of state put back; the loop continues after the checkpoint's step."""
        if self.resumed is None:
            return
        saved = ckpt_io.restore_run(self.resumed, self.resume_path, info=self.info, model=self.model,
                                    adam=self.adam, muon=self.muon, loader=self.train_loader,
                                    monitor=self.monitor, guard=self.guard)
        self.start_step, self.clock.ms = self.resumed["step"], saved["training_time_ms"]
        self.result.best_val_loss = saved["best_val_loss"]
        if self.coord is not None:
            self.coord.rows = list(saved["coord_rows"])
        self.resumed = None  # free the host copy
        self.log(f"resume: model, optimizers, data position, RNG and monitor restored; continuing after step "
                 f"{self.start_step}")

    # -----------------------------------------------------------------------------------------
    # The loop

    def window_at(self, step: int) -> int:
        return window_blocks(step, self.cfg.iterations, self.cfg.window_max)

    def train(self) -> RunResult:
        """Validate (step 0, every --val-every, the end), train one step, log it, checkpoint; repeat.

        Steps are counted as the step line does: `done` steps are complete after the step that trains
        with schedule position `step = done - 1`.
        """
        cfg = self.cfg
        self.run_start = time.perf_counter()
        self.clock.start()
        self.last_log = (self.start_step, self.clock.ms)  # (step, training ms) at the last log: throughput
        self.stop = GracefulStop()  # SIGTERM/SIGINT: finish the step, checkpoint, exit (core/guard.py)
        with self.stop:
            try:
                for step in range(self.start_step, cfg.iterations + 1):
                    last_step = step == cfg.iterations
                    if last_step or (cfg.val_every > 0 and step % cfg.val_every == 0):
                        self.evaluate(step)
                    if last_step:
                        break
                    done = self.done = step + 1  # the step in progress, numbered as the step line does
                    out = self.train_step(step)
                    if self.monitor.is_log_step(done):
                        self.log_step(done, out)
                    self.checkpoint_or_stop(done)
                return self._finish()
            except StopRequested as e:
                self._on_stop(e)
                raise
            except NonFiniteError as e:
                self._on_nonfinite(e)
                raise

    def train_step(self, step: int) -> StepOutput:
        """Forward/backward over the step's micro-batches, the non-finite check, the schedules, the update."""
        cfg, model, monitor, guard, coord = self.cfg, self.model, self.monitor, self.guard, self.coord
        done = step + 1
        batches = self.train_loader.next_step()
        window = self.window_at(step)
        recording = coord is not None and coord.wants(step, cfg.coord_check_every, cfg.coord_check_steps)
        # forward hooks added after torch.compile traced the model never fire (core/monitor.py): steps that
        # measure activations or record the coordinate check run the eager module
        step_model = model if recording else monitor.module_for(done, self.train_model)
        measuring = recording or monitor.measures_activations(done)
        self.peaks.switch("train_eager" if step_model is not self.train_model else "train")  # eager steps apart
        # measuring steps: the chunked loss under --chunked-loss auto (the unchunked eager readout runs out of
        # memory at the record's batch: issue 21); the other steps: the path resolve_loss_paths chose
        chunked = self.loss_paths.eager if measuring else self.loss_paths.train
        with monitor.activation_hooks(done), (coord.recording() if recording else contextlib.nullcontext()):
            loss_sum = forward_backward(step_model, batches, window, self.grad_accum, chunked=chunked)
        if recording:
            self.logger.log_metrics(coord.finish_step(step), step=step)
        monitor.after_backward(done)
        bad = guard.check(done, loss_sum / (self.grad_accum * cfg.seq_len))  # device flag, no host sync
        factor = set_schedules(cfg, self.optimizers, self.muon, step)
        monitor.before_optimizer(done)
        guard.snapshot()  # --nan-policy skip only: copy weights + state to put back if `bad`
        for opt in self.optimizers:
            opt.step()
        # several ranks: agree on `bad`, and at log steps the averaged gradient's norm from the optimizers'
        # shards (the monitor's own is this rank's local one), in one small all-reduce (core/guard.py)
        bad, grad_norm = guard.agree(bad, self.optimizers, want_grad_norm=monitor.is_log_step(done))
        guard.restore(bad)
        monitor.after_optimizer(done)
        model.zero_grad(set_to_none=True)
        return StepOutput(loss_sum, grad_norm, factor, window)

    def evaluate(self, step: int) -> float:
        """The validation loss at `step` (the clock paused), its step line and metrics."""
        cfg, result = self.cfg, self.result
        with self.clock.paused():
            self.peaks.switch("val")
            # the module-level evaluate (core/steps.py), looked up here so that tests can wrap it
            val_loss = evaluate(self.train_model, self.val_set, self.window_at(step), self.info,
                                chunked=self.loss_paths.val).item()
            result.val_losses.append((step, val_loss))
            result.final_val_loss = val_loss
            result.best_val_loss = min(result.best_val_loss, val_loss)
            ms = self.clock.ms
            self.log(format_step_line(step, cfg.iterations, val_loss=val_loss, train_time_ms=ms,
                                      step_avg_ms=ms / max(step, 1)))
            metrics = {"Loss/val_loss": val_loss, "Loss/val_perplexity": _ppl(val_loss),
                       "Loss/best_val_loss": result.best_val_loss, "Time/training_time_ms": ms}
            if _is_bytes(self.data.vocab):  # the loss is already nats per byte
                metrics["Loss/val_bits_per_byte"] = val_loss / math.log(2)
            self.logger.log_metrics(metrics, step=step)
        return val_loss

    def log_step(self, done: int, out: StepOutput) -> None:
        """The log step's one host read-back (the monitor's collect), the guard's verdict, the step line and
        the metrics row. Raises NonFiniteError when the --nan-policy says stop."""
        cfg, info = self.cfg, self.info
        extra = {"Loss/train_loss": all_reduce_mean(out.loss_sum / (self.grad_accum * cfg.seq_len), info),
                 **self.guard.device_values()}
        if out.grad_norm is not None:
            extra["Optimization/grad_norm"] = out.grad_norm  # extra keys override the monitor's
        metrics = self.monitor.collect(done, extra=extra)
        train_loss = metrics["Loss/train_loss"]
        guard_report = self.guard.report(metrics, done)
        metrics.update(guard_report.metrics)
        for line in guard_report.lines:
            self.log(line)
        elapsed_ms = self.clock.now_ms()
        self.result.train_losses.append((done, train_loss))
        self.log(format_step_line(done, cfg.iterations, train_loss=train_loss, train_time_ms=elapsed_ms,
                                  step_avg_ms=elapsed_ms / done))
        steps_since, ms_since = done - self.last_log[0], elapsed_ms - self.last_log[1]
        self.last_log = (done, elapsed_ms)
        tok_s = steps_since * cfg.batch_tokens / max(ms_since / 1000, 1e-9)
        flops_s = tok_s * self.flops_per_token(out.window)
        if _is_bytes(self.data.vocab):
            metrics["Loss/train_bits_per_byte"] = train_loss / math.log(2)
        metrics.update({
            "Loss/train_perplexity": _ppl(train_loss),
            "Time/training_time_ms": elapsed_ms, "Time/step_avg_ms": elapsed_ms / done,
            "Time/total_time_s": time.perf_counter() - self.run_start,
            "Optimization/lr": self.adam.param_groups[0]["initial_lr"] * out.lr_factor,
            "Optimization/lr_factor": out.lr_factor, "Optimization/muon_lr": cfg.muon_lr * cfg.lr_mult * out.lr_factor,
            "Optimization/momentum": self.muon.param_groups[0]["momentum"],
            "Perf/tokens_per_second": tok_s, "Perf/flops_per_second": flops_s,
            "Attention/long_window_tokens": 128 * out.window,
            **memory_metrics(self.device, self.peaks)})
        if self.peak_flops:
            metrics["Perf/mfu"] = flops_s / (self.peak_flops * info.world_size)
        self.logger.log_metrics(metrics, step=done)

    def flops_per_token(self, window: int) -> float:
        """Training FLOPs per token with this long window (in blocks; the short layers get half of it)."""
        if window not in self._flops_per_token:
            cfg, gpt = self.cfg, self.model.cfg
            self._flops_per_token[window] = flops_per_token(
                depth=cfg.depth, width=cfg.width, head_dim=cfg.head_dim, vocab_size=gpt.padded_vocab,
                mlp_ratio=gpt.mlp_ratio, attn_layers=[gpt.has_attention(i) for i in range(cfg.depth)],
                window_tokens=[128 * (window if long else max(1, window // 2)) for long in self.model.window_layout()],
                seq_len=cfg.seq_len)
        return self._flops_per_token[window]

    def checkpoint_or_stop(self, done: int) -> None:
        """Checkpoint every --save-every steps and at the end; after a stop signal, checkpoint and raise
        StopRequested (several ranks agree on the signal at log steps only, to keep other steps sync-free)."""
        cfg, info = self.cfg, self.info
        stop_signal = None
        if done < cfg.iterations and (not info.distributed or self.monitor.is_log_step(done)):
            stop_signal = self.stop.agreed(self.device, info.distributed)
        if stop_signal or (cfg.save_every > 0 and (done % cfg.save_every == 0 or done == cfg.iterations)):
            with self.clock.paused():
                path = self.save_checkpoint(done, self.clock.ms)
            if stop_signal:
                raise StopRequested(stop_signal, done, str(path))

    def save_checkpoint(self, done: int, training_time_ms: float, check_guard: bool = True) -> Path:
        """Checkpoint after `done` steps (every rank calls it). Never saves a NaN: the guard's counters are
        read first (abort policy: a non-finite step since the last log stops the run here)."""
        if check_guard:
            for line in self.guard.report(self.guard.read(), done).lines:
                self.log(line)
        t = time.perf_counter()
        trainer_state = {"training_time_ms": training_time_ms, "best_val_loss": self.result.best_val_loss,
                         "coord_rows": self.coord.rows if self.coord is not None else [],
                         "metrics_bytes": _metrics_bytes(self.run_dir) if self.info.is_main else 0}
        payload = ckpt_io.build_payload(step=done, cfg=self.cfg, info=self.info, model=self.model, adam=self.adam,
                                        muon=self.muon, loader=self.train_loader, monitor=self.monitor,
                                        guard=self.guard, trainer_state=trainer_state,
                                        wandb_run_id=self.logger.wandb_run_id)
        path = ckpt_io.save_run_checkpoint(self.run_dir, payload, self.cfg.keep_last, self.info)
        self.log(f"checkpoint: {path} (step {done}, {time.perf_counter() - t:.1f}s)")
        return path

    # -----------------------------------------------------------------------------------------
    # The three ways a run ends

    def _finish(self) -> RunResult:
        """The end of the loop: the summary, the unigram verdict, the coordinate-check file, peak memory."""
        cfg, result, log = self.cfg, self.result, self.log
        sync(self.device)
        peaks = self.peaks
        peaks.end()
        log(peaks.summary())
        if self.device.type == "cuda":
            log(f"peak memory allocated: {peaks.run_peak_mib:.0f} MiB reserved: {peaks.run_reserved_mib:.0f} MiB")
        summary = {"best_val_loss": result.best_val_loss, "final_val_loss": result.final_val_loss,
                   "total_steps": cfg.iterations, "total_time_s": time.perf_counter() - self.run_start,
                   "training_time_ms": self.clock.ms,
                   **{f"peak_memory_mib/{phase}": mib for phase, mib in peaks.peaks_mib.items()}}
        if result.unigram_entropy is not None:
            summary["unigram_entropy"] = result.unigram_entropy
            verdict = "below" if result.final_val_loss < result.unigram_entropy else "NOT below"
            per_byte = (f" ({result.final_val_loss / math.log(2):.4f} bits/byte, "
                        f"{result.final_val_loss / result.unigram_entropy:.3f} x the unigram entropy)"
                        if _is_bytes(self.data.vocab) else "")
            log(f"final val_loss {result.final_val_loss:.4f}{per_byte} is {verdict} the unigram entropy "
                f"{result.unigram_entropy:.4f} of the validation {_unit(self.data.vocab)}s")
        if self.coord is not None and self.info.is_main:
            path = self.coord.save(self.run_dir / "coord_check.jsonl", width=cfg.width, mup=cfg.mup)
            log(f"coordinate check: per-layer-type mean |x| of steps 0..{cfg.coord_check_steps - 1} in {path}")
        self.logger.set_summary(summary)
        self.logger.close()
        return result

    def _on_stop(self, e: StopRequested) -> None:
        """A stop signal: the checkpoint is written; say where, and close the logs with exit code 3."""
        self.log(str(e))
        self.logger.set_summary({"stopped_at_step": e.step, "stop_signal": e.signal_name, "checkpoint": e.checkpoint,
                                 "best_val_loss": self.result.best_val_loss, "training_time_ms": self.clock.ms})
        self.logger.close(exit_code=EXIT_STOPPED)

    def _on_nonfinite(self, e: NonFiniteError) -> None:
        """A non-finite step the --nan-policy does not survive: name the last good checkpoint (under `skip`,
        first save the weights the guard kept finite), and close the logs with exit code 4."""
        kept = None
        if self.cfg.nan_policy == "skip":  # the gate kept the weights finite: save them, the literal last good state
            try:
                kept = self.save_checkpoint(self.done, self.clock.now_ms(), check_guard=False)
            except NonFiniteError as again:  # a NaN that was not in a gradient (e.g. an overflowing update)
                self.log(f"not saving on the way out: {again}")
        on_disk = ckpt_io.list_checkpoints(self.run_dir)
        last = kept or (on_disk[-1][1] if on_disk else None)
        e.args = (f"{e} Last good checkpoint: {last}" + (" (resume with --resume auto, e.g. with a lower LR)" if last
                  else " -- none was written; use --save-every N to keep checkpoints."),)
        self.log(f"stopping: {e}")
        self.logger.set_summary({"nonfinite_step": e.step, "nonfinite_groups": ", ".join(e.groups),
                                 "last_good_checkpoint": str(last) if last else None})
        self.logger.close(exit_code=EXIT_NONFINITE)


# ---------------------------------------------------------------------------------------------
# Helpers


def resolve_vocab(cfg: TrainConfig, vocab: Vocab) -> TrainConfig:
    """Take the vocabulary from the data source; a --vocab-size/--bos-id that disagrees with it is an error."""
    for name, declared in (("vocab_size", vocab.size), ("bos_id", vocab.bos_id)):
        given = getattr(cfg, name)
        if given is None:
            setattr(cfg, name, declared)
        elif given != declared:
            raise ConfigError(f"--{name.replace('_', '-')} {given} disagrees with the data: its vocabulary "
                              f"'{vocab.name}' has size {vocab.size} and BOS {vocab.bos_id}. Drop --vocab-size and "
                              "--bos-id (the data declares them) or choose data made with that vocabulary.")
    return cfg


def _metrics_bytes(run_dir: Path) -> int:
    """Length of metrics.jsonl now (the logger flushes every row); a resume cuts the file back to it."""
    path = run_dir / "metrics.jsonl"
    return path.stat().st_size if path.exists() else 0


def _is_bytes(vocab: Vocab) -> bool:
    return vocab.name == "bytes"


def _unit(vocab: Vocab) -> str:
    return "byte" if _is_bytes(vocab) else "token"


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))
