"""Optimizers of the speedrun GPT: Muon (Newton-Schulz 5) for hidden matrices, DistAdam for the rest.

Owns:
- `zeropower_via_newtonschulz5(G, steps=5)`: the quintic Newton-Schulz orthogonalisation (bf16 on CUDA,
  fp32 on CPU: `ns_dtype`).
- `polar_factor_svd(G)`: the exact orthogonal polar factor, a diagnostic reference for NS5.
- `Muon`: Nesterov momentum + NS5 per hidden matrix; with several processes each rank orthogonalises
  its share of the matrices and all-gathers the results.
- `DistAdam`: Adam whose state is sharded along dim 0 across ranks.
- `build_optimizers(model, param_kinds, ...)`: the one place that splits a model's parameters into
  the two optimizers, applies the per-kind LR multipliers and asserts every parameter is covered once.
- `set_muon_momentum(muon, step, ...)`: the momentum warm-up 0.85 -> 0.95.

The algorithms follow the modded-nanogpt record `records/track_1_short/2025-07-12_BosAlign`
(Keller Jordan et al.; read for facts, code written here). Gradient averaging across ranks happens
inside `step()` of both optimizers (as in the reference, there is no DDP wrapper): the trainer must
not all-reduce gradients itself, and after `step()` a parameter's `.grad` still holds the local
(un-averaged) gradient. With `world_size == 1` neither optimizer makes any `torch.distributed` call.

The per-parameter LR multiplier is the attribute `p.lr_mul` (default 1.0) and the weight-decay
multiplier `p.wd_mul` (default 1.0); both optimizers read them at every step. DistAdam also reads
`p.eps_mul` (default 1.0), the per-parameter factor on its eps that depth muP sets (core/depth_mup.py).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from core.schedule import muon_momentum  # the one formula of the Muon momentum warm-up

# -----------------------------------------------------------------------------
# Newton-Schulz orthogonalisation

# Quintic coefficients from the reference: chosen to maximise the slope at zero, so 5 steps push
# every singular value into a band around 1 instead of converging exactly to 1 (Keller Jordan,
# https://kellerjordan.github.io/posts/muon/).
NS_COEFFS = (3.4445, -4.7750, 2.0315)

_compiled_ns = None  # torch.compile'd NS5, created on the first CUDA call (never at import)


def ns_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype Newton-Schulz runs in on `device`: bf16 on CUDA (tensor cores; the record's choice), fp32
    elsewhere. A CPU without bf16 matmul units emulates bf16: one step of a width-512 model spent 88.7 s of
    its time in bf16 NS5 against 2.2 s in fp32 on the project's 2-core AVX2 EPYC (issue 10), and fp32 is at
    least as accurate. The trainer logs the choice at start and records it in config.json."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _newtonschulz5(G: Tensor, steps: int, dtype: torch.dtype) -> Tensor:
    a, b, c = NS_COEFFS
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation: X @ X.mT is then the smaller Gram matrix
        X = X.mT
    # The Frobenius norm bounds the spectral norm, so after this every singular value is <= 1,
    # inside the interval where the polynomial iteration is designed to work.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X  # maps each singular value s to a*s + b*s^3 + c*s^5
    if tall:
        X = X.mT
    return X


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, dtype: torch.dtype | None = None) -> Tensor:
    """Approximate the orthogonal polar factor U V^T of G (USV^T = G) with a quintic Newton-Schulz iteration.

    G has shape (..., rows, cols); leading dims are a batch (e.g. the (3, hdim, dim) qkv weight is
    three matrices). The result has G's shape and `dtype` (default `ns_dtype(G.device)`: bf16 on CUDA, fp32
    on CPU). It is not exactly U V^T but U S' V^T with
    S' in a band around 1 (about 0.7 to 1.2 for well-conditioned inputs); the reference found that
    this does not hurt training and saves iterations. On CUDA the iteration is torch.compile'd
    (lazily, on first use); on CPU it runs eagerly.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix (or a batch of matrices), got shape {tuple(G.shape)}; "
                         "1-D parameters belong in DistAdam, not Muon")
    dtype = ns_dtype(G.device) if dtype is None else dtype
    if G.is_cuda and not torch.compiler.is_compiling():
        global _compiled_ns
        if _compiled_ns is None:
            _compiled_ns = torch.compile(_newtonschulz5)
        return _compiled_ns(G, steps, dtype)
    return _newtonschulz5(G, steps, dtype)


def polar_factor_svd(G: Tensor, rel_tol: float = 1e-6) -> Tensor:
    """The exact polar factor U V^T of G (fp32 SVD), with singular values <= rel_tol * max treated as zero.

    A diagnostic reference, not a training default: an SVD costs far more than NS5 on a GPU. It
    answers "is this effect muP's or NS5's approximation?" (the coordinate check's
    `--orthogonalizer svd`). Dropping the (numerically) zero singular values keeps NS5's behaviour
    on a zero gradient (update zero) instead of returning an arbitrary orthogonal matrix.
    """
    U, S, Vh = torch.linalg.svd(G.float(), full_matrices=False)
    keep = (S > rel_tol * S.amax(dim=-1, keepdim=True)).to(S.dtype)
    return (U * keep.unsqueeze(-2)) @ Vh


ORTHOGONALIZERS = {"ns5": zeropower_via_newtonschulz5, "svd": polar_factor_svd}


# -----------------------------------------------------------------------------
# Distributed helpers (only ever called with world_size > 1)

def _check_process_group(world_size: int, who: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{who} was built with world_size={world_size} but no torch.distributed process group is "
                           "initialised: call dist.init_process_group first (torchrun + the trainer's setup do), "
                           "or build it with world_size=1")
    if dist.get_world_size() != world_size:
        raise RuntimeError(f"{who} was built with world_size={world_size} but the process group has "
                           f"{dist.get_world_size()} ranks: pass world_size=dist.get_world_size()")


def _reduce_scatter_single(output: Tensor, inp: Tensor, op):
    # torch 2.13 renamed reduce_scatter_tensor -> reduce_scatter_single; older releases only have the former.
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, inp, op=op, async_op=True)


def _all_gather_single(output: Tensor, inp: Tensor):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, inp, async_op=True)


# -----------------------------------------------------------------------------
# Muon

class Muon(torch.optim.Optimizer):
    """Muon - MomentUm Orthogonalized by Newton-Schulz (https://kellerjordan.github.io/posts/muon/).

    What: SGD with Nesterov momentum whose update, per 2-D matrix, is replaced by (approximately)
    the nearest semi-orthogonal matrix, computed with `zeropower_via_newtonschulz5`. The step is
    `lr * sqrt(max(1, rows/cols)) * p.lr_mul`, so every matrix moves by the same spectral amount
    whatever its width (which is also why muP keeps Muon's LR constant with width).

    Why: orthogonalising equalises the update's singular values, boosting the rare directions that
    plain momentum under-weights; Newton-Schulz runs stably in bf16, so it is cheap on a GPU (on a CPU it
    runs in fp32, where bf16 would be emulated: `ns_dtype`).

    Caveats:
    - Only for hidden matrices. Embeddings, the lm_head and 0/1-D parameters belong in Adam
      (`build_optimizers` enforces this split).
    - Parameters with more than 2 dims are batches of matrices over the leading dims: the
      (3, hdim, dim) qkv weight is orthogonalised as three (hdim, dim) matrices.
    - NS5 gives singular values in a band around 1, not exactly 1 (see the function's docstring).
    - Distributed (world_size > 1, process group initialised): gradients are averaged with a
      reduce-scatter over same-shape parameters taken world_size at a time; parameter i of a
      same-shape group belongs to rank i % world_size (`owner_rank(p)`), which alone keeps its
      momentum and orthogonalises it; an all-gather then sends the new values to every rank.
      Every rank must build Muon with the same parameters in the same order. A parameter whose
      `.grad` is None contributes zeros to the average (all ranks must run the same collectives);
      with one process such a parameter is skipped, as torch optimizers do.
    - Weight decay is decoupled: `p *= 1 - lr * weight_decay * p.wd_mul` before the update.
    - `self.orthogonalize` (default NS5) may be swapped for `polar_factor_svd` in diagnostics.
    - After a distributed `step()`, `self.averaged_grad_shards` holds the averaged gradients of the matrices
      this rank owns: over all ranks they are the whole averaged gradient, once
      (`core.distributed.sharded_grad_sq`). The consumer empties the list.
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 0.05, momentum: float = 0.95,
                 weight_decay: float = 0.0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"Muon: rank {rank} is outside [0, world_size={world_size})")
        params = list(params)
        if any(isinstance(p, dict) for p in params):
            raise TypeError("Muon takes a flat list of parameters (it groups them by shape itself), not param groups")
        # Same-shape parameters form one group, in order of first appearance, so that every rank
        # derives the same groups and the same owner for each parameter.
        by_shape: dict[torch.Size, list[Tensor]] = {}
        for p in params:
            by_shape.setdefault(p.shape, []).append(p)
        groups = [dict(params=ps) for ps in by_shape.values()]
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.rank = rank
        self.world_size = world_size
        self.orthogonalize = zeropower_via_newtonschulz5
        self.averaged_grad_shards: list[Tensor] = []
        self._owner = {p: i % world_size for g in self.param_groups for i, p in enumerate(g["params"])}

    def owner_rank(self, p: Tensor) -> int:
        """The rank that keeps `p`'s momentum and orthogonalises its update."""
        return self._owner[p]

    def _update(self, p: Tensor, grad: Tensor, group: dict) -> None:
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buf = state["momentum_buffer"]
        buf.lerp_(grad, 1 - momentum)
        g = grad.lerp(buf, momentum)  # Nesterov: look ahead along the updated momentum
        v = self.orthogonalize(g)
        eff_lr = lr * math.sqrt(max(1.0, p.size(-2) / p.size(-1))) * getattr(p, "lr_mul", 1.0)
        if wd != 0:
            p.mul_(1 - lr * wd * getattr(p, "wd_mul", 1.0))
        p.add_(v.to(p.dtype), alpha=-eff_lr)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.world_size == 1:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self._update(p, p.grad, group)
            return loss
        self._step_distributed()
        return loss

    def _step_distributed(self) -> None:
        _check_process_group(self.world_size, "Muon")
        ws, rank = self.world_size, self.rank
        # 1) Launch every reduce-scatter first so communication overlaps with the NS work below.
        #    Chunk k of a group holds params [k*ws, (k+1)*ws); rank r receives the average of
        #    param k*ws + r (or of a zero pad when the chunk is short).
        pending = []
        for group in self.param_groups:
            params = group["params"]
            for base in range(0, len(params), ws):
                chunk = params[base:base + ws]
                inputs = [p.grad if p.grad is not None else torch.zeros_like(p) for p in chunk]
                inputs += [torch.zeros_like(params[0])] * (ws - len(chunk))
                out = torch.empty_like(params[0])
                # dist.reduce_scatter takes a list; on gloo its work has no future, so we keep the work.
                work = dist.reduce_scatter(out, inputs, op=dist.ReduceOp.AVG, async_op=True)
                pending.append((group, chunk, out, work))
        # 2) Each rank updates the parameter it owns in every chunk, then shares it.
        gathers = []
        self.averaged_grad_shards = []
        for group, chunk, avg_grad, work in pending:
            work.wait()
            if rank < len(chunk):
                mine = chunk[rank]
                self.averaged_grad_shards.append(avg_grad)
                self._update(mine, avg_grad, group)
            else:
                mine = torch.empty_like(chunk[0])  # this rank has nothing in a short last chunk
            outputs = list(chunk) + [torch.empty_like(chunk[0]) for _ in range(ws - len(chunk))]
            gathers.append(dist.all_gather(outputs, mine, async_op=True))
        for work in gathers:
            work.wait()


# -----------------------------------------------------------------------------
# DistAdam

class DistAdam(torch.optim.Optimizer):
    """Adam with bias correction whose state is sharded along dim 0 across ranks.

    Math (per parameter, `lr = group lr * p.lr_mul`), as the reference record writes it:
    `p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)`, plus decoupled weight decay
    `p *= 1 - lr * weight_decay * p.wd_mul`. The eps is added to sqrt(v) *before* the bias correction
    (record 2025-07-12_BosAlign, `DistAdam.step`: `denom = exp_avg_sq.sqrt().add_(eps)`, then
    `step_size = lr * sqrt(bias2) / bias1`). In bias-corrected terms that is
    `m_hat / (sqrt(v_hat) + eps / sqrt(1 - b2^t))`: an effective eps larger than torch.optim.Adam's
    (`sqrt(v_hat) + eps`) by 1/sqrt(1 - b2^t), about 4.5x at step 1 with b2 = 0.95, tending to 1x.
    On an entry whose gradient is near zero (sqrt(v) ~ eps = 1e-10, which happens for rarely seen
    embedding rows) the two rules give visibly different steps, so this follows the record and is
    not torch.optim.Adam; the tests compare it with a reference written in that form.

    Distributed (world_size > 1): gradients are reduce-scattered with AVG so rank r receives
    rows [r*s, (r+1)*s) of the averaged gradient, keeps Adam state for those rows only (about
    1/world_size of the memory), updates them and all-gathers the parameter. A parameter whose
    dim 0 is not divisible by world_size (the model's 5*depth scalars on 8 GPUs, say) is padded
    with zero rows to the next multiple inside the optimizer: the pad rows get zero gradient and
    are dropped after the all-gather, so the model never sees them. 0-d parameters are treated as
    shape (1,). A parameter whose `.grad` is None contributes zeros to the average; with one
    process it is skipped. With world_size == 1 it is plain Adam and makes no dist call.
    After a distributed `step()`, `self.averaged_grad_shards` holds this rank's shards of the averaged
    gradients (pad rows are zero), as Muon's does.
    """

    def __init__(self, params, lr: float = 0.008, betas: tuple[float, float] = (0.8, 0.95), eps: float = 1e-10,
                 weight_decay: float = 0.0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"DistAdam: rank {rank} is outside [0, world_size={world_size})")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.rank = rank
        self.world_size = world_size
        self.averaged_grad_shards: list[Tensor] = []

    def _shard_rows(self, p: Tensor) -> int:
        n = p.shape[0] if p.ndim > 0 else 1
        return -(-n // self.world_size)  # ceil: rows per rank after padding

    def _update_shard(self, p: Tensor, p_shard: Tensor, g_shard: Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr = group["lr"] * getattr(p, "lr_mul", 1.0)
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p_shard)
            state["exp_avg_sq"] = torch.zeros_like(p_shard)
        state["step"] += 1
        t = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if group["weight_decay"] != 0:
            p_shard.mul_(1 - lr * group["weight_decay"] * getattr(p, "wd_mul", 1.0))
        exp_avg.lerp_(g_shard, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g_shard, g_shard, value=1 - beta2)
        bias1 = 1 - beta1 ** t
        bias2_sqrt = math.sqrt(1 - beta2 ** t)
        # eps before the bias correction, as the record; x p.eps_mul (depth muP, core/depth_mup.py; default 1)
        denom = exp_avg_sq.sqrt().add_(group["eps"] * getattr(p, "eps_mul", 1.0))
        p_shard.addcdiv_(exp_avg, denom, value=-lr * bias2_sqrt / bias1)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.world_size == 1:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self._update_shard(p, p, p.grad, group)
            return loss
        self._step_distributed()
        return loss

    def _step_distributed(self) -> None:
        _check_process_group(self.world_size, "DistAdam")
        ws, rank = self.world_size, self.rank
        pending = []
        for group in self.param_groups:
            for p in group["params"]:
                rows = self._shard_rows(p)
                p2 = p.view(1) if p.ndim == 0 else p
                g2 = p.grad.reshape(p2.shape) if p.grad is not None else torch.zeros_like(p2)
                padded = rows * ws != p2.shape[0]
                if padded:
                    full_g = g2.new_zeros((rows * ws, *p2.shape[1:]))
                    full_g[:p2.shape[0]] = g2
                    full_p = p2.new_zeros((rows * ws, *p2.shape[1:]))
                    full_p[:p2.shape[0]] = p2
                else:
                    full_g, full_p = g2, p2
                g_shard = full_g.new_empty((rows, *p2.shape[1:]))
                work = _reduce_scatter_single(g_shard, full_g.contiguous(), dist.ReduceOp.AVG)
                pending.append((group, p, p2, full_p, g_shard, work))
        gathers = []
        self.averaged_grad_shards = [g for *_, g, _ in pending]
        for group, p, p2, full_p, g_shard, work in pending:
            work.wait()
            rows = g_shard.shape[0]
            p_shard = full_p[rank * rows:(rank + 1) * rows]  # a view: updating it updates full_p
            self._update_shard(p, p_shard, g_shard, group)
            # All-gather in place into the full (possibly padded) tensor; p_shard aliases our own slot.
            gathers.append((p2, full_p, _all_gather_single(full_p, p_shard)))
        for p2, full_p, work in gathers:
            work.wait()
            if full_p is not p2:
                p2.copy_(full_p[:p2.shape[0]])


# -----------------------------------------------------------------------------
# Building both optimizers from a model

PARAM_KINDS = ("hidden", "embed", "value_embed", "lm_head", "scalar")
# LR multipliers of the reference record (embed and value embeddings 75, lm_head 27.5, scalars 5).
DEFAULT_LR_MULS = {"hidden": 1.0, "embed": 75.0, "value_embed": 75.0, "lm_head": 27.5, "scalar": 5.0}


def build_optimizers(model: torch.nn.Module, param_kinds: dict[str, str], *, adam_lr: float = 0.008,
                     muon_lr: float = 0.05, adam_betas: tuple[float, float] = (0.8, 0.95), adam_eps: float = 1e-10,
                     muon_momentum: float = 0.95, weight_decay: float = 0.0, lr_muls: dict[str, float] | None = None,
                     rank: int = 0, world_size: int = 1) -> tuple[DistAdam, Muon]:
    """Split `model`'s parameters into DistAdam (embed, value_embed, lm_head, scalar) and Muon (hidden).

    `param_kinds` maps every name of `model.named_parameters()` to one of PARAM_KINDS. A name that
    is missing, unknown to the model, has an unknown kind, or a parameter shared under two names
    with different kinds raises ValueError listing all offenders: a model change that forgets a
    parameter fails here, not silently at training time.

    LR multipliers: `p.lr_mul` is the single per-parameter multiplier both optimizers read. The
    kind's multiplier (DEFAULT_LR_MULS, entries overridden by `lr_muls`) is MULTIPLIED into any
    `p.lr_mul` already set by someone else (muP sets its width factor there, before or after this
    call, also by multiplying), never overwriting it. Calling build_optimizers again on the same
    model first divides out the kind multiplier it applied last time, so rebuilding is idempotent.

    Every group gets `group["initial_lr"]` (the base LR that schedules scale). Adam groups carry
    `group["kind"]`. Returns (adam, muon); step both every iteration.
    """
    muls = dict(DEFAULT_LR_MULS)
    if lr_muls:
        bad = sorted(set(lr_muls) - set(PARAM_KINDS))
        if bad:
            raise ValueError(f"lr_muls has unknown kinds {bad}; valid kinds are {list(PARAM_KINDS)}")
        muls.update(lr_muls)

    # remove_duplicate=False so a parameter shared under two names (tied weights) is seen twice.
    named = list(model.named_parameters(remove_duplicate=False))
    problems = _param_kind_problems(named, param_kinds)
    if problems:
        raise ValueError("build_optimizers: every parameter must belong to exactly one optimizer group.\n  "
                         + "\n  ".join(problems))

    kind_of: dict[Tensor, str] = {p: param_kinds[n] for n, p in named}
    for p, kind in kind_of.items():
        base = getattr(p, "lr_mul", 1.0) / getattr(p, "_kind_lr_mul", 1.0)
        p._kind_lr_mul = muls[kind]
        p.lr_mul = base * muls[kind]

    hidden = [p for p, k in kind_of.items() if k == "hidden"]
    adam_groups = [dict(params=[p for p, k in kind_of.items() if k == kind], kind=kind)
                   for kind in PARAM_KINDS if kind != "hidden"]
    adam_groups = [g for g in adam_groups if g["params"]]
    if not hidden:
        raise ValueError("build_optimizers: no parameter has kind 'hidden', so Muon would be empty; "
                         "mark the block matrices (attention qkv/out, MLP in/out) as 'hidden'")
    if not adam_groups:
        raise ValueError("build_optimizers: no parameter for Adam (embed, value_embed, lm_head, scalar)")

    adam = DistAdam(adam_groups, lr=adam_lr, betas=adam_betas, eps=adam_eps, weight_decay=weight_decay,
                    rank=rank, world_size=world_size)
    muon = Muon(hidden, lr=muon_lr, momentum=muon_momentum, weight_decay=weight_decay,
                rank=rank, world_size=world_size)
    for opt in (adam, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]

    # Final guard: the two optimizers together hold each parameter exactly once.
    counts: dict[Tensor, int] = {}
    for opt in (adam, muon):
        for group in opt.param_groups:
            for p in group["params"]:
                counts[p] = counts.get(p, 0) + 1
    assert set(counts) == set(kind_of) and all(c == 1 for c in counts.values()), \
        "internal error: optimizer groups do not cover every parameter exactly once"
    return adam, muon


def _param_kind_problems(named: list[tuple[str, Tensor]], param_kinds: dict[str, str]) -> list[str]:
    """What is wrong with `param_kinds` for these (name, parameter) pairs, one line per kind of problem."""
    model_names = {n for n, _ in named}
    missing = sorted(model_names - set(param_kinds))
    unknown_names = sorted(set(param_kinds) - model_names)
    bad_kinds = sorted(f"{n}={k!r}" for n, k in param_kinds.items() if k not in PARAM_KINDS)
    names_of: dict[Tensor, list[str]] = {}
    for n, p in named:
        names_of.setdefault(p, []).append(n)
    doubly = sorted(" & ".join(f"{n}={param_kinds.get(n)!r}" for n in ns) for ns in names_of.values()
                    if len({param_kinds.get(n) for n in ns}) > 1)
    vectors_in_muon = sorted(n for n, p in named if param_kinds.get(n) == "hidden" and p.ndim < 2)
    problems = []
    if missing:
        problems.append(f"parameters with no kind (add them to param_kinds): {missing}")
    if unknown_names:
        problems.append(f"names that are not parameters of the model (remove or rename them): {unknown_names}")
    if bad_kinds:
        problems.append(f"unknown kinds (valid: {list(PARAM_KINDS)}): {bad_kinds}")
    if doubly:
        problems.append(f"one parameter assigned to two different kinds: {doubly}")
    if vectors_in_muon:
        problems.append(f"'hidden' (Muon) parameters must have >= 2 dims; give these kind 'scalar': {vectors_in_muon}")
    return problems


def set_muon_momentum(muon: Muon, step: int, warmup_steps: int = 300, start: float = 0.85,
                      end: float = 0.95) -> float:
    """Warm Muon's momentum up linearly from `start` to `end` over `warmup_steps` steps (reference record).

    Sets `group["momentum"]` on every group and returns the value (for the `Optimization/momentum` metric).
    """
    momentum = muon_momentum(max(step, 0), warmup_steps, start, end)
    for group in muon.param_groups:
        group["momentum"] = momentum
    return momentum
