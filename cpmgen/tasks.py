"""The two tasks: each owns its input format, end-of-text rule, defaults and help.

Input formats as the older CPM scripts read them:

lyric: lines separated by `<eod>`; each non-empty piece is stripped, encoded and followed by
the `<eod>` id, and generated `<eod>` ids are line breaks (the window drops whole lines).
novel: pieces between `<eod>` are stripped, encoded and concatenated; a generated `<eod>`
ends the story (with --ignore-eos it stays in the window and shows as a line break, and the
model starts a new text, as after the `<eod>` between two articles in training).
"""

from __future__ import annotations

from dataclasses import dataclass, field

EOD = "<eod>"
NEWLINE_PIECE_ID = 3  # "▃": the tokenizer decodes it as "\n"


@dataclass(frozen=True)
class Task:
    name: str
    lines: bool  # lyric: <eod> ends a line and the window drops whole lines
    help: str  # the command's --help
    examples: tuple[str, ...]
    prompt_hint: str  # the interactive loop's prompt (rich markup)
    defaults: dict = field(default_factory=dict)  # settings that differ from the dataclass defaults
    own_options: tuple[str, ...] = ()  # options only this task has (the other's --help leaves them out)

    def pieces(self, text: str) -> list[str]:
        return [piece.strip() for piece in text.split(EOD) if piece.strip()]

    def prompt_ids(self, text: str, tokenizer) -> list[int]:
        ids: list[int] = []
        for piece in self.pieces(text):
            ids += tokenizer.encode(piece)
            if self.lines:
                ids.append(tokenizer.eod_id)
        return ids

    def prompt_text(self, text: str) -> str:
        """The prompt as typed (full-width punctuation and all), laid out as its ids are:
        lyric lines one a line, novel pieces joined."""
        return "".join(piece + "\n" for piece in self.pieces(text)) if self.lines else "".join(self.pieces(text))

    @staticmethod
    def display_ids(ids: list[int], eod_id: int) -> list[int]:
        """Ids to decode for display: <eod> shows as a line break."""
        return [NEWLINE_PIECE_ID if i == eod_id else i for i in ids]

    def ends_at_eod(self) -> bool:
        return not self.lines


# Both tasks sample a little below temperature 1 with nucleus 0.9; lyric asks for less text by default.
_SAMPLING = {"temperature": 0.9, "top_p": 0.9}

TASKS = {
    "lyric": Task(
        "lyric", lines=True,
        help="""Continue song lyrics: the prompt holds lines ending with <eod>; generated <eod> are line breaks.

    When the window is full it drops whole oldest lines (at least --stride tokens), so the
    song goes on for as long as asked, token for token the same with --fast and --no-fast.""",
        examples=("cpmgen lyric -m models/cpm-tiny examples/lyric.txt --lines 6 -s 1",
                  'cpmgen lyric -m models/cpm-tiny -p "冬天的早晨<eod>阳光照在村庄的小路上<eod>" -n 100',
                  "cpmgen lyric -m models/cpm-tiny          # on a terminal: a prompt loop"),
        prompt_hint="[bold]lyric[/bold] lines, separated by <eod> or \\n (Ctrl-D quits) >>> ",
        defaults={"generate": {"max_new_tokens": 128}, "sampling": _SAMPLING},
        own_options=("lines",)),
    "novel": Task(
        "novel", lines=False,
        help="""Continue a novel: prompt pieces between <eod> are joined; the model's end of text ends the story (unless --ignore-eos).

    When the window is full (the model's positions - 1 tokens) the oldest --stride tokens are
    dropped and the rest is re-encoded once (fast path) or for every token (--no-fast); both
    give the same tokens.""",
        examples=("cpmgen novel -m models/cpm-tiny examples/novel.txt -n 200 -s 1",
                  'cpmgen novel -m models/cpm-tiny -p "今天天气很好，" --temperature 0',
                  "cpmgen novel -m models/cpm-tiny examples/novel.txt -n 1000 --ignore-eos -o story.txt",
                  "echo 从前有座山 | cpmgen novel -m models/cpm-tiny --json"),
        prompt_hint="[bold]novel[/bold] opening, \\n for a line break (Ctrl-D quits) >>> ",
        defaults={"generate": {"max_new_tokens": 512}, "sampling": _SAMPLING},
        own_options=("ignore_eos", "min_new_tokens")),
}
