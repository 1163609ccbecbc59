"""Wire format between the daemon and a runner, and the on-disk exec log format.

Socket: one JSON object per line in each direction (`{"op": ...}` → `{"ok": ...}`).
Exec log `<exec_id>.log`: a sequence of frames, each a 13-byte header
(stream: 1 = stdout, 2 = stderr; length: u32; timestamp: f64 UNIX seconds) and the bytes.
Exec meta `<exec_id>.json`: written atomically (tmp + rename) when the exec finishes.

Stdlib only: this module is imported by the runner, which must run in images without Python.
"""

from __future__ import annotations

import hashlib
import json
import struct

FRAME = struct.Struct("<BId")
STDOUT, STDERR = 1, 2
STREAM_NAMES = {STDOUT: "stdout", STDERR: "stderr"}
MAX_LINE = 64 * 1024 * 1024


def encode(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict:
    msg = json.loads(line)
    if not isinstance(msg, dict):
        raise ValueError("message must be a JSON object")
    return msg


def frame(stream: int, data: bytes, ts: float) -> bytes:
    return FRAME.pack(stream, len(data), ts) + data


def parse_frames(buf: bytes, offset: int = 0):
    """Yield (offset_after, stream, timestamp, data) for each complete frame from `offset`.
    A torn last frame (runner killed mid-write) is ignored."""
    n = len(buf)
    while offset + FRAME.size <= n:
        stream, length, ts = FRAME.unpack_from(buf, offset)
        end = offset + FRAME.size + length
        if end > n:
            return
        yield end, stream, ts, buf[offset + FRAME.size:end]
        offset = end


def split_output(buf: bytes) -> tuple[bytes, bytes, bytes, str]:
    """stdout, stderr, combined (arrival order) and the sha256 of the combined output."""
    out, err, both = bytearray(), bytearray(), bytearray()
    for _, stream, _, data in parse_frames(buf):
        (out if stream == STDOUT else err).extend(data)
        both.extend(data)
    return bytes(out), bytes(err), bytes(both), hashlib.sha256(both).hexdigest()
