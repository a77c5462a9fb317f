"""A small reader of W&B transaction logs (``run-<id>.wandb``), for tests of offline runs.

Format written by wandb 0.31's wandb-core (found by reading real files; the Python datastore that
used to document it is no longer shipped):

* a 7-byte file header: ``b":W&B"``, magic ``0xBEE1`` (little-endian uint16), version ``0``;
* then LevelDB-log-format blocks of 32 KiB (block boundaries counted from the start of the file,
  header included). Each physical record has a 7-byte header: checksum (uint32 LE), length
  (uint16 LE), type (uint8: FULL=1, FIRST=2, MIDDLE=3, LAST=4), then ``length`` bytes. A block
  tail shorter than a record header is zero padding. The checksum is the IEEE CRC-32
  (``zlib.crc32``) of the type byte followed by the data, not LevelDB's masked CRC-32C;
* each logical record (FULL, or FIRST + MIDDLE* + LAST) is a serialized
  ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK_SIZE = 32 * 1024
RECORD_HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class TransactionLogError(ValueError):
    pass


def iter_payloads(path: str | Path) -> Iterator[bytes]:
    """The logical records' bytes, checksums verified."""
    data = Path(path).read_bytes()
    if data[: len(HEADER)] != HEADER:
        raise TransactionLogError(f"{path}: bad header {data[:len(HEADER)]!r}, expected {HEADER!r}")
    offset = len(HEADER)
    pending: bytearray | None = None
    while offset < len(data):
        left_in_block = BLOCK_SIZE - offset % BLOCK_SIZE
        if left_in_block < RECORD_HEADER.size:
            offset += left_in_block  # zero padding at the end of a block
            continue
        if offset + RECORD_HEADER.size > len(data):
            raise TransactionLogError(f"{path}: truncated record header at {offset}")
        checksum, length, kind = RECORD_HEADER.unpack_from(data, offset)
        if checksum == 0 and length == 0 and kind == 0:
            # zero-filled remainder (preallocated or padded): skip to the next block
            offset += left_in_block
            continue
        start = offset + RECORD_HEADER.size
        chunk = data[start : start + length]
        if len(chunk) != length or length > left_in_block - RECORD_HEADER.size:
            raise TransactionLogError(f"{path}: record at {offset} runs past its block or the file")
        if zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF != checksum:
            raise TransactionLogError(f"{path}: checksum mismatch in record at {offset}")
        offset = start + length
        if kind == FULL:
            if pending is not None:
                raise TransactionLogError(f"{path}: FULL record inside a fragmented one at {offset}")
            yield bytes(chunk)
        elif kind == FIRST:
            pending = bytearray(chunk)
        elif kind == MIDDLE:
            if pending is None:
                raise TransactionLogError(f"{path}: MIDDLE record without FIRST at {offset}")
            pending += chunk
        elif kind == LAST:
            if pending is None:
                raise TransactionLogError(f"{path}: LAST record without FIRST at {offset}")
            pending += chunk
            yield bytes(pending)
            pending = None
        else:
            raise TransactionLogError(f"{path}: unknown record type {kind} at {offset}")


def iter_records(path: str | Path):
    """``wandb_internal_pb2.Record`` messages of a transaction log, in order."""
    from wandb.proto import wandb_internal_pb2

    for payload in iter_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _item_key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


@dataclass
class RunLog:
    """What the tests look at in one transaction log."""

    run_id: str | None
    history: list[dict[str, Any]]  # one dict per history record: key -> decoded JSON value
    record_types: list[str]
    metric_definitions: list[dict[str, Any]]


def read_run(path: str | Path) -> RunLog:
    run_id = None
    history: list[dict[str, Any]] = []
    types: list[str] = []
    metrics: list[dict[str, Any]] = []
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        types.append(kind or "")
        if kind == "run" and run_id is None:
            run_id = record.run.run_id
        elif kind == "history":
            row = {}
            for item in record.history.item:
                row[_item_key(item)] = json.loads(item.value_json)
            if record.history.HasField("step"):
                row.setdefault("_step", record.history.step.num)
            history.append(row)
        elif kind == "metric":
            metric = record.metric
            metrics.append({"name": metric.name or metric.glob_name, "step_metric": metric.step_metric})
    return RunLog(run_id, history, types, metrics)
