"""The training loop: wires config, data, model, muP, optimizers, monitoring and logging together.

`train.py` parses the CLI and calls `run(cfg)`. The pieces are functions so that the coordinate
check and the tests can build the same model and take the same steps without the CLI.
"""
from __future__ import annotations

import copy
import json
import math
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from core import mup
from core.compile import describe_compiled, resolve_compile, run_train_tflop
from core.config import ConfigError, TrainConfig, grad_accum_steps, resolve_defaults, validate
from core.data import GPT2_VOCAB, Vocab, declared_vocab
from core.distributed import DistInfo, all_reduce_mean, broadcast_object, setup_distributed, teardown
from core.model import GPT, GPTConfig
from core.optimizers import build_optimizers, ns_dtype, set_muon_momentum
from core.schedule import lr_factor, window_blocks


# ---------------------------------------------------------------------------------------------
# Building blocks shared by train.py, the coordinate check and the tests


def model_config(cfg: TrainConfig, fp8_mode: str = "off", max_seq_len: int | None = None) -> GPTConfig:
    # vocab_size / bos_id None: no data source was consulted (a test or a benchmark): GPT-2, the default data's
    return GPTConfig(vocab_size=cfg.vocab_size or GPT2_VOCAB.size,
                     bos_id=GPT2_VOCAB.bos_id if cfg.bos_id is None else cfg.bos_id,
                     depth=cfg.depth, width=cfg.width, head_dim=cfg.head_dim,
                     max_seq_len=max_seq_len or max(cfg.seq_len, cfg.val_seq_len), fp8=fp8_mode,
                     mup=cfg.mup, base_width=cfg.base_width if cfg.mup else None, mup_mistake=cfg.mup_mistake)


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


def build_model(cfg: TrainConfig, device: torch.device, fp8_mode: str = "off") -> GPT:
    """The model on `device`, seeded; embeddings in bf16 on CUDA as in the record."""
    torch.manual_seed(cfg.seed)
    model = GPT(model_config(cfg, fp8_mode)).to(device)
    if device.type == "cuda":
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                m.bfloat16()
    return model


def build_optimizer_pair(model: GPT, cfg: TrainConfig, rank: int = 0, world_size: int = 1):
    """muP LR multipliers (if --mup) then the record's DistAdam + Muon; returns (adam, muon, mup_table)."""
    table = mup.apply_mup(model, cfg.base_width) if cfg.mup else None
    # --lr-mult scales every LR of both optimizers together (the swept quantity of a global-LR sweep)
    adam, muon = build_optimizers(model, model.param_kinds(), adam_lr=cfg.adam_lr * cfg.lr_mult,
                                  muon_lr=cfg.muon_lr * cfg.lr_mult, rank=rank, world_size=world_size)
    return adam, muon, table


def set_schedules(cfg: TrainConfig, optimizers, muon, step: int) -> float:
    """LR factor for every group and the Muon momentum warm-up at `step`; returns the LR factor."""
    factor = lr_factor(step, cfg.iterations, cfg.cooldown_frac, cfg.final_lr_frac)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * factor
    set_muon_momentum(muon, step, cfg.muon_momentum_warmup)
    return factor


_window_tensors: dict[tuple, torch.Tensor] = {}


def window_tensor(blocks: int, device: torch.device) -> torch.Tensor:
    """The window as a cached 0-dim tensor: a compiled model sees a tensor, not a new int, so no recompile."""
    key = (blocks, str(device))
    if key not in _window_tensors:
        # pinned + non_blocking, as the record's get_window_size_blocks_helper: no host sync when the window grows
        host = torch.tensor(blocks, dtype=torch.int32, pin_memory=torch.device(device).type == "cuda")
        _window_tensors[key] = host.to(device, non_blocking=True)
    return _window_tensors[key]


def forward_backward(model, batches, window: int, grad_accum: int) -> torch.Tensor:
    """Sum-reduced loss per micro-batch (as the record: keeps FP8 e5m2 gradients in range), divided by
    grad_accum so that 1 process x A micro-batches == A ranks x 1. Returns the summed loss (device)."""
    device = batches[0][0].device
    total = None  # in the loss's dtype (float64 in the golden test)
    for inputs, targets in batches:
        loss = model(inputs, targets, window_tensor(window, device))
        (loss / grad_accum).backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


@torch.no_grad()
def evaluate(model, val_set, window: int, info: DistInfo) -> torch.Tensor:
    """Mean validation loss per token over this rank's share, averaged over ranks (device tensor)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=info.device)
    for inputs, targets in val_set:
        total += model(inputs, targets, window_tensor(window, info.device), reduction="mean")
    total /= max(len(val_set), 1)
    model.train(was_training)
    return all_reduce_mean(total, info)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_metrics(device: torch.device, peaks=None) -> dict[str, float]:
    if device.type == "cuda" and peaks is not None:  # PhasePeaks resets the allocator's peak at phase changes
        return {"Hardware/peak_memory_mb": peaks.peak_so_far_mib(),
                "Hardware/reserved_memory_mb": peaks.reserved_so_far_mib()}
    if device.type == "cuda":
        return {"Hardware/peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                "Hardware/reserved_memory_mb": torch.cuda.max_memory_reserved(device) / 2**20}
    # ru_maxrss is in KiB on Linux: the process's peak resident memory
    return {"Hardware/peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class RunResult:
    run_dir: Path
    train_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) at log steps
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    final_val_loss: float = float("nan")
    best_val_loss: float = float("inf")
    unigram_entropy: float | None = None


def run(cfg: TrainConfig) -> RunResult:
    from core.data import BatchLoader, resolve_data, unigram_entropy, val_batches
    from core.fp8 import fallback_warning as fp8_fallback_warning, resolve_fp8_mode
    from core.fp8 import grad_scale_for_accumulation as fp8_grad_scale
    from core.logger import SimpleLogger, default_wandb_project, format_step_line, make_run_name
    from core.mfu import detect_peak_flops, flops_per_token
    from core.memory import PhasePeaks, allocator_note
    from core.monitor import TrainingMonitor
    from core.coord_check import CoordRecorder
    from core import checkpoint as ckpt_io
    from core.guard import EXIT_NONFINITE, EXIT_STOPPED, GracefulStop, NonFiniteError, NonFiniteGuard, StopRequested

    stop = GracefulStop()
    info = setup_distributed(cfg.device)
    try:
        device = info.device
        resolve_defaults(cfg, device.type)
        validate(cfg, info.world_size)
        resolve_vocab(cfg, declared_vocab(cfg.data, cfg.data_dir))
        # --resume: find, verify and check the checkpoint before any heavy work (bad or incompatible: exit 2)
        notes: list[str] = []  # logged once the logger exists
        resume_path, resumed = ckpt_io.resolve_resume(cfg, notes.append)
        config_changes = ckpt_io.check_compatible(resumed, cfg, resume_path) if resumed is not None else []
        grad_accum = grad_accum_steps(cfg, info.world_size)
        fp8_mode, fp8_reason = resolve_fp8_mode(cfg.fp8, device)  # --fp8 on where FP8 cannot run: exit 2
        fp8_warning = fp8_fallback_warning(cfg.fp8, fp8_mode, device)
        use_compile, compile_reason = resolve_compile(cfg.compile, device, run_train_tflop(cfg), cfg.vocab_size)

        # data first: bad shards fail before any model is built (rank 0 builds the embedded cache)
        if info.is_main:
            data = resolve_data(cfg.data_dir, data=cfg.data)
        if info.distributed:
            torch.distributed.barrier()
        if not info.is_main:
            data = resolve_data(cfg.data_dir, data=cfg.data)
        resolve_vocab(cfg, data.vocab)  # the shards agree with what was declared
        if resumed is not None:
            ckpt_io.check_data(resumed, data.train_files, resume_path)
        val_tokens = cfg.val_tokens or data.val_tokens
        val_tokens -= val_tokens % (cfg.val_seq_len * info.world_size)
        if val_tokens <= 0:
            raise ConfigError(f"the validation set of {data.val_tokens} tokens is smaller than one validation batch "
                              f"(val_seq_len x world_size = {cfg.val_seq_len * info.world_size}): lower --val-seq-len")

        # rank 0's name on every rank: the timestamps of the ranks' clocks may differ by a second
        cfg.run_name = broadcast_object(
            cfg.run_name or make_run_name(mup=cfg.mup, width=cfg.width, base_width=cfg.base_width), info)
        run_dir = Path(cfg.log_dir) / cfg.run_name
        continuing = bool(cfg.resume) and run_dir.is_dir()  # a resumed run appends to its folder's logs
        if continuing and info.is_main:
            dropped = ckpt_io.truncate_metrics(run_dir, resumed["trainer"]["metrics_bytes"] if resumed else 0)
            if dropped:
                notes.append(f"resume: dropped {dropped} metrics.jsonl row(s) logged after the checkpoint by the "
                             "interrupted attempt; this run logs those steps again")
        # what "auto" resolved to on this machine, next to the flags, in config.json and the W&B config
        resolved = {"device": str(device), "world_size": info.world_size, "grad_accum": grad_accum,
                    "fp8_mode": fp8_mode, "fp8_reason": fp8_reason, "compile": use_compile, "ns_dtype": str(ns_dtype(device)).replace("torch.", ""),
                    "vocab": data.vocab.name}
        try:
            logger = SimpleLogger(
                run_dir, {**cfg.to_dict(), "resolved": resolved}, rank=info.rank, use_wandb=cfg.use_wandb,
                wandb_project=cfg.wandb_project or default_wandb_project(cfg.mup),
                wandb_entity=cfg.wandb_entity, wandb_run_name=cfg.wandb_run_name or cfg.run_name,
                wandb_tags=tuple(cfg.wandb_tags), wandb_group=cfg.wandb_group, resume=continuing,
                wandb_resume_id=resumed.get("wandb_run_id") if resumed else None)
        except FileExistsError as e:
            raise ConfigError(f"{e} (from the command line: add --resume auto to continue it)") from None
        except PermissionError as e:
            raise ConfigError(str(e)) from None
        log = logger.info
        result = RunResult(run_dir=run_dir)
        for note in notes:
            log(note)
        if resumed is not None:
            log(f"resume: {resume_path} (after step {resumed['step']}, written by {resumed['world_size']} process(es))")
            for change in config_changes:
                log(f"resume: config changed since the checkpoint: {change}")
            if resumed["world_size"] != info.world_size:
                log(f"resume: world size {resumed['world_size']} -> {info.world_size}: same global batch, so the run "
                    "continues the same training, equal to an uninterrupted one up to float rounding (not bitwise)")

        log(f"python {sys.version.split()[0]} | torch {torch.__version__} | {platform.platform()}")
        log(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
            + f" | world size {info.world_size} | backend {info.backend or 'none (single process)'}")
        log(f"data: {data.name} ({len(data.train_files)} train shard(s), {val_tokens:,} validation tokens, "
            f"vocabulary {data.vocab.name}: {data.vocab.size} ids, BOS {data.vocab.bos_id})"
            + (" -- no FineWeb shards found, using the embedded corpus" if data.is_embedded else ""))

        # model, muP, optimizers
        model = build_model(cfg, device, fp8_mode)
        model.lm_head.grad_s = fp8_grad_scale(model.lm_head.grad_s, grad_accum)  # e5m2 range as on the record's ranks
        if info.distributed:
            for p in model.parameters():
                torch.distributed.broadcast(p.detach(), 0)
        adam, muon, mup_table = build_optimizer_pair(model, cfg, info.rank, info.world_size)
        optimizers = [adam, muon]
        n_params = sum(p.numel() for p in model.parameters())
        n_embed = sum(p.numel() for n, p in model.named_parameters() if "embed" in n)
        tokens_per_step = cfg.batch_tokens
        window_at = lambda step: window_blocks(step, cfg.iterations, cfg.window_max)
        layers_long = model.window_layout()
        attn_layers = [model.cfg.has_attention(i) for i in range(cfg.depth)]

        def window_tokens_per_layer(step: int) -> list[int]:
            w = window_at(step)
            return [128 * (w if long else max(1, w // 2)) for long in layers_long]

        peak_flops, peak_reason = detect_peak_flops(device, cfg.peak_tflops)
        log(f"model: depth {cfg.depth} width {cfg.width} heads {cfg.width // cfg.head_dim}x{cfg.head_dim} | "
            f"params {n_params:,} ({n_embed:,} in embeddings, {n_params - n_embed:,} other)")
        log(f"batch: {tokens_per_step:,} tokens/step = {info.world_size} rank(s) x {grad_accum} accumulation x "
            f"{cfg.seq_len} seq_len | {cfg.iterations} steps | val every {cfg.val_every}")
        log(f"attention: {'FlexAttention (compiled)' if device.type == 'cuda' else 'scaled_dot_product_attention with the same document-causal sliding-window mask (FlexAttention has no CPU backward)'}")
        log(f"compile: {use_compile} ({compile_reason}); compiled: {describe_compiled(use_compile, device)}")
        log(f"fp8 lm_head: {fp8_mode} ({fp8_reason}) | dtype: "
            f"{'bf16 activations' if device.type == 'cuda' else 'fp32'} | Muon Newton-Schulz in "
            f"{resolved['ns_dtype']} ({'tensor cores' if device.type == 'cuda' else 'bf16 would be emulated on a CPU'})")
        if cfg.lr_mult != 1.0:
            log(f"lr-mult {cfg.lr_mult:g}: Adam LR {cfg.adam_lr * cfg.lr_mult:g}, Muon LR {cfg.muon_lr * cfg.lr_mult:g}")
        if fp8_warning:  # a GPU with FP8 tensor cores whose FP8 probe failed: say it where nobody can miss it
            log(fp8_warning)
            print(fp8_warning, file=sys.stderr, flush=True)
        if device.type == "cuda":
            log(allocator_note())
        log(f"MFU: {'peak %.0f TFLOP/s (%s)' % (peak_flops / 1e12, peak_reason) if peak_flops else 'unavailable: ' + peak_reason}")
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

        hidden = {n: p for n, p in model.named_parameters() if model.param_kinds()[n] == "hidden"}
        # the monitor counts completed steps (1..N): step k's metrics describe the model after k updates
        monitor = TrainingMonitor(model, hidden, log_every=cfg.log_every, spectral_every=cfg.spectral_every,
                                  activations=cfg.activations, activation_modules=_activation_modules(model),
                                  total_steps=cfg.iterations)
        coord = CoordRecorder(model) if cfg.coord_check else None
        guard = NonFiniteGuard(model, model.param_kinds(), optimizers, policy=cfg.nan_policy,
                               max_skips=cfg.max_nan_skips, spike_factor=cfg.spike_factor, device=device,
                               distributed=info.distributed)
        train_model = torch.compile(model, dynamic=False) if use_compile else model

        train_loader = BatchLoader(data.train_files, cfg.seq_len, info.world_size * grad_accum, rank=info.rank,
                                   world_size=info.world_size, device=device, vocab=data.vocab)
        val_set = val_batches(data.val_files, cfg.val_seq_len, val_tokens, rank=info.rank,
                              world_size=info.world_size, device=device, vocab=data.vocab)

        peaks = PhasePeaks(device)  # peak memory per phase, in the log at the end (core/memory.py)
        if cfg.warmup_steps > 0:
            peaks.switch("warmup")
            _warmup_kernels(train_model, model, optimizers, train_loader, cfg, grad_accum, window_at, log)

        if data.is_embedded and info.is_main:
            # the whole validation set, not rank 0's share, so the baseline does not depend on the world size
            whole_val = val_set if not info.distributed else val_batches(data.val_files, cfg.val_seq_len, val_tokens,
                                                                         vocab=data.vocab)
            result.unigram_entropy = unigram_entropy(_val_tokens(whole_val))
            log(f"unigram entropy of the validation {_unit(data.vocab)}s: {result.unigram_entropy:.4f} nats"
                + (f" ({result.unigram_entropy / math.log(2):.4f} bits) per byte" if _is_bytes(data.vocab) else "")
                + " (a model that learned anything beyond token frequencies beats it)")

        # ------------------------------------------------------------------------------------
        fpt_cache = {}
        training_time_ms = 0.0
        start_step = 0
        if resumed is not None:
            saved = ckpt_io.restore_run(resumed, resume_path, info=info, model=model, adam=adam, muon=muon,
                                        loader=train_loader, monitor=monitor, guard=guard)
            start_step, training_time_ms = resumed["step"], saved["training_time_ms"]
            result.best_val_loss = saved["best_val_loss"]
            if coord is not None:
                coord.rows = list(saved["coord_rows"])
            resumed = None  # free the host copy
            log(f"resume: model, optimizers, data position, RNG and monitor restored; continuing after step "
                f"{start_step}")

        def save(step_done: int, time_ms: float, check_guard: bool = True) -> Path:
            """Checkpoint after `step_done` steps (every rank calls it). Never saves a NaN: the guard's
            counters are read first (abort policy: a non-finite step since the last log stops the run here)."""
            if check_guard:
                for line in guard.report(guard.read(), step_done).lines:
                    log(line)
            t = time.perf_counter()
            trainer_state = {"training_time_ms": time_ms, "best_val_loss": result.best_val_loss,
                             "coord_rows": coord.rows if coord is not None else [],
                             "metrics_bytes": _metrics_bytes(run_dir) if info.is_main else 0}
            payload = ckpt_io.build_payload(step=step_done, cfg=cfg, info=info, model=model, adam=adam, muon=muon,
                                            loader=train_loader, monitor=monitor, guard=guard,
                                            trainer_state=trainer_state, wandb_run_id=logger.wandb_run_id)
            path = ckpt_io.save_run_checkpoint(run_dir, payload, cfg.keep_last, info)
            log(f"checkpoint: {path} (step {step_done}, {time.perf_counter() - t:.1f}s)")
            return path

        run_start = time.perf_counter()
        _sync(device)
        t0 = time.perf_counter()
        last_log = (start_step, training_time_ms)  # (step, training_time_ms) at the previous log, for throughput
        stop.install()  # SIGTERM/SIGINT: finish the step, checkpoint, exit (core/guard.py)
        for step in range(start_step, cfg.iterations + 1):
            last_step = step == cfg.iterations
            if last_step or (cfg.val_every > 0 and step % cfg.val_every == 0):
                _sync(device)
                training_time_ms += 1000 * (time.perf_counter() - t0)
                peaks.switch("val")
                val_loss = evaluate(train_model, val_set, window_at(step), info).item()
                result.val_losses.append((step, val_loss))
                result.final_val_loss = val_loss
                result.best_val_loss = min(result.best_val_loss, val_loss)
                log(format_step_line(step, cfg.iterations, val_loss=val_loss, train_time_ms=training_time_ms,
                                     step_avg_ms=training_time_ms / max(step, 1)))
                val_metrics = {"Loss/val_loss": val_loss, "Loss/val_perplexity": _ppl(val_loss),
                               "Loss/best_val_loss": result.best_val_loss, "Time/training_time_ms": training_time_ms}
                if _is_bytes(data.vocab):  # the loss is already nats per byte
                    val_metrics["Loss/val_bits_per_byte"] = val_loss / math.log(2)
                logger.log_metrics(val_metrics, step=step)
                _sync(device)
                t0 = time.perf_counter()
            if last_step:
                break

            # ---------------- training step ----------------
            batches = train_loader.next_step()
            window = window_at(step)
            done = step + 1
            recording = coord is not None and coord.wants(step, cfg.coord_check_every, cfg.coord_check_steps)
            # forward hooks added after torch.compile traced the model never fire (core/monitor.py): steps that
            # measure activations or record the coordinate check run the eager module
            step_model = model if recording else monitor.module_for(done, train_model)
            peaks.switch("train_eager" if step_model is not train_model else "train")  # eager steps of a compiled run
            with monitor.activation_hooks(done), (coord.recording() if recording else _null()):
                loss_sum = forward_backward(step_model, batches, window, grad_accum)
            if recording:
                logger.log_metrics(coord.finish_step(step), step=step)
            monitor.after_backward(done)
            bad = guard.check(done, loss_sum / (grad_accum * cfg.seq_len))  # device flag, no host sync
            factor = set_schedules(cfg, optimizers, muon, step)
            monitor.before_optimizer(done)
            guard.snapshot()  # --nan-policy skip only: copy weights + state to put back if `bad`
            for opt in optimizers:
                opt.step()
            # several ranks: agree on `bad`, and at log steps the averaged gradient's norm from the optimizers'
            # shards (the monitor's own is this rank's local one), in one small all-reduce (core/guard.py)
            bad, grad_norm_t = guard.agree(bad, optimizers, want_grad_norm=monitor.is_log_step(done))
            guard.restore(bad)
            monitor.after_optimizer(done)
            model.zero_grad(set_to_none=True)

            if monitor.is_log_step(done):
                train_loss_t = all_reduce_mean(loss_sum / (grad_accum * cfg.seq_len), info)
                extra = {"Loss/train_loss": train_loss_t, **guard.device_values()}
                if grad_norm_t is not None:
                    extra["Optimization/grad_norm"] = grad_norm_t  # extra keys override the monitor's
                metrics = monitor.collect(done, extra=extra)
                train_loss = metrics["Loss/train_loss"]
                guard_report = guard.report(metrics, done)  # raises NonFiniteError when the policy says stop
                metrics.update(guard_report.metrics)
                for line in guard_report.lines:
                    log(line)
                elapsed_ms = training_time_ms + 1000 * (time.perf_counter() - t0)
                result.train_losses.append((done, train_loss))
                log(format_step_line(done, cfg.iterations, train_loss=train_loss, train_time_ms=elapsed_ms,
                                     step_avg_ms=elapsed_ms / done))
                steps_since, ms_since = done - last_log[0], elapsed_ms - last_log[1]
                last_log = (done, elapsed_ms)
                tok_s = steps_since * tokens_per_step / max(ms_since / 1000, 1e-9)
                key = window
                if key not in fpt_cache:
                    fpt_cache[key] = flops_per_token(
                        depth=cfg.depth, width=cfg.width, head_dim=cfg.head_dim, vocab_size=model.cfg.padded_vocab,
                        mlp_ratio=model.cfg.mlp_ratio, attn_layers=attn_layers,
                        window_tokens=window_tokens_per_layer(step), seq_len=cfg.seq_len)
                flops_s = tok_s * fpt_cache[key]
                if _is_bytes(data.vocab):
                    metrics["Loss/train_bits_per_byte"] = train_loss / math.log(2)
                metrics.update({
                    "Loss/train_perplexity": _ppl(train_loss),
                    "Time/training_time_ms": elapsed_ms, "Time/step_avg_ms": elapsed_ms / done,
                    "Time/total_time_s": time.perf_counter() - run_start,
                    "Optimization/lr": adam.param_groups[0]["initial_lr"] * factor,
                    "Optimization/lr_factor": factor, "Optimization/muon_lr": cfg.muon_lr * cfg.lr_mult * factor,
                    "Optimization/momentum": muon.param_groups[0]["momentum"],
                    "Perf/tokens_per_second": tok_s, "Perf/flops_per_second": flops_s,
                    "Attention/long_window_tokens": 128 * window,
                    **memory_metrics(device, peaks)})
                if peak_flops:
                    metrics["Perf/mfu"] = flops_s / (peak_flops * info.world_size)
                logger.log_metrics(metrics, step=done)

            # ---------------- checkpoint / graceful stop ----------------
            stop_signal = None
            if done < cfg.iterations and (not info.distributed or monitor.is_log_step(done)):
                stop_signal = stop.agreed(device, info.distributed)  # several ranks agree at log steps
            if stop_signal or (cfg.save_every > 0 and (done % cfg.save_every == 0 or done == cfg.iterations)):
                _sync(device)
                training_time_ms += 1000 * (time.perf_counter() - t0)
                saved_path = save(done, training_time_ms)
                _sync(device)
                t0 = time.perf_counter()
                if stop_signal:
                    raise StopRequested(stop_signal, done, str(saved_path))

        _sync(device)
        peaks.end()
        log(peaks.summary())
        if device.type == "cuda":
            log(f"peak memory allocated: {peaks.run_peak_mib:.0f} MiB reserved: {peaks.run_reserved_mib:.0f} MiB")
        summary = {"best_val_loss": result.best_val_loss, "final_val_loss": result.final_val_loss,
                   "total_steps": cfg.iterations, "total_time_s": time.perf_counter() - run_start,
                   "training_time_ms": training_time_ms,
                   **{f"peak_memory_mib/{phase}": mib for phase, mib in peaks.peaks_mib.items()}}
        if result.unigram_entropy is not None:
            summary["unigram_entropy"] = result.unigram_entropy
            verdict = "below" if result.final_val_loss < result.unigram_entropy else "NOT below"
            per_byte = (f" ({result.final_val_loss / math.log(2):.4f} bits/byte, "
                        f"{result.final_val_loss / result.unigram_entropy:.3f} x the unigram entropy)"
                        if _is_bytes(data.vocab) else "")
            log(f"final val_loss {result.final_val_loss:.4f}{per_byte} is {verdict} the unigram entropy "
                f"{result.unigram_entropy:.4f} of the validation {_unit(data.vocab)}s")
        if coord is not None and info.is_main:
            path = coord.save(run_dir / "coord_check.jsonl", width=cfg.width, mup=cfg.mup)
            log(f"coordinate check: per-layer-type mean |x| of steps 0..{cfg.coord_check_steps - 1} in {path}")
        logger.set_summary(summary)
        logger.close()
        return result
    except StopRequested as e:
        log(str(e))
        logger.set_summary({"stopped_at_step": e.step, "stop_signal": e.signal_name, "checkpoint": e.checkpoint,
                            "best_val_loss": result.best_val_loss, "training_time_ms": training_time_ms})
        logger.close(exit_code=EXIT_STOPPED)
        raise
    except NonFiniteError as e:
        kept = None
        if cfg.nan_policy == "skip":  # the gate kept the weights finite: save them, the literal last good state
            try:
                kept = save(done, training_time_ms + 1000 * (time.perf_counter() - t0), check_guard=False)
            except NonFiniteError as again:  # a NaN that was not in a gradient (e.g. an overflowing update)
                log(f"not saving on the way out: {again}")
        on_disk = ckpt_io.list_checkpoints(run_dir)
        last = kept or (on_disk[-1][1] if on_disk else None)
        e.args = (f"{e} Last good checkpoint: {last}" + (" (resume with --resume auto, e.g. with a lower LR)" if last
                  else " -- none was written; use --save-every N to keep checkpoints."),)
        log(f"stopping: {e}")
        logger.set_summary({"nonfinite_step": e.step, "nonfinite_groups": ", ".join(e.groups),
                            "last_good_checkpoint": str(last) if last else None})
        logger.close(exit_code=EXIT_NONFINITE)
        raise
    finally:
        stop.uninstall()
        teardown(info)


# ---------------------------------------------------------------------------------------------
# helpers of run()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


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


def _val_tokens(val_set) -> torch.Tensor:
    return torch.cat([inputs.cpu() for inputs, _ in val_set])


def _activation_modules(model: GPT) -> dict[str, nn.Module]:
    mods = {"embed": model.embed, "lm_head": model.lm_head}
    for i, block in enumerate(model.blocks):
        if block.attn is not None:
            mods[f"block{i}_attn"] = block.attn
        mods[f"block{i}_mlp"] = block.mlp
        mods[f"block{i}"] = block
    return mods


def _warmup_kernels(train_model, model, optimizers, loader, cfg, grad_accum, window_at, log):
    """Compile / autotune on real batches, then restore the initial state (record: warm-up is not training).

    The loader is restored too, so the measured run sees exactly the batches it would have seen.
    """
    t = time.perf_counter()
    initial = dict(model=copy.deepcopy(model.state_dict()),
                   optimizers=[copy.deepcopy(opt.state_dict()) for opt in optimizers],
                   loader=copy.deepcopy(loader.state_dict()))
    for i in range(cfg.warmup_steps):
        # visit the window sizes the run will use, so no recompile happens inside the timed loop
        step = (i * cfg.iterations) // max(cfg.warmup_steps, 1)
        forward_backward(train_model, loader.next_step(), window_at(step), grad_accum)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    model.load_state_dict(initial["model"])
    for opt, state in zip(optimizers, initial["optimizers"]):
        opt.load_state_dict(state)
    loader.load_state_dict(initial["loader"])
    log(f"kernel warm-up: {cfg.warmup_steps} steps in {time.perf_counter() - t:.1f}s (state restored)")
