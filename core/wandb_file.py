"""Reader for W&B's `.wandb` run files: history, summary and config without the W&B server.

wandb 0.31 has no public reader for the binary file an (offline) run writes; tests use this one to
check what `SimpleLogger` sent to W&B, and a user can inspect an offline run with::

    python -m core.wandb_file logs/<run_name>            # or a path to a run-*.wandb file

Format (verified byte by byte on files written by wandb 0.31's Go core; the layout matches the
docstring of the pre-0.18 Python writer `wandb/sdk/internal/datastore.py`, which 0.31 no longer
ships, and Google's LevelDB log format `doc/log_format.md`). requirements.txt pins wandb to the versions
this reader is tested against (>=0.30,<0.32); files written by each of them are committed under
tests/golden/wandb_files/ and read back by tests/test_wandb_file.py:

* file header, 7 bytes: ident `b":W&B"`, magic `0xBEE1` (little-endian uint16), version byte (0);
* then 32 KiB blocks (the header takes the first 7 bytes of block 0). Each block holds records
  `crc32 (uint32 LE) | length (uint16 LE) | type (uint8) | data[length]`, where the CRC is zlib's
  (IEEE) CRC-32 of the type byte followed by the data, unmasked, and type is FULL=1, FIRST=2,
  MIDDLE=3, LAST=4 (one logical record split over blocks as FIRST, MIDDLE..., LAST). A block tail
  shorter than a record header (7 bytes) is zero padding;
* each logical record is a serialised `wandb.proto.wandb_internal_pb2.Record`. The ones read here:
  `run` (id, project, initial config), `config` (updates/removes), `history` (one logged row: items
  with `key` or `nested_key` and `value_json`), `summary` (updates/removes), `exit` (exit code).
"""
from __future__ import annotations

import json
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

HEADER_IDENT = b":W&B"
HEADER_MAGIC = 0xBEE1
HEADER_VERSION = 0
FILE_HEADER = struct.Struct("<4sHB")   # ident, magic, version
RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, type
BLOCK_SIZE = 32 * 1024

FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """The file is not a readable .wandb file (bad header, bad checksum, broken fragment chain)."""


def iter_chunks(data: bytes, path: str = "<bytes>") -> Iterator[tuple[int, int, bytes]]:
    """Yield `(offset, type, payload)` for every physical record, checking each CRC.

    A record cut off at the end of the data (a run still writing, or killed) ends the iteration
    quietly: everything before it is intact.
    """
    if len(data) < FILE_HEADER.size:
        raise WandbFileError(f"{path}: {len(data)} bytes is too short for a .wandb header")
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if ident != HEADER_IDENT or magic != HEADER_MAGIC:
        raise WandbFileError(f"{path}: not a .wandb file (starts with {data[:6]!r}, expected "
                             f"{HEADER_IDENT!r} and magic 0x{HEADER_MAGIC:X})")
    if version != HEADER_VERSION:
        raise WandbFileError(f"{path}: .wandb format version {version}; this reader knows version "
                             f"{HEADER_VERSION} (wandb 0.31). Read it with a matching wandb instead")
    pos = FILE_HEADER.size
    while True:
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < RECORD_HEADER.size:
            pos += left_in_block  # zero trailer
        if pos + RECORD_HEADER.size > len(data):
            return
        crc, length, rtype = RECORD_HEADER.unpack_from(data, pos)
        start = pos + RECORD_HEADER.size
        if start + length > len(data):
            return  # truncated tail
        payload = data[start:start + length]
        if rtype == 0 and length == 0 and crc == 0:
            pos = (pos // BLOCK_SIZE + 1) * BLOCK_SIZE  # zero padding: the rest of the block is empty
            continue
        if zlib.crc32(bytes([rtype]) + payload) != crc:
            raise WandbFileError(f"{path}: checksum mismatch in the record at byte {pos}; "
                                 "the file is corrupted from there on")
        yield pos, rtype, payload
        pos = start + length


def iter_record_bytes(data: bytes, path: str = "<bytes>") -> Iterator[bytes]:
    """Yield each logical record's bytes, joining FIRST/MIDDLE/LAST fragments."""
    parts: list[bytes] | None = None
    for pos, rtype, payload in iter_chunks(data, path):
        if rtype == FULL:
            if parts is not None:
                raise WandbFileError(f"{path}: FULL record at byte {pos} inside a fragmented one")
            yield payload
        elif rtype == FIRST:
            if parts is not None:
                raise WandbFileError(f"{path}: FIRST record at byte {pos} inside a fragmented one")
            parts = [payload]
        elif rtype in (MIDDLE, LAST):
            if parts is None:
                raise WandbFileError(f"{path}: {'MIDDLE' if rtype == MIDDLE else 'LAST'} record "
                                     f"at byte {pos} without a FIRST")
            parts.append(payload)
            if rtype == LAST:
                yield b"".join(parts)
                parts = None
        else:
            raise WandbFileError(f"{path}: unknown record type {rtype} at byte {pos}")


def iter_records(path: str | Path) -> Iterator[Any]:
    """Yield each `wandb_internal_pb2.Record` in the file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb  # lazy: wandb's import is slow

    data = Path(path).read_bytes()
    for raw in iter_record_bytes(data, str(path)):
        rec = pb.Record()
        rec.ParseFromString(raw)
        yield rec


def _item_value(item: Any) -> Any:
    if item.value_json:
        return json.loads(item.value_json)  # Python's json reads the NaN/Infinity W&B may write
    # HistoryItem also has typed fields (a `value` oneof); summary and config items only value_json.
    which = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if which is None or which == "none":
        return None
    value = getattr(item, which)
    return json.loads(value) if which == "json" else value


def _item_path(item: Any) -> list[str]:
    return [item.key] if item.key else list(item.nested_key)


def _set_path(d: dict, path: list[str], value: Any) -> None:
    for k in path[:-1]:
        nxt = d.get(k)
        if not isinstance(nxt, dict):
            nxt = d[k] = {}
        d = nxt
    d[path[-1]] = value


def _del_path(d: dict, path: list[str]) -> None:
    for k in path[:-1]:
        d = d.get(k)
        if not isinstance(d, dict):
            return
    d.pop(path[-1], None)


def _apply(target: dict, record: Any) -> None:
    """Apply a config/summary record's updates and removes to `target` (nested keys nest)."""
    for item in record.update:
        _set_path(target, _item_path(item), _item_value(item))
    for item in record.remove:
        _del_path(target, _item_path(item))


def read_wandb_file(path: str | Path) -> dict[str, Any]:
    """Read a `.wandb` file into plain Python values.

    Returns a dict with
      `history`: one dict per logged row, in order (nested keys joined with "."; W&B's own `_step`,
                 `_runtime`, `_timestamp` included);
      `summary`: the final run summary (nested keys as nested dicts);
      `config`:  the run config (W&B's internal `_wandb` entry included);
      `run_id`, `project`: from the run record (None if absent);
      `exit_code`: from the exit record, None if the run did not finish.
    """
    out: dict[str, Any] = {"history": [], "summary": {}, "config": {}, "run_id": None,
                           "project": None, "exit_code": None}
    for rec in iter_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({".".join(_item_path(it)): _item_value(it) for it in rec.history.item})
        elif kind == "summary":
            _apply(out["summary"], rec.summary)
        elif kind == "config":
            _apply(out["config"], rec.config)
        elif kind == "run":
            out["run_id"] = rec.run.run_id or out["run_id"]
            out["project"] = rec.run.project or out["project"]
            _apply(out["config"], rec.run.config)
            _apply(out["summary"], rec.run.summary)
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


def is_finished(path: str | Path) -> bool:
    """Whether the file already holds the run's exit record (everything logged before it is on disk)."""
    try:
        return any(rec.WhichOneof("record_type") == "exit" for rec in iter_records(path))
    except (FileNotFoundError, WandbFileError):
        return False


def wait_until_finished(path: str | Path, timeout_s: float = 10.0, poll_s: float = 0.05) -> bool:
    """Wait until `is_finished(path)`, at most `timeout_s`; returns whether it is.

    Needed because wandb 0.31's `run.finish()` returns before wandb-core has flushed the file: the
    service closes the run's stream (and writes its buffered records) after a fire-and-forget
    `inform_finish` (wandb/sdk/wandb_run.py `_finish`). Measured here: a file read right after
    `finish()` sometimes holds only its 7-byte header; it is complete within ~0.2 s. The file is
    re-read only when its size changed, so waiting on a big file stays cheap.
    """
    p = Path(path)
    deadline = time.monotonic() + timeout_s
    last_size = None
    while True:
        size = p.stat().st_size if p.exists() else None
        if size != last_size:
            last_size = size
            if is_finished(p):
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def find_wandb_file(run_dir: str | Path) -> Path:
    """The `run-*.wandb` file of a run folder (`logs/<run_name>/`, its `wandb/` folder, or a W&B run
    folder). With several (a resumed offline run writes one per session) the newest is returned."""
    p = Path(run_dir)
    if p.is_file() and p.suffix == ".wandb":
        return p
    patterns = ("wandb/*run-*/run-*.wandb", "*run-*/run-*.wandb", "run-*.wandb")
    found = {f.resolve() for pat in patterns for f in p.glob(pat)}
    if not found:
        raise FileNotFoundError(
            f"no run-*.wandb file under {str(p)!r}; was the run started with --use-wandb true? "
            "(W&B files live in <run_dir>/wandb/offline-run-*/ or run-*/)"
        )
    return max(found, key=lambda f: (f.stat().st_mtime, str(f)))


def main(argv: list[str] | None = None) -> int:
    """Print what a run's .wandb file holds: row count, keys, last row, summary, config."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m core.wandb_file <run_dir | run-*.wandb>", file=sys.stderr)
        return 2
    path = find_wandb_file(args[0])
    data = read_wandb_file(path)
    keys = sorted({k for row in data["history"] for k in row})
    print(f"file: {path}")
    print(f"run: {data['run_id']}  project: {data['project']}  exit_code: {data['exit_code']}")
    print(f"history: {len(data['history'])} rows; keys: {', '.join(keys)}")
    if data["history"]:
        print(f"last row: {json.dumps(data['history'][-1])}")
    print(f"summary: {json.dumps(data['summary'], indent=2, default=str)}")
    print(f"config: {json.dumps(data['config'], indent=2, default=str)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
