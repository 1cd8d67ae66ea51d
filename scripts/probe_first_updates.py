"""What the first two training steps do at each width: the facts behind the README's coordinate-check notes.

    python scripts/probe_first_updates.py --widths 512 1024 2048 --seq-len 256       # ~5 min on CPU
    python scripts/probe_first_updates.py --widths 32 128 512 --seq-len 4096 --mup

Per width, training as `python -m core.coord_check` does (same data, same seed):
  step 1's gradient of the first attention output projection (zero-initialised, so its first update
  comes from this gradient): `s1/|G|_F`, the share of the Frobenius norm in its top singular value
  (1.0 = rank one), and how many singular values of NS5(G) and of the exact polar factor exceed 0.5
  (the directions the first update acts on);
  the scalar parameters (block lambdas, U-net skip weights): the largest |gradient| at step 1, and the
  change of block 0's lambdas made by that step's Adam update. At step 1 every block output is still
  zero, so the loss is invariant to these scalars (the final RMS norm removes the scale of x0): their
  gradient is rounding noise, and Adam, which divides by the gradient's own size, turns it into a step
  of +-lr with a random sign.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.attention import BLOCK_SIZE  # noqa: E402
from core.coord_check import check_config  # noqa: E402
from core.data import BatchLoader, resolve_data  # noqa: E402
from core.model import sequence_len_ok  # noqa: E402
from core.optimizers import polar_factor_svd, zeropower_via_newtonschulz5  # noqa: E402
from core.steps import build_model, build_optimizer_pair, forward_backward, set_schedules  # noqa: E402


def probe(width: int, base_width: int, seq_len: int, use_mup: bool, depth: int, head_dim: int, files) -> dict:
    cfg = check_config(width, base_width, use_mup, 0, seq_len, depth, head_dim)
    model = build_model(cfg, torch.device("cpu"))
    adam, muon, _ = build_optimizer_pair(model, cfg)
    loader = BatchLoader(files, seq_len, 1, device="cpu")
    c_proj = next(b.attn.c_proj.weight for b in model.blocks if b.attn is not None)
    scalars = [model.block_lambdas, model.skip_weights]
    row = {}
    for step in range(2):
        forward_backward(model, loader.next_step(), 1, 1)
        if step == 1:
            G = c_proj.grad.float()
            s = torch.linalg.svdvals(G)
            row["s1_share"] = (s[0] / s.norm()).item()
            row["ns5_dirs"] = int((torch.linalg.svdvals(zeropower_via_newtonschulz5(G).float()) > 0.5).sum())
            row["polar_dirs"] = int((torch.linalg.svdvals(polar_factor_svd(G)) > 0.5).sum())
            row["scalar_grad_max"] = max(p.grad.abs().max().item() for p in scalars)
            before = model.block_lambdas[0].detach().clone()
        set_schedules(cfg, [adam, muon], muon, step)
        adam.step()
        muon.step()
        model.zero_grad(set_to_none=True)
    row["lambda0_step"] = (model.block_lambdas[0].detach() - before).tolist()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--mup", action="store_true", help="muP with base width = the smallest width (default: SP)")
    a = p.parse_args(argv)
    if any(w <= 0 or w % a.head_dim for w in a.widths):
        p.error(f"every width must be a positive multiple of --head-dim {a.head_dim}")
    if not sequence_len_ok(a.seq_len):
        p.error(f"--seq-len must be a positive multiple of {BLOCK_SIZE}")
    torch.set_num_threads(1)  # one thread is the fastest on the 2-core machine these notes were made on
    files = resolve_data(None).train_files
    print(f"{'SP' if not a.mup else 'muP'}, depth {a.depth}, head_dim {a.head_dim}, {a.seq_len} tokens/step, seed 0")
    print(f"{'width':>6} {'s1/|G|_F':>9} {'NS5 dirs>0.5':>13} {'polar dirs>0.5':>15} {'max |scalar grad|':>18}  "
          "block-0 lambdas moved by")
    for w in a.widths:
        r = probe(w, min(a.widths), a.seq_len, a.mup, a.depth, a.head_dim, files)
        print(f"{w:>6} {r['s1_share']:>9.4f} {r['ns5_dirs']:>13d} {r['polar_dirs']:>15d} {r['scalar_grad_max']:>18.2e}  "
              + ", ".join(f"{v:+.4f}" for v in r["lambda0_step"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
