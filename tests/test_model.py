"""The speedrun GPT: masks, causality, document isolation, the two attention executors, param kinds."""
import pytest
import torch

from core.attention import dense_mask, document_ids, flex_block_mask
from core.model import GPT, GPTConfig

V = 50257
BOS = 50256


def tiny(width=64, depth=4, **kw):
    return GPTConfig(depth=depth, width=width, head_dim=16, max_seq_len=1024, **kw)


def perturbed_model(cfg, seed=0):
    """Zero-initialised projections and readout would make every logit equal: perturb them."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def sequence(T=512, bos_at=(0, 200), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 5000, (T,), generator=g)
    for i in bos_at:
        x[i] = BOS
    return x


def test_future_tokens_do_not_change_earlier_logits():
    model = perturbed_model(tiny())
    x = sequence()
    x2 = x.clone()
    x2[300:] = torch.randint(0, 5000, (212,))
    with torch.no_grad():
        a, b = model(x, None, 4), model(x2, None, 4)
    assert torch.equal(a[:300], b[:300])
    assert (a[300:] - b[300:]).abs().max() > 1e-3  # the change does reach later positions


def test_no_attention_across_documents():
    model = perturbed_model(tiny())
    x = sequence(bos_at=(0, 200))
    x2 = x.clone()
    x2[1:200] = torch.randint(0, 5000, (199,))  # rewrite the whole first document
    with torch.no_grad():
        a, b = model(x, None, 4), model(x2, None, 4)
    assert torch.equal(a[200:], b[200:]), "the second document saw the first one"
    assert (a[:200] - b[:200]).abs().max() > 1e-3


def test_sliding_window_limits_context():
    docs = document_ids(sequence(T=512, bos_at=(0,)), BOS)
    m = dense_mask(docs, 1)  # one block: a query sees only its own 128-token block
    assert m[200, 128] and not m[200, 127] and m[127, 0] and not m[128, 127]
    m2 = dense_mask(docs, 2)
    assert m2[300, 128] and not m2[300, 127]


@pytest.mark.parametrize("window", [1, 2, 3])
def test_flex_block_mask_matches_dense_mask(window):
    """The BlockMask's block sparsity (full / partial / skipped) must agree with the mask definition."""
    x = sequence(T=768, bos_at=(0, 100, 130, 400, 640))
    docs = document_ids(x, BOS)
    bm = flex_block_mask(docs, torch.tensor(window, dtype=torch.int32))
    dense_from_blocks = bm.to_dense()[0, 0].bool()  # (Q_blocks, KV_blocks): blocks the kernel visits
    truth = dense_mask(docs, window)
    nb = 768 // 128
    needed = truth.view(nb, 128, nb, 128).any(dim=3).any(dim=1)
    assert torch.equal(dense_from_blocks, needed), "a block with allowed pairs is skipped, or an empty one visited"


def test_cpu_attention_path_equals_flex_attention_forward():
    model = perturbed_model(tiny())
    x = sequence(T=512, bos_at=(0, 77, 300))
    for window in (1, 3):
        with torch.no_grad():
            sdpa = model(x, None, window, use_flex=False)
            flex = model(x, None, window, use_flex=True)  # FlexAttention's (unfused) forward runs on CPU
        assert (sdpa - flex).abs().max() < 1e-4


def test_every_parameter_has_exactly_one_kind():
    model = GPT(GPTConfig(depth=12, width=256, head_dim=128, max_seq_len=256))
    kinds = model.param_kinds()
    assert set(kinds) == {n for n, _ in model.named_parameters()}
    assert set(kinds.values()) == {"hidden", "embed", "value_embed", "lm_head", "scalar"}
    # the record's layout: block 7 has no attention, 3 value embeddings, padded vocab
    assert model.blocks[7].attn is None and all(b.attn is not None for i, b in enumerate(model.blocks) if i != 7)
    assert len(model.value_embeds) == 3 and model.lm_head.weight.shape == (50304, 256)
    assert [model.cfg.uses_long_window(i) for i in range(12)] == \
        [True, False, False, False, True, False, False, True, False, False, False, True]


def test_initial_readout_is_zero_and_loss_is_uniform():
    model = GPT(tiny()).eval()
    x = sequence()
    with torch.no_grad():
        logits = model(x, None, 2)
        loss = model(x, x.roll(-1), 2, reduction="mean")
    assert torch.all(logits == 15.0)  # 30 * sigmoid(0): zero-initialised readout
    assert abs(loss.item() - torch.log(torch.tensor(50304.0)).item()) < 1e-4


def test_bad_model_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of head_dim"):
        GPTConfig(width=100, head_dim=32)
    with pytest.raises(ValueError, match="even"):
        GPTConfig(depth=5)


def test_flex_attention_is_never_stored_uncompiled_from_inside_a_trace(monkeypatch):
    # Issue 13 item 1: a lazy torch.compile(flex_attention) run while dynamo traces the model is a no-op that
    # returns the plain function; storing it sent later eager CUDA forwards down the unfused O(T^2) path.
    from torch.nn.attention.flex_attention import flex_attention
    from core import attention
    monkeypatch.setattr(attention, "_compiled_flex", None)
    model = perturbed_model(tiny(depth=2))
    x = sequence(T=256, bos_at=(0, 100))
    compiled = torch.compile(lambda seq: model(seq, None, 2, use_flex=True), backend="eager", fullgraph=True)
    with torch.no_grad():
        traced = compiled(x)
        eager_sdpa = model(x, None, 2, use_flex=False)
    assert (traced - eager_sdpa).abs().max() < 1e-4  # the traced flex path computes the same attention
    assert attention._compiled_flex is None  # nothing was stored while tracing
    fn = attention.compiled_flex_attention()  # the eager path's function: torch.compile's wrapper
    assert fn is not flex_attention and getattr(fn, "_torchdynamo_orig_callable", None) is flex_attention
    assert attention.compiled_flex_attention() is fn  # compiled once
