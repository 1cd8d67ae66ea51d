"""Document-causal sliding-window attention: one mask definition, two executors.

The mask (`document_causal_window`) is the single source of truth for who attends to whom:
  - causal: a query never sees a later key;
  - document: a query only sees keys of its own document (documents start at a BOS token);
  - window: a query in 128-token block i sees key blocks i-w+1 .. i (block-granular sliding
    window, as in the modded-nanogpt record 2025-07-12_BosAlign, `create_blockmasks`).

Executors:
  - CUDA: FlexAttention with a BlockMask whose block sparsity is computed from the document
    boundaries (the record's fast construction), and whose partial blocks apply the mask above.
  - CPU: FlexAttention has no backward on CPU in torch 2.13, so the same mask is materialised
    densely with `create_mask` and run through `scaled_dot_product_attention`.
A test checks that both give the same output (FlexAttention's forward does run on CPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_mask, flex_attention

BLOCK_SIZE = 128  # FlexAttention tile; also the granularity of the sliding window


def document_ids(input_seq: Tensor, bos_id: int) -> Tensor:
    """Document index of every position: increments at each BOS token. (T,) -> (T,)"""
    return (input_seq == bos_id).cumsum(0)


def document_causal_window(docs: Tensor, window_blocks: Tensor | int):
    """The mask_mod shared by both executors. `window_blocks` may be a 0-dim tensor (no recompiles)."""

    def mask_mod(b, h, q_idx, kv_idx):
        causal = q_idx >= kv_idx
        same_doc = docs[q_idx] == docs[kv_idx]
        in_window = (q_idx // BLOCK_SIZE) - (kv_idx // BLOCK_SIZE) < window_blocks
        return causal & same_doc & in_window

    return mask_mod


def _dense_to_ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
    """(Q_blocks, KV_blocks) bool -> (num_blocks, indices) in BlockMask's (B=1, H=1, ...) layout."""
    num_blocks = dense.sum(dim=-1, dtype=torch.int32)
    indices = dense.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    return num_blocks[None, None].contiguous(), indices[None, None].contiguous()


def flex_block_mask(docs: Tensor, window_blocks: Tensor) -> BlockMask:
    """BlockMask for `document_causal_window`, with block sparsity derived from document ranges.

    A key block is *full* when every (q, kv) pair in it is allowed (strictly below the diagonal and
    one document spans both blocks), *partial* when some pair may be allowed (the mask_mod decides
    inside it), and skipped otherwise. The window keeps the last `window_blocks` key blocks per
    query block: the diagonal block is always partial, so at most `window_blocks - 1` full blocks.
    Reference: modded-nanogpt record 2025-07-12_BosAlign, `GPT.create_blockmasks` (@YouJiacheng).
    """
    T = docs.numel()
    assert T % BLOCK_SIZE == 0, f"sequence length {T} must be a multiple of {BLOCK_SIZE}"
    n = T // BLOCK_SIZE
    idx = torch.arange(n, dtype=torch.int32, device=docs.device)
    q_blk, kv_blk = idx[:, None], idx[None, :]
    docs_low = docs.view(n, BLOCK_SIZE)[:, 0]
    docs_high = docs.view(n, BLOCK_SIZE)[:, -1]
    in_window = (q_blk - kv_blk) < window_blocks
    any_pair = (q_blk >= kv_blk) & (docs_low[:, None] <= docs_high[None, :]) & in_window
    all_pairs = (q_blk > kv_blk) & (docs_low[:, None] == docs_high[None, :]) \
        & (docs_high[:, None] == docs_low[None, :]) & in_window
    partial_num, partial_idx = _dense_to_ordered(any_pair & ~all_pairs)
    full_num, full_idx = _dense_to_ordered(all_pairs)
    return BlockMask.from_kv_blocks(
        partial_num, partial_idx, full_num, full_idx,
        BLOCK_SIZE=BLOCK_SIZE, mask_mod=document_causal_window(docs, window_blocks),
    )


def dense_mask(docs: Tensor, window_blocks: Tensor | int) -> Tensor:
    """The same mask materialised as a (T, T) bool tensor, for the SDPA executor."""
    T = docs.numel()
    return create_mask(document_causal_window(docs, window_blocks), None, None, T, T, device=docs.device)[0, 0]


_compiled_flex = None  # torch.compile(flex_attention), created on the first eager call (never at import)


def compiled_flex_attention():
    """flex_attention wrapped in torch.compile, created once outside any trace.

    FlexAttention is only fused (and memory-efficient) when compiled; eager flex_attention materialises
    the (T, T) scores, about 6 x 49k^2 fp32 values per layer at 48k tokens: an out-of-memory on any GPU.
    """
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _flex(q, k, v, block_mask, scale):
    if torch.compiler.is_compiling():
        # Inside a compiled model dynamo captures flex_attention itself as a fused higher-order op (what the
        # record does). A torch.compile call here would be a no-op under the trace that hands back the plain
        # flex_attention, and storing that would send every later *eager* forward (coordinate-check and
        # activation-monitor steps run the eager module) down the unfused path (issue 13 item 1). So the
        # lazy compile happens only outside a trace, as zeropower_via_newtonschulz5 does.
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)
    return compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask | Tensor, scale: float) -> Tensor:
    """q, k, v: (B, H, T, D). `mask` is a BlockMask (flex executor) or a dense bool mask (SDPA)."""
    if isinstance(mask, BlockMask):
        return _flex(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def build_masks(input_seq: Tensor, bos_id: int, long_blocks: Tensor, short_blocks: Tensor, use_flex: bool):
    """Long and short window masks for one packed sequence, in the executor's format."""
    docs = document_ids(input_seq, bos_id)
    if use_flex:
        return flex_block_mask(docs, long_blocks), flex_block_mask(docs, short_blocks)
    return dense_mask(docs, long_blocks), dense_mask(docs, short_blocks)
