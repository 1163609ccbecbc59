"""Wire format between the daemon and a runner, and the on-disk exec log format.

Socket: one JSON object per line in each direction (`{"op": ...}` → `{"ok": ...}`).
Exec log `<exec_id>.log`: a sequence of frames, each a 13-byte header
(stream: 1 = stdout, 2 = stderr; length: u32; timestamp: f64 UNIX seconds) and the bytes.
Exec results: a line in the session's `runner.ledger` when the exec finishes (`results`;
runners before the ledger wrote `<exec_id>.json`).

Stdlib only: this module is imported by the runner, which must run in images without Python.
"""

from __future__ import annotations

import json
import struct

FRAME = struct.Struct("<BId")
STDOUT, STDERR = 1, 2
STREAM_NAMES = {STDOUT: "stdout", STDERR: "stderr"}
MAX_LINE = 64 * 1024 * 1024
MAX_PROCESS_LOG = 64 * 1024 * 1024   # a process's log keeps its newest output up to this


def encode(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict:
    msg = json.loads(line)
    if not isinstance(msg, dict):
        raise ValueError("message must be a JSON object")
    return msg


def frame(stream: int, data: bytes, ts: float) -> bytes:
    return FRAME.pack(stream, len(data), ts) + data


def read_output(path, limit: int | None = None) -> tuple[bytes, bytes, bytes, bool]:
    """stdout, stderr and combined output of an exec log file, each cut at `limit` bytes
    (reading stops there, so a huge log costs only what is returned); True if cut."""
    out, err, both = bytearray(), bytearray(), bytearray()
    cut = False
    with open(path, "rb") as f:
        while True:
            head = f.read(FRAME.size)
            if len(head) < FRAME.size:
                break
            stream, length, _ = FRAME.unpack(head)
            data = f.read(length)
            if len(data) < length:
                break
            if limit is not None and len(both) + len(data) > limit:
                data = data[:limit - len(both)]
                cut = True
            (out if stream == STDOUT else err).extend(data)
            both.extend(data)
            if cut:
                break
    return bytes(out), bytes(err), bytes(both), cut
