"""A training example: its token ids and labels (IGNORE where nothing is learned), and where it came from."""

from __future__ import annotations

from array import array
from typing import Iterable

IGNORE = -100


class Encoded:
    """An example's token ids and labels, held as int32 arrays (4 bytes a token; a list of Python ints holds ~36,
    gigabytes for a million rows) and given out as lists."""

    __slots__ = ("_ids", "_labels", "row", "where", "part")

    def __init__(self, input_ids: Iterable[int], labels: Iterable[int], row: int, where: str = "", part: int = 0
                 ) -> None:
        self._ids, self._labels = array("i", input_ids), array("i", labels)
        self.row = row
        self.where = where  # its row named as errors name it (FILE:LINE, DIR row N): data may come from several files
        self.part = part  # its number among the examples its row was split into (`_chat_plans`); 0: the first or only

    @property
    def input_ids(self) -> list[int]:
        return self._ids.tolist()

    @property
    def labels(self) -> list[int]:
        return self._labels.tolist()

    def __len__(self) -> int:
        return len(self._ids)

    def buffers(self) -> tuple[array, array]:
        """The int32 arrays themselves (ids, labels): what a writer of many examples copies without lists."""
        return self._ids, self._labels

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Encoded) and (self._ids, self._labels, self.row, self.where) == \
            (other._ids, other._labels, other.row, other.where)

    def __repr__(self) -> str:
        return f"Encoded(input_ids={self.input_ids}, labels={self.labels}, row={self.row}, where={self.where!r})"

    @property
    def target_tokens(self) -> int:
        return len(self._labels) - self._labels.count(IGNORE)

    def truncated(self, n: int) -> "Encoded":
        return Encoded(self._ids[:n], self._labels[:n], self.row, self.where, self.part)
