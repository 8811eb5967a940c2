"""The two tasks and their input formats, as the older CPM scripts read them.

lyric: lines separated by `<eod>`; each non-empty piece is stripped, encoded and followed by
the `<eod>` id, and generated `<eod>` ids are line breaks (the window drops whole lines).
novel: pieces between `<eod>` are stripped, encoded and concatenated; a generated `<eod>`
ends the story (with --ignore-eos it stays in the window and shows as a line break, and the
model starts a new text, as after the `<eod>` between two articles in training).
"""

from __future__ import annotations

from dataclasses import dataclass

EOD = "<eod>"
NEWLINE_PIECE_ID = 3  # "▃": the tokenizer decodes it as "\n"


@dataclass(frozen=True)
class Task:
    name: str
    lines: bool  # lyric: <eod> ends a line and the window drops whole lines

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


TASKS = {"lyric": Task("lyric", lines=True), "novel": Task("novel", lines=False)}
