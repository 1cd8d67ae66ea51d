"""Depth muP for the speedrun GPT: CompleteP (alpha = 1) and the 1/sqrt(L) rule (alpha = 0.5), its rule table,
and how the model and the optimizers apply it. Width muP is core/mup.py; the two combine (`--mup --base-width`
with `--depth-mup --base-depth`), each multiplying its own factors into `p.lr_mul`.

Depth L (transformer blocks), base depth L0, depth multiplier m_L = L / L0. Hyperparameters tuned at L0 are
reused unchanged at L. `--depth-mup off` is the standard parametrisation in depth; at L == L0 every factor
below is exactly 1.0, so the run is bitwise the run without `--depth-mup` (tests/test_depth_mup.py).

THE RULES (one row per parameter kind; `DEPTH_RULES` below is this table in code; b = m_L^-alpha)

| kind          | where it acts                           | forward           | LR x          | Adam eps x | why |
|---------------|-----------------------------------------|-------------------|---------------|------------|-----|
| hidden (Muon) | attention qkv/out, MLP in/out           | branch x b        | m_L^(alpha-1) | - (Muon)   | [CP] Table 1: hidden AdamW LR x m_L^(alpha-1). HYPOTHESIS for Muon: its orthogonalised update has size lr whatever the gradient's scale, as Adam's normalised one does, so the same argument holds (L branches x b x lr must stay O(1)); at alpha = 1 the LR is constant. Unverified by any source: the depth x LR sweep decides |
| attn_lambdas  | mix of v and the value embedding        | (inside branch)   | m_L^(alpha-1) | m_L^-alpha | [CP]'s rule for the vector parameters of a block (norm gains, biases: `hidden_ln_params` of nanoGPT-mup `completep`): same LR factor as the matrices; their gradient carries b, so eps follows it |
| value_embed   | added to v in at most 6 fixed blocks    | (inside branch)   | 1             | m_L^-alpha | an input weight ([CP]: embedding LR unchanged with depth); it feeds a FIXED number of blocks, not L, so the sum-over-L argument behind m_L^(alpha-1) does not apply. Its gradient passes through b, so eps follows it. Its share of the output falls as b (a fixed set of blocks weighs O(1/L^alpha)): an architecture property no LR factor fixes; the sweep shows whether it matters |
| block_lambdas | x = l0 x + l1 x0 at every block         | -                 | m_L^-1        | 1          | they act on the whole stream at each of the L blocks, outside the branch: their updates add up over L (l1 x0 adds; l0's product compounds as exp(sum of deviations)), so each block's update must be O(1/L), the budget a branch update gets at either alpha (b x LR factor = m_L^-alpha x m_L^(alpha-1) = m_L^-1). Their gradient is that of the stream, O(1) in depth: eps unchanged |
| skip_weights  | x += w_j * skip_j, L/2 U-net skips      | skip x L0/L       | 1             | L0/L       | every skip adds a copy of an earlier stream state, and all of them hold x0 and the shared early features: perfectly correlated, they add linearly in L at ANY alpha. Unscaled, the final stream is (1 + L/2) x0 at init and the second half's share of the output falls as 1/L. With the factor: (1 + L0/2) x0 at every depth. A forward multiplier (w keeps init 1, Adam keeps its relative step) rather than a smaller init; eps follows the gradient, which carries the factor |
| embed, lm_head| input embedding, readout                | -                 | 1             | 1          | [CP] Table 1: embeddings and unembedding unchanged with depth (their eps carries only the width rule, which is 1 here: core/mup.py) |
| final norm    | parameter-free RMS norm                 | -                 | -             | -          | nothing to scale ([CP]: final-norm LR unchanged) |
| init          | every kind                              | unchanged         |               |            | [CP]: init unchanged with depth (the output projections start at zero anyway, so every branch is 0 at init) |
| block without attention | (layer 7 at depth 12 only)    | its MLP x b       | as hidden     |            | b counts blocks (L), not branches: a fixed number of missing attention branches does not scale with L |

Model layout by depth (core/model.py): any even L >= 2 (U-net skips pair block i with L-1-i); value-embedding
tables min(3, L/2), so L < 6 has fewer (base depth 2: one table); the block without attention only at L = 12.
A base depth below 6 therefore has fewer value-embedding tables than a target >= 6; `describe` says so at start.

NEGATIVE CONTROLS (`--depth-mistake NAME`, experiments only, needs --depth-mup): `DEPTH_MISTAKES`. The predicted
drift is the sign of the slope of log(size) vs log(depth) in the depth coordinate check (core/coord_check.py):
  depth-branch-no-lr    the branch and skip multipliers without any LR or eps factor. completep: only the
                        block lambdas' m_L^-1 is lost, so the final stream's change since init grows with depth
                        (predicted slope +0.5 .. +1: their first steps follow rounding-noise gradients and add up as
                        sqrt(L), later ones are correlated and add up as L); sqrt: also the hidden LR is m_L^0.5 too
                        large, the per-block update flat where the rule wants m_L^-0.5 (drift +0.5). Sign: +
  depth-skips-unscaled  the U-net skip multiplier 1 instead of L0/L: the final stream grows as (1 + L/2) from init
                        on (slope -> +1; +0.8 over depths 2-32). Sign: +

[CP] Dey et al., "Don't be lazy: CompleteP enables compute-efficient deep transformers", arXiv:2505.01618,
     Table 1, and its reference code EleutherAI/nanoGPT-mup branch `completep` (`model.py`: residual branch
     x (L/L0)^-alpha, hidden LR x (L/L0)^(alpha-1), eps of residual-block parameters x (L/L0)^-alpha, embedding
     and final-norm eps without the depth factor). alpha = 0.5 is the depth-muP of Yang et al., arXiv:2310.02244,
     and Bordelon et al., arXiv:2309.16620 (branch 1/sqrt(L), Adam LR ~ L^-1/2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

ALPHAS = {"completep": 1.0, "sqrt": 0.5}   # residual-branch exponent of each rule
DEPTH_MUP_CHOICES = ("off", *ALPHAS)

DEPTH_MISTAKES = {
    "depth-branch-no-lr": "branch and skip multipliers applied, every depth LR and eps factor dropped",
    "depth-skips-unscaled": "U-net skip multiplier 1 instead of L0/L",
}


# ---------------------------------------------------------------------------------------------
# The rule table


@dataclass(frozen=True)
class DepthRule:
    lr_exp: Callable[[float], float]    # alpha -> exponent of m_L in the LR factor
    eps_exp: Callable[[float], float]   # alpha -> exponent of m_L in the Adam eps factor (Muon has no eps)
    lr: str                             # the same, as printed
    eps: str
    source: str


DEPTH_RULES: dict[str, DepthRule] = {
    "hidden": DepthRule(lambda a: a - 1, lambda a: 0.0, "m_L^(alpha-1)", "- (Muon)",
                        "CompleteP Table 1 (AdamW); Muon: HYPOTHESIS that it follows Adam's rule"),
    "attn_lambdas": DepthRule(lambda a: a - 1, lambda a: -a, "m_L^(alpha-1)", "m_L^-alpha",
                              "CompleteP: vector params inside a residual block"),
    "value_embed": DepthRule(lambda a: 0.0, lambda a: -a, "1", "m_L^-alpha",
                             "input weight in a fixed set of blocks; gradient carries the branch multiplier"),
    "block_lambdas": DepthRule(lambda a: -1.0, lambda a: 0.0, "m_L^-1", "1",
                               "act on the stream at all L blocks: O(1/L) per block at any alpha"),
    "skip_weights": DepthRule(lambda a: 0.0, lambda a: -1.0, "1", "m_L^-1",
                              "forward x L0/L: L/2 correlated copies of the stream at any alpha"),
    "embed": DepthRule(lambda a: 0.0, lambda a: 0.0, "1", "1", "CompleteP Table 1: unchanged with depth"),
    "lm_head": DepthRule(lambda a: 0.0, lambda a: 0.0, "1", "1", "CompleteP Table 1: unchanged with depth"),
}


def depth_kind(name: str, kind: str) -> str:
    """The depth rule of one parameter: its optimizer kind (core/model.py `param_kinds`), the scalars by name."""
    rule = name if kind == "scalar" else kind
    if rule not in DEPTH_RULES:
        raise ValueError(f"parameter {name} (kind {kind!r}) has no depth rule: add a row to DEPTH_RULES in "
                         "core/depth_mup.py")
    return rule


def branch_multiplier(depth: int, base_depth: int | None, rule: str, mistake: str | None = None) -> float:
    """(L0/L)^alpha on every attention and MLP output added into the stream (1 for `off`). No mistake changes
    it (`mistake` is taken for a signature like `skip_multiplier`'s)."""
    if rule == "off":
        return 1.0
    return (base_depth / depth) ** ALPHAS[rule]


def skip_multiplier(depth: int, base_depth: int | None, rule: str, mistake: str | None = None) -> float:
    """L0/L on every U-net skip (alpha-independent: the skips are correlated copies; see the table)."""
    if rule == "off" or mistake == "depth-skips-unscaled":
        return 1.0
    return base_depth / depth


def factors(kind: str, depth: int, base_depth: int | None, rule: str,
            mistake: str | None = None) -> tuple[float, float]:
    """(LR factor, Adam eps factor) of one depth kind; (1, 1) for `off` and for the no-LR control."""
    if rule == "off" or mistake == "depth-branch-no-lr":
        return 1.0, 1.0
    r, alpha, m = DEPTH_RULES[kind], ALPHAS[rule], depth / base_depth
    return m ** r.lr_exp(alpha), m ** r.eps_exp(alpha)


def apply_depth_mup(model) -> dict[str, tuple[str, float, float]]:
    """Multiply each parameter's depth LR factor into `p.lr_mul` and set its Adam eps factor `p.eps_mul`.

    `model` has a `cfg` with depth, base_depth, depth_mup, depth_mistake and a `param_kinds()` (as GPT). Call
    before building the optimizers, as core/mup.py `apply_mup`. Returns {name: (depth kind, LR factor, eps factor)}.
    """
    cfg, kinds, table = model.cfg, model.param_kinds(), {}
    for name, p in model.named_parameters():
        kind = depth_kind(name, kinds[name])
        lr, eps = factors(kind, cfg.depth, cfg.base_depth, cfg.depth_mup, cfg.depth_mistake)
        p.lr_mul = getattr(p, "lr_mul", 1.0) * lr
        p.eps_mul = eps  # set, not multiplied: no other rule touches eps (width muP keeps it, core/mup.py)
        table[name] = (kind, lr, eps)
    return table


def describe(depth: int, base_depth: int, rule: str, mistake: str | None = None) -> str:
    """The depth rules with this run's numbers, as printed at the start of a run."""
    alpha, m = ALPHAS[rule], depth / base_depth
    lines = [f"depth-muP {rule}: depth {depth} base {base_depth} m_L {m:g} alpha {alpha:g} | branch multiplier "
             f"{branch_multiplier(depth, base_depth, rule, mistake):g} | skip multiplier "
             f"{skip_multiplier(depth, base_depth, rule, mistake):g}",
             f"  {'kind':<14} {'LR x':<14} {'= now':<8} {'eps x':<11} {'= now':<8} why"]
    for kind, r in DEPTH_RULES.items():
        lr, eps = factors(kind, depth, base_depth, rule, mistake)
        lines.append(f"  {kind:<14} {r.lr:<14} {lr:<8.4g} {r.eps:<11} {eps:<8.4g} {r.source}")
    ve = (min(3, base_depth // 2), min(3, depth // 2))
    if ve[0] != ve[1] or (depth == 12) != (base_depth == 12):
        lines.append(f"  layout: value-embedding tables {ve[0]} at the base depth, {ve[1]} here; block without "
                     f"attention {'here (layer 7)' if depth == 12 else 'none here'}, "
                     f"{'at' if base_depth == 12 else 'none at'} the base (core/model.py)")
    if mistake:
        lines.append(f"depth-muP NEGATIVE CONTROL --depth-mistake {mistake}: {DEPTH_MISTAKES[mistake]} "
                     "(a deliberately wrong depth rule; for experiments only)")
    return "\n".join(lines)
