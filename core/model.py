"""The modded-nanogpt speedrun GPT (record 2025-07-12_BosAlign), written for width scaling.

Features (each cites the record's author in the reference `train_gpt.py`):
  - packed single sequence (B=1) with document-causal sliding-window attention (core/attention.py),
    long and short windows per layer, QK RMS-norm, constant attention scale 0.12, one layer of the
    12-layer model without attention;
  - half-truncated RoPE, value embeddings in the pattern 0,1,2, none..., 0,1,2, U-net skips with
    learned weights, per-block lambdas mixing in the initial embedding x0;
  - ReLU^2 MLP (4x), parameter-free RMS norm, zero-initialised output projections;
  - untied lm_head (zero init, FP8 matmul on H100 through core/fp8.py) and the logit soft-cap
    30 * sigmoid(z / divisor).

Places where muP changes the model are marked `# muP:`, depth muP `# depth-muP:`; the rules themselves live in
core/mup.py (width) and core/depth_mup.py (depth: residual-branch and U-net-skip multipliers).
Shapes are written as comments `# (T, C)`: T tokens of the packed sequence, C = width, H heads, D head dim.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from core import depth_mup, mup
from core.attention import BLOCK_SIZE, attend, build_masks
from core.chunked_loss import chunked_softcap_cross_entropy
from core.fp8 import fp8_linear


def next_multiple_of(n: int, k: int) -> int:
    return ((n + k - 1) // k) * k


@dataclass
class GPTConfig:
    vocab_size: int = 50257        # GPT-2 BPE; the lm_head pads it to a multiple of 128 (50304)
    depth: int = 12                # transformer blocks; must be even (U-net pairs block i with depth-1-i)
    width: int = 768               # model width d (the muP "width")
    head_dim: int = 128            # fixed as width grows (heads = width / head_dim), so attention needs no muP change
    mlp_ratio: int = 4             # MLP hidden = mlp_ratio * width
    max_seq_len: int = 64 * 1024   # length of the rotary tables; longest packed sequence the model accepts
    attn_scale: float = 0.12       # constant attention scale instead of 1/sqrt(head_dim) (@leloykun)
    softcap: float = 30.0          # logits = softcap * sigmoid(z / divisor) (@Grad62304977, @KoszarskyB, @YouJiacheng)
    bos_id: int = 50256            # documents start at this token; attention never crosses it
    fp8: str = "off"               # lm_head matmul: "fp8" (torch._scaled_mm), "emulated", "off" (see core/fp8.py)
    mup: bool = False              # muP: readout multiplier and FP8 grad scale follow core/mup.py
    base_width: int | None = None  # muP base width d0 (width_mult = width / base_width)
    mup_mistake: str | None = None # experiments only: a known muP mistake as a negative control (core/mup.py)
    depth_mup: str = "off"         # depth muP: off | completep | sqrt (core/depth_mup.py)
    base_depth: int | None = None  # depth-muP base depth L0 (m_L = depth / base_depth)
    depth_mistake: str | None = None  # experiments only: a known depth-muP mistake (core/depth_mup.py)
    no_attn_layers: tuple[int, ...] | None = None  # None: layer 7 of a 12-layer model, as in the record

    def __post_init__(self):
        if self.depth < 2 or self.depth % 2:
            raise ValueError(f"depth must be an even number >= 2 (U-net skips pair blocks), got {self.depth}")
        if self.width <= 0 or self.head_dim <= 0 or self.width % self.head_dim:
            raise ValueError(f"width ({self.width}) must be a positive multiple of head_dim ({self.head_dim})")
        if self.head_dim % 4:
            raise ValueError(f"head_dim must be a multiple of 4 for half-truncated RoPE, got {self.head_dim}")
        if self.depth_mup not in depth_mup.DEPTH_MUP_CHOICES:
            raise ValueError(f"depth_mup must be one of {depth_mup.DEPTH_MUP_CHOICES}, got {self.depth_mup!r}")
        if self.depth_mup != "off" and not (self.base_depth and self.base_depth >= 2 and self.base_depth % 2 == 0):
            raise ValueError(f"depth_mup {self.depth_mup} needs an even base_depth >= 2, got {self.base_depth}")
        if self.no_attn_layers is None:
            # The record drops the attention of block 7 (@YouJiacheng); tuned only for 12 layers.
            self.no_attn_layers = (7,) if self.depth == 12 else ()

    @property
    def n_heads(self) -> int:
        return self.width // self.head_dim

    @property
    def padded_vocab(self) -> int:
        return next_multiple_of(self.vocab_size, 128)

    @property
    def n_value_embeds(self) -> int:
        return min(3, self.depth // 2)

    def value_embed_index(self, layer: int) -> int | None:
        """Value-embedding table used by `layer`: 0,1,2 on the first and last blocks, none between."""
        k = self.n_value_embeds
        if layer < k:
            return layer
        if layer >= self.depth - k:
            return layer - (self.depth - k)
        return None

    def uses_long_window(self, layer: int) -> bool:
        """Long window on every 4th block counted from either end (record: 0, 4, 7, 11 of 12)."""
        return min(layer, self.depth - 1 - layer) % 4 == 0

    def has_attention(self, layer: int) -> bool:
        return layer not in self.no_attn_layers


def at_least_fp32(x: Tensor) -> Tensor:
    """x in fp32, or in float64 when it already is (the golden test runs the model in float64)."""
    return x if x.dtype == torch.float64 else x.float()


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def uniform_init_(w: Tensor, fan_in: int) -> Tensor:
    """Uniform init with std 0.5 / sqrt(fan_in) (record: 0.5 is a bit better than 1/sqrt(3))."""
    bound = math.sqrt(3.0) * 0.5 * fan_in ** -0.5
    with torch.no_grad():
        return w.uniform_(-bound, bound)


class CastedLinear(nn.Module):
    """Bias-free linear layer whose fp32 master weight is cast to the activation dtype (bf16 on CUDA)."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        if zero_init:  # zero-init output projections (@Grad62304977)
            nn.init.zeros_(self.weight)
        else:
            uniform_init_(self.weight, in_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.type_as(x))


class Rotary(nn.Module):
    """Half-truncated RoPE (@YouJiacheng): head_dim/4 frequencies (1/1024)**linspace(0,1), then head_dim/4 zeros."""

    def __init__(self, head_dim: int, max_seq_len: int):
        super().__init__()
        freqs = (1 / 1024) ** torch.linspace(0, 1, steps=head_dim // 4, dtype=torch.float32)
        freqs = torch.cat([freqs, freqs.new_zeros(head_dim // 4)])
        theta = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)  # (T_max, D/2)
        self.register_buffer("cos", theta.cos(), persistent=False)
        self.register_buffer("sin", theta.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, H, D)
        T = x.size(1)
        assert T <= self.cos.size(0), f"sequence of {T} tokens is longer than max_seq_len {self.cos.size(0)}"
        cos, sin = self.cos[None, :T, None, :], self.sin[None, :T, None, :]
        x1, x2 = at_least_fp32(x).chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.scale = cfg.n_heads, cfg.head_dim, cfg.attn_scale
        hdim = cfg.n_heads * cfg.head_dim
        # merged q, k, v weights, one (hdim, width) matrix each; Muon orthogonalises each slice
        self.qkv_w = nn.Parameter(uniform_init_(torch.empty(3, hdim, cfg.width), cfg.width))
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len)
        self.c_proj = CastedLinear(hdim, cfg.width, zero_init=True)

    def forward(self, x: Tensor, ve: Tensor | None, lambdas: Tensor, mask) -> Tensor:  # x: (1, T, C)
        B, T = x.size(0), x.size(1)
        qkv = F.linear(x, self.qkv_w.flatten(end_dim=1).type_as(x))  # (1, T, 3*H*D)
        q, k, v = qkv.view(B, T, 3 * self.n_heads, self.head_dim).chunk(3, dim=-2)  # (1, T, H, D) each
        q, k = rms_norm(q), rms_norm(k)  # QK norm (@Grad62304977)
        q, k = self.rotary(q), self.rotary(k)
        # value embeddings mixed into v (@KoszarskyB, @Grad62304977); skipped in the middle blocks
        v = lambdas[0] * v + lambdas[1] * ve.view_as(v) if ve is not None else lambdas[0] * v
        y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.scale)  # (1, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_heads * self.head_dim)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.width
        self.c_fc = CastedLinear(cfg.width, hidden)
        self.c_proj = CastedLinear(hidden, cfg.width, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2 (arXiv:2109.08668)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(cfg) if cfg.has_attention(layer) else None
        self.mlp = MLP(cfg)
        # depth-muP: (L0/L)^alpha on both residual branches (CompleteP); 1 without depth muP
        self.branch_mult = depth_mup.branch_multiplier(cfg.depth, cfg.base_depth, cfg.depth_mup, cfg.depth_mistake)

    def branch(self, y: Tensor) -> Tensor:
        # x * 1.0 == x bitwise, so skipping the multiply at 1 (no depth muP, or L == L0) changes no number
        return y if self.branch_mult == 1.0 else self.branch_mult * y

    def forward(self, x, ve, x0, lambdas, attn_lambdas, mask) -> Tensor:
        x = lambdas[0] * x + lambdas[1] * x0
        if self.attn is not None:
            x = x + self.branch(self.attn(rms_norm(x), ve, attn_lambdas, mask))
        return x + self.branch(self.mlp(rms_norm(x)))


class Readout(nn.Module):
    """The lm_head: z = x @ W^T times the muP output multiplier (1 under the standard parametrisation).

    Its output is the pre-soft-cap logit that the coordinate check measures. The chunked loss
    (core/chunked_loss.py) never calls `forward` on the whole sequence, only `project` on row chunks, so the
    coordinate check and the activation monitor watch z through `observe` (called with every part of z the
    forward computes, whole or in chunks), not through a forward hook.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.padded_vocab, cfg.width))  # zero init (@Grad62304977)
        self.fp8 = cfg.fp8
        # muP: 1/width_mult (a negative control may change it: core/mup.py MUP_MISTAKES)
        self.output_mult = mup.output_multiplier(cfg.width, cfg.base_width, cfg.mup, cfg.mup_mistake)
        self.x_s, self.w_s, self.grad_s = mup.fp8_scales(cfg.width, cfg.base_width, cfg.mup, cfg.mup_mistake)  # muP
        self._observers: OrderedDict[int, object] = OrderedDict()  # weak-referenceable, as RemovableHandle needs

    def project(self, x: Tensor, weight: Tensor | None = None) -> Tensor:  # x: (..., C) -> (..., V) in fp32
        """z for x through `weight` (default: this module's; the chunked loss passes a detached alias)."""
        weight = self.weight if weight is None else weight
        if self.fp8 != "off" and self.training:
            z = fp8_linear(x, weight, self.x_s, self.w_s, self.grad_s, self.fp8)
        else:
            z = F.linear(x, weight.type_as(x))
        # x * 1.0 == x bitwise: skip the multiply when the multiplier is 1 (standard parametrisation); it is a
        # pass over the (1, T, V) logits in the forward and one in the backward of an eager CPU step (issue 10)
        z = at_least_fp32(z)
        return z if self.output_mult == 1.0 else z * self.output_mult

    def observe(self, fn) -> RemovableHandle:
        """Call `fn(z_part, first, last)` (no grad) with each part of z a forward computes; `.remove()` the handle."""
        handle = RemovableHandle(self._observers)
        self._observers[handle.id] = fn
        return handle

    def notify(self, z: Tensor, first: bool, last: bool) -> None:
        if self._observers:
            with torch.no_grad():
                for fn in list(self._observers.values()):
                    fn(z.detach(), first, last)

    def forward(self, x: Tensor) -> Tensor:  # x: (1, T, C) -> (1, T, V) in fp32
        z = self.project(x)
        self.notify(z, True, True)
        return z


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        V, C = cfg.padded_vocab, cfg.width
        # Embedding tables keep nn.Embedding's N(0, 1) init: the embedding output is RMS-normed, and
        # under muP an input weight's init is width-independent anyway (core/mup.py).
        self.embed = nn.Embedding(V, C)
        self.value_embeds = nn.ModuleList([nn.Embedding(V, C) for _ in range(cfg.n_value_embeds)])
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.depth)])
        self.lm_head = Readout(cfg)
        n = cfg.depth // 2
        self.skip_weights = nn.Parameter(torch.ones(n))                          # U-net skips (@brendanh0gan)
        self.block_lambdas = nn.Parameter(torch.tensor([[1.0, 0.0]] * cfg.depth))  # mix of x and x0 per block
        self.attn_lambdas = nn.Parameter(torch.tensor([[0.5, 0.5]] * cfg.depth))   # mix of v and value embedding
        self.softcap_divisor = mup.softcap_divisor(cfg.width, cfg.base_width, cfg.mup)  # muP: 7.5*sqrt(d0)
        # depth-muP: L0/L on every U-net skip (the L/2 skips are correlated copies of the stream); 1 without
        self.skip_mult = depth_mup.skip_multiplier(cfg.depth, cfg.base_depth, cfg.depth_mup, cfg.depth_mistake)

    def param_kinds(self) -> dict[str, str]:
        """Every parameter's kind; core/optimizers.py and core/mup.py key their rules on it."""
        kinds = {}
        for name, p in self.named_parameters():
            if name == "embed.weight":
                kinds[name] = "embed"
            elif name.startswith("value_embeds."):
                kinds[name] = "value_embed"
            elif name == "lm_head.weight":
                kinds[name] = "lm_head"
            elif name.startswith("blocks.") and p.ndim >= 2:
                kinds[name] = "hidden"
            elif name in ("skip_weights", "block_lambdas", "attn_lambdas"):
                kinds[name] = "scalar"
            else:
                raise ValueError(f"parameter {name} {tuple(p.shape)} has no kind: extend GPT.param_kinds")
        return kinds

    def window_layout(self) -> list[bool]:
        return [self.cfg.uses_long_window(i) for i in range(self.cfg.depth)]

    def forward(self, input_seq: Tensor, target_seq: Tensor | None = None, window_blocks: Tensor | int = 1,
                reduction: str = "sum", use_flex: bool | None = None, chunked: bool = False) -> Tensor:
        """input_seq, target_seq: (T,) token ids. Returns the summed (or mean) loss, or the logits if no targets.

        `window_blocks` is the long window in 128-token blocks; the short window is half of it (at least 1).
        `chunked`: the loss through core/chunked_loss.py (row chunks, never the full fp32 logits; equal up to
        float rounding), else the record's readout, soft-cap and cross-entropy over the whole sequence.
        """
        cfg = self.cfg
        assert input_seq.ndim == 1, "the model takes one packed sequence (T,)"
        if use_flex is None:
            use_flex = input_seq.is_cuda
        long_blocks = torch.as_tensor(window_blocks, dtype=torch.int32, device=input_seq.device)
        short_blocks = torch.clamp_min(long_blocks // 2, 1)
        long_mask, short_mask = build_masks(input_seq, cfg.bos_id, long_blocks, short_blocks, use_flex)

        ve = [emb(input_seq) for emb in self.value_embeds]
        x = x0 = rms_norm(self.embed(input_seq)[None])  # (1, T, C); norm of the embedding (@Grad62304977)
        skips = []
        n = cfg.depth // 2
        for i, block in enumerate(self.blocks):
            if i >= n:
                w = self.skip_weights[i - n] if self.skip_mult == 1.0 else self.skip_mult * self.skip_weights[i - n]
                x = x + w * skips.pop()
            j = cfg.value_embed_index(i)
            mask = long_mask if cfg.uses_long_window(i) else short_mask
            x = block(x, ve[j] if j is not None else None, x0, self.block_lambdas[i], self.attn_lambdas[i], mask)
            if i < n:
                skips.append(x)
        x = rms_norm(x)
        if chunked and target_seq is not None:
            return chunked_softcap_cross_entropy(x[0], self.lm_head, target_seq, cfg.softcap, self.softcap_divisor,
                                                 reduction)
        z = self.lm_head(x)  # (1, T, V) fp32
        logits = cfg.softcap * torch.sigmoid(z / self.softcap_divisor)
        if target_seq is None:
            return logits[0]
        return F.cross_entropy(logits.view(-1, logits.size(-1)), target_seq, reduction=reduction)


def sequence_len_ok(seq_len: int) -> bool:
    return seq_len > 0 and seq_len % BLOCK_SIZE == 0
