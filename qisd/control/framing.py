"""Line framing for the control socket (pure): split a byte stream into lines with a
hard bound on what is buffered, used by the server and both clients."""

from __future__ import annotations

import enum

__all__ = ["LineSplitter", "Overflow"]


class Overflow(enum.Enum):
    """Returned by :meth:`LineSplitter.next` in place of a line over the limit."""

    TOO_LONG = "too_long"


class LineSplitter:
    """Split a byte stream into lines of at most ``max_line`` bytes.

    Holds at most ``max_line`` bytes of a pending line plus one fed chunk: a line
    that grows past the limit is reported once as :attr:`Overflow.TOO_LONG` as soon
    as that is known, and the rest of it is skipped as it arrives, so a peer cannot
    make us buffer without bound.
    """

    def __init__(self, max_line: int) -> None:
        if max_line < 1:
            raise ValueError(f"max_line must be positive, got {max_line}")
        self._max = max_line
        self._buf = bytearray()
        self._start = 0  # consumed prefix, compacted lazily (cheap pipelining)
        self._scan = 0  # no newline before this index
        self._skipping = False

    @property
    def pending(self) -> int:
        """Bytes held that are not yet a complete line."""
        return len(self._buf) - self._start

    def feed(self, data: bytes) -> None:
        if self._start and self._start * 2 >= len(self._buf):
            del self._buf[: self._start]
            self._scan -= self._start
            self._start = 0
        self._buf += data

    def next(self) -> bytes | Overflow | None:
        """The next complete line (without its ``\\n`` or ``\\r\\n``), TOO_LONG, or
        None when more data is needed."""
        while True:
            nl = self._buf.find(b"\n", max(self._scan, self._start))
            if self._skipping:
                if nl < 0:
                    self._buf.clear()
                    self._start = self._scan = 0
                    return None
                self._start = self._scan = nl + 1
                self._skipping = False
                continue
            if nl < 0:
                self._scan = len(self._buf)
                if self._scan - self._start > self._max:
                    self._skipping = True
                    self._buf.clear()
                    self._start = self._scan = 0
                    return Overflow.TOO_LONG
                return None
            line = bytes(self._buf[self._start : nl])
            self._start = self._scan = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self._max:
                return Overflow.TOO_LONG
            return line
