"""Progress of long loops (evaluation, loss surfaces): a tqdm bar on a terminal, a plain line at an interval elsewhere.

Outside a terminal (a log file, CI, ``nohup``) tqdm writes one carriage-return update per item, so a log becomes mostly
progress output. There :func:`progress` prints ``desc: 40/125 batch (32%), 12 s`` at most once per ``interval``
seconds, and one closing line with the total time.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

#: Seconds between two plain progress lines outside a terminal.
INTERVAL = 30.0

_LINES = {"on": False, "prefix": ""}  # plain lines even on a terminal, each led by the prefix (see plain_lines)


@contextlib.contextmanager
def plain_lines(prefix: str) -> Iterator[None]:
    """Inside: progress (evaluation, loss surfaces, training stages) as plain lines led by ``prefix``, terminal or
    not: what several worker processes sharing one terminal can print without garbling each other's bars."""
    before = dict(_LINES)
    _LINES.update(on=True, prefix=prefix)
    try:
        yield
    finally:
        _LINES.update(before)


def say(text: str, stream: TextIO | None = None) -> None:
    """Write ``text`` and its newline in one write, then flush: a whole line, which lines written by other processes
    to the same pipe or terminal cannot cut in two (``print`` writes the text and the newline apart)."""
    stream = sys.stdout if stream is None else stream
    stream.write(text + "\n")
    stream.flush()


def plain(stream: TextIO) -> bool:
    """Whether progress on ``stream`` is plain lines (not a terminal, or :func:`plain_lines`)."""
    return _LINES["on"] or not stream.isatty()


def line_prefix() -> str:
    return str(_LINES["prefix"])


def _plain(items: Iterable[T], desc: str, unit: str, total: int | None, interval: float,
           stream: TextIO) -> Iterator[T]:
    start = last = time.perf_counter()
    done = 0
    of = f"/{total}" if total is not None else ""

    def line(now: float, closing: str = "") -> None:
        share = f" ({100 * done / total:.0f}%)" if total else ""
        say(f"{line_prefix()}{desc}: {done}{of} {unit}{share}, {now - start:.0f} s{closing}", stream)

    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= interval:
            line(now)
            last = now
    if done and time.perf_counter() - start >= interval:  # short loops stay silent
        line(time.perf_counter(), ", done")


def progress(items: Iterable[T], desc: str, unit: str = "it", enabled: bool = True, total: int | None = None,
             interval: float = INTERVAL, stream: TextIO | None = None) -> Iterable[T]:
    """``items``, with their progress shown when ``enabled``: a tqdm bar on a terminal, else a plain line at most every
    ``interval`` seconds (and a closing line for loops that took longer than that)."""
    if not enabled:
        return items
    stream = sys.stderr if stream is None else stream
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if not plain(stream):
        return tqdm(items, desc=desc, unit=unit, total=total, file=stream)
    return _plain(items, desc, unit, total, interval, stream)
