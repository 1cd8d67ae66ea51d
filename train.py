"""Train the modded-nanogpt speedrun GPT, with or without muP.

    python train.py                                   # CPU: small model on the embedded corpus; CUDA: the record
    python train.py --width 768 --iterations 1750
    python train.py --mup --width 1024 --base-width 768 --coord-check
    torchrun --nproc_per_node=8 train.py --mup --width 1024 --base-width 768
    python train.py --width 256 --iterations 100 --use-wandb false

Every flag: `python train.py --help`. The loop lives in core/trainer.py.

Checkpoints and restarts (core/checkpoint.py, core/guard.py):

    python train.py --run-name exp1 --save-every 100 --resume auto   # same command for the first start and
                                                                    # every restart after a preemption

Exit codes (so that sweep and job scripts can tell what happened):

    0    finished
    1    crashed (a bug or a hardware/system failure; Python's traceback is printed)
    2    bad input: a flag, the data (the file is named), a checkpoint, or the log folder; no traceback
    3    stopped by SIGTERM/SIGINT after finishing the current step and writing a checkpoint;
         resume with the same command plus --resume auto (keep --run-name)
    4    stopped by a non-finite loss or gradient (--nan-policy); the message names the step, the
         parameter group and the last good checkpoint
    128+N  a second signal N (130 for SIGINT, 143 for SIGTERM) while stopping: exited at once, no checkpoint
"""
import sys

from core.memory import configure_cuda_allocator

EXIT_BAD_INPUT = 2


def main(argv=None) -> int:
    # Before anything touches CUDA: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, as the record sets it
    # before torch starts, unless the user has an allocator config of their own (core/memory.py says why).
    configure_cuda_allocator()
    from core.config import ConfigError, parse_args
    cfg = parse_args(argv)  # argparse exits with 2 itself on an unknown flag or a malformed value
    # heavy imports only after the flags parsed
    from core.data import DataError
    from core.guard import EXIT_NONFINITE, EXIT_STOPPED, NonFiniteError, StopRequested
    from core.trainer import run
    try:
        run(cfg)
    except (ConfigError, DataError) as e:  # ConfigError covers core.checkpoint.CheckpointError
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StopRequested as e:
        print(f"stopped: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    return 0


if __name__ == "__main__":
    # The allocator setting first: the import below loads torch, which parses PYTORCH_CUDA_ALLOC_CONF only then
    # (issue 21 item 6). main() calls it again for callers that import train (a no-op once it is set).
    configure_cuda_allocator()
    # record(): under torchrun, a failing rank's traceback lands in the job's "Root Cause" summary
    from torch.distributed.elastic.multiprocessing.errors import record
    sys.exit(record(main)())
