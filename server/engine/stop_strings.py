"""Stop strings matched on the decoded text, across token boundaries.

A stop string may end in the middle of a token or span several tokens, so matching
works on text: text that could still be the start of a stop string is held back
until the next token settles it, and nothing of a matched stop string (or after it)
is ever sent to the client — OpenAI's semantics.
"""

from __future__ import annotations


class StopStringFilter:
    """Feed text deltas; get back the text that is safe to emit and whether a stop matched."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.matched: str | None = None

    def push(self, delta: str) -> str:
        """Add a delta; return what may be emitted now (a matched stop ends the stream)."""
        if self.matched is not None:
            return ""
        if not self.stops:
            return delta
        self.pending += delta
        first: tuple[int, str] | None = None
        for stop in self.stops:
            i = self.pending.find(stop)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, stop)
        if first is not None:
            self.matched = first[1]
            out, self.pending = self.pending[: first[0]], ""
            return out
        hold = self._held_suffix()
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def _held_suffix(self) -> int:
        """Length of the longest suffix of `pending` that is a proper prefix of a stop."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """At the end of generation (not by a stop string) the held text is real output."""
        out, self.pending = ("" if self.matched is not None else self.pending), ""
        return out
