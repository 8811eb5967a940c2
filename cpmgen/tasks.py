"""The two tasks and their input formats, as the older CPM scripts read them.

lyric: lines separated by `<eod>`; each non-empty piece is stripped, encoded and followed by
the `<eod>` id, and generated `<eod>` ids are line breaks (the window drops whole lines).
novel: pieces between `<eod>` are stripped, encoded and concatenated; a generated `<eod>`
ends the story.
"""

from __future__ import annotations

from dataclasses import dataclass

EOD = "<eod>"
NEWLINE_PIECE_ID = 3  # "▃": the tokenizer decodes it as "\n"


@dataclass(frozen=True)
class Task:
    name: str
    lines: bool  # lyric: <eod> ends a line and the window drops whole lines

    def prompt_ids(self, text: str, tokenizer) -> list[int]:
        ids: list[int] = []
        for piece in text.split(EOD):
            piece = piece.strip()
            if piece:
                ids += tokenizer.encode(piece)
                if self.lines:
                    ids.append(tokenizer.eod_id)
        return ids

    def display_ids(self, ids: list[int], eod_id: int) -> list[int]:
        """Ids to decode for display: lyric shows <eod> as a line break."""
        if not self.lines:
            return [i for i in ids if i != eod_id]
        return [NEWLINE_PIECE_ID if i == eod_id else i for i in ids]

    def ends_at_eod(self) -> bool:
        return not self.lines


TASKS = {"lyric": Task("lyric", lines=True), "novel": Task("novel", lines=False)}
