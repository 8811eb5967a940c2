"""Showing generation as it happens.

On a terminal: a rich live view. Finished lines scroll up as plain, soft-wrapped text (a copy
gives whole paragraphs); the line being written and a status bar (tokens, speed, time, the
time left when there is a limit) stay live at the bottom. With several samples, the live view
shows the tail of each and the full texts follow at the end. Not a terminal: the text of a
single sample is streamed as plain text, flushed per token, and the closing status (why the
text ended) goes to stderr.
"""

from __future__ import annotations

import sys
from typing import Optional

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from cpmgen import console as term
from cpmgen.generate import Stats


def stop_words(reason: str, limit: Optional[int] = None, lines: Optional[int] = None) -> str:
    """A stop reason (the codes of --json's stop_reason) in words."""
    return {
        "eod": "the model wrote end of text (--ignore-eos writes on)",
        "length": f"reached the limit of {limit} new tokens" if limit else "reached the length limit",
        "stop": "wrote a --stop text",
        "lines": f"wrote {lines} line(s) (--lines)",
        "interrupt": "interrupted (Ctrl-C)",
    }[reason]


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def status_line(stats: Stats, limit: Optional[int] = None) -> str:
    """The live status: tokens so far (of the limit), speed, time taken and, with a limit, time left."""
    tokens = f"{stats.new_tokens} of {limit} tokens" if limit else f"{stats.new_tokens} tokens"
    parts = [f"writing: {tokens}", f"{stats.tokens_per_s:.1f} tokens/s", f"{_clock(stats.seconds)} elapsed"]
    if limit and stats.tokens_per_s > 0:
        parts.append(f"about {_clock((limit - stats.new_tokens) / stats.tokens_per_s)} left")
    if stats.slides:
        parts.append(f"window moved {stats.slides} time(s)")
    return " · ".join(parts)


def done_line(stats: Stats, reasons: list[str], limit: Optional[int] = None, lines: Optional[int] = None) -> str:
    """The closing status: what was written, how fast, and why each sample ended."""
    words = [stop_words(r, limit, lines) for r in reasons]
    why = words[0] if len(set(words)) == 1 else "; ".join(f"sample {i + 1}: {w}" for i, w in enumerate(words))
    slides = f", window moved {stats.slides} time(s)" if stats.slides else ""
    return (f"done: {stats.new_tokens} new tokens in {stats.seconds:.1f} s ({stats.tokens_per_s:.1f} tokens/s{slides}). "
            f"Stopped: {why}.")


def full_text(prompt_text: str, texts: list[str]) -> str:
    """The finished text as printed when piped and as written by --output: the prompt and its
    continuation, under a header per sample when there are several."""
    if len(texts) == 1:
        return prompt_text + texts[0] + "\n"
    return "".join(f"--- sample {i + 1} ---\n{prompt_text}{text}\n" for i, text in enumerate(texts))


class PlainStream:
    """Text straight to stdout; only a single sample streams (several are printed at the end)."""

    def __init__(self, prompt_text: str, num_samples: int, out=None, limit: Optional[int] = None,
                 lines: Optional[int] = None):
        self.out = out or sys.stdout
        self.streaming = num_samples == 1
        self.limit, self.lines = limit, lines
        if self.streaming:
            self.out.write(prompt_text)
            self.out.flush()

    def update(self, row: int, chunk: str, stats: Stats) -> None:
        if self.streaming and chunk:
            self.out.write(chunk)
            self.out.flush()

    def finish(self, prompt_text: str, texts: list[str], stats: Stats, reasons: list[str]) -> None:
        # a single sample has streamed already: only its closing line break is left
        self.out.write("\n" if self.streaming else full_text(prompt_text, texts))
        self.out.flush()
        term.stderr.print(done_line(stats, reasons, self.limit, self.lines), markup=False, soft_wrap=True)


class LiveView:
    TAIL_LINES = 4

    def __init__(self, console: Console, prompt_text: str, num_samples: int, limit: Optional[int] = None,
                 lines: Optional[int] = None):
        self.console = console
        self.num_samples = num_samples
        self.limit, self.lines = limit, lines
        self.pending = [""] * num_samples  # text not yet scrolled up (single sample) / the tail (several)
        self.stats = Stats()
        self.live = Live(self._render(), console=console, refresh_per_second=8, transient=True)
        self.live.start()
        if num_samples == 1:
            self._scroll(prompt_text, style="dim")

    def _scroll(self, text: str, style: str = "") -> None:
        """Print every finished line above the live region, soft-wrapped; keep the open line live."""
        self.pending[0] += text
        if "\n" in self.pending[0]:
            done, self.pending[0] = self.pending[0].rsplit("\n", 1)
            self.live.console.print(Text(done, style=style), soft_wrap=True)

    def _render(self):
        parts = []
        for i, text in enumerate(self.pending):
            tail = "\n".join(text.splitlines()[-self.TAIL_LINES:]) if self.num_samples > 1 else text[-2000:]
            if self.num_samples > 1:
                parts.append(Text(f"sample {i + 1}", style="bold"))
            parts.append(Text(tail))
        parts.append(Text(status_line(self.stats, self.limit), style="cyan"))
        return Group(*parts)

    def update(self, row: int, chunk: str, stats: Stats) -> None:
        self.stats = stats
        if self.num_samples == 1:
            self._scroll(chunk)
        else:
            self.pending[row] += chunk
        self.live.update(self._render())

    def finish(self, prompt_text: str, texts: list[str], stats: Stats, reasons: list[str]) -> None:
        self.live.stop()
        if self.num_samples == 1:
            self.console.print(Text(self.pending[0]), soft_wrap=True)
        else:
            for i, text in enumerate(texts):
                self.console.print(Text(f"--- sample {i + 1} ---", style="bold"))
                self.console.print(Text(prompt_text, style="dim"), Text(text), sep="", soft_wrap=True)
        self.console.print(Text(done_line(stats, reasons, self.limit, self.lines), style="cyan"))


class SavedView:
    """A view that also keeps each sample's text for --output: a single sample streams into the
    output file as it comes, so the file holds the text so far whatever stops the run."""

    def __init__(self, view, output, prompt_text: str, num_samples: int):
        self.view, self.output, self.prompt_text = view, output, prompt_text
        self.texts = [""] * num_samples
        output.begin()
        if num_samples == 1:
            output.stream(prompt_text)

    def update(self, row: int, chunk: str, stats: Stats) -> None:
        self.texts[row] += chunk
        if len(self.texts) == 1:
            self.output.stream(chunk)
        self.view.update(row, chunk, stats)

    def finish(self, prompt_text: str, texts: list[str], stats: Stats, reasons: list[str]) -> None:
        self.texts = texts
        self.view.finish(prompt_text, texts, stats, reasons)

    def save(self) -> None:
        self.output.commit(full_text(self.prompt_text, self.texts))


class Silent:
    """--json: nothing until the end."""

    def update(self, row: int, chunk: str, stats: Stats) -> None:
        pass

    def finish(self, prompt_text: str, texts: list[str], stats: Stats, reasons: list[str]) -> None:
        pass


def make_view(as_json: bool, console: Console, prompt_text: str, num_samples: int,
              out: Optional[object] = None, limit: Optional[int] = None, lines: Optional[int] = None):
    if as_json:
        return Silent()
    if console.is_terminal:
        # console.stdout soft-wraps (long lines stay whole when piped); the live region must wrap
        return LiveView(Console(highlight=False), prompt_text, num_samples, limit, lines)
    return PlainStream(prompt_text, num_samples, out, limit, lines)
