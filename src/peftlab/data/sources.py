"""Read records from files, one at a time: .json, .jsonl, .csv, .parquet, .txt, directories
of them, and datasets saved with ``datasets.save_to_disk``.

Every reader is a generator that yields ``(where, record)`` pairs — ``where`` names the file
and the record or line (``data.jsonl line 12``, ``data.json record 3``) so that every later
error can point at it — and holds one record (or one parquet/arrow batch) in memory at a
time, so a corpus bigger than RAM streams in constant memory. A ``.json`` array is decoded
incrementally for the same reason.

Text is decoded as UTF-8 with ``surrogateescape``: a byte that is not UTF-8 does not stop
the read but survives as a lone surrogate, and the record parser (``formats``) rejects the
one field that holds it, naming file, record and field. So one bad record can be skipped
(``data.skip_bad_records``) instead of losing the file.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from ..errors import DataError

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
_CHUNK = 1 << 20


class Bad:
    """A record that could not even be read (bad JSON on one line): skipped or raised later."""

    def __init__(self, message: str):
        self.message = message


def _need_pyarrow(what: str):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise DataError(f"reading {what} needs pyarrow: pip install 'peftlab[data]'") from None


# ---------------------------------------------------------------------------- one file


def _open_text(path: Path, newline: str | None = None):
    """UTF-8 text; a leading byte-order mark (Excel's "CSV UTF-8", Windows editors) is dropped."""
    return path.open(encoding="utf-8-sig", errors="surrogateescape", newline=newline)


def iter_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, Bad(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                                 "each line of a .jsonl file must be one JSON object")
            except RecursionError:
                yield where, Bad(f"{where}: the JSON is nested too deeply to read")


class _Window:
    """The part of a text file read so far and not yet consumed: ``text`` starts at line ``line``,
    ``col`` characters into it, so any position in ``text`` maps back to the file's line and column."""

    def __init__(self, f):
        self.f, self.text, self.eof, self.line, self.col = f, "", False, 1, 0
        self.fill(0)

    def fill(self, pos: int, size: int | None = None) -> int:
        """Drop ``text[:pos]``, read ``size`` more characters (default one chunk, -1 the rest); returns
        the new index of ``pos``, 0."""
        dropped = self.text[:pos]
        newline = dropped.rfind("\n")
        self.line += dropped.count("\n")
        self.col = len(dropped) - newline - 1 if newline >= 0 else self.col + len(dropped)
        more = self.f.read(_CHUNK if size is None else size)
        self.eof = self.eof or not more or size == -1
        self.text = self.text[pos:] + more
        return 0

    def skip_space(self, pos: int) -> int:
        while True:
            while pos < len(self.text) and self.text[pos] in " \t\r\n":
                pos += 1
            if pos < len(self.text) or self.eof:
                return pos
            pos = self.fill(pos)

    def where(self, at: int) -> str:
        """``line L column C`` of ``text[at]``, counted as Python's json module counts them."""
        newline = self.text.rfind("\n", 0, at)
        column = at - newline if newline >= 0 else self.col + at + 1
        line = self.line + self.text.count("\n", 0, at)
        return f"line {line} column {column}"


def _json_error(path: Path, w: _Window, at: int, what: str) -> DataError:
    return DataError(f"{path} {w.where(at)}: not valid JSON ({what})")


def iter_json(path: Path) -> Iterator[tuple[str, object]]:
    """Records of a JSON array, decoded one at a time (a file may be larger than memory).

    ``{"data": [...]}`` is read whole; any other top-level object is refused (one object taken as
    one record was almost always a dict of splits or of ids, trained on as a single example).
    """
    with _open_text(path) as f:
        w = _Window(f)
        pos = w.skip_space(0)
        head = w.text[pos:pos + 1]
        if head == "{":
            yield from _json_object(path, w, pos)
        elif head == "[":
            yield from _json_array(path, w, pos + 1)
        elif not w.text.strip():
            raise DataError(f"{path}: the file is empty; it should hold a JSON array of records")
        else:
            raise _json_error(path, w, pos, "expected '[' at the start; the file must hold one JSON array of "
                                            "records (or use .jsonl, one record a line)")


def _json_object(path: Path, w: _Window, pos: int) -> Iterator[tuple[str, object]]:
    """A top-level object: ``{"data": [records]}`` or an error that says what shape is expected."""
    pos = w.fill(pos, -1)
    try:
        data, end = json.JSONDecoder().raw_decode(w.text, pos)
    except json.JSONDecodeError as e:
        raise _json_error(path, w, e.pos, e.msg) from None
    except RecursionError:
        raise _json_error(path, w, pos, "nested too deeply to read") from None
    end = w.skip_space(end)
    if end < len(w.text):
        raise _json_error(path, w, end, "extra data after the top-level object")
    if isinstance(data.get("data"), list):
        for i, rec in enumerate(data["data"]):
            yield f"{path} record {i}", rec
        return
    keys = ", ".join(repr(k) for k in list(data)[:8]) + (", ..." if len(data) > 8 else "")
    lists = [repr(k) for k, v in data.items() if isinstance(v, list)]
    raise DataError(
        f"{path}: the file holds one JSON object (keys {keys or 'none'}), not a list of records; a .json data "
        'file is an array of records [{...}, ...] or {"data": [{...}, ...]}'
        + (f"; the lists under {', '.join(lists)} look like records: give each its own file" if lists else
           "; for a single record write [{...}], or use .jsonl (one record a line)")
    )


def _json_array(path: Path, w: _Window, pos: int) -> Iterator[tuple[str, object]]:
    """The records of an array whose '[' ends before ``pos``, one ``raw_decode`` at a time."""
    decoder, index, need_comma = json.JSONDecoder(), 0, False
    while True:
        pos = w.skip_space(pos)
        if pos >= len(w.text) - 1 and not w.eof:  # keep at least one character of lookahead
            pos = w.fill(pos)
            continue
        if pos >= len(w.text):
            raise _json_error(path, w, pos, "the file ends before the array is closed with ']' (truncated?)")
        ch = w.text[pos]
        if ch == "]":
            _json_end(path, w, pos + 1)
            return
        if need_comma:
            if ch != ",":
                raise _json_error(path, w, pos, f"expected ',' or ']' after record {index - 1}")
            pos, need_comma = pos + 1, False
            continue
        try:
            rec, end = decoder.raw_decode(w.text, pos)
        except json.JSONDecodeError as e:
            if not w.eof:  # maybe the record is cut by the buffer: read on and retry
                pos = w.fill(pos, max(_CHUNK, len(w.text)))
                continue
            cut = e.pos >= len(w.text.rstrip())
            raise _json_error(path, w, e.pos, f"the file ends inside record {index} (truncated?)" if cut
                              else f"{e.msg} in record {index}") from None
        except RecursionError:
            raise _json_error(path, w, pos, f"record {index} is nested too deeply to read") from None
        yield f"{path} record {index}", rec
        index, pos, need_comma = index + 1, end, True


def _json_end(path: Path, w: _Window, pos: int) -> None:
    """Nothing but white space may follow the array: a second array (a file appended to itself, two
    files concatenated) must not load half the data silently."""
    pos = w.skip_space(pos)
    if pos < len(w.text):
        raise _json_error(path, w, pos, "extra data after the array's closing ']' (two arrays in one file?)")


def iter_csv(path: Path) -> Iterator[tuple[str, object]]:
    csv.field_size_limit(sys.maxsize)
    with _open_text(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return
        for row in reader:
            if None in row:  # more cells than header fields
                yield f"{path} line {reader.line_num}", Bad(
                    f"{path} line {reader.line_num}: {len(row[None])} more cells than the header's "
                    f"{len(reader.fieldnames)} columns (quote fields that contain commas)")
                continue
            yield f"{path} line {reader.line_num}", dict(row)


def iter_txt(path: Path) -> Iterator[tuple[str, object]]:
    """One document a line (empty lines skipped): ``{"text": line}``. A NUL byte means a binary file."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            where = f"{path} line {lineno}"
            if "\x00" in line:
                yield where, Bad(f"{where}: a NUL byte at character {line.index(chr(0)) + 1}; a .txt source is "
                                 "text, one document a line (is this a binary file?)")
            elif line.strip():
                yield where, {"text": line}


def iter_parquet(path: Path) -> Iterator[tuple[str, object]]:
    _need_pyarrow(f"{path}")
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends for damaged files
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            yield f"{path} row {row}", rec
            row += 1


def iter_arrow_stream(path: Path, label: str) -> Iterator[tuple[str, object]]:
    import pyarrow as pa

    row = 0
    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
        for batch in batches:
            for rec in batch.to_pylist():
                yield f"{label} row {row}", rec
                row += 1


READERS = {".json": iter_json, ".jsonl": iter_jsonl, ".csv": iter_csv, ".txt": iter_txt, ".parquet": iter_parquet}


# ---------------------------------------------------------------------------- saved datasets


def is_saved_dataset(path: Path) -> bool:
    """A directory written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict``)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def iter_saved_dataset(path: Path, split: str | None) -> Iterator[tuple[str, object]]:
    """Rows of a ``save_to_disk`` directory, read with pyarrow (the ``datasets`` package is not needed)."""
    _need_pyarrow(f"the saved dataset {path}")
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        chosen = split or "train"
        if chosen not in splits:
            raise DataError(f"{path} is a saved DatasetDict with splits {splits}; there is no split {chosen!r} "
                            "(set split: in the dataset registry entry)")
        path = path / chosen
    elif split is not None and split != "train":
        raise DataError(f"{path} is a saved Dataset (one split); split {split!r} does not apply")
    state = json.loads((path / "state.json").read_text())
    files = [f["filename"] for f in state.get("_data_files", [])]
    if not files:
        raise DataError(f"{path}/state.json lists no data files; save the dataset again with save_to_disk")
    for name in files:
        yield from iter_arrow_stream(path / name, f"{path}/{name}")


# ---------------------------------------------------------------------------- any path


def data_files(path: Path) -> list[Path]:
    """The files a path stands for: itself, or a directory's supported files (sorted, not recursive)."""
    if path.is_file():
        if path.suffix.lower() not in READERS:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)} "
                            "or a directory saved with datasets' save_to_disk")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in READERS)
        if not files:
            raise DataError(f"{path}: the directory holds no {', '.join(SUFFIXES)} files and is not a dataset "
                            "saved with save_to_disk")
        return files
    raise DataError(f"data file {str(path)!r} does not exist")


def iter_source(path: str | Path, split: str | None = None) -> Iterator[tuple[str, object]]:
    """``(where, record)`` for every record behind ``path``; ``record`` may be a ``Bad``."""
    path = Path(path)
    if is_saved_dataset(path):
        yield from iter_saved_dataset(path, split)
        return
    for file in data_files(path):
        yield from READERS[file.suffix.lower()](file)
