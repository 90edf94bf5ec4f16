"""Text pieces of Moshi's text tokens (SentencePiece, 32000 pieces for moshiko)."""
from __future__ import annotations

from pathlib import Path

import sentencepiece

from .weights import CheckpointError


class TextTokenizer:
    """Turns the LM's text token ids into the text pieces a client displays.

    Padding tokens (Kyutai's text padding and end-of-padding ids) carry no text and map to "".
    SentencePiece marks a word start with U+2581, which becomes a space.
    """

    def __init__(self, path: str | Path, padding_ids: tuple[int, ...] = (0, 3)):
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"text tokenizer not found: {path}")
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read {path} as a SentencePiece model: {e}") from None
        self._processor = processor
        self.path = path
        self.padding_ids = frozenset(padding_ids)

    @property
    def vocab_size(self) -> int:
        return self._processor.GetPieceSize()

    def piece(self, token: int) -> str:
        if token < 0 or token in self.padding_ids or token >= self.vocab_size:
            return ""
        return self._processor.IdToPiece(token).replace("\u2581", " ")

    def pieces(self, tokens) -> list[str]:
        return [self.piece(int(t)) for t in tokens]
