"""Download the FineWeb-10B GPT-2 token shards of modded-nanogpt from the Hugging Face Hub.

Fetches `fineweb_val_000000.bin` and `fineweb_train_000001.bin` .. `fineweb_train_<N>.bin` of the dataset repo
`kjj0/fineweb10B-gpt2` into data/fineweb10B/ (each train shard is 10**8 tokens, ~200 MB; the record's 1750
steps read about 9 of them). Files already present with a valid header and size are skipped, so an interrupted
download can simply be re-run. Without network (or with HF_HUB_OFFLINE=1) it stops within seconds with an
explanation and exit code 2. Usually run through the wrapper:

    bash scripts/data_process/download_hf_data.sh [NUM_TRAIN_SHARDS=9]
    python scripts/data_process/download_fineweb.py 9 --out-dir data/fineweb10B
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

from core.data import DataError, read_header  # noqa: E402

HF_REPO = "kjj0/fineweb10B-gpt2"
EXIT_NO_NETWORK = 2


def wanted_files(num_train_shards: int) -> list[str]:
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, num_train_shards + 1)]


def is_valid(path: Path) -> bool:
    try:
        read_header(path)
        return True
    except DataError:
        return False


def no_network(reason: str, repo: str, missing: list[str], out_dir: Path) -> int:
    print(f"\nerror: cannot download from the Hugging Face Hub ({reason}). The FineWeb shards ({len(missing)} "
          f"file(s) missing in {out_dir}, from dataset {repo}) need network access to huggingface.co (or to the "
          "mirror in HF_ENDPOINT). Check your connection/proxy, unset HF_HUB_OFFLINE if it is set, and run this "
          "again: present files are kept. Alternatively, copy the .bin files into that folder by hand, make "
          "shards from local text with scripts/data_process/tokenize_corpus.py, or just run train.py without "
          "--data-dir to use the small embedded corpus that needs no download.", file=sys.stderr)
    return EXIT_NO_NETWORK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("num_train_shards", nargs="?", type=int, default=9, help="train shards to fetch (default 9)")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "data" / "fineweb10B")
    parser.add_argument("--repo", default=HF_REPO, help=f"dataset repo on the Hub (default {HF_REPO})")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the Hub to answer")
    args = parser.parse_args(argv)
    if not 0 <= args.num_train_shards <= 103:
        parser.error("num_train_shards must be between 0 and 103 (the repo holds 103 train shards)")

    out_dir: Path = args.out_dir
    files = wanted_files(args.num_train_shards)
    missing = [f for f in files if not is_valid(out_dir / f)]
    if not missing:
        print(f"all {len(files)} shards already present and valid in {out_dir}")
        return 0
    print(f"{len(files) - len(missing)} of {len(files)} shards already present; downloading {len(missing)} "
          f"from {args.repo} into {out_dir}")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return no_network("HF_HUB_OFFLINE is set", args.repo, missing, out_dir)

    # Lazy imports: huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE when imported.
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from tqdm import tqdm

    # Ask for one file's metadata first with a short timeout, so a missing network fails in seconds instead of
    # after the download client's retries.
    try:
        get_hf_file_metadata(hf_hub_url(args.repo, missing[0], repo_type="dataset"), timeout=args.timeout)
    except Exception as exc:  # connection, DNS, proxy, HTTP and offline-mode errors all mean the same here
        return no_network(f"{type(exc).__name__}: {exc}", args.repo, missing, out_dir)

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in tqdm(missing, desc="FineWeb shards", unit="file"):
        try:
            path = Path(hf_hub_download(args.repo, name, repo_type="dataset", local_dir=out_dir,
                                        etag_timeout=args.timeout))
        except Exception as exc:
            return no_network(f"while fetching {name}: {type(exc).__name__}: {exc}", args.repo,
                              [f for f in files if not is_valid(out_dir / f)], out_dir)
        try:
            read_header(path)
        except DataError as exc:
            path.unlink(missing_ok=True)
            print(f"error: downloaded file is not a valid shard and was deleted, run again: {exc}", file=sys.stderr)
            return 1
    print(f"done: {len(files)} shards in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
