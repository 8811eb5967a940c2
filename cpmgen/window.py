"""The window policy: what the model sees, what slides, and when the cache must be re-encoded.

One definition serves the slow path, the fast path and scoring, which is why fast == slow:

- The model sees at most `size` tokens (default max_positions - 1 = 1023, as the older
  scripts), always at positions 0..n-1.
- When a new token would make the context longer than `size`, the oldest tokens after the
  first `keep` are dropped: `stride` of them (novel), or whole oldest lines through their
  `<eod>` until at least `stride` are freed (lyric). When the lines to drop would take more
  than half the window (one very long line), lyric falls back to dropping `stride` tokens.
- The slow path recomputes the kept tokens for every new token; the fast path re-encodes them
  once into the KV cache after each slide (the positions of every kept token change, and
  CPM-1's learned absolute positions are baked into every layer's keys and values, so cached
  entries can never be shifted) and then decodes incrementally until the next slide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


DEFAULT_STRIDE_FRACTION = 4  # see config.WindowSection.stride and README "Choosing the stride"


def default_stride(size: int) -> int:
    return max(1, size // DEFAULT_STRIDE_FRACTION)


@dataclass(frozen=True)
class Window:
    size: int
    stride: int
    keep: int = 0
    line_end: Optional[int] = None  # lyric: the <eod> id; None: drop tokens (novel)

    @classmethod
    def from_settings(cls, section, max_positions: int, line_end: Optional[int] = None) -> "Window":
        """The window of a `window:` config section (checked) for a model with `max_positions`."""
        section.validate(max_positions)
        size = section.size or max_positions - 1
        stride = default_stride(size) if section.stride is None else section.stride
        return cls(size, stride, section.keep, line_end)

    def overflows(self, length: int) -> bool:
        return length > self.size

    def drop_range(self, ctx: Sequence[int]) -> tuple[int, int]:
        """The slice [start, end) of `ctx` to drop so that it fits again."""
        start = self.keep
        need = max(self.stride, len(ctx) - self.size)
        if self.line_end is not None:
            end = start + need
            # extend to the end of the line the token cut falls in, through its <eod>
            while end <= len(ctx) - 1 and ctx[end - 1] != self.line_end:
                end += 1
            if end <= len(ctx) - 1 and end - start <= max(need, self.size // 2):
                return start, end
        return start, start + need

    def slide(self, ctx: list) -> list:
        start, end = self.drop_range(ctx)
        return ctx[:start] + ctx[end:]
