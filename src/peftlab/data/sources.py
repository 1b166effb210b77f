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


def iter_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, Bad(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                                 "each line of a .jsonl file must be one JSON object")


def iter_json(path: Path) -> Iterator[tuple[str, object]]:
    """Records of a JSON array, decoded one at a time (a file may be larger than memory).

    A top-level object is one record, or ``{"data": [...]}`` (read whole).
    """
    decoder = json.JSONDecoder()
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        buf, pos, lines_before, eof = f.read(_CHUNK), 0, 0, False

        def fail(msg: str, at: int):
            line = lines_before + buf.count("\n", 0, at) + 1
            column = at - buf.rfind("\n", 0, at)  # exact unless the line began before the buffer
            raise DataError(f"{path} line {line} column {column}: not valid JSON ({msg}); the file must hold one "
                            "JSON array of records (or use .jsonl, one record a line)")

        def skip_space(p: int) -> int:
            while p < len(buf) and buf[p] in " \t\r\n":
                p += 1
            return p

        pos = skip_space(pos)
        if buf[pos:pos + 1] == "{":  # one object: a record, or {"data": [...]}
            text = buf + f.read()
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None
            records = data["data"] if isinstance(data.get("data"), list) else [data]
            for i, rec in enumerate(records):
                yield f"{path} record {i}", rec
            return
        if buf[pos:pos + 1] != "[":
            if not buf.strip():
                raise DataError(f"{path}: the file is empty; it should hold a JSON array of records")
            fail("expected '[' at the start", pos)
        pos += 1
        index, need_comma = 0, False
        while True:
            pos = skip_space(pos)
            if pos >= len(buf) - 1 and not eof:  # keep at least one character of lookahead
                more = f.read(_CHUNK)
                eof = not more
                lines_before += buf.count("\n", 0, pos)
                buf, pos = buf[pos:] + more, 0
                continue
            if pos >= len(buf):
                fail("the array is not closed with ']'", pos)
            ch = buf[pos]
            if ch == "]":
                # Nothing but white space may follow: a second array (a file appended to itself,
                # two files concatenated) must not load half the data silently.
                pos = skip_space(pos + 1)
                while pos >= len(buf) and not eof:
                    more = f.read(_CHUNK)
                    eof = not more
                    lines_before += buf.count("\n")
                    buf, pos = more, 0
                    pos = skip_space(pos)
                if pos < len(buf):
                    fail("extra data after the array's closing ']' (two arrays in one file?)", pos)
                return
            if need_comma:
                if ch != ",":
                    fail(f"expected ',' or ']' after record {index - 1}", pos)
                pos, need_comma = pos + 1, False
                continue
            try:
                rec, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if not eof:  # maybe the record is cut by the buffer: read on and retry
                    more = f.read(max(_CHUNK, len(buf)))
                    eof = not more
                    lines_before += buf.count("\n", 0, pos)
                    buf, pos = buf[pos:] + more, 0
                    continue
                fail(f"{e.msg} in record {index}", e.pos)
            yield f"{path} record {index}", rec
            index, pos, need_comma = index + 1, end, True


def iter_csv(path: Path) -> Iterator[tuple[str, object]]:
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", errors="surrogateescape", newline="") as f:
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
    """One document a line (empty lines skipped): ``{"text": line}``."""
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield f"{path} line {lineno}", {"text": line}


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
