"""Records -> conversations: the one shape every template renders.

A ``Conversation`` is a list of messages ``{"role", "content"}`` (optionally ``"weight"``, the
loss weight of a trained turn) plus ``tools`` (function schemas the conversation may call) and
``source`` (file and record/line), so every later error can name the record. Roles:

    system     first message only
    user       a prompt
    assistant  an answer                       (trained)
    tool_call  an answer that calls a tool: JSON {"name": ..., "arguments": {...}}   (trained)
    tool       the tool's result, given back to the model

Formats (field names are ours; ``data.columns`` maps them to the file's, e.g.
``{instruction: question, output: answer}``):

- ``alpaca``: ``instruction``, optional ``input`` (appended after a newline), ``output``,
  optional ``system`` and ``history`` (a list of ``[prompt, answer]`` pairs before this one).
- ``sharegpt``: ``conversations``: ``[{from, value}]`` with ``from`` in human / gpt / system /
  function_call / observation (the role names are mappable too: ``columns: {gpt: chatgpt}``),
  optional ``system`` and ``tools`` (a JSON string or list); an optional ``loss_weight`` (or
  ``weight``) per turn.
- ``messages``: OpenAI chat records: ``messages: [{role, content}]`` (roles system/developer,
  user, assistant, tool; ``tool_calls`` on assistant messages; ``weight`` 0/1 per assistant
  message), optional ``tools``.
- ``text``: ``{"text": ...}`` (and every line of a .txt file), for continued pre-training.
- ``preference``: a ``PreferencePair``: a prompt (``prompt`` as a string or messages, or
  ShareGPT ``conversations``, or alpaca ``instruction``/``input``) and the ``chosen`` and
  ``rejected`` answers (strings, one message, or lists of messages).
- ``kto``: a ``LabeledAnswer`` (KTO's unpaired data): the same prompt fields, one ``completion``
  and a boolean ``label`` (true: desirable).

Every check names file, record and field, and says what to do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import DataError
from .sample_types import TypeLabelError, TypeLabels, attach
from .sources import Bad, iter_source

ROLES = ("system", "user", "assistant", "tool_call", "tool")
TRAINED = ("assistant", "tool_call")


@dataclass
class Conversation:
    messages: list[dict]
    source: str = ""  # e.g. "data.jsonl line 12" or "data.json record 3"
    extra: dict = field(default_factory=dict)
    tools: list | None = None  # function schemas, rendered into the system prompt by the template

    @property
    def is_text(self) -> bool:
        return bool(self.messages) and self.messages[0]["role"] == "text"

    @property
    def text(self) -> str:  # for the ``text`` format
        return self.messages[0]["content"] if self.messages else ""


@dataclass
class PreferencePair:
    """A prompt and two answers to it, the chosen one better (for preference training)."""

    prompt: list[dict]  # ends with a user (or tool) message
    chosen: list[dict]  # assistant-side messages
    rejected: list[dict]
    source: str = ""
    tools: list | None = None

    def conversations(self) -> tuple[Conversation, Conversation]:
        return (Conversation(self.prompt + self.chosen, self.source, tools=self.tools),
                Conversation(self.prompt + self.rejected, self.source, tools=self.tools))


@dataclass
class LabeledAnswer:
    """KTO's unpaired example: a prompt and one answer, desirable (``label``) or not."""

    prompt: list[dict]  # ends with a user (or tool) message
    completion: list[dict]  # assistant-side messages
    label: bool
    source: str = ""
    tools: list | None = None


@dataclass
class BadRecords:
    """Counts of records skipped with ``data.skip_bad_records`` (and the first few reasons)."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(message)


# ---------------------------------------------------------------------------- field checks


class Fields:
    """A record seen through a column mapping (our name -> the file's name)."""

    def __init__(self, rec: dict, where: str, columns: dict | None):
        self.rec, self.where, self.columns = rec, where, columns or {}

    def name(self, ours: str) -> str:
        return self.columns.get(ours, ours)

    def get(self, ours: str):
        return self.rec.get(self.name(ours))

    def has(self, ours: str) -> bool:
        return self.rec.get(self.name(ours)) is not None

    def error(self, what: str) -> DataError:
        return DataError(f"{self.where}: {what}")


def check_utf8(value: str, where: str, name: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: field {name!r} holds bytes that are not UTF-8 (at character {e.start}); "
                        "re-encode the file as UTF-8") from None
    return value


def text_field(value, where: str, name: str, required: bool = True, allow_empty: bool = False) -> str | None:
    if value is None:
        if required:
            raise DataError(f"{where}: missing field {name!r}")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__} {_short(value)}")
    check_utf8(value, where, name)
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def list_field(value, where: str, name: str) -> list:
    """A list, or a JSON string holding one (as CSV and parquet files often store them)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: field {name!r} is a string but not a valid JSON list ({e.msg})") from None
    if not isinstance(value, list):
        raise DataError(f"{where}: field {name!r} must be a list, got {type(value).__name__} {_short(value)}")
    if not value:
        raise DataError(f"{where}: field {name!r} is an empty list")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


FLOAT32_MAX = 3.4028234663852886e38


def weight_field(m: dict, where: str, name: str) -> float | None:
    for key in ("loss_weight", "weight"):
        if m.get(key) is not None:
            w = m[key]
            # nan, inf and weights past float32 (1e308) poison the loss; a negative one flips it
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w <= FLOAT32_MAX:
                raise DataError(f"{where}: {name}.{key} must be a number >= 0 (a loss weight, usually 0 or 1), "
                                f"got {_short(w)}")
            return float(w)
    return None


def tools_field(value, where: str, name: str) -> list | None:
    if value is None or (isinstance(value, str) and value.strip() in ("", "[]")) or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: field {name!r} is not valid JSON ({e.msg})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataError(f"{where}: field {name!r} must be a list of function schemas (JSON objects)")
    return value


def tool_call_content(value: str, where: str, name: str) -> str:
    """A tool call as canonical JSON ``{"name": ..., "arguments": {...}}``."""
    try:
        call = json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: {name} is not a JSON tool call ({e.msg}); expected "
                        '{"name": ..., "arguments": {...}}') from None
    if isinstance(call, list):
        if len(call) != 1:
            raise DataError(f"{where}: {name} holds {len(call)} tool calls in one turn; give each call its own "
                            "function_call turn followed by its observation")
        call = call[0]
    if isinstance(call, dict) and "function" in call and isinstance(call["function"], dict):
        call = call["function"]  # OpenAI's {"type": "function", "function": {...}}
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
        raise DataError(f"{where}: {name} must be a JSON object with 'name' and 'arguments'")
    args = call["arguments"]
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: {name}: 'arguments' is a string but not JSON ({e.msg})") from None
    return json.dumps({"name": call["name"], "arguments": args}, ensure_ascii=False)


def check_turns(messages: list[dict], where: str, complete: bool = True, name: str = "the conversation") -> None:
    """The order of roles every template can render.

    system? then turns of: user, then (tool_call, tool)*, then assistant. ``complete`` means
    the conversation must end with a trained turn (for SFT); otherwise with a prompt (for
    preference pairs and generation).
    """
    roles = [m["role"] for m in messages]
    allowed_next = {None: ("user",), "system": ("user",), "user": ("assistant", "tool_call"),
                    "tool_call": ("tool",), "tool": ("assistant", "tool_call"), "assistant": ("user",)}
    prev = None
    for i, role in enumerate(roles):
        if role == "system" and i == 0:
            prev = "system"
            continue
        if role not in allowed_next[prev]:
            expected = " or ".join(allowed_next[prev])
            after = f"after a {prev!r} turn" if prev else "first"
            raise DataError(f"{where}: turn {i} has role {role!r} but {expected} must come {after} "
                            f"(roles: {', '.join(roles)})")
        prev = role
    if complete:
        if not any(r in TRAINED for r in roles):
            raise DataError(f"{where}: {name} has no assistant turn, so there is nothing to learn")
        if prev not in TRAINED:
            raise DataError(f"{where}: the last turn is {prev!r}; the assistant's answer to it is missing "
                            f"(roles: {', '.join(roles)})")
    elif prev not in ("user", "tool"):
        raise DataError(f"{where}: a prompt must end with a user turn, got {prev!r} (roles: {', '.join(roles)})")


# ---------------------------------------------------------------------------- formats


def _alpaca_turns(f: Fields) -> list[dict]:
    instruction = text_field(f.get("instruction"), f.where, f.name("instruction"), allow_empty=True)
    extra = text_field(f.get("input"), f.where, f.name("input"), required=False, allow_empty=True) or ""
    if not instruction.strip() and not extra.strip():
        raise f.error(f"fields {f.name('instruction')!r} and {f.name('input')!r} are both empty")
    system = text_field(f.get("system"), f.where, f.name("system"), required=False, allow_empty=True)
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    if f.has("history"):
        for i, pair in enumerate(list_field(f.get("history"), f.where, f.name("history"))):
            name = f"{f.name('history')}[{i}]"
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise f.error(f"{name} must be a [prompt, answer] pair, got {_short(pair)}")
            messages.append({"role": "user", "content": text_field(pair[0], f.where, name + "[0]")})
            messages.append({"role": "assistant", "content": text_field(pair[1], f.where, name + "[1]")})
    prompt = f"{instruction}\n{extra}" if extra.strip() else instruction
    messages.append({"role": "user", "content": prompt})
    return messages


def from_alpaca(rec: dict, where: str, columns: dict | None = None) -> Conversation:
    f = Fields(rec, where, columns)
    messages = _alpaca_turns(f)
    messages.append({"role": "assistant", "content": text_field(f.get("output"), where, f.name("output"))})
    check_turns(messages, where)
    return Conversation(messages, where)


SHAREGPT_TAGS = {"human": "user", "gpt": "assistant", "system": "system", "function_call": "tool_call",
                 "observation": "tool"}


def _sharegpt_messages(f: Fields, key: str = "conversations") -> list[dict]:
    turns = list_field(f.get(key), f.where, f.name(key))
    role_key, content_key = f.name("from"), f.name("value")
    tags = {f.name(tag): role for tag, role in SHAREGPT_TAGS.items()}
    messages = []
    for i, m in enumerate(turns):
        name = f"{f.name(key)}[{i}]"
        if not isinstance(m, dict):
            raise f.error(f"{name} must be an object with {role_key!r} and {content_key!r}, got {_short(m)}")
        tag = m.get(role_key)
        if tag is None:
            raise f.error(f"{name} has no {role_key!r} (role); fields present: {', '.join(m) or 'none'}")
        if tag not in tags:
            raise f.error(f"{name}.{role_key} is {tag!r}; expected one of {', '.join(tags)} (map other role names "
                          f"with data.columns, e.g. gpt: {tag})")
        content = text_field(m.get(content_key), f.where, f"{name}.{content_key}")
        role = tags[tag]
        if role == "tool_call":
            content = tool_call_content(content, f.where, f"{name}.{content_key}")
        msg = {"role": role, "content": content}
        weight = weight_field(m, f.where, name)
        if weight is not None:
            msg["weight"] = weight
        messages.append(msg)
    system = text_field(f.get("system"), f.where, f.name("system"), required=False, allow_empty=True)
    if system and system.strip() and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _conversation(rec: dict, where: str, columns: dict | None, read_messages, field: str) -> Conversation:
    """A checked Conversation from the messages ``read_messages`` finds in the record's ``field``."""
    f = Fields(rec, where, columns)
    messages = read_messages(f)
    check_turns(messages, where, name=f.name(field))
    return Conversation(messages, where, tools=tools_field(f.get("tools"), where, f.name("tools")))


def from_sharegpt(rec: dict, where: str, columns: dict | None = None) -> Conversation:
    return _conversation(rec, where, columns, _sharegpt_messages, "conversations")


OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def _openai_content(m: dict, where: str, name: str, required: bool = True) -> str | None:
    content = m.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise DataError(f"{where}: {name}.content[{j}] is not a text part ({{type: text, text: ...}}); "
                                "only text is supported")
            parts.append(part["text"])
        content = "".join(parts)
    if content is None and not required:
        return None
    return text_field(content, where, f"{name}.content")


def _openai_messages(f: Fields, key: str = "messages") -> list[dict]:
    turns = list_field(f.get(key), f.where, f.name(key))
    messages = []
    for i, m in enumerate(turns):
        name = f"{f.name(key)}[{i}]"
        if not isinstance(m, dict):
            raise f.error(f"{name} must be an object with role and content, got {_short(m)}")
        role = m.get("role")
        if role is None:
            raise f.error(f"{name} has no 'role'; fields present: {', '.join(m) or 'none'}")
        if role not in OPENAI_ROLES:
            raise f.error(f"{name}.role is {role!r}; expected one of {', '.join(OPENAI_ROLES)}")
        weight = weight_field(m, f.where, name)
        calls = m.get("tool_calls") if role == "assistant" else None
        if calls:
            if not isinstance(calls, list):
                raise f.error(f"{name}.tool_calls must be a list")
            if _openai_content(m, f.where, name, required=False):
                raise f.error(f"{name} has both content and tool_calls; give the text and the call as two turns")
            for j, call in enumerate(calls):
                if j:  # parallel calls: the results must come back between them
                    raise f.error(f"{name} makes {len(calls)} parallel tool calls; give each call its own "
                                  "assistant message followed by its tool result")
                content = tool_call_content(json.dumps(call), f.where, f"{name}.tool_calls[{j}]")
                messages.append({"role": "tool_call", "content": content})
        else:
            messages.append({"role": OPENAI_ROLES[role], "content": _openai_content(m, f.where, name)})
        if weight is not None:
            messages[-1]["weight"] = weight
    return messages


def from_messages(rec: dict, where: str, columns: dict | None = None) -> Conversation:
    return _conversation(rec, where, columns, _openai_messages, "messages")


def from_text(rec: dict, where: str, columns: dict | None = None) -> Conversation:
    f = Fields(rec, where, columns)
    text = text_field(f.get("text"), where, f.name("text"))
    return Conversation([{"role": "text", "content": text}], where)


def _answer(value, f: Fields, key: str) -> list[dict]:
    name = f.name(key)
    if isinstance(value, str) or value is None:
        return [{"role": "assistant", "content": text_field(value, f.where, name)}]
    items = value if isinstance(value, list) else [value]
    out = []
    for i, m in enumerate(items):
        where_name = f"{name}[{i}]" if isinstance(value, list) else name
        if not isinstance(m, dict):
            raise f.error(f"{where_name} must be a string or a message, got {_short(m)}")
        if f.name("from") in m:  # ShareGPT {from, value}
            tag, content = m[f.name("from")], m.get(f.name("value"))
            role = {f.name(t): r for t, r in SHAREGPT_TAGS.items()}.get(tag)
        else:  # OpenAI {role, content}
            tag, content = m.get("role", "assistant"), m.get("content")
            role = OPENAI_ROLES.get(tag)
        if role not in TRAINED:
            raise f.error(f"{where_name} must be an assistant answer, got role {tag!r}")
        content = text_field(content, f.where, f"{where_name}.content")
        if role == "tool_call":
            content = tool_call_content(content, f.where, where_name)
        out.append({"role": role, "content": content})
    return out


def _prompt(f: Fields) -> list[dict]:
    """The prompt of a preference pair or a KTO record: ``prompt`` (a string or messages),
    ShareGPT ``conversations``, OpenAI ``messages`` or alpaca ``instruction``/``input``."""
    if f.has("conversations"):
        prompt = _sharegpt_messages(f)
    elif f.has("messages"):
        prompt = _openai_messages(f)
    elif f.has("prompt"):
        value = f.get("prompt")
        if isinstance(value, list):
            prompt = _openai_messages(f, "prompt")
        else:
            prompt = [{"role": "user", "content": text_field(value, f.where, f.name("prompt"))}]
        system = text_field(f.get("system"), f.where, f.name("system"), required=False, allow_empty=True)
        if system and system.strip() and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": system})
    elif f.has("instruction"):
        prompt = _alpaca_turns(f)
    else:
        raise f.error(f"a preference record needs a prompt: {f.name('prompt')!r}, {f.name('conversations')!r}, "
                      f"{f.name('messages')!r} or {f.name('instruction')!r} (fields present: {', '.join(f.rec)})")
    check_turns(prompt, f.where, complete=False)
    return prompt


def from_preference(rec: dict, where: str, columns: dict | None = None) -> PreferencePair:
    f = Fields(rec, where, columns)
    tools = tools_field(f.get("tools"), where, f.name("tools"))
    prompt = _prompt(f)
    chosen, rejected = _answer(f.get("chosen"), f, "chosen"), _answer(f.get("rejected"), f, "rejected")
    if [m["content"] for m in chosen] == [m["content"] for m in rejected]:
        raise f.error(f"fields {f.name('chosen')!r} and {f.name('rejected')!r} are identical; a preference pair "
                      "needs two different answers (fix or remove the record)")
    return PreferencePair(prompt, chosen, rejected, where, tools)


def from_unpaired(rec: dict, where: str, columns: dict | None = None) -> LabeledAnswer:
    """KTO's unpaired record: a prompt, one ``completion`` and its ``label`` (true = desirable)."""
    f = Fields(rec, where, columns)
    tools = tools_field(f.get("tools"), where, f.name("tools"))
    prompt = _prompt(f)
    completion = _answer(f.get("completion"), f, "completion")
    label = f.get("label")
    if label is None:
        raise f.error(f"missing field {f.name('label')!r}: a KTO record says whether its completion is desirable "
                      f"(true) or undesirable (false); add it, or map the file's field with data.columns")
    if isinstance(label, str) and label.lower() in ("true", "false"):
        label = label.lower() == "true"
    if not isinstance(label, bool) and label not in (0, 1):
        raise f.error(f"field {f.name('label')!r} must be true or false, got {_short(label)}")
    return LabeledAnswer(prompt, completion, bool(label), where, tools)


PARSERS = {"alpaca": from_alpaca, "sharegpt": from_sharegpt, "messages": from_messages, "text": from_text,
           "preference": from_preference, "kto": from_unpaired}


def detect_format(rec: dict, where: str, columns: dict | None = None) -> str:
    f = Fields(rec, where, columns)
    if f.has("chosen") or f.has("rejected"):  # one of them missing: the parser names it
        return "preference"
    if f.has("completion"):  # KTO's unpaired records (a missing label is named by the parser)
        return "kto"
    if f.has("conversations"):
        return "sharegpt"
    if f.has("messages"):
        first = f.get("messages")
        if isinstance(first, list) and first and isinstance(first[0], dict) and "from" in first[0]:
            return "sharegpt_in_messages"
        return "messages"
    if f.has("instruction") or f.has("output"):
        return "alpaca"
    if f.has("text"):
        return "text"
    raise DataError(
        f"{where}: cannot tell the data format from fields ({', '.join(rec) or 'none'}); set data.format to one of "
        f"{', '.join(PARSERS)}, and map differently named fields with data.columns"
    )


def parse_record(rec: object, where: str, fmt: str = "auto", columns: dict | None = None):
    """One raw record -> a Conversation (or a PreferencePair); raises DataError naming the field."""
    if isinstance(rec, Bad):
        raise DataError(rec.message)
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object (a record), got {type(rec).__name__} {_short(rec)}")
    kind = detect_format(rec, where, columns) if fmt == "auto" else fmt
    if kind == "sharegpt_in_messages":
        kind, columns = "sharegpt", {"conversations": "messages", **(columns or {})}
    if kind not in PARSERS:
        raise DataError(f"data.format {kind!r} is not one of auto, {', '.join(PARSERS)}")
    return PARSERS[kind](rec, where, columns)


PLACEHOLDER = re.compile(r"\{\{\s*(name|author)\s*\}\}")


def fill_placeholders(record, values: dict) -> bool:
    """Replace ``{{key}}`` in every message with ``values[key]``; True if {{name}}/{{author}} stay unfilled."""
    if isinstance(record, PreferencePair):
        groups = [record.prompt, record.chosen, record.rejected]
    elif isinstance(record, LabeledAnswer):
        groups = [record.prompt, record.completion]
    else:
        groups = [record.messages]
    unfilled = False
    for messages in groups:
        for m in messages:
            text = m["content"]
            for key, value in values.items():
                text = text.replace("{{" + key + "}}", value)
            m["content"] = text
            unfilled = unfilled or bool(PLACEHOLDER.search(text))
    return unfilled


def read_records(path, fmt: str = "auto", columns: dict | None = None, bad: BadRecords | None = None,
                 split: str | None = None, types: TypeLabels | None = None) -> Iterator:
    """Parsed records of a source, one at a time. Malformed ones raise, or with ``bad`` are counted there.
    With ``types`` each record's type label is read from its column (data/sample_types.py)."""
    if fmt != "auto" and fmt not in PARSERS:
        raise DataError(f"data.format {fmt!r} is not one of auto, {', '.join(PARSERS)}")
    for where, rec in iter_source(path, split):
        try:
            parsed = parse_record(rec, where, fmt, columns)
            if types is not None:
                attach(parsed, rec, where, types)
            yield parsed
        except DataError as e:
            if bad is None:
                raise (TypeLabelError if isinstance(e, TypeLabelError) else DataError)(
                    f"{e} (or skip such records with --skip-bad-records / data.skip_bad_records=true)") from None
            bad.add(str(e))


def load_conversations(path, fmt: str = "auto", bad: BadRecords | None = None,
                       columns: dict | None = None) -> list[Conversation]:
    """All records of a file or directory, in memory."""
    out = list(read_records(path, fmt, columns, bad))
    if not out:
        raise DataError(f"{path}: no usable records")
    return out
