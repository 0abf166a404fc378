"""How a recipe's YAML syntax errors read (`yaml_error`); where each key of a recipe sits: the 1-based line of
every key path in a composed YAML document, for errors that name file:line; and the keys given twice at one level,
which YAML would otherwise keep the last of without a word (a chain stage copied under the same name dropped the
first)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class RepeatedKey(Exception):
    """A key given twice at one level: its path and both lines."""

    def __init__(self, path: tuple[Any, ...], first: int, again: int) -> None:
        super().__init__(path)
        self.path, self.first, self.again = path, first, again


def line_index(node: yaml.Node, prefix: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    """Map every key path in a composed YAML document to its 1-based line; a repeated key raises RepeatedKey (YAML
    merge keys, `<<`, may repeat)."""
    lines: dict[tuple[Any, ...], int] = {prefix: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (key_node.value,)
            if isinstance(key_node.value, str) and key_node.value != "<<" and path in lines:
                raise RepeatedKey(path, lines[path], key_node.start_mark.line + 1)
            lines.update(line_index(value_node, path))
            lines[path] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(line_index(item, prefix + (i,)))
    return lines


def yaml_error(e: yaml.YAMLError, path: Path, text: str) -> str:
    """A YAML syntax error as 'FILE:LINE: ...', with what to do where the usual cause is known."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML refuses: it names a position, not a line
        line = len((text[: e.position] + ".").splitlines())  # lines as YAML ends them (CR too), as problem_mark's
        return f"{path}:{line}: the character U+{e.character:04X}, a control character YAML does not allow: remove it"
    where = f"{path}:{mark.line + 1}" if mark else str(path)
    if "'\\t'" in problem:  # PyYAML's "found character '\t' that cannot start any token"
        col = f" (column {mark.column + 1})" if mark else ""
        return f"{where}: a tab{col}: YAML indents and separates with spaces only: replace the tab with spaces"
    return f"{where}: YAML syntax error: {problem}"
