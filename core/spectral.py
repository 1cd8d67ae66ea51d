"""Spectral norms (largest singular values) of weight matrices, cheap enough to log during training.

Owns `compute_weight_spectral_norms` (the user's entry point), `SpectralNormTracker` (the default
method: warm-started block power iteration whose vectors persist between calls and in checkpoints)
and `matrix_slices` (how 3D parameters are split into matrices and named).

Modes (`mode=`):

- ``"power"`` (default): block power iteration on W^T W (a block of 8 vectors) with a
  Rayleigh-Ritz step, in float32 matmuls (TF32 if the trainer enables it, ~1e-3 relative). Stateless
  calls start cold (random block, 30 iterations); a `SpectralNormTracker` keeps each matrix's block
  between calls and in checkpoints, so warm calls need fewer iterations (16). The estimate is a Rayleigh
  quotient ||W v|| / ||v||, hence never above the true norm; the residual
  ||W^T u - s v|| / s bounds the distance to *a* singular value (|s - s_i| <~ s * residual / 2);
  the block (several vectors) is what makes that singular value the largest one in practice.
  Measured accuracy and cost: `python bench/spectral_accuracy.py` (numbers quoted in
  METRICS_ANALYSIS.md).
- ``"ns5-fast"`` / ``"ns3-accurate"``: the user's design. A Newton-Schulz polar factor Q of W
  (quintic Muon coefficients (3.4445, -4.7750, 2.0315), 5 steps; or the classical cubic
  X <- 1.5 X - 0.5 X X^T X), in Muon's dtype (`ns_dtype`: bf16 on CUDA, fp32 on a CPU, where bf16 is
  emulated: 2.3x / 3.2x slower per call for the same estimates, issue 10), then power iteration on
  v -> Q^T (W v) without forming Q^T W; matmuls in that dtype, fp32 norms. Caveat, measured rather than assumed: NS iterates are odd
  polynomials p(W) = U p(S) V^T, so Q^T W = V p(S) S V^T and the estimate converges to
  max_i p(s_i) s_i, not to s_1. The quintic Muon coefficients deliberately do not converge to 1
  (the record's `zeropower_via_newtonschulz5` docstring: the output's singular values are roughly
  Uniform(0.5, 1.5); five steps map a rank-one matrix's 1 to 0.696), so **ns5-fast is biased by up
  to tens of percent**, in either direction;
  the cubic iteration does converge to 1 for the top singular values but only after ~12 steps from
  a Frobenius-normalised start and is then limited by bf16 rounding on CUDA. Also, power iteration on
  |W| contracts by s_2/s_1 per step where power iteration on W^T W contracts by (s_2/s_1)^2 for the
  same two matmuls. Both modes are therefore slower *and* less accurate than ``"power"``; they are
  kept because the user's scripts name them. When the NS estimate is non-finite or its power
  iteration has not converged (residual above `ns_fallback_residual`), the result falls back to a
  cold ``"power"`` estimate (computed for every matrix and selected on the device, so no host
  synchronisation decides it).
- ``"exact"``: `torch.linalg.matrix_norm(ord=2)` in float64 (an SVD). Validation only: slow, and on
  CUDA it synchronises with the host.

3D parameters are one matrix per leading index: a `(3, h, d)` parameter whose name contains
``qkv`` gives ``<name>.q``, ``<name>.k``, ``<name>.v``; any other `(k, m, n)` parameter gives
``<name>[0]`` ... ``<name>[k-1]``.

Matrices of the same shape are stacked and processed with one batched matmul per iteration, so a
GPU pays no kernel launch per matrix. Nothing here reads a value back to the host (no `.item()`,
no `eigh`, which synchronises on CUDA; Cholesky through `cholesky_ex`, which does not): results are
device tensors, and the caller reads them back once (see `core.monitor.TrainingMonitor.collect`).
Call it on every rank or on rank 0 only: it runs no collectives.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from core.optimizers import ns_dtype

MODES = ("power", "ns5-fast", "ns3-accurate", "exact")
DEFAULT_MODE = "power"

# Muon's quintic Newton-Schulz coefficients, from the modded-nanogpt record 2025-07-12_BosAlign
# (`zeropower_via_newtonschulz5`); chosen for slope at zero, not for convergence to 1.
NS5_COEFFS = (3.4445, -4.7750, 2.0315)
NS5_STEPS = 5
# Classical cubic Newton-Schulz for the polar factor (Higham, "Functions of Matrices", 2008, ch. 8):
# converges for singular values in (0, sqrt(3)); from a Frobenius-normalised start the top values
# (>= 1/sqrt(rank) of the norm) need ~log(sqrt(rank))/log(1.5) growth steps plus ~3 to converge.
NS3_COEFFS = (1.5, -0.5)
NS3_STEPS = 12


# ----------------------------------------------------------------------------------------------
# Naming and grouping of matrices


def matrix_slices(name: str, param: Tensor) -> list[tuple[str, Tensor]]:
    """Split a parameter into named 2D matrices (views, no copy). See the module docstring."""
    if param.ndim == 2:
        return [(name, param)]
    if param.ndim == 3:
        if param.shape[0] == 3 and "qkv" in name:
            return [(f"{name}.{s}", param[i]) for i, s in enumerate("qkv")]
        return [(f"{name}[{i}]", param[i]) for i in range(param.shape[0])]
    raise ValueError(
        f"spectral norm of {name!r} with shape {tuple(param.shape)}: only 2D matrices and 3D stacks "
        f"of matrices are supported; leave vectors/scalars out of target_params"
    )


def resolve_targets(model: nn.Module | None, target_params) -> dict[str, Tensor]:
    """`target_params` as a dict name -> parameter; also accepts names of `model`'s parameters, or the
    parameters themselves (e.g. the optimizer's `hidden_matrix_params` list), named as in the model."""
    if isinstance(target_params, Mapping):
        return dict(target_params)
    if model is None:
        raise ValueError("target_params given as names or a list of parameters needs the model to name them; "
                         "pass model=, or a dict name -> parameter")
    named = dict(model.named_parameters())
    by_id = {id(p): n for n, p in named.items()}
    out = {}
    for item in target_params:
        if isinstance(item, Tensor):
            if id(item) not in by_id:
                raise KeyError(f"a tensor of shape {tuple(item.shape)} in target_params is not a parameter of the "
                               f"model; pass the model's own parameters, or a dict name -> tensor")
            out[by_id[id(item)]] = item
        elif item in named:
            out[item] = named[item]
        else:
            sample = ", ".join(list(named)[:5])
            raise KeyError(f"{item!r} is not a parameter of the model (names look like: {sample}, ...)")
    return out


def _split_matrices(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    mats: dict[str, Tensor] = {}
    for name, p in params.items():
        for sub, m in matrix_slices(name, p):
            mats[sub] = m.detach()
    return mats


def _group_by_shape(mats: Mapping[str, Tensor]) -> dict[tuple, list[str]]:
    groups: dict[tuple, list[str]] = {}
    for name, m in mats.items():
        groups.setdefault((tuple(m.shape), m.device), []).append(name)
    return groups


def _stack(mats: Mapping[str, Tensor], names: list[str], dtype: torch.dtype) -> Tensor:
    return torch.stack([mats[n].to(dtype) for n in names])  # (B, m, n)


# ----------------------------------------------------------------------------------------------
# Block power iteration with Rayleigh-Ritz (the default)


def _orthonormalize(Z: Tensor, fallback: Tensor) -> Tensor:
    """Columns of Z (B, n, r) made orthonormal by shifted Cholesky-QR in float64.

    Cholesky-QR is a batched Gram matrix + `cholesky_ex` + triangular solve: no per-matrix launch
    and no host sync (QR on CUDA loops over the batch for tall matrices, `eigh` syncs). Where it
    fails (zero or non-finite Z, e.g. a zero-initialised projection) the previous block `fallback`
    is kept, so a matrix that starts at zero is picked up as soon as it moves.
    """
    scale = Z.norm(dim=-2).amax(dim=-1).clamp_min(1e-30)  # (B,)
    Zd = (Z / scale[:, None, None]).double()
    G = Zd.mT @ Zd  # (B, r, r)
    r = G.shape[-1]
    eye = torch.eye(r, dtype=G.dtype, device=G.device)
    # relative shift keeps the factorisation positive definite when columns are (nearly) dependent
    shift = 1e-12 * G.diagonal(dim1=-2, dim2=-1).sum(-1) + 1e-300
    L, info = torch.linalg.cholesky_ex(G + shift[:, None, None] * eye)
    V = torch.linalg.solve_triangular(L, Zd.mT, upper=False).mT  # Z L^{-T}
    ok = (info == 0) & (scale > 1e-30) & torch.isfinite(V).all(dim=(-2, -1))
    return torch.where(ok[:, None, None], V.to(Z.dtype), fallback)


def _top_eigvec(H: Tensor, squarings: int = 12) -> Tensor:
    """Top eigenvector (B, r) of small symmetric PSD matrices H (B, r, r), without `eigh`.

    Repeated squaring H^(2^k) (normalised by its trace) is a rank-one projector onto the top
    eigenvector up to (l2/l1)^(2^k); its column with the largest diagonal entry is that vector.
    Exactly degenerate top eigenvalues give some vector of the top eigenspace, which is as good.
    """
    P = H
    for _ in range(squarings):
        P = P @ P
        P = P / P.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300)[:, None, None]
    idx = P.diagonal(dim1=-2, dim2=-1).argmax(dim=-1)  # (B,)
    y = torch.gather(P, 2, idx[:, None, None].expand(-1, P.shape[1], 1)).squeeze(-1)  # (B, r)
    ny = y.norm(dim=-1, keepdim=True)
    e0 = torch.zeros_like(y)
    e0[:, 0] = 1.0
    return torch.where(ny > 0, y / ny.clamp_min(1e-300), e0)


def block_power_iteration(W: Tensor, V: Tensor, iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """`iters` steps of block power iteration on W^T W, then Rayleigh-Ritz.

    W: (B, m, n) float32, V: (B, n, r) orthonormal start. Returns (sigma (B,), residual (B,),
    next block (B, n, r)); the next block is one step further than the one sigma was read from.
    """
    if iters < 1:
        raise ValueError(f"power iteration needs iters >= 1, got {iters}")
    for i in range(iters):
        U = W @ V  # (B, m, r)
        Z = W.mT @ U  # (B, n, r) = W^T W V
        if i < iters - 1:
            V = _orthonormalize(Z, V)
    # Rayleigh-Ritz on span(V): best vector y of the small problem (W V)^T (W V)
    y = _top_eigvec((U.mT @ U).double()).to(W.dtype)[..., None]  # (B, r, 1)
    v = (V @ y).squeeze(-1)  # (B, n)
    u = (U @ y).squeeze(-1)  # (B, m), = W v
    wtu = (Z @ y).squeeze(-1)  # (B, n), = W^T W v
    vn, un = v.norm(dim=-1), u.norm(dim=-1)
    sigma = un / vn.clamp_min(1e-30)
    # residual ||W^T u^ - s v^|| / s with u^ = u/|u|, v^ = v/|v|, s = |u|/|v|
    res = (wtu / un.clamp_min(1e-30)[:, None] - sigma[:, None] * v / vn.clamp_min(1e-30)[:, None]).norm(dim=-1)
    res = torch.where(sigma > 0, res / sigma.clamp_min(1e-30), torch.zeros_like(res))
    return sigma, res, _orthonormalize(Z, V)


def _random_block(shape: tuple[int, ...], device, seed: int) -> Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    V = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
    return V / V.norm(dim=-2, keepdim=True)


@dataclass
class SpectralEstimate:
    """Estimates for named matrices, as device tensors in `names` order (nothing read back)."""

    names: list[str]
    norms: Tensor  # (N,) float32, estimated largest singular value of each matrix
    residuals: Tensor  # (N,) float32, ||W^T u - s v|| / s (0 for "exact")
    used_fallback: Tensor | None = None  # (N,) bool, NS modes only: fell back to "power"

    def as_dict(self) -> dict[str, Tensor]:
        return {n: self.norms[i] for i, n in enumerate(self.names)}


class SpectralNormTracker:
    """Warm-started block power iteration; its blocks persist between calls and in checkpoints.

    A matrix seen for the first time (or whose shape changed) gets a random block and
    `cold_iters` iterations; afterwards each call runs `warm_iters` from the stored block. Same-shape
    matrices share one batched matmul per iteration. `converged_residual` is the threshold for the
    convergence flag (residual r means some singular value lies within about r/2 of the estimate).

    Defaults (block 8, 16 warm / 30 cold iterations) come from `bench/spectral_accuracy.py` on the
    project's model trained with Muon: Muon moves the weights fast (lr 0.05 with orthogonal updates),
    so a stored block is a head start, not a converged answer. Calls 10-100 steps apart measured a
    max error of 3-11% with 4 warm iterations, ~1-2% with 8, <0.2% with 16 (cold 30: <0.05%); one
    vector instead of a block of 8 stayed at 2-10% even with 16 iterations (clustered top singular
    values). The cost is small anyway: a few matmuls with 8 columns per matrix every 100 steps.
    """

    def __init__(self, *, block_size: int = 8, warm_iters: int = 16, cold_iters: int = 30,
                 converged_residual: float = 0.02, seed: int = 0):
        if block_size < 1 or warm_iters < 1 or cold_iters < 1:
            raise ValueError("block_size, warm_iters and cold_iters must be >= 1")
        self.block_size = block_size
        self.warm_iters = warm_iters
        self.cold_iters = cold_iters
        self.converged_residual = converged_residual
        self.seed = seed
        self._blocks: dict[str, Tensor] = {}  # name -> (n, r) float32, on the matrix's device

    def estimate(self, matrices: Mapping[str, Tensor]) -> SpectralEstimate:
        """Spectral norms of 2D matrices (name -> tensor); 3D stacks must be split with `matrix_slices`."""
        names_out, norms, residuals = [], [], []
        for (shape, device), names in _group_by_shape(matrices).items():
            if len(shape) != 2:
                raise ValueError(f"{names[0]!r}: expected a 2D matrix, got shape {shape}; use matrix_slices")
            n, r = shape[1], min(self.block_size, shape[1])
            W = _stack(matrices, names, torch.float32)  # (B, m, n)
            blocks, cold = [], False
            for k, name in enumerate(names):
                V = self._blocks.get(name)
                if V is None or V.shape != (n, r):
                    cold = True
                    V = _random_block((n, r), device, self.seed + k)
                blocks.append(V.to(device))
            iters = self.cold_iters if cold else self.warm_iters
            sigma, res, V_next = block_power_iteration(W, torch.stack(blocks), iters)
            for k, name in enumerate(names):
                self._blocks[name] = V_next[k]
            names_out += names
            norms.append(sigma)
            residuals.append(res)
        return _assemble(names_out, norms, residuals)

    def converged(self, est: SpectralEstimate) -> Tensor:
        """(N,) bool device tensor: residual below `converged_residual`."""
        return est.residuals <= self.converged_residual

    def reset(self) -> None:
        self._blocks.clear()

    def state_dict(self) -> dict:
        return {
            "blocks": {k: v.detach().cpu().clone() for k, v in self._blocks.items()},
            "block_size": self.block_size,
        }

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("block_size", self.block_size) != self.block_size:
            # blocks of another width are unusable; start cold rather than fail a resume
            self._blocks = {}
            return
        self._blocks = {k: v.clone() for k, v in state["blocks"].items()}


def _assemble(names: list[str], norms: list[Tensor], residuals: list[Tensor], fallback=None) -> SpectralEstimate:
    if not names:
        empty = torch.zeros(0)
        return SpectralEstimate([], empty, empty, None if fallback is None else empty.bool())
    return SpectralEstimate(
        names, torch.cat(norms), torch.cat(residuals), None if fallback is None else torch.cat(fallback)
    )


# ----------------------------------------------------------------------------------------------
# The user's Newton-Schulz modes


def newton_schulz_polar(W: Tensor, mode: str, steps: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Approximate polar factor of W (B, m, n) in Muon's dtype (`ns_dtype`: bf16 on CUDA, fp32 on CPU; see module doc)."""
    X = W.to(ns_dtype(W.device) if dtype is None else dtype)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # Frobenius >= spectral: all s <= 1
    if mode == "ns5-fast":
        a, b, c = NS5_COEFFS
        for _ in range(NS5_STEPS if steps is None else steps):
            A = X @ X.mT
            X = a * X + (b * A + c * A @ A) @ X
    elif mode == "ns3-accurate":
        a, b = NS3_COEFFS
        for _ in range(NS3_STEPS if steps is None else steps):
            X = a * X + b * (X @ X.mT) @ X
    else:
        raise ValueError(f"unknown Newton-Schulz mode {mode!r}; use 'ns5-fast' or 'ns3-accurate'")
    return X.mT if tall else X


def _ns_power(W: Tensor, Q: Tensor, iters: int, seed: int) -> tuple[Tensor, Tensor]:
    """Power iteration on H = Q^T W (matmuls in Q's dtype, fp32 norms). Returns (lambda (B,), residual (B,))."""
    B, _, n = W.shape
    Wb = W.to(Q.dtype)
    v = _random_block((B, n, 1), W.device, seed)  # fp32
    for _ in range(iters):
        h = (Q.mT @ (Wb @ v.to(Q.dtype))).float()  # (B, n, 1)
        v = h / h.norm(dim=-2, keepdim=True).clamp_min(1e-30)
    h = (Q.mT @ (Wb @ v.to(Q.dtype))).float()
    lam = (v * h).sum(dim=(-2, -1))  # Rayleigh quotient, v is unit
    res = (h - lam[:, None, None] * v).norm(dim=(-2, -1)) / lam.abs().clamp_min(1e-30)
    return lam, res


# ----------------------------------------------------------------------------------------------
# Entry point


def spectral_norms(
    matrices: Mapping[str, Tensor],
    mode: str = DEFAULT_MODE,
    power_iters: int | None = None,
    *,
    tracker: SpectralNormTracker | None = None,
    ns_fallback_residual: float = 0.05,
    fallback_iters: int = 30,
    seed: int = 0,
) -> SpectralEstimate:
    """Spectral norms of named 2D matrices; see `compute_weight_spectral_norms` for the arguments."""
    if mode not in MODES:
        raise ValueError(f"unknown spectral-norm mode {mode!r}; choose one of {MODES}")
    if mode == "power":
        if tracker is None:
            tracker = SpectralNormTracker(cold_iters=power_iters or 30, seed=seed)
        elif power_iters is not None:
            raise ValueError("power_iters is set on the tracker (warm_iters/cold_iters), not per call")
        return tracker.estimate(matrices)
    names_out, norms, residuals, fallback = [], [], [], []
    for k, ((_shape, _device), names) in enumerate(_group_by_shape(matrices).items()):
        W = _stack(matrices, names, torch.float32)
        if mode == "exact":
            s = torch.linalg.matrix_norm(W.double(), ord=2).float()
            norms.append(s)
            residuals.append(torch.zeros_like(s))
            fallback.append(torch.zeros_like(s, dtype=torch.bool))
        else:
            Q = newton_schulz_polar(W, mode)
            iters = power_iters if power_iters is not None else (7 if mode == "ns5-fast" else 10)
            lam, res = _ns_power(W, Q, iters, seed + k)
            V0 = _random_block((W.shape[0], W.shape[-1], 8 if W.shape[-1] >= 8 else W.shape[-1]), W.device, seed + k)
            s_pow, res_pow, _ = block_power_iteration(W, V0, fallback_iters)
            failed = ~torch.isfinite(lam) | ~(res <= ns_fallback_residual)
            norms.append(torch.where(failed, s_pow, lam))
            residuals.append(torch.where(failed, res_pow, res))
            fallback.append(failed)
        names_out += names
    return _assemble(names_out, norms, residuals, fallback)


def compute_weight_spectral_norms(
    model: nn.Module | None,
    target_params,
    mode: str = DEFAULT_MODE,
    power_iters: int | None = None,
    *,
    tracker: SpectralNormTracker | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Largest singular value of each target matrix, as 0-d device tensors keyed by name.

    model: the module whose parameters `target_params` names (may be None when a dict is given).
    target_params: dict name -> parameter, or an iterable of parameter names of `model` or of its
        parameters (named as in `model.named_parameters()`).
        3D parameters give one entry per matrix (``<name>.q/.k/.v`` for a qkv stack, else ``<name>[i]``).
    mode: ``"power"`` (default, within 1% at small cost), ``"ns5-fast"`` (biased, see module doc),
        ``"ns3-accurate"``, or ``"exact"`` (SVD, validation only).
    power_iters: iterations; for ``"power"`` without a tracker, the cold-start count (default 30);
        for the NS modes, the power iterations after Newton-Schulz (default 7 / 10).
    tracker: a `SpectralNormTracker` whose stored vectors warm-start ``"power"`` (keep one per run).

    Nothing is read back to the host; read the values once, e.g. ``torch.stack(list(d.values())).tolist()``.
    """
    mats = _split_matrices(resolve_targets(model, target_params))
    return spectral_norms(mats, mode, power_iters, tracker=tracker, seed=seed).as_dict()
