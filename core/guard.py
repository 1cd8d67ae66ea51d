"""Run guards: graceful stop on SIGTERM/SIGINT, and the non-finite-loss / loss-spike policy.

GracefulStop
    SIGTERM or SIGINT (Ctrl-C) asks the trainer to stop after the current step; the trainer then
    writes a checkpoint, flushes the logs, closes W&B and exits with code 3 (train.py). A second
    signal exits at once with 128 + signal number, without a checkpoint. With several processes the
    ranks agree at the next log step (an all-reduce folded into that step's read-back), so every rank
    stops after the same step; with one process the stop happens after the current step.

NonFiniteGuard (--nan-policy abort|skip, --max-nan-skips K, --spike-factor F)
    Detection costs no host synchronisation: after each backward, the guard computes on the device a
    small vector "does group g hold a non-finite value" (group 0 the loss, then one per parameter kind:
    hidden, embed, value_embed, lm_head, scalar; from one fused `_foreach_norm` over the gradients).
    With several ranks the vector rides on the grad-norm all-reduce after the optimizers' step
    (`agree`: one 7-float SUM per step), so every rank sees the same flags; then it is folded into device
    counters (first bad step and its groups, skips, consecutive skips). The host reads the counters
    back at log steps, inside the trainer's one read-back of that step, and before every checkpoint.

    abort (default): no per-step cost beyond the detection. At the first log step after a non-finite
        step the run stops (exit code 4), naming the step and the parameter groups of the first
        non-finite value. The weights in memory may be poisoned by then, so they are never saved; the
        newest checkpoint on disk, saved before that step and checked finite, is the last good one.
    skip: the update is gated on the device. Before the optimizers step, the guard copies the
        parameters and the optimizer state; after, `torch.where(bad, copy, new)` restores them. So a
        non-finite step leaves weights and moments untouched, decided by the same all-reduced flag on
        every rank, with no host sync. Cost: one copy of parameters + optimizer state per step. After
        K consecutive skipped steps (checked at the next log step) the run stops like abort, but the
        weights in memory are good, so it first writes a checkpoint of them: a literal "last good"
        checkpoint. The learning-rate schedule still advances on a skipped step (it counts batches), and
        DistAdam's step counter, a host integer, is corrected at the next read-back.
    Either way, every checkpoint is checked finite before it is written (core.checkpoint).

    Loss spikes: the per-step train loss is compared on the device with F x the running minimum of the
    finite losses so far; spikes are counted and reported at the next log step (a log line and the
    metrics `Loss/spike`, `Loss/spike_ratio`).

Test-only hook (documented here, never set in real runs): `SPEEDRUN_INJECT_NAN_AT_STEP=k[,k...][:kind]`
writes a NaN into one gradient of parameter kind `kind` (default hidden) at each listed step (the
completed-step number k of the step line), so the tests can show both policies at work.
"""
from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from core.distributed import drop_grad_shards, sharded_grad_sq

# Exit codes of train.py for the two ways a guard ends a run (0 done, 1 crash, 2 bad input: see train.py).
EXIT_STOPPED = 3      # SIGTERM/SIGINT: checkpoint written, resumable with --resume auto
EXIT_NONFINITE = 4    # a non-finite loss/gradient ended the run (--nan-policy)

GROUPS = ("loss", "hidden", "embed", "value_embed", "lm_head", "scalar")
NAN_POLICIES = ("abort", "skip")
INJECT_ENV = "SPEEDRUN_INJECT_NAN_AT_STEP"


# ---------------------------------------------------------------------------------------------
# Graceful stop


class StopRequested(Exception):
    """Raised by the trainer after it saved a checkpoint because a stop signal arrived."""

    def __init__(self, signal_name: str, step: int, checkpoint: str | None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (see the log)"
        super().__init__(f"stopped by {signal_name} after step {step}; {where}. Resume with the same command "
                         "plus --resume auto (with the same --run-name), or --resume <checkpoint>.")


class GracefulStop:
    """Context manager: while active, SIGTERM/SIGINT set `requested` instead of killing the process.

    Handlers are only installed in the main thread (Python allows no other); elsewhere this is a no-op.
    The previous handlers come back on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> "GracefulStop":
        return self.install()

    def __exit__(self, *exc) -> bool:
        self.uninstall()
        return False

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            # os.write: a signal handler must not re-enter buffered I/O the main code may be inside of
            os.write(2, f"\n{name} again: exiting now, without a checkpoint\n".encode())
            os._exit(128 + signum)
        self.requested = name
        os.write(2, f"\n{name}: finishing the current step, then writing a checkpoint and exiting "
                    f"(send it again to exit at once)\n".encode())

    def agreed(self, device: torch.device, distributed: bool) -> str | None:
        """The stop decision every rank shares: the signal name, or None. Collective when distributed:
        call it on every rank at the same steps."""
        if not distributed:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            return self.requested or "a stop signal on another rank"
        return None


# ---------------------------------------------------------------------------------------------
# Non-finite values and loss spikes


class NonFiniteError(RuntimeError):
    """The run stopped on a non-finite value; the message names the step and the groups."""

    def __init__(self, message: str, step: int, groups: list[str]):
        super().__init__(message)
        self.step, self.groups = step, groups


def decode_groups(mask: int) -> list[str]:
    return [g for i, g in enumerate(GROUPS) if mask >> i & 1]


@dataclass
class GuardReport:
    """What the host learned at a read-back: metrics to log and lines to print."""
    metrics: dict[str, float]
    lines: list[str]


class NonFiniteGuard:
    """See the module docstring. Call order per step: `check` after backward, `snapshot` before the optimizers
    step (skip policy), `agree` after it, then `restore`; `device_values` + `report` at log steps."""

    def __init__(self, model: torch.nn.Module, param_kinds: dict[str, str], optimizers, *, policy: str = "abort",
                 max_skips: int = 10, spike_factor: float = 10.0, device: torch.device | str = "cpu",
                 distributed: bool = False):
        if policy not in NAN_POLICIES:
            raise ValueError(f"nan policy {policy!r}: use one of {NAN_POLICIES}")
        self.policy, self.max_skips, self.spike_factor = policy, max_skips, spike_factor
        self.distributed = distributed
        self.optimizers = list(optimizers)
        self.device = torch.device(device)
        named = dict(model.named_parameters())
        self._params = list(named.values())
        self._group_of = [GROUPS.index(param_kinds[n]) for n in named]
        self._weights = torch.tensor([float(2 ** i) for i in range(len(GROUPS))], device=self.device,
                                     dtype=torch.float64)  # bit i of the mask: group i had a non-finite value
        z = lambda v=0.0: torch.tensor(v, device=self.device, dtype=torch.float64)  # noqa: E731
        # device counters; float64 holds step numbers and bitmasks exactly
        # first non-finite step (and its groups) since the last read-back; the run's first is kept on the host
        self._first_bad_step, self._first_bad_mask = z(-1.0), z(0.0)
        self.first_bad_step: int = -1
        self.first_bad_groups: list[str] = []
        self._skipped, self._consec, self._max_consec = z(), z(), z()
        self._run_min, self._spikes, self._spike_step, self._spike_ratio, self._spike_loss = (
            z(float("inf")), z(), z(-1.0), z(), z())
        self.skipped_total = 0
        self.spikes_total = 0
        self._saved: list[Tensor] | None = None
        self._targets: list[Tensor] = []
        self._new_state: list[tuple[dict, str]] = []
        self._known_state: set[tuple[int, str]] = set()
        self._gid_cache: dict[tuple[int, ...], Tensor] = {}
        self._inject_steps, self._inject_kind = injection_from_env()
        self._pending: tuple | None = None  # several ranks: (step, local flags, loss) until `agree`

    # ------------------------------------------------------------------ per step (device only)

    @torch.no_grad()
    def check(self, step: int, loss: Tensor) -> Tensor:
        """Flag non-finite values of this step's loss (mean per token) and gradients; returns the 0-dim
        bool `bad` (the same on every rank). No host synchronisation."""
        if step in self._inject_steps:
            self._inject()
        flags = torch.zeros(len(GROUPS), device=self.device, dtype=torch.float32)
        flags[0] = (~torch.isfinite(loss.detach().float())).float()
        present = tuple(i for i, p in enumerate(self._params) if p.grad is not None)
        if present:
            norms = torch.stack(torch._foreach_norm([self._params[i].grad for i in present], 2, dtype=torch.float32))
            flags.index_add_(0, self._group_index(present), (~torch.isfinite(norms)).float())
        if self.distributed:
            # the ranks agree in `agree`, after the optimizers' reduce-scatters, in the grad-norm all-reduce
            self._pending = (step, flags, loss.detach())
            return None
        return self._commit(step, flags, loss)

    @torch.no_grad()
    def agree(self, bad: Tensor | None, optimizers, want_grad_norm: bool) -> tuple[Tensor, Tensor | None]:
        """Call after the optimizers' `step()` (before `restore`): returns (`bad`, the global grad norm or None).

        One process: `bad` from `check` as it is, and no grad norm (the monitor's local one is global).
        Several ranks: one all-reduce (SUM) of 7 floats carries this step's non-finite flags of every rank
        and, at log steps, the sum of squares of this rank's averaged-gradient shards
        (`core.distributed.sharded_grad_sq`), whose sum over ranks is the squared norm of the averaged
        gradient. It replaces both the guard's own per-step all-reduce and a log-step all-reduce of a
        copy of all gradients (issue 13 item 4). No host synchronisation.
        """
        if not self.distributed:
            return bad, None
        step, flags, loss = self._pending
        if want_grad_norm:
            sq = sharded_grad_sq(optimizers, self.device)
        else:  # the norm only at log steps; the shards are dropped either way, so they never outlive the step
            drop_grad_shards(optimizers)
            sq = flags.new_zeros(())
        packed = torch.cat([flags, sq.float().reshape(1)])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)  # flags: > 0 iff some rank flagged the group
        self._pending = None
        return self._commit(step, packed[:len(GROUPS)], loss), (packed[-1].sqrt() if want_grad_norm else None)

    def _commit(self, step: int, flags: Tensor, loss: Tensor) -> Tensor:
        mask = ((flags > 0).double() * self._weights).sum()
        bad = mask > 0
        first = (self._first_bad_step < 0) & bad
        self._first_bad_step = torch.where(first, float(step), self._first_bad_step)
        self._first_bad_mask = torch.where(first, mask, self._first_bad_mask)
        self._skipped += bad.double()
        self._consec = torch.where(bad, self._consec + 1, 0.0)
        self._max_consec = torch.maximum(self._max_consec, self._consec)
        if self.spike_factor > 0:
            x = loss.detach().double()
            finite = torch.isfinite(x)
            spike = finite & torch.isfinite(self._run_min) & (x > self.spike_factor * self._run_min)
            ratio = x / self._run_min
            self._spikes += spike.double()
            newest = spike & (ratio >= self._spike_ratio)
            self._spike_step = torch.where(newest, float(step), self._spike_step)
            self._spike_loss = torch.where(newest, x, self._spike_loss)
            self._spike_ratio = torch.where(newest, ratio, self._spike_ratio)
            self._run_min = torch.where(finite, torch.minimum(self._run_min, x), self._run_min)
        return bad

    def _group_index(self, present: tuple[int, ...]) -> Tensor:
        # Cached: building it from a list each step would be a blocking host-to-device copy on CUDA.
        if present not in self._gid_cache:
            self._gid_cache[present] = torch.tensor([self._group_of[i] for i in present], device=self.device)
        return self._gid_cache[present]

    def _inject(self) -> None:
        for p, g in zip(self._params, self._group_of):
            if GROUPS[g] == self._inject_kind and p.grad is not None:
                p.grad.view(-1)[0] = float("nan")
                return
        raise ValueError(f"{INJECT_ENV}: no gradient of kind {self._inject_kind!r} to poison")

    @torch.no_grad()
    def snapshot(self) -> None:
        """Skip policy: copy parameters and optimizer state before the optimizers step."""
        if self.policy != "skip":
            return
        self._targets = list(self._params)
        self._known_state = set()
        for opt in self.optimizers:
            for p, st in opt.state.items():
                for k, v in st.items():
                    if isinstance(v, Tensor):
                        self._targets.append(v)
                        self._known_state.add((id(st), k))
        self._saved = [t.clone() for t in self._targets]

    @torch.no_grad()
    def restore(self, bad: Tensor) -> None:
        """Skip policy: where `bad`, put back what `snapshot` copied (state created in this step is zeroed)."""
        if self.policy != "skip" or self._saved is None:
            return
        for t, s in zip(self._targets, self._saved):
            torch.where(bad, s, t, out=t)
        for opt in self.optimizers:
            for st in opt.state.values():
                for k, v in st.items():
                    if isinstance(v, Tensor) and (id(st), k) not in self._known_state:
                        v.masked_fill_(bad, 0)
        self._saved, self._targets = None, []

    # ------------------------------------------------------------------ read-back (host)

    def device_values(self) -> dict[str, Tensor]:
        """Device scalars for the trainer's one read-back of a log step (keys start with 'guard/')."""
        return {"guard/first_bad_step": self._first_bad_step, "guard/first_bad_mask": self._first_bad_mask,
                "guard/skipped": self._skipped, "guard/max_consec": self._max_consec, "guard/spikes": self._spikes,
                "guard/spike_step": self._spike_step, "guard/spike_ratio": self._spike_ratio,
                "guard/spike_loss": self._spike_loss, "guard/run_min": self._run_min}

    def read(self) -> dict[str, float]:
        """Read the counters back on their own (before a checkpoint): one small host transfer."""
        values = self.device_values()
        return dict(zip(values, torch.stack([v.double() for v in values.values()]).tolist()))

    def report(self, values: dict[str, float], step: int) -> GuardReport:
        """Act on read-back values (the 'guard/' keys are removed from `values`): raise NonFiniteError
        when the policy says stop, else return the metrics and log lines of this read-back."""
        v = {k: values.pop(k) for k in list(values) if k.startswith("guard/")}
        lines: list[str] = []
        metrics: dict[str, float] = {}
        bad_steps = int(v["guard/skipped"])  # non-finite steps since the last read-back
        if bad_steps:
            first, groups = int(v["guard/first_bad_step"]), decode_groups(int(v["guard/first_bad_mask"]))
            if self.first_bad_step < 0:
                self.first_bad_step, self.first_bad_groups = first, groups
            self._first_bad_step.fill_(-1.0)
            self._first_bad_mask.zero_()
            self._skipped.zero_()
            if self.policy == "abort":
                raise NonFiniteError(
                    f"non-finite value at step {first} in {', '.join(groups)} (--nan-policy abort). The weights in "
                    "memory may hold NaN/inf, so they are not saved.", first, groups)
            self._uncount_adam_steps(bad_steps)
            self.skipped_total += bad_steps
            lines.append(f"non-finite value: skipped {bad_steps} step(s) up to step {step} (the first at step "
                         f"{first} in {', '.join(groups)}); {self.skipped_total} skipped in total")
        if self.policy == "skip":
            first, groups = self.first_bad_step, self.first_bad_groups
            max_consec = int(v["guard/max_consec"])
            self._max_consec.copy_(self._consec)
            metrics["Guard/skipped_steps"] = float(self.skipped_total)
            if max_consec >= self.max_skips:
                raise NonFiniteError(
                    f"{max_consec} consecutive steps had non-finite values (--max-nan-skips {self.max_skips}), up "
                    f"to step {step}; the first non-finite value of the run was at step {first} in "
                    f"{', '.join(groups)}.", first, groups)
        spikes = int(v["guard/spikes"])
        if self.spike_factor > 0:
            metrics["Loss/spike"] = 1.0 if spikes else 0.0
            metrics["Loss/spike_ratio"] = v["guard/spike_ratio"] if spikes else 0.0
            if spikes:
                self.spikes_total += spikes
                lines.append(f"loss spike: {spikes} step(s) since the last log; largest at step "
                             f"{int(v['guard/spike_step'])}: train_loss {v['guard/spike_loss']:.4f} = "
                             f"{v['guard/spike_ratio']:.1f} x the running minimum {v['guard/run_min']:.4f} "
                             f"(--spike-factor {self.spike_factor:g})")
                self._spikes.zero_()
                self._spike_ratio.zero_()
        return GuardReport(metrics, lines)

    def _uncount_adam_steps(self, skipped: int) -> None:
        # DistAdam counts its steps in a host int that a device-side skip cannot hold back; put the skipped
        # steps back now, so the bias correction again counts applied updates only.
        for opt in self.optimizers:
            for st in opt.state.values():
                if isinstance(st.get("step"), int):
                    st["step"] = max(0, st["step"] - skipped)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        v = self.read()
        return {"run_min": v["guard/run_min"], "consec": float(self._consec.item()),
                "skipped_total": self.skipped_total, "spikes_total": self.spikes_total,
                "first_bad_step": self.first_bad_step, "first_bad_groups": list(self.first_bad_groups)}

    def load_state_dict(self, state: dict) -> None:
        self._run_min.fill_(state["run_min"])
        self._consec.fill_(state["consec"])
        self._max_consec.fill_(state["consec"])
        self.skipped_total, self.spikes_total = int(state["skipped_total"]), int(state["spikes_total"])
        self.first_bad_step, self.first_bad_groups = int(state["first_bad_step"]), list(state["first_bad_groups"])


def injection_from_env() -> tuple[set[int], str]:
    """Parse the test-only SPEEDRUN_INJECT_NAN_AT_STEP hook: (steps, parameter kind)."""
    raw = os.environ.get(INJECT_ENV, "").strip()
    if not raw:
        return set(), "hidden"
    steps_part, _, kind = raw.partition(":")
    kind = kind.strip() or "hidden"
    if kind not in GROUPS[1:]:
        raise ValueError(f"{INJECT_ENV}={raw!r}: kind must be one of {GROUPS[1:]}")
    try:
        steps = {int(s) for s in steps_part.split(",") if s.strip()}
    except ValueError:
        raise ValueError(f"{INJECT_ENV}={raw!r}: use step numbers like 12 or 5,6,7, optionally :kind") from None
    return steps, kind
