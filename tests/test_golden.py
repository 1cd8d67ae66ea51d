"""Golden 10-step loss curve: guards against accidental changes to the model, the optimizers or the data order.

If this fails after a change that is MEANT to change training (a new init, a different optimizer rule,
another data order, a new default), regenerate the reference and commit it with the change:

    python tests/test_golden.py --update

If the change was meant to be a pure refactor (or a speed-up), a failure here is a real regression.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GOLDEN = Path(__file__).parent / "golden" / "loss_curve_10_steps.json"
TOLERANCE = 1e-5  # relative; fp32 on CPU is deterministic, this only absorbs BLAS differences between machines


def ten_step_losses(mup: bool) -> list[float]:
    from core.config import TrainConfig, resolve_defaults
    from core.data import BatchLoader, resolve_data
    from core.trainer import build_model, build_optimizer_pair, forward_backward, set_schedules
    torch.set_num_threads(1)  # thread count changes the fp32 summation order
    cfg = resolve_defaults(TrainConfig(width=64 if mup else 32, depth=2, head_dim=16, seq_len=256, batch_tokens=512,
                                       val_seq_len=256, iterations=10, seed=1234, mup=mup,
                                       base_width=32 if mup else None, spectral_every=0, activations=False),
                           "cpu", env={})
    model = build_model(cfg, torch.device("cpu"))
    adam, muon, _ = build_optimizer_pair(model, cfg)
    loader = BatchLoader(resolve_data(None).train_files, cfg.seq_len, 2)
    losses = []
    for step in range(cfg.iterations):
        window = 1 + step % 2
        losses.append(forward_backward(model, loader.next_step(), window, 2).item() / 512)
        set_schedules(cfg, [adam, muon], muon, step)
        adam.step()
        muon.step()
        model.zero_grad(set_to_none=True)
    return losses


def test_golden_loss_curve():
    golden = json.loads(GOLDEN.read_text())
    for name, mup in (("sp_w32", False), ("mup_w64_base32", True)):
        got, want = ten_step_losses(mup), golden[name]
        worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
        assert worst <= TOLERANCE, (
            f"{name}: the 10-step loss curve changed (worst relative difference {worst:.2e}).\n"
            f"  expected {want}\n  got      {got}\n"
            "If the change was meant to change training (init, optimizer, data order, defaults), update the "
            "reference with `python tests/test_golden.py --update` and commit it; otherwise this is a regression.")
    assert golden["sp_w32"][-1] < golden["sp_w32"][0] - 1.0  # the reference itself shows learning


if __name__ == "__main__":
    if "--update" not in sys.argv:
        sys.exit("usage: python tests/test_golden.py --update   (rewrites " + str(GOLDEN) + ")")
    GOLDEN.write_text(json.dumps({"sp_w32": ten_step_losses(False), "mup_w64_base32": ten_step_losses(True)},
                                 indent=1) + "\n")
    print(f"wrote {GOLDEN}")
