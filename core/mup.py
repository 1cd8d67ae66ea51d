"""muP for the speedrun GPT: width tracking (InfShape), the rule table, and how the model applies it.

Width d, base width d0, width_mult m = d / d0. Hyperparameters tuned at d0 are reused unchanged at d.

THE RULES (one row per parameter kind of core/model.py; `MUP_RULES` below is this table in code)

| kind        | optimizer | inf dims | init                          | LR multiplier | source |
|-------------|-----------|----------|-------------------------------|---------------|--------|
| hidden      | Muon      | 2        | std 0.5/sqrt(fan_in) (as SP)  | 1             | spectral condition [YSB23]: ||dW|| ~ sqrt(fan_out/fan_in); the orthogonalised Muon update has spectral norm ~1 at any width, its shape factor sqrt(max(1, rows/cols)) is width-independent at fixed aspect ratio |
| (hidden)    | Adam      | 2        | std ~ 1/sqrt(fan_in)          | 1/m           | Tensor Programs V [TP5], Table 3 (none in this model; the rule is applied if one appears) |
| embed       | Adam      | 1        | N(0, 1), width-independent    | 1             | TP5 Table 3, input weights; the embedding output is RMS-normed anyway |
| value_embed | Adam      | 1        | N(0, 1), width-independent    | 1             | TP5 Table 3, input weights (added into v, whose coordinates are O(1)) |
| lm_head     | Adam      | 1        | zero                          | 1             | TP5 Table 3, output weights in MuReadout form: the output multiplier carries the 1/m |
| scalar      | Adam      | 0        | as SP                         | 1             | no width dimension (U-net skip weights, block lambdas, attention lambdas) |

Model-level rules (applied in core/model.py where marked `# muP:`):
  - output multiplier 1/m on the readout z = x W^T (MuReadout, microsoft/mup `mup/layer.py`);
  - soft-cap divisor: the record uses logits = 30 sigmoid(z / (7.5 sqrt(d))); under muP it is
    7.5 sqrt(d0), so the whole readout scale is 1 / (7.5 sqrt(d0) m): equal to the record at d = d0
    (muP == SP bitwise at the base width) and ~1/d beyond it, as muP's readout wants;
  - attention: head_dim is fixed (128) and q, k are RMS-normed, so q.k is width-independent and the
    constant scale 0.12 stays (if head_dim grew, the scale would have to go as 1/head_dim);
  - FP8 lm_head scales (core/fp8.py): x_s = sqrt(d)/448 bounds an RMS-normed input at any width and
    w_s = 24/448 bounds the weights, both unchanged; the gradient reaching z scales with the inverse
    of the effective readout divisor (7.5 sqrt(d) / mult), so grad_s = (1/448) * (7.5 sqrt(768)) /
    effective_divisor: exactly the record's 1/448 at d = 768 (SP), and shrinking as 1/m under muP so
    that e5m2 gradients do not underflow sooner at large width.
  - Adam eps stays 1e-10: Adam trains only vector-like parameters here (nanoGPT-mup scales eps by
    1/m only for Adam on hidden matrices).

A common mistake is to divide the Muon LR by m: the update would then shrink with width.

NEGATIVE CONTROLS (`--mup-mistake NAME`, experiments only, needs --mup): `MUP_MISTAKES` applies one known
mistake on top of the rules, so that the coordinate check and the transfer verdict can show they reject it:
  no-readout-mult       drop the readout's 1/m: logits grow ~ m (predicted Adam-LR optimum drift toward -1)
  readout-mult-squared  1/m^2 instead of 1/m: logits shrink ~ 1/m
  muon-lr-over-m        Muon LR / m: hidden updates shrink with width (predicted Muon-LR optimum drift +1)
  embed-lr-over-m       embedding and value-embedding Adam LRs / m: the input layer learns ever slower

[YSB23] Yang, Simon, Bernstein, "A Spectral Condition for Feature Learning", arXiv:2310.17813.
[TP5]   Yang et al., "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot Hyperparameter
        Transfer", arXiv:2203.03466, Table 3.
InfShape follows microsoft/mup `mup/shape.py` (`set_base_shapes`): a dimension is infinite when it
differs between the base-width model and a delta-width model. `infer_infshapes` builds those models with
the class it is given (`apply_mup` passes the model's own), so this module imports no model: the model
imports it. The coordinate check is core/coord_check.py (`python -m core.coord_check`).
"""
from __future__ import annotations

import math
import runpy
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn as nn

# ---------------------------------------------------------------------------------------------
# Readout and FP8 scales (used by core/model.py)

SOFTCAP_DIV = 7.5           # record: logits / (7.5 * sqrt(d))
FP8_MAX_E4M3 = 448.0
REF_WIDTH = 768             # the record's width, where its FP8 scales were tuned


MUP_MISTAKES = {
    "no-readout-mult": "readout multiplier 1 instead of 1/m",
    "readout-mult-squared": "readout multiplier 1/m^2 instead of 1/m",
    "muon-lr-over-m": "Muon LR divided by m",
    "embed-lr-over-m": "embedding and value-embedding Adam LRs divided by m",
}


def width_mult(width: int, base_width: int | None, mup: bool) -> float:
    return width / base_width if mup else 1.0


def output_multiplier(width: int, base_width: int | None, mup: bool, mistake: str | None = None) -> float:
    """muP readout multiplier 1/m (1 under the standard parametrisation; `mistake` for negative controls)."""
    m = width_mult(width, base_width, mup)
    if mistake == "no-readout-mult":
        return 1.0
    if mistake == "readout-mult-squared":
        return 1.0 / m ** 2
    return 1.0 / m


def softcap_divisor(width: int, base_width: int | None, mup: bool) -> float:
    """7.5 sqrt(d) in SP (record); 7.5 sqrt(d0) under muP (the 1/m lives in the output multiplier)."""
    return SOFTCAP_DIV * math.sqrt(base_width if mup else width)


def fp8_scales(width: int, base_width: int | None, mup: bool, mistake: str | None = None) -> tuple[float, float, float]:
    """(x_s, w_s, grad_s) for the FP8 lm_head; see the module docstring for why."""
    effective_divisor = softcap_divisor(width, base_width, mup) / output_multiplier(width, base_width, mup, mistake)
    grad_s = (1.0 / FP8_MAX_E4M3) * (SOFTCAP_DIV * math.sqrt(REF_WIDTH)) / effective_divisor
    return math.sqrt(width) / FP8_MAX_E4M3, 24.0 / FP8_MAX_E4M3, grad_s


# ---------------------------------------------------------------------------------------------
# InfShape: which dimensions of each parameter scale with width


@dataclass(frozen=True)
class InfDim:
    base_dim: int | None  # size at the base width; None for a finite (width-independent) dimension
    dim: int              # size at the target width

    @property
    def is_infinite(self) -> bool:
        return self.base_dim is not None

    @property
    def width_mult(self) -> float:
        return self.dim / self.base_dim if self.is_infinite else 1.0


@dataclass(frozen=True)
class InfShape:
    dims: tuple[InfDim, ...]

    @property
    def ninf(self) -> int:
        return sum(d.is_infinite for d in self.dims)

    @property
    def width_mult(self) -> float:
        """The fan-in's width multiplier, as microsoft/mup uses (last infinite dim)."""
        inf = [d for d in self.dims if d.is_infinite]
        return inf[-1].width_mult if inf else 1.0

    def __str__(self) -> str:
        return "(" + ", ".join(f"{d.dim}/{d.base_dim}" if d.is_infinite else str(d.dim) for d in self.dims) + ")"


def _meta_shapes(build: Callable[[Any], nn.Module], cfg) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = build(cfg)
    return {name: p.shape for name, p in model.named_parameters()}


def infer_infshapes(build: Callable[[Any], nn.Module], cfg, base_width: int,
                    delta_width: int | None = None) -> dict[str, InfShape]:
    """InfShape of every parameter of `build(cfg)`, by comparing with models at base and delta widths.

    `build` makes the model from a config dataclass with `width` and `base_width` fields (the model's
    class, e.g. `GPT`); this module imports no model. The comparison models are built on the meta
    device, so this allocates nothing.
    """
    if delta_width is None:
        delta_width = 2 * base_width  # any width other than the base tells the scaling dims apart
    if delta_width == base_width:
        raise ValueError("delta_width must differ from base_width to tell which dimensions scale")
    target = _meta_shapes(build, cfg)
    base = _meta_shapes(build, replace(cfg, width=base_width, base_width=base_width))
    delta = _meta_shapes(build, replace(cfg, width=delta_width, base_width=base_width))
    shapes = {}
    for name, shape in target.items():
        b, dl = base[name], delta[name]
        if len(b) != len(shape) or len(dl) != len(shape):
            raise ValueError(f"{name}: rank changes with width ({tuple(b)} vs {tuple(shape)}); cannot track it")
        shapes[name] = InfShape(tuple(
            InfDim(base_dim=bd if bd != dd else None, dim=td) for td, bd, dd in zip(shape, b, dl)
        ))
    return shapes


# ---------------------------------------------------------------------------------------------
# The rule table


@dataclass(frozen=True)
class MupRule:
    optimizer: str     # "muon" or "adam"
    ninf: int          # number of width-scaled dimensions this kind must have (checked)
    init: str          # what the init does (the model implements it; tests check the statistics)
    source: str


MUP_RULES: dict[str, MupRule] = {
    "hidden": MupRule("muon", 2, "uniform, std 0.5/sqrt(fan_in); output projections zero",
                      "spectral condition (Yang, Simon & Bernstein 2023): Muon LR constant"),
    "embed": MupRule("adam", 1, "N(0,1), width-independent", "TP5 Table 3: input weights, LR constant"),
    "value_embed": MupRule("adam", 1, "N(0,1), width-independent", "TP5 Table 3: input weights, LR constant"),
    "lm_head": MupRule("adam", 1, "zero", "TP5 Table 3: output weights with 1/m multiplier, LR constant"),
    "scalar": MupRule("adam", 0, "as the record", "no width dimension: LR constant"),
}


def lr_multiplier(kind: str, shape: InfShape) -> float:
    """muP LR multiplier of one parameter (applied on top of the record's per-kind lr_mul)."""
    rule = MUP_RULES[kind]
    if shape.ninf != rule.ninf:
        raise ValueError(f"a '{kind}' parameter of shape {shape} has {shape.ninf} width dimensions, "
                         f"the muP table expects {rule.ninf}: update MUP_RULES in core/mup.py")
    if rule.optimizer == "adam" and shape.ninf == 2:
        return 1.0 / shape.width_mult  # TP5 Table 3: Adam on hidden (matrix-like) weights
    return 1.0                          # Muon (spectral condition) and vector-like Adam params


def mistake_lr_multiplier(kind: str, m: float, mistake: str | None) -> float:
    """The extra LR factor a negative control applies to one parameter kind (1 without a mistake)."""
    if mistake == "muon-lr-over-m" and kind == "hidden":
        return 1.0 / m
    if mistake == "embed-lr-over-m" and kind in ("embed", "value_embed"):
        return 1.0 / m
    return 1.0


def apply_mup(model, base_width: int) -> dict[str, tuple[InfShape, float]]:
    """Attach `infshape` to every parameter and multiply its muP LR factor into `p.lr_mul`.

    `model` has a `cfg` that its class builds it from (as GPT) and a `param_kinds()` (the rule of each
    parameter). Returns {name: (infshape, lr multiplier)} for logging. Call before building the optimizers
    (core/optimizers.build_optimizers multiplies its per-kind defaults into an existing lr_mul).
    A negative control (`model.cfg.mup_mistake`) multiplies its factor in as well.
    """
    shapes = infer_infshapes(type(model), model.cfg, base_width)
    kinds = model.param_kinds()
    mistake = getattr(model.cfg, "mup_mistake", None)
    m = model.cfg.width / base_width
    table = {}
    for name, p in model.named_parameters():
        mult = lr_multiplier(kinds[name], shapes[name]) * mistake_lr_multiplier(kinds[name], m, mistake)
        p.infshape = shapes[name]
        p.lr_mul = getattr(p, "lr_mul", 1.0) * mult
        table[name] = (shapes[name], mult)
    return table


def describe_rules() -> str:
    """The rule table as printed at the start of a muP run."""
    lines = [f"{'kind':<12} {'optimizer':<9} {'ninf':<4} {'init':<52} source"]
    for kind, r in MUP_RULES.items():
        lines.append(f"{kind:<12} {r.optimizer:<9} {r.ninf:<4} {r.init:<52} {r.source}")
    return "\n".join(lines)


if __name__ == "__main__":
    # `python -m core.mup coord-check ...`, the command's old name: it lives in core/coord_check.py
    # (`python -m core.coord_check ...`). runpy hands over by module name, so this module, which the
    # model imports, never imports the coordinate check.
    if len(sys.argv) < 2 or sys.argv[1] != "coord-check":
        sys.exit("usage: python -m core.coord_check [--widths 64 128 256 512] [--steps 10] [--seeds 3] "
                 "[--out-dir logs/coord_check]   (also as: python -m core.mup coord-check ...)")
    sys.argv = ["python -m core.coord_check", *sys.argv[2:]]
    runpy.run_module("core.coord_check", run_name="__main__", alter_sys=True)
