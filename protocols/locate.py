"""Line numbers of keys in a TOML document, so findings can point at a line.

tomllib returns plain data without positions. This scanner walks text that
tomllib has already accepted and records the line on which every key (and
every array element) starts, keyed by the same path the data has. It never
raises: on anything it does not understand it stops and returns what it has.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence

from pbmd.protocols.errors import Path, PathPart

_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class _Stop(Exception):
    pass


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1
        self.lines: dict[Path, int] = {}
        self.array_tables: dict[Path, int] = {}

    # -- low level ---------------------------------------------------------
    def peek(self, n: int = 1) -> str:
        return self.text[self.pos : self.pos + n]

    def advance(self, n: int = 1) -> None:
        chunk = self.text[self.pos : self.pos + n]
        self.line += chunk.count("\n")
        self.pos += n

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def skip_space(self, newlines: bool) -> None:
        while not self.at_end():
            ch = self.peek()
            if ch in " \t\r" or (newlines and ch == "\n"):
                self.advance()
            elif ch == "#":
                while not self.at_end() and self.peek() != "\n":
                    self.advance()
            else:
                return

    # -- keys ----------------------------------------------------------------
    def key_part(self) -> str:
        ch = self.peek()
        if ch == '"':
            return self.basic_string()
        if ch == "'":
            self.advance()
            end = self.text.find("'", self.pos)
            if end < 0:
                raise _Stop
            value = self.text[self.pos : end]
            self.advance(end - self.pos + 1)
            return value
        start = self.pos
        while not self.at_end() and self.peek() in _BARE:
            self.advance()
        if self.pos == start:
            raise _Stop
        return self.text[start : self.pos]

    def dotted_key(self) -> list[str]:
        parts = [self.key_part()]
        while True:
            self.skip_space(newlines=False)
            if self.peek() != ".":
                return parts
            self.advance()
            self.skip_space(newlines=False)
            parts.append(self.key_part())

    # -- values --------------------------------------------------------------
    def basic_string(self) -> str:
        self.advance()  # opening quote
        out: list[str] = []
        while not self.at_end():
            ch = self.peek()
            if ch == "\\":
                out.append(self.peek(2))
                self.advance(2)
            elif ch == '"':
                self.advance()
                return "".join(out)
            else:
                out.append(ch)
                self.advance()
        raise _Stop

    def value(self, path: Path) -> None:
        ch = self.peek()
        if self.peek(3) in ('"""', "'''"):
            quote = self.peek(3)
            self.advance(3)
            while not self.at_end():
                if quote == '"""' and self.peek() == "\\":
                    self.advance(2)
                    continue
                if self.peek(3) == quote:
                    # a closing run may be up to five quotes long
                    while self.peek(4) == quote + quote[0]:
                        self.advance()
                    self.advance(3)
                    return
                self.advance()
            raise _Stop
        if ch == '"':
            self.basic_string()
        elif ch == "'":
            self.key_part()
        elif ch == "[":
            self.array(path)
        elif ch == "{":
            self.inline_table(path)
        else:
            while not self.at_end() and self.peek() not in ",]}#\n":
                self.advance()

    def array(self, path: Path) -> None:
        index = itertools.count()

        def element() -> None:
            where = (*path, next(index))
            self.lines.setdefault(where, self.line)
            self.value(where)

        self.delimited("]", element)

    def inline_table(self, path: Path) -> None:
        self.delimited("}", lambda: self.key_value(path))

    def delimited(self, close: str, item: Callable[[], None]) -> None:
        """From the opening bracket to `close`: items separated by commas (an array's
        elements, an inline table's keys)."""
        self.advance()
        while True:
            self.skip_space(newlines=True)
            if self.peek() == close:
                self.advance()
                return
            if self.at_end():
                raise _Stop
            item()
            self.skip_space(newlines=True)
            if self.peek() == ",":
                self.advance()

    def key_value(self, prefix: Path) -> None:
        line = self.line
        keys = self.dotted_key()
        full: Path = (*prefix, *keys)
        for i in range(len(prefix) + 1, len(full) + 1):
            self.lines.setdefault(full[:i], line)
        self.skip_space(newlines=False)
        if self.peek() != "=":
            raise _Stop
        self.advance()
        self.skip_space(newlines=False)
        self.value(full)

    # -- tables --------------------------------------------------------------
    def resolve(self, keys: Sequence[str]) -> Path:
        """Insert the current index of every array of tables along a header path."""
        out: list[PathPart] = []
        for key in keys:
            out.append(key)
            count = self.array_tables.get(tuple(out))
            if count is not None:
                out.append(count - 1)
        return tuple(out)

    def header(self) -> Path:
        line = self.line
        is_array = self.peek(2) == "[["
        self.advance(2 if is_array else 1)
        self.skip_space(newlines=False)
        keys = self.dotted_key()
        self.skip_space(newlines=False)
        self.advance(2 if is_array else 1)
        if is_array:
            parent = self.resolve(keys[:-1])
            table = (*parent, keys[-1])
            count = self.array_tables.get(table, 0) + 1
            self.array_tables[table] = count
            self.lines.setdefault(table, line)
            path: Path = (*table, count - 1)
        else:
            path = self.resolve(keys)
        for i in range(1, len(path) + 1):
            self.lines.setdefault(path[:i], line)
        return path

    def document(self) -> None:
        prefix: Path = ()
        while True:
            self.skip_space(newlines=True)
            if self.at_end():
                return
            if self.peek() == "[":
                prefix = self.header()
            else:
                self.key_value(prefix)


def key_lines(text: str) -> dict[Path, int]:
    """Map every key path in `text` to its 1-based line (best effort, never raises)."""
    scanner = _Scanner(text)
    with contextlib.suppress(_Stop, IndexError, RecursionError):
        scanner.document()
    return scanner.lines


def line_of(lines: dict[Path, int], path: Sequence[PathPart]) -> int | None:
    """The line of the longest prefix of `path` that the scanner saw."""
    parts = tuple(path)
    while parts:
        found = lines.get(parts)
        if found is not None:
            return found
        parts = parts[:-1]
    return None
