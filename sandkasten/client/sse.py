"""Server-Sent Events decoding (the WHATWG event-stream format), fed line by line.

Pure: the sync and async clients feed it the lines httpx reads, it hands back whole
events. `last_id` survives events without an `id:` line, as the format requires, so a
client resuming with `Last-Event-ID` always sends the last id it saw."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    event: str
    data: str
    id: str | None


class Decoder:
    def __init__(self) -> None:
        self.last_id: str | None = None
        self.retry_ms: int | None = None
        self._event = ""
        self._data: list[str] = []
        self._saw_field = False

    def feed(self, line: str) -> Event | None:
        """One line without its terminator; returns the event a blank line completes."""
        line = line.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self.last_id = value
        elif name == "retry":
            if value.isdigit():
                self.retry_ms = int(value)
        else:
            return None
        self._saw_field = True
        return None

    def _dispatch(self) -> Event | None:
        saw, data, event = self._saw_field, self._data, self._event
        self._event, self._data, self._saw_field = "", [], False
        if not saw or not data:
            return None
        return Event(event=event or "message", data="\n".join(data), id=self.last_id)
