"""Following an exec's framed output log while the runner writes it.

Who runs this: the daemon's SSE routes (`api/stream.py`) and the CLI's `logs --follow`, on their
event loops. The runner (another process, inside the sandbox) appends frames to
`logs/<sid>/<exec_id>.log` as output arrives — 13-byte header `<BId` (stream, length,
timestamp) then the bytes — and never rewrites them, so a reader only has to poll the file's end,
hold back a frame that is not complete yet, and stop once the exec is settled in the journal and
everything before that moment has been read. Nothing here talks to the journal or the runner:
the caller says when the exec is done.

A `Cursor` is a resume point that is exact in bytes *and* in text: the byte offset just after a
frame, plus the bytes of a UTF-8 character that frame cut in half (per stream, at most 3), so a
client resuming there decodes the next frame as if it had never left.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import AsyncIterator, Awaitable, Callable

from runner.protocol import FRAME, STDERR, STDOUT, STREAM_NAMES

READ_BYTES = 1 << 20          # one read from the log at most; a frame may span several
POLL_MIN_S = 0.005            # sleep after an empty read; doubles while idle ...
POLL_MAX_S = 0.02             # ... up to this, and drops back as soon as output arrives
SETTLE_CHECK_S = 1.0          # woken followers: the longest sleep before asking `is_done` again
MAX_FRAME_BYTES = 64 << 20    # a header claiming more than this is corrupt (the runner writes ≤ 64 KiB)
_CURSOR = re.compile(r"^(\d{1,15})(?:\.([0-9a-f]{0,6})\.([0-9a-f]{0,6}))?(?:-done|-error)?$")


class FeedError(ValueError):
    """The log is not what the runner writes at that place (corrupt, or a bad resume offset)."""


@dataclass(frozen=True)
class Frame:
    offset: int      # byte offset in the log just after this frame (the resume point)
    stream: str      # "stdout" | "stderr"
    ts: float        # UNIX seconds, when the runner read the bytes
    data: bytes


@dataclass(frozen=True)
class Cursor:
    offset: int = 0
    stdout_tail: bytes = b""   # an incomplete UTF-8 character at the end of stdout so far
    stderr_tail: bytes = b""

    def format(self, suffix: str = "") -> str:
        """`123`, or `123.c3.` when a character is pending; `suffix` marks a final event."""
        base = str(self.offset)
        if self.stdout_tail or self.stderr_tail:
            base += f".{self.stdout_tail.hex()}.{self.stderr_tail.hex()}"
        return base + suffix

    @classmethod
    def parse(cls, text: str | None) -> Cursor:
        """The cursor an event id names (`Last-Event-ID`); empty means the start."""
        if text is None or not text.strip():
            return cls()
        m = _CURSOR.match(text.strip())
        if m is None:
            raise FeedError(f"invalid event id {text!r}: expected an id this server sent, like '1234'")
        out, err = (bytes.fromhex(g or "") if len(g or "") % 2 == 0 else None for g in m.group(2, 3))
        if out is None or err is None:
            raise FeedError(f"invalid event id {text!r}: odd-length character tail")
        return cls(int(m.group(1)), out, err)


class TextDecoder:
    """Incremental UTF-8 per stream: a character split over two frames is decoded whole;
    bytes that are not UTF-8 become U+FFFD. `cursor(offset)` captures what is held back."""

    def __init__(self, cursor: Cursor = Cursor()) -> None:
        self._decoders = {}
        for stream, tail in ((STDOUT, cursor.stdout_tail), (STDERR, cursor.stderr_tail)):
            d = codecs.getincrementaldecoder("utf-8")(errors="replace")
            d.decode(tail)   # a valid prefix is only buffered; anything else was never a tail we sent
            self._decoders[STREAM_NAMES[stream]] = d

    def decode(self, frame: Frame) -> str:
        return self._decoders[frame.stream].decode(frame.data)

    def cursor(self, offset: int) -> Cursor:
        return Cursor(offset, self._decoders["stdout"].getstate()[0], self._decoders["stderr"].getstate()[0])

    def flush(self) -> list[tuple[str, str]]:
        """(stream, text) for characters still pending at the end of the output (as U+FFFD)."""
        return [(name, text) for name, d in self._decoders.items() if (text := d.decode(b"", final=True))]


def check_offset(path: Path, offset: int) -> None:
    """Refuse a resume offset that cannot be a frame boundary of this log: past its end, or
    pointing at something that is not a frame header. Offset 0 is always fine."""
    if offset == 0:
        return
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = os.pread(f.fileno(), FRAME.size, offset)
    except FileNotFoundError:
        raise FeedError(f"invalid resume offset {offset}: the exec has no output yet") from None
    if offset > size:
        raise FeedError(f"invalid resume offset {offset}: the log has only {size} bytes")
    if offset < size and len(head) == FRAME.size and not _dropped(path, offset):
        _unpack(head, offset)


def _dropped(path: Path, offset: int) -> bool:
    """Is `offset` inside the punched-out start of a bounded log (see `data_start`)?"""
    first = data_start(path, 0)
    return first is not None and offset < first


def _unpack(head: bytes, offset: int) -> tuple[int, int, float]:
    stream, length, ts = FRAME.unpack(head)
    if stream not in STREAM_NAMES or length > MAX_FRAME_BYTES or not ts >= 0:
        raise FeedError(f"invalid frame header at offset {offset} (not a frame boundary, or a corrupt log)")
    return stream, length, ts


def parse_frames(buf: bytes | bytearray, offset: int) -> tuple[list[Frame], int]:
    """Complete frames at the start of `buf` (which begins at file `offset`) and how many
    bytes of `buf` they use; an incomplete last frame is left for the next read."""
    frames, pos = [], 0
    while len(buf) - pos >= FRAME.size:
        stream, length, ts = _unpack(bytes(buf[pos:pos + FRAME.size]), offset + pos)
        end = pos + FRAME.size + length
        if end > len(buf):
            break
        frames.append(Frame(offset + end, STREAM_NAMES[stream], ts, bytes(buf[pos + FRAME.size:end])))
        pos = end
    return frames, pos


@dataclass(frozen=True)
class Gap:
    """The oldest output of a bounded (process) log was dropped: reading resumes at `offset`."""

    skipped_from: int
    offset: int


def data_start(path: Path, at: int) -> int | None:
    """The offset of the first frame at or after `at` past a punched hole (the runner drops a
    process's oldest output by punching it out: it reads back as zeros, and a frame header
    never starts with a zero byte). None when nothing follows yet."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            pos = os.lseek(fd, at, os.SEEK_DATA)
        except OSError:   # ENXIO: no data after `at`
            return None
        while True:
            block = os.pread(fd, 65536, pos)
            if not block:
                return None
            stripped = block.lstrip(b"\0")
            if stripped:
                return pos + len(block) - len(stripped)
            pos += len(block)
    finally:
        os.close(fd)


async def follow(path: Path, offset: int, is_done: Callable[[], Awaitable[bool]],
                 heartbeat_s: float | None = None, watch=None,
                 wake: asyncio.Event | None = None) -> AsyncIterator[Frame | Gap | None]:
    """Frames of the log from `offset` (a frame boundary) on, as the runner appends them, until
    `is_done()` says the exec is settled and the file has been read to its end after that answer.
    A missing file is an empty one (the runner creates it when the command starts). With
    `heartbeat_s`, yields None after that long without a frame, so a caller can keep a
    connection alive. A `Gap` says the oldest output was dropped (process logs are bounded).
    With `watch` (a `log_watch.LogWatch`) a write wakes the reader at once; with `wake` too (an
    event the journal sets when the exec's end is committed, see `endings`) nothing is polled:
    the reader sleeps until one of them (or, for an end another process journaled, at most
    SETTLE_CHECK_S). Without them the file and `is_done` are polled. The file is reopened on
    each read: its descriptor is never held while idle.
    """
    buf = bytearray()
    read_at = offset          # file position of the end of `buf`
    settled = False
    sleep_s = POLL_MIN_S
    loop = asyncio.get_running_loop()
    quiet_since = loop.time()
    ticket = None
    woken = wake is not None and watch is not None
    try:
        while True:
            if woken and wake is not None:
                wake.clear()   # (an end committed meanwhile is still seen: `is_done` below)
            ticket = watch.arm(path, wake if woken else None) if watch is not None and not settled else None
            chunk = _read(path, read_at)
            if chunk:
                _close(ticket)
                ticket = None
                buf += chunk
                read_at += len(chunk)
                if buf[0] == 0:   # at a frame boundary inside a punched hole
                    begin = read_at - len(buf)
                    start = data_start(path, begin)
                    buf.clear()
                    if start is None:
                        read_at = begin
                    else:
                        read_at = start
                        yield Gap(begin, start)
                        continue
                frames, used = parse_frames(buf, read_at - len(buf))
                del buf[:used]
                for frame in frames:
                    yield frame
                if frames:
                    quiet_since, sleep_s = loop.time(), POLL_MIN_S
                continue   # read on until the file's end before asking whether the exec is done
            if settled:
                return     # done was seen before this empty read: everything it wrote has been read
            if await is_done():
                settled = True
                _close(ticket)
                ticket = None
                continue
            if heartbeat_s is not None and loop.time() - quiet_since >= heartbeat_s:
                _close(ticket)
                ticket = None
                yield None
                quiet_since = loop.time()
                continue
            if ticket is not None and woken:   # output or the end wakes it; nothing to poll
                left = SETTLE_CHECK_S if heartbeat_s is None else heartbeat_s - (loop.time() - quiet_since)
                await ticket.wait(max(0.0, min(left, SETTLE_CHECK_S)))
                ticket = None
                continue
            if ticket is not None:
                await ticket.wait(sleep_s)
                ticket = None
            else:
                await asyncio.sleep(sleep_s)
            sleep_s = min(sleep_s * 2, POLL_MAX_S)
    finally:
        _close(ticket)


def _close(ticket) -> None:
    if ticket is not None:
        ticket.close()


def _read(path: Path, at: int) -> bytes:
    """Up to READ_BYTES from `at`; b"" at the end or while the file does not exist. Small reads
    of a local file's page cache: cheap enough for the event loop."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return b""
    try:
        return os.pread(fd, READ_BYTES, at)
    finally:
        os.close(fd)


async def read_all(path: Path, offset: int = 0) -> AsyncIterator[Frame]:
    """Frames already in a finished exec's log (no waiting): `follow` with done=True."""
    async def done() -> bool:
        return True

    async for frame in follow(path, offset, done):
        if isinstance(frame, Frame):
            yield frame
