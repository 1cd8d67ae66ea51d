"""TrainingMonitor: training-health metrics computed on the device and read back once per log step.

Owns which metric is measured on which step, the forward hooks for activation statistics, and the
single device-to-host transfer per log step. Metric names are the SPEC section 6 W&B keys.

Per step, the trainer calls (all are no-ops, with no host synchronisation, on steps that do not log):

    with monitor.activation_hooks(step):        # hooks attached only on activation steps
        loss = monitor.module_for(step, compiled_model)(inputs, targets)
        loss.backward()
    monitor.after_backward(step)                # log steps: global grad norm (foreach, on device)
    monitor.before_optimizer(step)              # spectral steps: snapshot of the hidden matrices
    optimizer.step()
    monitor.after_optimizer(step)               # log steps: param norm; spectral steps: ||dW||/||W||
                                                # and spectral norms of the hidden matrices
    if monitor.is_log_step(step):
        metrics = monitor.collect(step, extra={"Loss/train_loss": loss})   # the one host transfer

Schedule: interval metrics are measured on `step % spectral_every == 0` (spectral norms, update
ratios) and `step % activation_every == 0` (activations, only when `activations=True`); such steps
are log steps too, so every measured value is logged at the step it belongs to and the cheap
group has no gaps. Call `after_backward` once the gradients are final (after accumulation; in the
record, Muon/DistAdam average gradients across ranks inside `step()`, so the grad norm here is this
rank's; with several ranks the trainer passes the averaged gradient's norm to `collect` as an extra).

torch.compile: a compiled graph does not see forward hooks added after it was compiled (dynamo skips
hook guards by default, `torch._dynamo.config.skip_nnmodule_hook_guards`), so hooks attached only on
some steps would silently measure nothing. `module_for(step, compiled)` therefore returns the eager
module on activation steps (slower, only on those steps) and the compiled one otherwise; the compiled
graph is never recompiled for the hooks.

Keys: `Optimization/grad_norm`, `Model/param_norm` (global L2 norms); `Model/spectral_norm_max|mean|std`
(population std over the hidden matrices), `Model/spectral_norm/<matrix>`, `Model/spectral_residual_max`
(see `core.spectral`), `Model/update_ratio/<matrix>` = ||W_after - W_before||_F / ||W_before||_F
(relative to ||W_after|| when W_before is zero, e.g. a zero-initialised projection on its first
step), `Model/update_ratio_mean`; `Activations/<layer>_mean|_std|_max|_min|_l2_norm` (over the whole
output tensor of the module, the last call of the step if it runs several times).
Env vars (`MONITOR_SPECTRAL_EVERY`, `MONITOR_ACTIVATIONS`) are read by the trainer, not here.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from core.spectral import SpectralEstimate, SpectralNormTracker, matrix_slices

ACTIVATION_STATS = ("mean", "std", "max", "min", "l2_norm")


def _output_tensor(output) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for o in output:
            if isinstance(o, Tensor):
                return o
    return None


ROW_CHUNK_ELEMENTS = 2**22  # row reductions take at most this many elements at a time (16 MiB in fp32)


def row_chunks(x: Tensor) -> tuple[Tensor, ...]:
    """x as a 2-D (rows, last dim) view, split into row chunks of at most ROW_CHUNK_ELEMENTS elements.

    A statistic reduced chunk by chunk makes fp32 temporaries (`.float()` of a bf16 output, `.abs()`) of one
    chunk, not of the whole output: the readout's z is 9.9 GB in fp32 at the record's batch (issue 21).
    """
    rows = x.reshape(-1, x.shape[-1]) if x.ndim > 0 else x.reshape(1, 1)
    return rows.split(max(1, ROW_CHUNK_ELEMENTS // max(rows.size(1), 1)))


class RowMoments:
    """[mean, std, max, min, l2_norm] of a tensor given in parts of whole rows (`add` each part, then `stats`)."""

    def __init__(self):
        self.norms: list[Tensor] = []   # per-row L2 norms
        self.means: list[Tensor] = []   # per-row means
        self.lo: list[Tensor] = []
        self.hi: list[Tensor] = []
        self.numel = 0

    def add(self, x: Tensor) -> "RowMoments":
        for chunk in row_chunks(x):
            chunk = chunk.float()
            self.norms.append(torch.linalg.vector_norm(chunk, dim=-1))
            self.means.append(chunk.mean(dim=-1))
            lo, hi = torch.aminmax(chunk)
            self.lo.append(lo)
            self.hi.append(hi)
            self.numel += chunk.numel()
        return self

    def stats(self) -> Tensor:
        l2 = torch.linalg.vector_norm(torch.cat(self.norms))
        mean = torch.cat(self.means).mean()
        std = (l2.square() / self.numel - mean.square()).clamp_min(0).sqrt()
        return torch.stack([mean, std, torch.stack(self.hi).max(), torch.stack(self.lo).min(), l2])


def activation_stats(x: Tensor) -> Tensor:
    """[mean, std, max, min, l2_norm] of all of x's elements, as one fp32 tensor on x's device.

    Row-wise reductions then a reduction over rows: on CPU a single fp32 `vector_norm` (or
    `_foreach_norm`) over millions of elements drifts low (tests/test_monitor.py: 3198.77 vs 3199.99 on
    a 512 x 20000 N(0,1) tensor), and `std_mean` is slow there (METRICS_ANALYSIS.md section 2: the
    logits hook went from 330 ms to 24 ms). std comes from the moments (E[x^2] - mean^2), exact
    enough unless |mean| >> std. The rows are reduced in chunks (`row_chunks`): no full-size temporary.
    """
    return RowMoments().add(x).stats()


def row_abs_means(x: Tensor) -> Tensor:
    """Mean |x| of each row of x's 2-D view (fp32), reduced chunk by chunk: no full-size temporary."""
    return torch.cat([chunk.float().abs().mean(dim=-1) for chunk in row_chunks(x)])


def default_activation_modules(model: nn.Module) -> dict[str, nn.Module]:
    """One entry per transformer block (`block_<i>`) when the model has `.blocks`, else its children."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        return {f"block_{i}": b for i, b in enumerate(blocks)}
    return dict(model.named_children())


class TrainingMonitor:
    """Cheap metrics every log step, spectral norms / update ratios / activations on intervals.

    model: the (uncompiled or compiled) module; its parameters give grad and param norms.
    hidden_params: name -> parameter of the Muon hidden matrices (2D, or 3D stacks such as qkv).
    log_every: log (and read back) every this many steps.
    spectral_every: spectral norms and update ratios every this many steps; 0 turns them off.
    activations: attach activation-statistics hooks on activation steps.
    activation_modules: name -> module whose outputs are measured (default: `default_activation_modules`).
    activation_every: activation steps interval (default: spectral_every, or log_every if that is 0).
    total_steps: when given, the last step is a log step too.
    tracker: the `SpectralNormTracker` to use (default settings otherwise); saved by `state_dict`.
    """

    def __init__(
        self,
        model: nn.Module,
        hidden_params: Mapping[str, Tensor],
        *,
        log_every: int,
        spectral_every: int = 100,
        activations: bool = False,
        activation_modules: Mapping[str, nn.Module] | None = None,
        activation_every: int | None = None,
        total_steps: int | None = None,
        tracker: SpectralNormTracker | None = None,
    ):
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        if spectral_every < 0:
            raise ValueError(f"spectral_every must be >= 0 (0 = off), got {spectral_every}")
        self.model = model
        self.log_every = log_every
        self.spectral_every = spectral_every
        self.activations = activations
        self.activation_every = activation_every or (spectral_every if spectral_every > 0 else log_every)
        self.total_steps = total_steps
        self.tracker = tracker if tracker is not None else SpectralNormTracker()
        self._params = [p for p in model.parameters()]
        self._hidden = dict(hidden_params)
        # 2D views of the hidden matrices (3D stacks split as core.spectral names them)
        self._slices: dict[str, Tensor] = {}
        for name, p in self._hidden.items():
            for sub, m in matrix_slices(name, p):
                self._slices[sub] = m
        self._act_modules = dict(activation_modules) if activation_modules is not None else (
            default_activation_modules(model) if activations else {})
        self._snapshot: list[Tensor] | None = None
        self._pending: list[tuple[list[str], Tensor]] = []  # (keys, 1-D device tensor)
        self._act: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ schedule

    def measures_spectral(self, step: int) -> bool:
        return self.spectral_every > 0 and bool(self._slices) and step % self.spectral_every == 0

    def measures_activations(self, step: int) -> bool:
        return self.activations and bool(self._act_modules) and step % self.activation_every == 0

    def is_log_step(self, step: int) -> bool:
        return (step % self.log_every == 0 or step == self.total_steps
                or self.measures_spectral(step) or self.measures_activations(step))

    # ------------------------------------------------------------------ hooks

    def module_for(self, step: int, compiled: nn.Module) -> nn.Module:
        """The module to run this step's forward with: the eager model on activation steps (see module doc)."""
        return self.model if self.measures_activations(step) else compiled

    @contextmanager
    def activation_hooks(self, step: int) -> Iterator[None]:
        """Forward hooks on the activation modules for this step only; always removed on exit."""
        if not self.measures_activations(step):
            yield
            return
        # a module with `observe` (the readout: core/model.py) reports its output in parts (the chunked loss)
        handles = [m.observe(self._make_observer(name)) if hasattr(m, "observe")
                   else m.register_forward_hook(self._make_hook(name)) for name, m in self._act_modules.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        for name, stats in self._act.items():
            self._pending.append(([f"Activations/{name}_{s}" for s in ACTIVATION_STATS], stats))
        self._act = {}

    def _make_hook(self, name: str):
        def hook(module, args, output):
            out = _output_tensor(output)
            if out is None:
                return
            self._act[name] = activation_stats(out.detach())
        return hook

    def _make_observer(self, name: str):
        """The readout's observer: the statistics of the whole output from its parts (rows), first to last."""
        parts: dict[str, RowMoments] = {}

        def observer(z: Tensor, first: bool, last: bool):
            if first:
                parts[name] = RowMoments()
            parts[name].add(z)
            if last:
                self._act[name] = parts.pop(name).stats()
        return observer

    # ------------------------------------------------------------------ step callbacks

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        if not self.is_log_step(step):
            return
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads:
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
            self._pending.append((["Optimization/grad_norm"], torch.linalg.vector_norm(torch.stack(norms)).reshape(1)))

    @torch.no_grad()
    def before_optimizer(self, step: int) -> None:
        if self.measures_spectral(step):
            self._snapshot = torch._foreach_mul(list(self._slices.values()), 1.0)

    @torch.no_grad()
    def after_optimizer(self, step: int) -> None:
        if not self.is_log_step(step):
            return
        norms = torch._foreach_norm([p.detach() for p in self._params], 2, dtype=torch.float32)
        self._pending.append((["Model/param_norm"], torch.linalg.vector_norm(torch.stack(norms)).reshape(1)))
        if not self.measures_spectral(step):
            return
        names = list(self._slices)
        if self._snapshot is not None:
            now = list(self._slices.values())
            diff = torch._foreach_sub(now, self._snapshot)
            dn = torch.stack(torch._foreach_norm(diff, 2, dtype=torch.float32))
            w0 = torch.stack(torch._foreach_norm(self._snapshot, 2, dtype=torch.float32))
            w1 = torch.stack(torch._foreach_norm(now, 2, dtype=torch.float32))
            ref = torch.where(w0 > 0, w0, w1)
            ratio = torch.where(ref > 0, dn / ref.clamp_min(1e-30), torch.zeros_like(dn))
            self._pending.append(([f"Model/update_ratio/{n}" for n in names] + ["Model/update_ratio_mean"],
                                  torch.cat([ratio, ratio.mean().reshape(1)])))
            self._snapshot = None
        est: SpectralEstimate = self.tracker.estimate({n: m.detach() for n, m in self._slices.items()})
        s = est.norms
        summary = torch.stack([s.max(), s.mean(), s.std(correction=0), est.residuals.max()])
        self._pending.append((["Model/spectral_norm_max", "Model/spectral_norm_mean", "Model/spectral_norm_std",
                               "Model/spectral_residual_max"], summary))
        self._pending.append(([f"Model/spectral_norm/{n}" for n in est.names], s))

    # ------------------------------------------------------------------ readback

    def collect(self, step: int, extra: Mapping[str, Tensor | float] | None = None) -> dict[str, float]:
        """Every pending metric (and `extra` values, e.g. the loss) in ONE host transfer.

        extra: key -> one-element device tensor (read back in the same transfer) or Python number;
        an `extra` key overrides a monitor key of the same name (e.g. a rank-averaged grad norm).
        `step` is the step the trainer logs, the same number it passed to the other callbacks.
        """
        pending = list(self._pending)
        out: dict[str, float] = {}
        for k, v in (extra or {}).items():
            if isinstance(v, Tensor):
                pending.append(([k], v.detach().reshape(1)))
            else:
                out[k] = float(v)
        self._pending = []
        if not pending:
            return out
        device = pending[0][1].device
        flat = torch.cat([t.to(device=device, dtype=torch.float32) for _, t in pending])
        values = flat.tolist()  # the single device -> host synchronisation of this log step
        keys = [k for ks, _ in pending for k in ks]
        out.update(zip(keys, values))
        return out

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {"spectral_tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        self.tracker.load_state_dict(state["spectral_tracker"])
