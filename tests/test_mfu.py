"""FLOPs per token, peak detection and MFU (core/mfu.py) against hand counts, the model's own mask,
the model's parameter shapes and torch's FlopCounterMode."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from core.attention import dense_mask
from core.mfu import detect_peak_flops, flops_per_token, mean_attended_keys, mfu, padded_vocab
from core.model import GPT, GPTConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: a second thread only spin-waits on a loaded 2-core machine
    yield
    torch.set_num_threads(n)


def test_hand_count_tiny_config():
    # depth 2, width 8, head_dim 4 (2 heads), vocab 10 -> padded 128, seq 4, token windows (block 1);
    # layer 0 has attention with a window of 2 tokens, layer 1 has none.
    #   qkv 2*8*24 = 384, out proj 2*8*8 = 128
    #   keys per query, window 2 over 4 positions: 1, 2, 2, 2 -> mean 1.75; scores+AV 2*2*2*4*1.75 = 56
    #   MLP per layer 2*2*8*32 = 1024 (x2 layers); lm_head 2*8*128 = 2048
    #   forward 384 + 128 + 56 + 1024 + 1024 + 2048 = 4664; training = 3 x 4664 = 13992
    got = flops_per_token(depth=2, width=8, head_dim=4, vocab_size=10, attn_layers=[True, False],
                          window_tokens=[2, 99], seq_len=4, attn_block_size=1)
    assert got == 13992


def test_block_window_mean_keys_hand_count():
    # 256 tokens, 128-token blocks. One-block window: each block is its own causal triangle,
    # 2 * (128*129/2) / 256 = 64.5 keys. Two blocks: block 1 also sees all of block 0:
    # (8256 + 128*128 + 8256) / 256 = 128.5 = (T+1)/2, plain causal attention.
    assert mean_attended_keys(256, 128) == 64.5
    assert mean_attended_keys(256, 256) == 128.5
    assert mean_attended_keys(256, 4096) == 128.5  # a window longer than the sequence changes nothing
    with pytest.raises(ValueError, match="shorter than one"):
        mean_attended_keys(256, 64)


@pytest.mark.parametrize("window_blocks", [1, 2, 3, 5])
def test_mean_keys_match_the_models_mask(window_blocks):
    # One document (no BOS): the mask the model really uses on CPU, counted row by row.
    T = 640
    mask = dense_mask(torch.zeros(T, dtype=torch.long), window_blocks)
    counted = mask.sum().item() / T
    assert mean_attended_keys(T, 128 * window_blocks) == pytest.approx(counted, rel=1e-12)


def test_matmul_terms_match_the_models_parameters():
    # 2 FLOPs per MAC forward, x3 for training: each hidden matrix and the lm_head contribute 6 x numel
    # per token; the attention term (no parameters) is added from its own formula.
    cfg = GPTConfig(vocab_size=300, depth=4, width=64, head_dim=16, max_seq_len=256)
    model = GPT(cfg)
    kinds = model.param_kinds()
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if kinds[n] in ("hidden", "lm_head"))
    attn = [cfg.has_attention(i) for i in range(cfg.depth)]
    got = flops_per_token(depth=4, width=64, head_dim=16, vocab_size=300, attn_layers=attn,
                          window_tokens=[128] * 4, seq_len=128)
    attention = 3 * 2 * 2 * cfg.n_heads * cfg.head_dim * mean_attended_keys(128, 128) * sum(attn)
    assert got == pytest.approx(6 * matmul_params + attention, rel=1e-12)
    assert model.lm_head.weight.shape[0] == padded_vocab(300) == 384


def test_against_flop_counter_on_the_tiny_model():
    """FlopCounterMode on one forward+backward of the real model on CPU, dense attention.

    With SDPA's math backend, attention is plain bmm's: q@k^T and p@v forward, 4 bmm's backward,
    i.e. 3 x 2*2*H*D*T per token per attention layer, counted over ALL T keys (FlopCounter cannot see
    the mask). The analytic count uses the keys actually attended, (T+1)/2 on average for a causal
    mask. So: counter == analytic - attention(causal) + attention(dense), exactly (tolerance: float
    rounding only). Elementwise ops (norms, soft-cap, rotary) are counted by neither.
    """
    cfg = GPTConfig(vocab_size=256, depth=2, width=64, head_dim=16, max_seq_len=256)
    torch.manual_seed(0)
    model = GPT(cfg)
    T = 256
    x, y = torch.randint(0, 256, (T,)), torch.randint(0, 256, (T,))
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(x, y, 2).backward()  # window of 2 blocks = the whole sequence: plain causal
    measured = counter.get_total_flops() / T
    analytic = flops_per_token(depth=2, width=64, head_dim=16, vocab_size=256, attn_layers=[True, True],
                               window_tokens=[256, 256], seq_len=T)
    per_key = 3 * 2 * 2 * cfg.n_heads * cfg.head_dim * 2  # x 2 attention layers
    assert measured == pytest.approx(analytic - per_key * (T + 1) / 2 + per_key * T, rel=1e-9)
    assert measured > analytic  # the counter over-counts the masked half


def test_peak_detection(monkeypatch):
    peak, why = detect_peak_flops("cpu")
    assert peak is None and "--peak-tflops" in why
    peak, why = detect_peak_flops("cpu", override_tflops=123.0)
    assert peak == 123e12 and "--peak-tflops" in why
    with pytest.raises(ValueError, match="positive"):
        detect_peak_flops("cpu", override_tflops=0.0)
    names = {
        "NVIDIA H100 80GB HBM3": 989e12,
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA H200": 989e12,
        "NVIDIA A100-SXM4-80GB": 312e12,
        "NVIDIA B200": 2250e12,
        "Tesla T4": None,
        "NVIDIA H100 80GB HBM3 MIG 1g.10gb": None,
    }
    for name, expected in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, _n=name: _n)
        peak, why = detect_peak_flops("cuda:0")
        assert peak == expected, f"{name}: {why}"
        if expected is None:
            assert "--peak-tflops" in why


def test_mfu_formula():
    # 8 GPUs at 2e5 tokens/s in total, 1e9 FLOPs per token: 2e14 FLOP/s over 8 x 989e12
    assert mfu(2e5, 1e9, 989e12, num_devices=8) == pytest.approx(2e14 / 7.912e15, rel=1e-12)
    assert mfu(1.0, 2.0, 4.0) == 0.5
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)
