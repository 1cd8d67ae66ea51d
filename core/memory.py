"""Device memory: the CUDA allocator setting the record uses, and peak memory per phase of a run.

- `configure_cuda_allocator(env)`: `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` unless the user set
  an allocator config of their own. The record sets it before torch starts CUDA
  (records/track_1_short/2025-07-12_BosAlign, first lines of train_gpt.py): the 262,144-token validation
  forward materialises 1 x 262,144 x 50,304 logits (~50 GiB in fp32 plus the soft-cap's copies; the chunked
  loss, core/chunked_loss.py, now avoids that), and without expandable segments the caching allocator
  fragments around such blocks and runs out of memory where the memory would fit. train.py calls it first
  thing, before anything imports torch (under torchrun every process runs train.py afresh): torch parses the
  variable once, at the first use of its allocator config, and never again. `allocator_note` logs the
  variable and what torch parsed (`torch_allocator_setting`).
- `PhasePeaks`: peak allocated memory of each phase (warm-up, train, train_eager, val), from the caching
  allocator's host-side counters (no device synchronisation). On CPU it records the process's peak
  resident memory at the end of each phase (monotonic: a phase shows the peak *so far*).
"""
from __future__ import annotations

import os
import resource

# torch is imported inside the functions below, not here: train.py imports this module to set the allocator
# config before torch loads (torch parses parts of it, the allocator backend, when its library loads).

ALLOC_ENV = "PYTORCH_CUDA_ALLOC_CONF"
ALLOC_ENV_NEW = "PYTORCH_ALLOC_CONF"  # torch >= 2.9 also reads this name (the newer spelling of the same)
RECORD_ALLOC_CONF = "expandable_segments:True"


def configure_cuda_allocator(env: dict | None = None) -> None:
    """Set the record's allocator config unless the user has an allocator config of their own."""
    env = os.environ if env is None else env
    if not any(env.get(name) for name in (ALLOC_ENV, ALLOC_ENV_NEW)):
        env[ALLOC_ENV] = RECORD_ALLOC_CONF


def torch_allocator_setting() -> str | None:
    """The allocator config torch parsed when it loaded (its effective setting), or None if this torch cannot say.

    torch (2.13, measured) parses PYTORCH_ALLOC_CONF / PYTORCH_CUDA_ALLOC_CONF once, at the first use of its
    allocator config (the first CUDA allocation, or this getter), and never again: a variable set after that is
    ignored. Importing torch alone does not parse it, but any import-time code of torch or of a library that
    touched the allocator would, so train.py sets the variable before anything imports torch. Calling this
    parses the variable if nothing has yet (the trainer calls it after the model is on the device).
    """
    import torch
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    return getter() if getter is not None else None


def allocator_note(env: dict | None = None, device_type: str = "cuda", effective: str | None = None) -> str:
    """The allocator config in effect, as a sentence for the run log: the environment variable, and what torch
    parsed (`effective`, default `torch_allocator_setting()`); on a CPU it says the setting does not apply."""
    env = os.environ if env is None else env
    effective = torch_allocator_setting() if effective is None else effective
    parsed = f"torch's effective setting: {effective!r}" if effective is not None else "torch cannot report its setting"
    if device_type != "cuda":
        return f"CUDA allocator: does not apply on {device_type} ({_env_note(env)}; {parsed})"
    note = f"CUDA allocator: {_env_note(env)}; {parsed}"
    wanted = _expandable(env.get(ALLOC_ENV) or env.get(ALLOC_ENV_NEW) or "")
    if effective is not None and wanted and not _expandable(effective):
        note += (" -- WARNING: the variable asks for expandable segments but torch parsed its allocator config before "
                 "the variable was set: set it in the shell before starting python")
    return note


def _expandable(conf: str) -> bool:
    return "expandable_segments:true" in conf.replace(" ", "").lower()


def _env_note(env: dict) -> str:
    for name in (ALLOC_ENV, ALLOC_ENV_NEW):
        value = env.get(name)
        if value:
            if _expandable(value):
                return f"{name}={value}"
            return (f"{name}={value} (yours, kept; the record uses {RECORD_ALLOC_CONF}, without which the 262k-token "
                    "validation can run out of memory)")
    return (f"no {ALLOC_ENV}; train.py sets {RECORD_ALLOC_CONF}, as the record does, before torch loads, when it starts "
            "the run")


class PhasePeaks:
    """Peak memory per phase, in MiB. `switch(name)` ends the current phase and starts `name`; `end()` ends
    the last. Phases with the same name keep their maximum. `run_peak_mib` is the peak over all phases.

    CUDA: `torch.cuda.reset_peak_memory_stats` at each switch, `max_memory_allocated` at the end of the
    phase (both host-side counters of the caching allocator, no synchronisation; cheap enough per step).
    CPU: the process's peak RSS (`ru_maxrss`) at the end of the phase, which cannot be reset.
    """

    def __init__(self, device):
        import torch
        self.device = torch.device(device)
        self.peaks_mib: dict[str, float] = {}
        self.current: str | None = None
        self.run_peak_mib = 0.0
        self.run_reserved_mib = 0.0

    def _read(self) -> float:
        import torch
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def _reserved(self) -> float:
        import torch
        return torch.cuda.max_memory_reserved(self.device) / 2**20 if self.device.type == "cuda" else 0.0

    def switch(self, name: str | None) -> None:
        if name == self.current:
            return
        if self.current is not None:
            peak = self._read()
            self.peaks_mib[self.current] = max(self.peaks_mib.get(self.current, 0.0), peak)
            self.run_peak_mib = max(self.run_peak_mib, peak)
            self.run_reserved_mib = max(self.run_reserved_mib, self._reserved())
        self.current = name
        if name is not None and self.device.type == "cuda":
            import torch
            torch.cuda.reset_peak_memory_stats(self.device)

    def end(self) -> None:
        self.switch(None)

    def peak_so_far_mib(self) -> float:
        """Peak over the run up to now, the current phase included (for the Hardware/peak_memory_mb metric)."""
        return max(self.run_peak_mib, self._read())

    def reserved_so_far_mib(self) -> float:
        return max(self.run_reserved_mib, self._reserved())

    def summary(self) -> str:
        kind = "allocated" if self.device.type == "cuda" else "process peak RSS at the end of"
        return "peak memory per phase (MiB, %s each phase): " % kind + ", ".join(
            f"{name} {mib:,.0f}" for name, mib in self.peaks_mib.items())
