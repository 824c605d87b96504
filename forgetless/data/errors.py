"""Errors raised while reading and validating data files."""

from __future__ import annotations


class DataError(ValueError):
    """A malformed input row; the message names the file, the 1-based line (row) and the field.

    Example: ``"data/x.jsonl, line 3: field 'answer': missing"``.
    """

    def __init__(self, message: str, origin: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.origin = origin
        self.line = line
        self.field = field

    @classmethod
    def at(cls, origin: str, line: int, problem: str, field: str | None = None) -> "DataError":
        """Build the error for ``problem`` at ``origin``/``line`` (and ``field`` when one is to blame)."""
        where = f"{origin}, line {line}"
        message = f"{where}: field '{field}': {problem}" if field is not None else f"{where}: {problem}"
        return cls(message, origin=origin, line=line, field=field)

    @classmethod
    def empty(cls, origin: str, what: str) -> "DataError":
        """A source with nothing to use in it (an empty file, or only blank rows)."""
        return cls(f"{origin}: no {what} (the file is empty or has only blank rows)", origin=origin)
