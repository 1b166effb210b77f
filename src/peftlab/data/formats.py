"""Read data files into conversations: the one shape every template renders.

A ``Conversation`` is a list of ``{"role": "system"|"user"|"assistant", "content": str}``
messages plus where it came from (``source``: file and record/line), so every later error
can name the record. Formats (first cut; the data issue widens this):

- ``alpaca``: ``instruction`` (str), optional ``input`` (str), ``output`` (str), optional
  ``system`` (str). The user turn is ``instruction`` followed by a newline and ``input``.
- ``messages``: ``messages`` (a list of ``{role, content}``), OpenAI style.
- ``text``: ``text`` (str), for continued pre-training.

Files: ``.json`` (one array of records) and ``.jsonl`` (one record a line).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    messages: list[dict]
    source: str = ""  # e.g. "data.jsonl line 12" or "data.json record 3"
    extra: dict = field(default_factory=dict)

    @property
    def text(self) -> str:  # for the ``text`` format
        return self.messages[0]["content"] if self.messages else ""


@dataclass
class BadRecords:
    """Counts of records skipped with ``data.skip_bad_records`` (and the first few reasons)."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(message)


def iter_raw(path: Path) -> Iterator[tuple[str, object]]:
    """Yield (where, record) from a .json array or a .jsonl file, naming lines on bad JSON."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield f"{path} line {lineno}", json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(
                            f"{path} line {lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                            "each line of a .jsonl file must be one JSON object"
                        ) from None
        elif suffix == ".json":
            text = path.read_text(encoding="utf-8")
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg})") from None
            if isinstance(data, dict):  # a single record, or {"data": [...]}
                data = data.get("data", [data]) if isinstance(data.get("data"), list) else [data]
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
            for i, rec in enumerate(data):
                yield f"{path} record {i}", rec
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use .json or .jsonl")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); re-encode the file as UTF-8") from None


def _field(rec: dict, name: str, where: str, required: bool = True) -> str | None:
    if name not in rec or rec[name] is None:
        if required:
            raise DataError(f"{where}: missing field {name!r} (fields present: {', '.join(rec) or 'none'})")
        return None
    value = rec[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def from_alpaca(rec: dict, where: str) -> Conversation:
    instruction = _field(rec, "instruction", where)
    extra_input = _field(rec, "input", where, required=False) or ""
    output = _field(rec, "output", where)
    system = _field(rec, "system", where, required=False)
    if not instruction.strip() and not extra_input.strip():
        raise DataError(f"{where}: field 'instruction' is empty")
    prompt = f"{instruction}\n{extra_input}" if extra_input.strip() else instruction
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return Conversation(messages, where)


def from_messages(rec: dict, where: str) -> Conversation:
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: messages has no assistant turn, so there is nothing to learn")
    return Conversation(out, where)


def from_text(rec: dict, where: str) -> Conversation:
    text = _field(rec, "text", where)
    return Conversation([{"role": "text", "content": text}], where)


PARSERS = {"alpaca": from_alpaca, "messages": from_messages, "text": from_text}


def detect_format(rec: object, where: str) -> str:
    if isinstance(rec, dict):
        if "messages" in rec:
            return "messages"
        if "instruction" in rec or "output" in rec:
            return "alpaca"
        if "text" in rec:
            return "text"
    keys = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
    raise DataError(
        f"{where}: cannot tell the data format from fields ({keys}); set data.format to one of "
        f"{', '.join(PARSERS)}"
    )


def load_conversations(path: str | Path, fmt: str = "auto", bad: BadRecords | None = None) -> list[Conversation]:
    """All records of a file (or of every .json/.jsonl file in a directory) as conversations.

    With ``bad`` given, malformed records are skipped and counted there; otherwise the first one
    raises a ``DataError`` naming file, record and field.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".json", ".jsonl"))
        if not files:
            raise DataError(f"{path}: directory holds no .json or .jsonl files")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"data.path {str(path)!r} does not exist")
    if fmt != "auto" and fmt not in PARSERS:
        raise DataError(f"data.format {fmt!r} is not one of auto, {', '.join(PARSERS)}")
    out = []
    for file in files:
        for where, rec in iter_raw(file):
            try:
                if not isinstance(rec, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
                kind = detect_format(rec, where) if fmt == "auto" else fmt
                out.append(PARSERS[kind](rec, where))
            except DataError as e:
                if bad is None:
                    raise
                bad.add(str(e))
    if not out:
        raise DataError(f"{path}: no usable records")
    return out
