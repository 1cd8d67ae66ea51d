#!/usr/bin/env bash
# Download the FineWeb-10B GPT-2 shards (modded-nanogpt .bin format) into data/fineweb10B/.
#
#   bash scripts/data_process/download_hf_data.sh [NUM_TRAIN_SHARDS=9]
#
# 9 train shards (~1.8 GB) cover the 1750-step record; the val shard is always fetched. Re-running skips
# shards already present. Exit code 2 means no network / Hub unreachable (the message says what to do).
# Set PYTHON to choose the interpreter (default: python, else python3). Work: download_fineweb.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [[ -z "${PYTHON:-}" ]]; then
  if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
exec "$PYTHON" scripts/data_process/download_fineweb.py "${1:-9}" "${@:2}"
