"""Read an offline wandb run back: the records of its `.wandb` file (wandb's LevelDB-style log:
a 7-byte header, then 32 KiB blocks of chunks, each `crc32 | length | type | data`, that join
into protobuf `Record`s). wandb itself ships no reader for it, and offline runs write no
config.yaml or wandb-summary.json; this is what `wandb sync` would upload."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7  # ":W&B", magic 0xBEE1, version
CHUNK = 7  # crc32 (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a wandb run file"
    out, pos, parts = [], HEADER, b""
    while pos + CHUNK <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK:  # the rest of a block too small for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK])
        body = data[pos + CHUNK : pos + CHUNK + length]
        pos += CHUNK + length
        if kind == 0 and length == 0:
            continue
        if kind in (FULL, FIRST):
            parts = body
        else:
            parts += body
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(parts)
            out.append(rec)
    return out


def read_run(run_dir: Path) -> dict[str, Any]:
    """{'run': RunRecord, 'config': {key: value}, 'summary': {key: value}, 'history': [...],
    'artifacts': [ArtifactRecord]} of the one `.wandb` file in an offline run dir."""
    (path,) = sorted(Path(run_dir).glob("*.wandb"))
    out: dict[str, Any] = {"run": None, "config": {}, "summary": {}, "history": [], "artifacts": []}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = rec.run
            for item in rec.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                key = item.key or ".".join(item.nested_key)
                out["config"][key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in rec.summary.update:
                key = item.key or "/".join(item.nested_key)
                out["summary"][key] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            out["history"].append(row)
        elif kind == "artifact":
            out["artifacts"].append(rec.artifact)
    return out
