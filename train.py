"""Train the modded-nanogpt speedrun GPT, with or without muP.

    python train.py                                   # CPU: small model on the embedded corpus; CUDA: the record
    python train.py --width 768 --iterations 1750
    python train.py --mup --width 1024 --base-width 768 --coord-check
    torchrun --nproc_per_node=8 train.py --mup --width 1024 --base-width 768
    python train.py --width 256 --iterations 100 --use-wandb false

Every flag: `python train.py --help`. The loop lives in core/trainer.py.
"""
import sys

from core.config import ConfigError, parse_args

EXIT_BAD_INPUT = 2


def main(argv=None) -> int:
    cfg = parse_args(argv)
    from core.trainer import run  # heavy imports only after the flags parsed
    try:
        run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
