"""Reading records from local JSON / JSON-lines / Parquet files or from the Hugging Face hub."""

from __future__ import annotations

import itertools

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DataError

# Suffixes that make a source look like a local file even when it does not exist, so that a typo
# gives FileNotFoundError instead of a confusing hub lookup.
LOCAL_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")


class Record(dict):
    """One row (a dict) that remembers where it came from, so errors can name the file and line."""

    def __init__(self, data: dict[str, Any], origin: str, line: int) -> None:
        super().__init__(data)
        self.origin = origin
        self.line = line

    def error(self, problem: str, field: str | None = None) -> DataError:
        """A DataError located at this record."""
        return DataError.at(self.origin, self.line, problem, field)

    def __reduce__(self):  # keep origin/line through pickling (datasets map, multiprocessing)
        return (Record, (dict(self), self.origin, self.line))


def _as_record(obj: Any, origin: str, line: int) -> Record:
    if not isinstance(obj, dict):
        raise DataError.at(origin, line, f"expected a JSON object, got {type(obj).__name__}")
    return Record(obj, origin, line)


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """``object_pairs_hook``: the object as a dict, or :class:`_DuplicateKey` when a key repeats (json keeps only the
    last value of a repeated key, so a row with ``"answer"`` twice would silently lose one)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _duplicate(origin: str, line: int, err: _DuplicateKey) -> DataError:
    return DataError.at(origin, line, "appears twice in one object (JSON would keep only the last value); remove or "
                                      "rename one", field=err.key)


def _read_jsonl(text: str, origin: str) -> list[Record]:
    records = []
    # Split on "\n" only: str.splitlines() also breaks on U+2028, U+0085 and others, which JSON allows raw
    # inside strings (MMLU has some), and would cut such a row in two.
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue  # blank lines are skipped but still counted, so numbers match an editor's
        try:
            obj = json.loads(raw, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as exc:
            raise DataError.at(origin, number, f"invalid JSON ({exc.msg}, column {exc.colno})") from exc
        except _DuplicateKey as exc:
            raise _duplicate(origin, number, exc) from None
        records.append(_as_record(obj, origin, number))
    return records


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _read_json_array(text: str, origin: str) -> list[Record]:
    """Parse a top-level JSON list element by element, recording the line where each element starts."""
    decoder = json.JSONDecoder(object_pairs_hook=_unique_keys)
    records: list[Record] = []

    def fail(pos: int, msg: str) -> DataError:
        return DataError.at(origin, text.count("\n", 0, pos) + 1, f"invalid JSON ({msg})")

    i = _skip_ws(text, 0) + 1  # past '['
    i = _skip_ws(text, i)
    if i < len(text) and text[i] == "]":
        return records
    # each element's line: the newlines since the previous element's start, each counted once (a recount from the
    # file's start for every element took minutes for Alpaca's 52k-row indented array)
    line, counted = 1, 0
    while True:
        line += text.count("\n", counted, i)
        counted = i
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise DataError.at(origin, exc.lineno, f"invalid JSON ({exc.msg}, column {exc.colno})") from exc
        except _DuplicateKey as exc:
            raise _duplicate(origin, line, exc) from None
        records.append(_as_record(obj, origin, line))
        i = _skip_ws(text, i)
        if i >= len(text):
            raise fail(i, "unterminated list")
        if text[i] == "]":
            if _skip_ws(text, i + 1) != len(text):
                raise fail(i + 1, "extra data after the list")
            return records
        if text[i] != ",":
            raise fail(i, "expected ',' or ']'")
        i = _skip_ws(text, i + 1)


def read_utf8(path: Path) -> str:
    """The text of ``path``; a file that is not UTF-8 is a DataError naming the line and column of the first bad
    byte (a traceback from deep inside the reader otherwise)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (as some Windows editors write) is not text
    except UnicodeDecodeError as err:
        data = err.object  # without the byte-order mark, which err.start does not count
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError.at(str(path), line, f"not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); "
                                            f"convert the file to UTF-8") from None


def _read_parquet(path: Path) -> list[Record]:
    """A Parquet file's rows as Records; a row's "line" is its 1-based row number."""
    import pyarrow.parquet as pq  # a dependency of datasets; imported lazily

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({err})", origin=str(path)) from None
    return [Record(row, str(path), number) for number, row in enumerate(rows, start=1)]


def read_records(path: str | Path) -> list[Record]:
    """Read ``.jsonl`` (one object per line), ``.json`` (a list of objects) or ``.parquet`` (one row per record) into
    Records.

    A ``.json`` file whose content is not a list is read as JSON lines, as ``datasets``' json loader does.
    """
    path = Path(path)
    origin, suffix = str(path), path.suffix.lower()  # up.JSONL is a JSON-lines file too
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix not in (".jsonl", ".json"):
        raise ValueError(f"{origin}: unsupported file type {path.suffix!r} (expected .jsonl, .json or .parquet)")
    text = read_utf8(path)
    if suffix == ".json" and text.lstrip().startswith("["):
        return _read_json_array(text, origin)
    try:
        return _read_jsonl(text, origin)
    except DataError:
        if suffix == ".json":
            _refuse_one_object(text, origin)  # a pretty-printed {"data": [...]}: say so, not "line 1: invalid JSON"
        raise


def _refuse_one_object(text: str, origin: str) -> None:
    """Raise a DataError naming the case when ``text`` is one JSON object over several lines (records under a key,
    as some exports write them): neither a list of records nor JSON lines. Returns when it is not such an object."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return
    if not isinstance(obj, dict):
        return
    lists = [key for key, value in obj.items() if isinstance(value, list) and value and isinstance(value[0], dict)]
    hint = (f"; its key {lists[0]!r} holds a list of {len(obj[lists[0]])} records: save that list alone" if lists
            else "")
    raise DataError(f"{origin}: one JSON object over several lines; expected a list of records (a JSON array) or "
                    f"one record per line (JSON lines){hint}", origin=origin)


def looks_local(source: str) -> bool:
    """True when ``source`` is meant as a local path rather than a hub dataset id: a file name's ending is enough (a
    misspelt ``taks.jsonl`` is a missing file, said at once, not a hub id tried for half a minute)."""
    return source.lower().endswith(LOCAL_SUFFIXES)


def resolve_local(source: str, split: str | None = None) -> Path | None:
    """The local file for ``source`` (a file, or a folder holding ``{split}.jsonl``/``.json``/``.parquet``), else None.

    Raises FileNotFoundError for a path that looks local but does not exist.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        # A folder of split files, like ../shared/data/piqa/{train,test}.jsonl.
        candidates = [path / f"{split}{suffix}" for suffix in (".jsonl", ".json", ".parquet")] if split else []
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        files = sorted(p.name for p in path.iterdir() if p.suffix in (".jsonl", ".json"))
        if split is None and len(files) == 1:
            return path / files[0]
        if not files and (any(path.rglob("*.parquet")) or any(path.rglob("*.arrow"))):
            return None  # a dataset folder (as saved from the hub): read through datasets, like a hub id
        if split is None:
            raise FileNotFoundError(f"{source} is a folder of {len(files)} data files ({', '.join(files) or 'none'}): "
                                    f"name the file")
        raise FileNotFoundError(f"{source}: no {split}.jsonl, .json or .parquet in this folder (found {files})")
    if looks_local(source):
        raise FileNotFoundError(f"{source}: no such file")
    return None


def training_split(source: str, split: str | None) -> str | None:
    """The split training data is read from: ``split`` when given; else ``train`` for a hub dataset id, a folder
    holding a ``train`` file (``../shared/data/piqa/{train,test}.jsonl``) or a dataset folder of shards, and None
    (the one file) for a file or a folder of one JSON file."""
    if split is not None or source.startswith("demo:"):
        return split
    path = Path(source).expanduser()
    if path.is_dir():
        if any((path / f"train{suffix}").is_file() for suffix in (".jsonl", ".json", ".parquet")):
            return "train"
        return None if any(p.suffix in (".jsonl", ".json") for p in path.iterdir()) else "train"
    return None if path.exists() or looks_local(source) else "train"


def iter_records(source: str, split: str | None = None, name: str | None = None) -> Iterator[Record]:
    """Records from a local file (or a folder of ``{split}.jsonl`` files), else from the hub, one at a time.

    A hub dataset (or a local dataset folder of parquet/arrow files, which goes through the same code) is *streamed*
    (``datasets.load_dataset(source, name, split=split, streaming=True)``): a caller that stops after ``limit``
    records reads only those, so ``allenai/c4`` with ``limit: 2000`` downloads a few shards, not hundreds of GB.
    Each Record's origin is ``f"{source}[{split}]"`` and its line the 1-based row index.
    """
    local = resolve_local(source, split)
    if local is not None:
        yield from read_records(local)
        return
    import datasets  # imported lazily: slow, and not needed for local files

    if split is None:
        splits = datasets.get_dataset_split_names(source, name)
        if len(splits) != 1:
            raise ValueError(f"{source}: choose a split, one of {splits}")
        split = splits[0]
    rows = datasets.load_dataset(source, name, split=split, streaming=True)
    origin = f"{source}[{split}]"
    for index, row in enumerate(rows):
        yield Record(dict(row), origin, index + 1)


def load_records(source: str, split: str | None = None, name: str | None = None,
                 limit: int | None = None) -> list[Record]:
    """The first ``limit`` records (all when None) of :func:`iter_records`."""
    return list(itertools.islice(iter_records(source, split, name), limit))
